"""The one config schema: every key, its default and its check, in one place.

Key names follow EveryDream2's train.json so that ED2 users feel at home. A config is read from a JSON
file, then command-line `--key value` pairs override it. Every user error becomes a `ConfigError` whose
message names the key, the value and what would be valid; train.py prints it without a traceback.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from utils import ed2_compat


class ConfigError(ValueError):
    """A user error in a config file or on the command line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CycleStage(_Strict):
    """One stage of a staged cyclic schedule: `cycles` cycles peaking at `lr`."""

    cycles: float = Field(gt=0, description="cycles in this stage (fractions allowed: 1.5 ends on a low point)")
    lr: float = Field(gt=0, description="peak LR of this stage")


class ValidationSettings(_Strict):
    """The validation config (ED2's validation_default.json keys)."""

    validate_training: bool = Field(True, description="master switch for the held-out validation split")
    val_split_mode: Literal["automatic", "manual", "none"] = Field(
        "automatic", description="automatic: hold out a share of data_root; manual: use manual_data_root; none"
    )
    auto_split_proportion: float = Field(0.15, ge=0.0, lt=1.0, description="share of images held out (automatic)")
    manual_data_root: Optional[str] = Field(None, description="folder of validation images (manual mode)")
    seed: int = Field(555, description="seed of the split and of the fixed noise of every validation pass")
    every_n_epochs: float = Field(
        1.0, gt=0, description="validate every N epochs; below 1 (0.5, 0.25) several times per epoch"
    )
    batch_size: Optional[int] = Field(None, ge=1, description="validation batch size (default: batch_size)")
    timesteps: int = Field(
        8, ge=1, le=1000, description="fixed timesteps, spread over the noise schedule, at which every image is scored"
    )
    extra_manual_datasets: dict[str, str] = Field(
        default_factory=dict, description='more validation sets {"name": "folder"}, each logged as loss/<name>'
    )
    stabilize_training_loss: bool = Field(
        False, description="also score a fixed subset of the training images the same way, logged as loss/stabilize-train"
    )
    stabilize_split_proportion: float = Field(0.15, gt=0, le=1, description="share of training images in that subset")

    @model_validator(mode="after")
    def _manual_needs_folder(self) -> "ValidationSettings":
        if self.validate_training and self.val_split_mode == "manual" and not self.manual_data_root:
            raise ValueError("val_split_mode 'manual' needs manual_data_root: the folder of validation images")
        return self

    @property
    def enabled(self) -> bool:
        return self.validate_training and self.val_split_mode != "none"


SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                   "cyclic", "one_cycle")
DEFAULT_MAX_EPOCHS = 300  # ED2's
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd",
                   "coordinate_dowg")


class TrainConfig(_Strict):
    """Every key of a training run. Descriptions feed `--help_keys` and the README key table."""

    _notes: list[str] = PrivateAttr(default_factory=list)

    # --- what to train, where to write ---------------------------------------------------------------
    resume_ckpt: str = Field(
        "tiny", description="base model: a local diffusers folder, a hub id, or 'tiny' (built-in demo model)"
    )
    data_root: str = Field(
        "input", description="folder of training images (recursive; captions from .txt/.caption/.yaml sidecars or the "
        "file name; ED2 per-folder files) or an ED2 JSON manifest"
    )
    project_name: str = Field("myproj", description="names the run folder and checkpoints")
    logdir: str = Field("logs", description="root of the run folders")
    save_ckpt_dir: Optional[str] = Field(
        None, description="also copy the final single-file .safetensors here (default: only inside the run folder)"
    )
    model_cache_dir: Optional[str] = Field(
        None, description="where the tiny model and converted single-file models are cached (default ~/.cache/everycycle)"
    )
    single_file_config: Optional[str] = Field(
        None, description="diffusers folder whose configs describe a single-file resume_ckpt (default: detected SD 1.x / 2.x)"
    )
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = Field(
        None, description="override the model's prediction type (default: from the model; detected for single files)"
    )

    # --- run length and batches ------------------------------------------------------------------------
    batch_size: int = Field(2, ge=1, description="images per micro-batch, all from one aspect bucket")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_epochs: Optional[int] = Field(
        None, ge=1, description="epochs to train (default 300, as ED2); with lr_cycle_stages and no max_epochs or "
        "max_steps, the stages set the run length"
    )
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps (wins over max_epochs)")
    resolution: int = Field(512, ge=64, description="training resolution, a multiple of 64 (buckets keep about this area)")
    seed: int = Field(555, description="global seed (-1: pick one at random and record it)")
    num_workers: int = Field(
        -1, ge=-1, description="DataLoader worker processes: 0 loads images in the main process; -1 (auto): on CUDA "
        "min(8, CPUs per process - 1, batches per epoch), on the CPU 0 (the workers would take the training's cores)"
    )
    prefetch_factor: int = Field(
        2, ge=1, description="batches each DataLoader worker loads ahead (only with workers)"
    )
    cache_latents: bool = Field(
        False, description="encode each image's VAE latent distribution once, before training (per bucket and per "
        "flip that can occur), and reuse it every epoch: no image decoding or VAE encode per step, and the VAE "
        "leaves the GPU while training"
    )
    latent_cache_dir: Optional[str] = Field(
        None, description="with cache_latents: keep the latents in this folder (safetensors, keyed by image content, "
        "bucket, flip and VAE) and reuse them in later runs; null: in memory"
    )
    cache_text_embeddings: bool = Field(
        False, description="with a frozen text encoder and fixed captions (no shuffle_tags): encode each distinct "
        "caption once, before training, and reuse it; the text encoder leaves the GPU while training"
    )

    # --- learning rate ---------------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="learning rate; the peak (upper bound) of cyclic schedules")
    lr_scheduler: str = Field("constant", description="constant, linear, cosine (ED2 semantics), cyclic, one_cycle")
    lr_warmup_steps: Optional[int] = Field(
        None, ge=0, description="linear warmup steps (null: ED2's automatic 2% of lr_decay_steps for linear/cosine, else 0)"
    )
    lr_decay_steps: Optional[int] = Field(
        None, ge=0, description="linear/cosine: steps to reach 0 (null or 0: 1.5 x the run, as ED2); cyclic: the stepsize"
    )
    lr_min: float = Field(0.0, ge=0, description="lower bound of the cyclic schedule")
    lr_stepsize_epochs: Optional[float] = Field(
        None, gt=0, description="cyclic: stepsize as a multiple of the epoch size (Smith's 2-10 rule)"
    )
    lr_cycles: Optional[float] = Field(None, gt=0, description="cyclic: number of cycles over the run (5.5 is exact)")
    lr_cycle_shape: Literal["triangular", "cosine"] = Field("triangular", description="cyclic ramps: linear or half-cosine")
    lr_cycle_start: Literal["low", "high"] = Field(
        "low", description="cyclic: begin at lr_min and rise (the paper) or at lr and fall (the post's ED2 runs)"
    )
    lr_cycle_decay: Literal["none", "triangular2", "exp_range", "stages"] = Field(
        "none", description="cyclic amplitude policy: none, triangular2 (halves each cycle), exp_range, stages"
    )
    lr_gamma: float = Field(1.0, gt=0, le=1, description="exp_range: amplitude x lr_gamma ** step")
    lr_cycle_stages: Optional[list[CycleStage]] = Field(
        None, description='staged decay, e.g. [{"cycles": 3, "lr": 1.13e-6}, {"cycles": 1.5, "lr": 5.65e-7}]'
    )
    lr_end_at_low: bool = Field(False, description="cyclic: shorten or lengthen the run to end on the nearest low point")
    lr_cycle_momentum: bool = Field(False, description="cycle beta1 opposite to the LR (0.95 at the low, 0.85 at the peak)")
    lr_pct_start: float = Field(0.3, gt=0, lt=1, description="one_cycle: share of the run spent rising")
    lr_div_factor: float = Field(25.0, gt=0, description="one_cycle: initial LR = lr / lr_div_factor")
    lr_final_div_factor: float = Field(1e4, gt=0, description="one_cycle: final LR = initial LR / lr_final_div_factor")
    lr_three_phase: bool = Field(False, description="one_cycle: torch's three_phase variant")
    lr_anneal_strategy: Literal["cos", "linear"] = Field("cos", description="one_cycle: cosine or linear ramps")
    text_encoder_lr: Optional[float] = Field(None, gt=0, description="text encoder peak LR (default: lr x text_encoder_lr_scale)")
    text_encoder_lr_min: Optional[float] = Field(
        None, ge=0, description="text encoder lower bound (default: lr_min x text_encoder_lr_scale)"
    )
    text_encoder_lr_scale: float = Field(1.0, gt=0, description="text encoder LRs relative to the UNet's when not given")
    text_encoder_lr_scheduler: Optional[str] = Field(
        None, description="a different schedule for the text encoder (ED2 names only; default: the UNet's, same phase)"
    )
    text_encoder_lr_warmup_steps: Optional[int] = Field(None, ge=0, description="with text_encoder_lr_scheduler: its warmup")
    text_encoder_lr_decay_steps: Optional[int] = Field(None, ge=0, description="with text_encoder_lr_scheduler: its decay steps")

    # --- LR range test (train.py --find_lr) --------------------------------------------------------------
    lr_find_start: float = Field(1e-8, gt=0, description="LR finder: LR of the first step of the sweep")
    lr_find_end: float = Field(1e-4, gt=0, description="LR finder: LR of the last step of the sweep")
    lr_find_ramp: Literal["linear", "exponential"] = Field(
        "exponential", description="LR finder: the LR rises linearly (Smith, the post) or exponentially (fastai)"
    )
    lr_find_steps: Optional[int] = Field(
        None, ge=2, description="LR finder: optimizer steps of the sweep (null: lr_find_epochs, else 200)"
    )
    lr_find_epochs: Optional[float] = Field(None, gt=0, description="LR finder: length of the sweep in epochs")
    lr_find_probe_every: Optional[int] = Field(
        None, ge=1, description="LR finder: measure the probe loss every N steps (null: about 40 probes per sweep)"
    )
    lr_find_probe_images: int = Field(
        8, ge=1, description="LR finder without validation: training images (chosen by seed) the probe scores"
    )
    lr_find_diverge: float = Field(
        3.0, gt=1, description="LR finder: stop when the smoothed probe loss exceeds this factor x its best"
    )

    # --- optimizer -------------------------------------------------------------------------------------
    optimizer: str = Field(
        "adamw8bit", description="adamw (torch), adamw8bit and lion8bit (bitsandbytes), lion (lion-pytorch), prodigy, "
        "dadapt_adam, dadapt_lion, dadapt_sgd, coordinate_dowg"
    )
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (Lion: its two betas)")
    epsilon: float = Field(1e-8, gt=0, description="Adam epsilon")
    clip_grad_norm: Optional[float] = Field(None, gt=0, description="clip the gradient norm of each model to this")
    max_nan_steps: int = Field(
        5, ge=1, description="stop after this many steps in a row with a NaN/inf loss (each one's update is skipped)"
    )
    optimizer_config: Optional[str] = Field(
        None, description="ED2's optimizer.json (base, text_encoder_overrides, text_encoder_freezing); see ED2 section"
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict, description="extra arguments of adaptive optimizers (prodigy, dadapt_*: d0, growth_rate ...)"
    )
    text_encoder_weight_decay: Optional[float] = Field(None, ge=0, description="text encoder weight decay (default: weight_decay)")
    text_encoder_betas: Optional[tuple[float, float]] = Field(None, description="text encoder betas (default: betas)")
    text_encoder_epsilon: Optional[float] = Field(None, gt=0, description="text encoder epsilon (default: epsilon)")
    text_encoder_unfreeze_last_n_layers: Optional[int] = Field(
        None, ge=0, description="train only the last N text encoder layers (and its final norm); null: all"
    )

    # --- what trains, how --------------------------------------------------------------------------------
    disable_textenc_training: bool = Field(False, description="freeze the text encoder")
    disable_unet_training: bool = Field(False, description="freeze the UNet (train the text encoder only; not recommended)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (UNet and text encoder)")
    attn_type: Literal["sdp", "xformers", "slice"] = Field(
        "sdp", description="attention kernel: torch SDPA, xformers (CUDA), or slice (sliced attention, least memory)"
    )
    channels_last: bool = Field(
        False, description="UNet (and the VAE when it encodes every step) in channels_last memory format: faster "
        "convolutions on tensor-core GPUs; no effect on results beyond rounding"
    )
    torch_compile: bool = Field(
        False, description="torch.compile the UNet: faster steps after a first step that compiles for minutes; "
        "checkpoints and states keep plain keys"
    )
    allow_tf32: bool = Field(
        True, description="on CUDA, fp32 matmuls and convolutions (those outside autocast) use TF32 tensor cores; "
        "false: full fp32"
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on CUDA, no on the CPU"
    )
    clip_skip: int = Field(0, ge=0, le=4, description="use the text encoder's n-th last layer (0/1: the last)")
    cond_dropout: float = Field(0.04, ge=0, le=1, description="chance of training a caption as the empty prompt")
    flip_p: float = Field(0.0, ge=0, le=1, description="chance of flipping an image horizontally")
    min_snr_gamma: Optional[float] = Field(None, gt=0, description="Min-SNR loss weighting gamma (5 is usual); null: off")
    zero_frequency_noise_ratio: float = Field(0.02, ge=0, le=1, description="offset noise strength (0: off)")
    pyramid_noise_discount: Optional[float] = Field(
        None, gt=0, lt=1, description="multi-resolution (pyramid) noise with this discount per level (ED2 uses 0.03); null: off"
    )
    enable_zero_terminal_snr: bool = Field(False, description="rescale the noise schedule to zero terminal SNR")
    loss_type: Literal["mse", "huber", "mse_huber", "huber_mse"] = Field(
        "mse", description="mse; huber; mse_huber: Huber at t=0 blending to MSE at t=999 (ED2's code); huber_mse: the reverse"
    )
    timestep_start: int = Field(0, ge=0, le=999, description="lowest training timestep")
    timestep_end: int = Field(1000, ge=1, le=1000, description="training timesteps are drawn from [timestep_start, timestep_end)")
    embedding_perturbation: float = Field(0.0, ge=0, description="Gaussian noise on the text embeddings, std gamma/sqrt(dim)")
    shuffle_tags: bool = Field(False, description="shuffle the comma-separated tags after the first chunk of each caption")
    keep_tags: int = Field(0, ge=0, description="with shuffle_tags: keep the first N tags in place")

    # --- logging, samples, validation, checkpoints ---------------------------------------------------
    log_step: int = Field(25, ge=1, description="log scalars every N optimizer steps")
    sample_prompts: Optional[str] = Field(
        None, description="a .txt (one prompt a line; empty: a few training captions) or an ED2 sample .json "
        "(prompts, negative prompts, seeds, sizes, cfgs, scheduler, steps); null: no samples"
    )
    sample_steps: int = Field(250, ge=1, description="make samples every N optimizer steps")
    sample_every_n_epochs: Optional[float] = Field(
        None, gt=0, description="make samples every N epochs instead (0.5: twice per epoch); wins over sample_steps"
    )
    validation_config: Optional[ValidationSettings] = Field(
        None, description="validation JSON file (ED2 keys) or an inline object; null: validation off"
    )
    save_every_n_epochs: Optional[int] = Field(None, ge=1, description="save a checkpoint every N epochs")
    ckpt_every_n_minutes: Optional[float] = Field(None, gt=0, description="save a checkpoint every N minutes")
    save_ckpts_from_n_epochs: int = Field(0, ge=0, description="no epoch-based checkpoints before this epoch")
    save_full_precision: bool = Field(False, description="single-file checkpoints in fp32 instead of fp16")
    no_save_ckpt: bool = Field(False, description="skip the single-file .safetensors (diffusers folder only)")
    save_state_every_n_minutes: Optional[float] = Field(
        None, gt=0, description="also save a resumable state every N minutes (one is saved with every checkpoint)"
    )
    save_state_keep: int = Field(2, ge=1, description="keep the newest N resumable states of the run")
    resume_from: Optional[str] = Field(
        None, description="continue a run exactly: 'latest' (newest complete state of this project under logdir) "
        "or a state / run folder"
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (nearest: {max(64, round(value / 64) * 64)})")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _one_of(value, SCHEDULER_NAMES)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value.lower() == "adacoor":
            raise ValueError("adacoor is EveryDream2's own optimizer and exists only there; use adamw8bit, prodigy "
                             "or dadapt_adam for an LR-free alternative")
        if value.lower() == "scalar_dowg":
            raise ValueError("scalar_dowg: the dowg package's ScalarDoWG (0.3.1) updates no weights unless the "
                             "loss is passed as a closure, which training does not do; use coordinate_dowg")
        return _one_of(value.lower(), OPTIMIZER_NAMES)

    @field_validator("text_encoder_lr_scheduler")
    @classmethod
    def _known_text_encoder_scheduler(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else _one_of(value, SCHEDULER_NAMES)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g}), the peak of the cycle")
        if self.max_epochs is None and self.max_steps is None and not self.lr_cycle_stages:
            self.__dict__["max_epochs"] = DEFAULT_MAX_EPOCHS
        if self.disable_textenc_training and self.disable_unet_training:
            raise ValueError("disable_unet_training and disable_textenc_training are both true: nothing would train")
        if self.timestep_start >= self.timestep_end:
            raise ValueError(f"timestep_start ({self.timestep_start}) must be below timestep_end ({self.timestep_end})")
        if self.lr_cycle_stages and self.lr_cycle_decay != "stages":
            self.__dict__["lr_cycle_decay"] = "stages"  # giving stages is choosing them; avoid a pointless error
        self._check_caches()
        return self

    def _check_caches(self) -> None:
        """The config-level conditions of the caches (per-image shuffle_tags is checked when the cache is built)."""
        if self.latent_cache_dir and not self.cache_latents:
            raise ValueError("key 'latent_cache_dir': it is used only with cache_latents true; set cache_latents "
                             "true, or leave latent_cache_dir out")
        if self.cache_text_embeddings and self.train_text_encoder:
            raise ValueError("key 'cache_text_embeddings': the text encoder trains (disable_textenc_training is "
                             "false), so its embeddings change every step; set disable_textenc_training true or "
                             "turn cache_text_embeddings off")
        if self.cache_text_embeddings and self.shuffle_tags:
            raise ValueError("key 'cache_text_embeddings': shuffle_tags is on, so the captions change every epoch "
                             "and cannot be encoded once; turn one of them off")

    # --- derived values -------------------------------------------------------------------------------
    @property
    def validation(self) -> ValidationSettings:
        return self.validation_config or ValidationSettings(validate_training=False, val_split_mode="none")

    @property
    def train_text_encoder(self) -> bool:
        return not self.disable_textenc_training

    @property
    def notes(self) -> list[str]:
        """What loading the config noted: ED2 keys accepted but not used, renamed keys."""
        return self._notes


def _one_of(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}{_did_you_mean(value, choices)}")
    return value


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# ---------------------------------------------------------------------------------------------------------
# Reading a config
# ---------------------------------------------------------------------------------------------------------

def read_json_file(path: Path, what: str) -> dict:
    """Read a JSON object from `path`; syntax errors name the line and column."""
    if not path.is_file():
        raise ConfigError(f"{what} file '{path}' does not exist. Give the path of a JSON file.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        line = text.splitlines()[error.lineno - 1] if error.lineno - 1 < len(text.splitlines()) else ""
        raise ConfigError(
            f"{what} file '{path}' is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}:\n"
            f"    {line}\n    {' ' * (error.colno - 1)}^"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file '{path}' must hold a JSON object {{...}}, not a {type(data).__name__}.")
    return data


def parse_cli_value(text: str) -> Any:
    """`--lr 2e-6` gives a float, `--validation_config '{...}'` an object, `--data_root x` a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _resolve_path(value: str, base_dir: Optional[Path]) -> str:
    """Relative paths are taken from the working directory, else from the config file's folder."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return str(path)
    beside_config = base_dir / path
    return str(beside_config) if beside_config.exists() else str(path)


def _check_known_keys(data: dict, model: type[BaseModel], where: str) -> None:
    for key in data:
        if key not in model.model_fields:
            _unknown_key(key, list(model.model_fields), where)


def _unknown_key(key: str, known: list, where: str) -> None:
    raise ConfigError(
        f"Unknown key '{key}' in {where}{_did_you_mean(key, known)}. "
        f"Run `python train.py --help_keys` for every valid key."
    )


def _format_validation_error(error: ValidationError, data: dict, where: str) -> str:
    lines = []
    for issue in error.errors():
        key = ".".join(str(part) for part in issue["loc"]) or "config"
        message = issue["msg"].removeprefix("Value error, ")
        if issue["loc"]:
            value = data.get(issue["loc"][0], issue.get("input"))
            lines.append(f"key '{key}' = {json.dumps(value, default=str)}: {message}")
        else:
            lines.append(message)
    return f"Invalid config ({where}): " + "; ".join(lines) + "."


def load_validation_settings(value: Any, base_dir: Optional[Path], notes: list[str]) -> Optional[dict]:
    """`validation_config` may be a path to a JSON file (as in ED2) or an inline object."""
    if value is None or isinstance(value, dict):
        data, where = value, "validation_config"
    else:
        path = Path(_resolve_path(str(value), base_dir))
        data, where = read_json_file(path, "validation_config"), f"validation config '{path}'"
        base_dir = path.parent
    if data is None:
        return None
    data = {key: value for key, value in ed2_compat.rename_validation_keys(data, notes, where).items()
            if value is not None}
    _check_known_keys(data, ValidationSettings, where)
    if data.get("manual_data_root"):
        data["manual_data_root"] = _resolve_path(data["manual_data_root"], base_dir)
    if data.get("extra_manual_datasets"):
        data["extra_manual_datasets"] = {name: _resolve_path(folder, base_dir)
                                         for name, folder in data["extra_manual_datasets"].items()}
    try:
        return ValidationSettings(**data).model_dump()
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, data, where)) from None


def load_config(config_path: Optional[Path] = None, overrides: Optional[dict] = None) -> TrainConfig:
    """The effective config: JSON file, then command-line overrides, validated as a whole."""
    data: dict = {}
    notes: list[str] = []
    base_dir = None
    if config_path is not None:
        config_path = Path(config_path)
        data = ed2_compat.take_noted_keys(read_json_file(config_path, "config"), notes, f"'{config_path}'")
        base_dir = config_path.parent
        _check_known_keys(data, TrainConfig, f"config file '{config_path}'")
    overrides = ed2_compat.take_noted_keys(overrides or {}, notes, "command line")
    _check_known_keys(overrides, TrainConfig, "the command line")
    # A JSON null means "use the default" (ED2 let nulls beat its defaults and then crashed).
    data = {key: value for key, value in data.items() if value is not None}
    optimizer_file = overrides.get("optimizer_config", data.get("optimizer_config"))
    if optimizer_file:
        data = _merge_optimizer_json(data, Path(_resolve_path(str(optimizer_file), base_dir)), notes)
    data.update(overrides)
    for key in ("data_root", "save_ckpt_dir", "logdir", "sample_prompts", "model_cache_dir", "latent_cache_dir"):
        if isinstance(data.get(key), str):
            data[key] = _resolve_path(data[key], base_dir)
    if isinstance(data.get("resume_ckpt"), str) and data["resume_ckpt"] != "tiny":
        data["resume_ckpt"] = _resolve_path(data["resume_ckpt"], base_dir)  # a hub id stays as it is
    if isinstance(data.get("resume_from"), str) and data["resume_from"] != "latest":
        data["resume_from"] = _resolve_path(data["resume_from"], base_dir)
    if "validation_config" in data:
        data["validation_config"] = load_validation_settings(data["validation_config"], base_dir, notes)
    where = f"config file '{config_path}'" if config_path else "command line"
    try:
        config = TrainConfig(**data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, data, where)) from None
    if config.resume_ckpt == "findlast":
        config.resume_ckpt = find_last_checkpoint(config)
        notes.append(f"resume_ckpt 'findlast': the newest checkpoint of '{config.project_name}' is {config.resume_ckpt}")
    check_paths(config)
    config._notes = notes
    return config


def _merge_optimizer_json(data: dict, path: Path, notes: list[str]) -> dict:
    """ED2's precedence, with its faults fixed: optimizer.json's settings win over train.json's, except `lr`,
    where train.json's wins when given (ED2 issue #102); the command line wins over both."""
    settings = ed2_compat.read_optimizer_json(path, read_json_file, notes, _unknown_key)
    merged = dict(data)
    for key, value in settings.items():
        if key == "lr" and "lr" in data:
            notes.append(f"'lr' {data['lr']:g} from the config wins over optimizer_config's base lr {value:g} (as ED2).")
        elif key == "optimizer_args":
            merged[key] = {**data.get(key, {}), **value}
        else:
            merged[key] = value
    merged["optimizer_config"] = str(path)
    return merged


def find_last_checkpoint(config: TrainConfig) -> str:
    """ED2's `findlast`: the newest complete diffusers checkpoint among this project's runs under logdir."""
    candidates = [
        index.parent for index in Path(config.logdir).glob(f"{config.project_name}-*/ckpts/*/model_index.json")
        if not index.parent.name.startswith(".")  # temporary folders of saves in progress
    ]
    if not candidates:
        raise ConfigError(
            f"key 'resume_ckpt' = 'findlast': no checkpoint of project '{config.project_name}' under logdir "
            f"'{config.logdir}'. Train once first, or give a model path."
        )
    return str(max(candidates, key=lambda folder: (folder / "model_index.json").stat().st_mtime))


def check_paths(config: TrainConfig) -> None:
    """Paths that must exist before anything expensive starts."""
    data_root = Path(config.data_root)
    if not (data_root.is_dir() or (data_root.suffix == ".json" and data_root.is_file())):
        raise ConfigError(
            f"key 'data_root' = '{config.data_root}': no such folder or .json manifest. Give the folder that holds "
            f"your training images (searched recursively for jpg, jpeg, png, webp, bmp), or an ED2 JSON manifest."
        )
    manual = config.validation.manual_data_root
    if config.validation.enabled and config.validation.val_split_mode == "manual" and not Path(manual).is_dir():
        raise ConfigError(f"validation key 'manual_data_root' = '{manual}': no such folder of validation images.")
    if config.sample_prompts and not Path(config.sample_prompts).is_file():
        raise ConfigError(
            f"key 'sample_prompts' = '{config.sample_prompts}': no such file. Give a .txt with one prompt a line, "
            f"an ED2 sample .json, or null for no samples."
        )


def key_table_markdown() -> str:
    """The README's table of every key, generated from the schema so the two cannot drift apart."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for model, prefix in ((TrainConfig, ""), (ValidationSettings, "validation_config.")):
        for name, field in model.model_fields.items():
            value = field.get_default(call_default_factory=True)
            default = json.dumps(value, default=str) if value is not None else "null"
            rows.append(f"| `{prefix}{name}` | `{default}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(key_table_markdown())
