"""The one config schema: every key, its default and its check, in one place.

Key names follow EveryDream2's train.json so that ED2 users feel at home. A config is read from a JSON
file, then command-line `--key value` pairs override it. Every user error becomes a `ConfigError` whose
message names the key, the value and what would be valid; train.py prints it without a traceback.
"""

from __future__ import annotations

import codecs
import difflib
import importlib.util
import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
    manual_data_root: str | None = Field(None, description="folder of validation images (manual mode)")
    seed: int = Field(555, description="seed of the split and of the fixed noise of every validation pass")
    every_n_epochs: float = Field(
        1.0, gt=0, description="validate every N epochs; below 1 (0.5, 0.25) several times per epoch"
    )
    batch_size: int | None = Field(None, ge=1, description="validation batch size (default: batch_size)")
    timesteps: int = Field(
        8, ge=1, le=1000, description="fixed timesteps, spread over the noise schedule, at which every image is scored"
    )
    extra_manual_datasets: dict[str, str] = Field(
        default_factory=dict, description='more validation sets {"name": "folder"}, each logged as loss/<name>'
    )
    stabilize_training_loss: bool = Field(
        False,
        description="also score a fixed subset of the training images the same way, logged as loss/stabilize-train",
    )
    stabilize_split_proportion: float = Field(0.15, gt=0, le=1, description="share of training images in that subset")

    @model_validator(mode="after")
    def _manual_needs_folder(self) -> ValidationSettings:
        if self.validate_training and self.val_split_mode == "manual" and not self.manual_data_root:
            raise ValueError("val_split_mode 'manual' needs manual_data_root: the folder of validation images")
        return self

    @property
    def enabled(self) -> bool:
        return self.validate_training and self.val_split_mode != "none"


# The LR schedules, named here once (optimizer/schedules.py builds them). The first six are ED2's: diffusers'
# get_scheduler names, with ED2's semantics.
ED2_SCHEDULE_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SCHEDULE_NAMES = ED2_SCHEDULE_NAMES + ("cyclic", "one_cycle")
DEFAULT_MAX_EPOCHS = 300  # ED2's
SDXL_RESOLUTION = 1024  # the default resolution of an SDXL model (SD 1.x/2.x: the key's default, 512)
# The longest run accepted, in optimizer steps. A fine-tune of SD takes thousands to a few hundred thousand steps
# (the base model's whole 512 px training took about 1.4 million); 10 million is weeks to months of nonstop
# compute at the fastest step rates, so a longer run is a typo (a few zeros too many), and refusing it keeps the
# per-step work outside the training loop, such as the schedule preview, bounded.
MAX_STEPS = 10_000_000
OPTIMIZER_NAMES = (
    "adamw",
    "adamw8bit",
    "lion",
    "lion8bit",
    "prodigy",
    "dadapt_adam",
    "dadapt_lion",
    "dadapt_sgd",
    "coordinate_dowg",
    "adafactor",
)
# Optimizers whose update of a parameter depends on that parameter alone, so that one optimizer per parameter
# (fused_backward_pass, stochastic_rounding: optimizer/per_parameter.py) updates as the one optimizer does. Prodigy,
# D-Adaptation and DoWG estimate their step size from sums over all parameters.
PER_PARAMETER_OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit", "adafactor")


class TrainConfig(_Strict):
    """Every key of a training run. Descriptions feed `--help_keys` and the README key table."""

    _notes: list[str] = PrivateAttr(default_factory=list)
    _from_ed2: bool = PrivateAttr(default=False)
    _source: tuple[Path | None, dict] = PrivateAttr(default=(None, {}))  # (config file, command-line overrides)

    # --- what to train, where to write ---------------------------------------------------------------
    resume_ckpt: str = Field(
        "tiny",
        description="base model: a local diffusers folder, a single .safetensors/.ckpt file, a hub id, 'tiny' / "
        "'tiny-sdxl' (built-in demo models), 'tiny-pretrained' (a small model pretrained on drawn shapes, "
        "docs/tiny-models.md), or 'random:sd15' / 'random:sd21' (the real architecture with random weights, "
        "nothing downloaded)",
    )
    data_root: str = Field(
        "input",
        description="folder of training images (recursive; captions from .txt/.caption/.yaml sidecars or the "
        "file name; ED2 per-folder files) or an ED2 JSON manifest",
    )
    project_name: str = Field("myproj", description="names the run folder and checkpoints")
    logdir: str = Field("logs", description="root of the run folders")
    save_ckpt_dir: str | None = Field(
        None, description="also copy the final single-file .safetensors here (default: only inside the run folder)"
    )
    model_cache_dir: str | None = Field(
        None,
        description="where the tiny model and converted single-file models are cached (default ~/.cache/everycycle)",
    )
    single_file_config: str | None = Field(
        None,
        description="diffusers folder whose configs describe a single-file resume_ckpt (default: detected SD 1.x/2.x/"
        "SDXL)",
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        None, description="override the model's prediction type (default: from the model; detected for single files)"
    )
    vae_path: str | None = Field(
        None,
        description="replace the model's VAE with this diffusers AutoencoderKL (a folder with config.json, or a hub "
        "id), e.g. SDXL's fp16-fix VAE; checkpoints then hold it",
    )

    # --- run length and batches ------------------------------------------------------------------------
    batch_size: int = Field(2, ge=1, description="images per micro-batch, all from one aspect bucket")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_epochs: int | None = Field(
        None,
        ge=1,
        description="epochs to train (default 300, as ED2); with lr_cycle_stages and no max_epochs or "
        "max_steps, the stages set the run length",
    )
    max_steps: int | None = Field(
        None, ge=1, description=f"stop after this many optimizer steps (wins over max_epochs; at most {MAX_STEPS:,})"
    )
    rated_dataset: bool = Field(
        False,
        description="ED2's rated data set: from epoch 3 each epoch trains a falling share of the images, each once "
        "(no multiplied copies), picked with a chance in proportion to each image's `rating` (default 1); needs "
        "max_epochs, over which the share falls",
    )
    rated_dataset_target_dropout_percent: float = Field(
        50,
        ge=0,
        le=100,
        description="with rated_dataset: the share falls by (100 - this)% / max_epochs an epoch, as ED2 "
        "(the last epoch trains 60% at 50 over 10 epochs; 100: no fall)",
    )
    resolution: int = Field(
        512,
        ge=64,
        description=f"training resolution, a multiple of 64 (buckets keep about this area); not given: "
        f"{SDXL_RESOLUTION} for an SDXL resume_ckpt",
    )
    seed: int = Field(555, description="global seed (-1: pick one at random and record it)")
    num_workers: int = Field(
        -1,
        ge=-1,
        description="DataLoader worker processes: 0 loads images in the main process; -1 (auto): on CUDA "
        "min(8, CPUs per process - 1, batches per epoch), on the CPU 0 (the workers would take the training's cores)",
    )
    prefetch_factor: int = Field(2, ge=1, description="batches each DataLoader worker loads ahead (only with workers)")
    cache_latents: bool = Field(
        False,
        description="encode each image's VAE latent distribution once, before training (per bucket and per "
        "flip that can occur), and reuse it every epoch: no image decoding or VAE encode per step, and the VAE "
        "leaves the GPU while training",
    )
    latent_cache_dir: str | None = Field(
        None,
        description="with cache_latents: keep the latents in this folder (safetensors, keyed by image content, "
        "bucket, flip and VAE) and reuse them in later runs; null: in memory",
    )
    cache_text_embeddings: bool = Field(
        False,
        description="with a frozen text encoder and fixed captions (no shuffle_tags): encode each distinct "
        "caption once, before training, and reuse it; the text encoder leaves the GPU while training",
    )

    # --- learning rate ---------------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="learning rate; the peak (upper bound) of cyclic schedules")
    lr_scheduler: str = Field("constant", description="constant, linear, cosine (ED2 semantics), cyclic, one_cycle")
    lr_warmup_steps: int | None = Field(
        None,
        ge=0,
        description="linear warmup steps (null: ED2's automatic 2% of lr_decay_steps for linear/cosine, else 0)",
    )
    lr_decay_steps: int | None = Field(
        None,
        ge=0,
        description="linear/cosine: steps to reach 0 (null or 0: 1.5 x the run, as ED2); cyclic: the stepsize",
    )
    lr_min: float = Field(0.0, ge=0, description="lower bound of the cyclic schedule")
    lr_stepsize_epochs: float | None = Field(
        None, gt=0, description="cyclic: stepsize as a multiple of the epoch size (Smith's 2-10 rule)"
    )
    lr_cycles: float | None = Field(None, gt=0, description="cyclic: number of cycles over the run (5.5 is exact)")
    lr_cycle_shape: Literal["triangular", "cosine"] = Field(
        "triangular", description="cyclic ramps: linear or half-cosine"
    )
    lr_cycle_start: Literal["low", "high"] = Field(
        "low", description="cyclic: begin at lr_min and rise (the paper) or at lr and fall (the post's ED2 runs)"
    )
    lr_cycle_decay: Literal["none", "triangular2", "exp_range", "stages"] = Field(
        "none", description="cyclic amplitude policy: none, triangular2 (halves each cycle), exp_range, stages"
    )
    lr_gamma: float = Field(1.0, gt=0, le=1, description="exp_range: amplitude x lr_gamma ** step")
    lr_cycle_stages: list[CycleStage] | None = Field(
        None, description='staged decay, e.g. [{"cycles": 3, "lr": 1.13e-6}, {"cycles": 1.5, "lr": 5.65e-7}]'
    )
    lr_end_at_low: bool = Field(
        False, description="cyclic: shorten or lengthen the run to end on the nearest low point"
    )
    lr_cycle_momentum: bool = Field(
        False, description="cycle beta1 opposite to the LR (0.95 at the low, 0.85 at the peak)"
    )
    lr_pct_start: float = Field(0.3, gt=0, lt=1, description="one_cycle: share of the run spent rising")
    lr_div_factor: float = Field(25.0, gt=0, description="one_cycle: initial LR = lr / lr_div_factor")
    lr_final_div_factor: float = Field(1e4, gt=0, description="one_cycle: final LR = initial LR / lr_final_div_factor")
    lr_three_phase: bool = Field(False, description="one_cycle: torch's three_phase variant")
    lr_anneal_strategy: Literal["cos", "linear"] = Field("cos", description="one_cycle: cosine or linear ramps")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="text encoder peak LR (default: lr x text_encoder_lr_scale)"
    )
    text_encoder_lr_min: float | None = Field(
        None, ge=0, description="text encoder lower bound (default: lr_min x text_encoder_lr_scale)"
    )
    text_encoder_lr_scale: float = Field(
        1.0, gt=0, description="text encoder LRs relative to the UNet's when not given"
    )
    text_encoder_lr_scheduler: str | None = Field(
        None, description="a different schedule for the text encoder (ED2 names only; default: the UNet's, same phase)"
    )
    text_encoder_lr_warmup_steps: int | None = Field(
        None, ge=0, description="with text_encoder_lr_scheduler: its warmup"
    )
    text_encoder_lr_decay_steps: int | None = Field(
        None, ge=0, description="with text_encoder_lr_scheduler: its decay steps"
    )
    text_encoder_2_lr: float | None = Field(
        None,
        gt=0,
        description="SDXL's second text encoder (train_text_encoder_2): its peak LR (default: lr x "
        "text_encoder_2_lr_scale; with none of text_encoder_2_lr / _lr_min / _lr_scale given, the first text "
        "encoder's LRs)",
    )
    text_encoder_2_lr_min: float | None = Field(
        None,
        ge=0,
        description="second text encoder lower bound (default: lr_min x text_encoder_2_lr_scale; see "
        "text_encoder_2_lr)",
    )
    text_encoder_2_lr_scale: float | None = Field(
        None,
        gt=0,
        description="second text encoder LRs relative to the UNet's when not given (null: 1; see text_encoder_2_lr)",
    )
    text_encoder_2_lr_scheduler: str | None = Field(
        None,
        description="a different schedule for the second text encoder (ED2 names only; default: "
        "text_encoder_lr_scheduler)",
    )
    text_encoder_2_lr_warmup_steps: int | None = Field(
        None, ge=0, description="with a separate second text encoder schedule: its warmup (default: the first's)"
    )
    text_encoder_2_lr_decay_steps: int | None = Field(
        None, ge=0, description="with a separate second text encoder schedule: its decay steps (default: the first's)"
    )

    # --- LR range test (train.py --find_lr) --------------------------------------------------------------
    lr_find_start: float = Field(1e-8, gt=0, description="LR finder: LR of the first step of the sweep")
    lr_find_end: float = Field(1e-4, gt=0, description="LR finder: LR of the last step of the sweep")
    lr_find_ramp: Literal["linear", "exponential"] = Field(
        "exponential", description="LR finder: the LR rises linearly (Smith, the post) or exponentially (fastai)"
    )
    lr_find_steps: int | None = Field(
        None, ge=2, description="LR finder: optimizer steps of the sweep (null: lr_find_epochs, else 200)"
    )
    lr_find_epochs: float | None = Field(None, gt=0, description="LR finder: length of the sweep in epochs")
    lr_find_probe_every: int | None = Field(
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
        "adamw8bit",
        description="adamw (torch), adamw8bit and lion8bit (bitsandbytes), lion (lion-pytorch), prodigy, "
        "dadapt_adam, dadapt_lion, dadapt_sgd, coordinate_dowg, adafactor (transformers; our schedule sets its LR: "
        "relative_step, scale_parameter and warmup_init are off)",
    )
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas (Lion: its two betas)")
    epsilon: float = Field(1e-8, gt=0, description="Adam epsilon")
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the gradient norm of each model to this")
    max_nan_steps: int = Field(
        5, ge=1, description="stop after this many steps in a row with a NaN/inf loss (each one's update is skipped)"
    )
    optimizer_config: str | None = Field(
        None,
        description="ED2's optimizer.json (base, text_encoder_overrides, text_encoder_freezing; for SDXL's second "
        "text encoder also text_encoder_2_overrides, text_encoder_2_freezing); see ED2 section",
    )
    optimizer_args: dict[str, Any] = Field(
        default_factory=dict,
        description="extra arguments of adaptive optimizers (prodigy, dadapt_*: d0, growth_rate ...)",
    )
    text_encoder_weight_decay: float | None = Field(
        None, ge=0, description="text encoder weight decay (default: weight_decay)"
    )
    text_encoder_betas: tuple[float, float] | None = Field(None, description="text encoder betas (default: betas)")
    text_encoder_epsilon: float | None = Field(None, gt=0, description="text encoder epsilon (default: epsilon)")
    text_encoder_unfreeze_last_n_layers: int | None = Field(
        None, ge=0, description="train only the last N text encoder layers (and its final norm); null: all"
    )
    text_encoder_2_weight_decay: float | None = Field(
        None, ge=0, description="second text encoder weight decay (default: the first text encoder's)"
    )
    text_encoder_2_betas: tuple[float, float] | None = Field(
        None, description="second text encoder betas (default: the first text encoder's)"
    )
    text_encoder_2_epsilon: float | None = Field(
        None, gt=0, description="second text encoder epsilon (default: the first text encoder's)"
    )
    text_encoder_2_unfreeze_last_n_layers: int | None = Field(
        None,
        ge=0,
        description="train only the last N layers of the second text encoder (and its final norm and projection); "
        "null: all (not the first's: SDXL's encoders have 12 and 32 layers)",
    )

    # --- what trains, how --------------------------------------------------------------------------------
    disable_textenc_training: bool = Field(False, description="freeze the text encoder")
    train_text_encoder_2: bool = Field(
        False,
        description="SDXL: also train the second text encoder (OpenCLIP ViT-bigG and its projection), in a param "
        "group of its own (text_encoder_2_* keys); SD 1.x/2.x have none",
    )
    disable_unet_training: bool = Field(
        False, description="freeze the UNet (train the text encoder only; not recommended)"
    )
    gradient_checkpointing: bool = Field(
        False, description="trade compute for memory (UNet and the trained text encoders)"
    )
    attn_type: Literal["sdp", "xformers", "slice"] = Field(
        "sdp", description="attention kernel: torch SDPA, xformers (CUDA), or slice (sliced attention, least memory)"
    )
    channels_last: bool = Field(
        False,
        description="UNet (and the VAE when it encodes every step) in channels_last memory format: faster "
        "convolutions on tensor-core GPUs; no effect on results beyond rounding",
    )
    torch_compile: bool = Field(
        False,
        description="torch.compile the UNet: faster steps after a first step that compiles for minutes; "
        "checkpoints and states keep plain keys",
    )
    deterministic: bool = Field(
        False,
        description="deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS's fixed workspace): a "
        "resumed run ends bit-equal to the run left alone on a GPU too; slower",
    )
    allow_tf32: bool = Field(
        True,
        description="on CUDA, fp32 matmuls and convolutions (those outside autocast) use TF32 tensor cores; "
        "false: full fp32",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp16 on CUDA, no on the CPU"
    )
    weight_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the trained weights: fp32 (master weights; autocast computes in mixed_precision) or "
        "bf16 (half the weight and gradient memory, no fp32 copy; use with stochastic_rounding)",
    )
    stochastic_rounding: bool = Field(
        False,
        description="with weight_dtype bf16: each update is computed in fp32 and rounded to bf16 stochastically "
        "(unbiased), so updates smaller than a bf16 step are not lost; per-parameter optimizer steps",
    )
    fused_backward_pass: bool = Field(
        False,
        description="update each parameter as soon as its gradient is ready in the backward and free that gradient "
        "(no full gradient buffer); needs grad_accum 1, no clip_grad_norm, one process and a per-parameter "
        "optimizer (adamw, adamw8bit, lion, lion8bit, adafactor)",
    )
    clip_skip: int = Field(
        0,
        ge=0,
        le=4,
        description="use the text encoder's n-th last layer (0/1: the last; SDXL: both encoders', 0-2: the "
        "penultimate, as SDXL was trained)",
    )
    cond_dropout: float = Field(0.04, ge=0, le=1, description="chance of training a caption as the empty prompt")
    flip_p: float = Field(0.0, ge=0, le=1, description="chance of flipping an image horizontally")
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (5 is usual); null: off")
    zero_frequency_noise_ratio: float = Field(0.02, ge=0, le=1, description="offset noise strength (0: off)")
    pyramid_noise_discount: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="multi-resolution (pyramid) noise with this discount per level (ED2 uses 0.03); null: off",
    )
    enable_zero_terminal_snr: bool = Field(False, description="rescale the noise schedule to zero terminal SNR")
    loss_type: Literal["mse", "huber", "mse_huber", "huber_mse"] = Field(
        "mse",
        description="mse; huber; mse_huber: Huber at t=0 blending to MSE at t=999 (ED2's code); huber_mse: the reverse",
    )
    timestep_start: int = Field(0, ge=0, le=999, description="lowest training timestep")
    timestep_end: int = Field(
        1000, ge=1, le=1000, description="training timesteps are drawn from [timestep_start, timestep_end)"
    )
    embedding_perturbation: float = Field(
        0.0, ge=0, description="Gaussian noise on the text embeddings, std gamma/sqrt(dim)"
    )
    shuffle_tags: bool = Field(
        False, description="shuffle the comma-separated tags after the first chunk of each caption"
    )
    keep_tags: int = Field(0, ge=0, description="with shuffle_tags: keep the first N tags in place")

    # --- logging, samples, validation, checkpoints ---------------------------------------------------
    log_step: int = Field(25, ge=1, description="log scalars every N optimizer steps")
    sample_prompts: str | None = Field(
        None,
        description="a .txt (one prompt a line; empty: a few training captions) or an ED2 sample .json "
        "(prompts, negative prompts, seeds, sizes, cfgs, scheduler, steps); null: no samples",
    )
    sample_steps: int = Field(250, ge=1, description="make samples every N optimizer steps")
    sample_every_n_epochs: float | None = Field(
        None, gt=0, description="make samples every N epochs instead (0.5: twice per epoch); wins over sample_steps"
    )
    validation_config: ValidationSettings | None = Field(
        None, description="validation JSON file (ED2 keys) or an inline object; null: validation off"
    )
    save_every_n_epochs: int | None = Field(None, ge=1, description="save a checkpoint every N epochs")
    stop_when_val_rises: int | None = Field(
        None,
        ge=1,
        description="early stopping: each new lowest validation loss is saved as a checkpoint (replacing the "
        "previous such one), and the run ends after N validations in a row above it; null: off",
    )
    ckpt_every_n_minutes: float | None = Field(None, gt=0, description="save a checkpoint every N minutes")
    save_ckpts_from_n_epochs: int = Field(0, ge=0, description="no epoch-based checkpoints before this epoch")
    save_full_precision: bool = Field(False, description="single-file checkpoints in fp32 instead of fp16")
    no_save_ckpt: bool = Field(False, description="skip the single-file .safetensors (diffusers folder only)")
    save_state_every_n_minutes: float | None = Field(
        None, gt=0, description="also save a resumable state every N minutes (one is saved with every checkpoint)"
    )
    save_state_keep: int = Field(2, ge=1, description="keep the newest N resumable states of the run")
    resume_from: str | None = Field(
        None,
        description="continue a run exactly: 'latest' (newest complete state of this project under logdir) "
        "or a state / run folder",
    )
    # --- EMA (ED2's keys and meanings: its doc/ADVANCED_TWEAKING.md) -----------------------------------
    ema_decay_rate: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an EMA of the trained weights: ema = rate x ema + (1 - rate) x weights at each update "
        "(0.999-0.9999 at interval 1); null: off",
    )
    ema_strength_target: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="EMA on, its decay computed so that decay^(updates of the run) equals this (0.01-0.15); "
        "overrides ema_decay_rate",
    )
    ema_update_interval: int = Field(500, ge=1, description="update the EMA every N optimizer steps (ED2: 500)")
    ema_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where the EMA is kept: cpu (slower updates, no GPU memory) or cuda (the training GPU)"
    )
    ema_sample_nonema_model: bool = Field(False, description="with EMA: samples of the trained weights too")
    ema_sample_ema_model: bool = Field(
        False, description="with EMA: samples of the EMA (the EMA samples when neither ema_sample_* key is set)"
    )
    ema_resume_model: str | None = Field(
        None,
        description="start the EMA from this model (diffusers folder or .safetensors) instead of the base; "
        "'findlast': the newest *_ema checkpoint under logdir",
    )
    ema_validate: bool = Field(False, description="with EMA: also the EMA's validation loss (loss/val_ema)")
    # --- extensions (ED2's keys) ---------------------------------------------------------------------------
    plugins: list[str] = Field(
        default_factory=list,
        description="ED2 plugins to load, as module.Class (e.g. plugins.example_plugin.EpochAnnouncer); searched in "
        "EveryCycle's plugins/ and a plugins/ folder next to the config",
    )
    load_settings_every_epoch: bool = Field(
        False, description="re-read the config file before each epoch; the keys that can change mid-run take effect"
    )
    wandb: bool = Field(False, description="also log metrics and sample grids to Weights & Biases (pip install wandb)")

    @field_validator("project_name")
    @classmethod
    def _plain_folder_name(cls, value: str) -> str:
        problem = folder_name_problem(value)
        if problem:
            raise ValueError(
                f"must be a plain folder name ({problem}): it names the run folders <logdir>/<project_name>-<date>-"
                f"<time>. Use a name such as 'my_style_v2': not '.' or '..', without / \\ : * ? \" < > | or control "
                f"characters, and not starting with '-' or a space"
            )
        return value

    @field_validator("logdir", "data_root")
    @classmethod
    def _names_a_folder(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip():
            raise ValueError(f"is empty: give a folder (an empty {info.field_name} would be the working directory)")
        return value

    @field_validator("max_steps", "max_epochs")
    @classmethod
    def _possible_length(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value > MAX_STEPS:
            unit = "steps" if info.field_name == "max_steps" else "epochs (an epoch is one optimizer step or more)"
            raise ValueError(
                f"must be at most {MAX_STEPS:,} {unit}: the longest run accepted is {MAX_STEPS:,} "
                f"optimizer steps, weeks to months of nonstop compute, so a longer one is a typo"
            )
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError(f"must be a multiple of 64 (nearest: {max(64, round(value / 64) * 64)})")
        return value

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _one_of(value, SCHEDULE_NAMES)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value.lower() == "adacoor":
            raise ValueError(
                "adacoor is EveryDream2's own optimizer and exists only there; use adamw8bit, prodigy "
                "or dadapt_adam for an LR-free alternative"
            )
        if value.lower() == "scalar_dowg":
            raise ValueError(
                "scalar_dowg: the dowg package's ScalarDoWG (0.3.1) updates no weights unless the "
                "loss is passed as a closure, which training does not do; use coordinate_dowg"
            )
        return _one_of(value.lower(), OPTIMIZER_NAMES)

    @field_validator("text_encoder_lr_scheduler", "text_encoder_2_lr_scheduler")
    @classmethod
    def _known_text_encoder_scheduler(cls, value: str | None) -> str | None:
        return None if value is None else _one_of(value, SCHEDULE_NAMES)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.lr_min > self.lr:
            raise ValueError(f"lr_min ({self.lr_min:g}) must not exceed lr ({self.lr:g}), the peak of the cycle")
        if self.max_epochs is None and self.max_steps is None and not self.lr_cycle_stages:
            self.__dict__["max_epochs"] = DEFAULT_MAX_EPOCHS
        if self.rated_dataset and self.max_epochs is None:
            raise ValueError(
                "key 'rated_dataset': the share of images an epoch trains falls over max_epochs epochs, so "
                "max_epochs must be given (max_steps may still set the run length)"
            )
        if self.disable_textenc_training and self.disable_unet_training and not self.train_text_encoder_2:
            raise ValueError("disable_unet_training and disable_textenc_training are both true: nothing would train")
        if self.timestep_start >= self.timestep_end:
            raise ValueError(f"timestep_start ({self.timestep_start}) must be below timestep_end ({self.timestep_end})")
        if self.lr_cycle_stages and self.lr_cycle_decay != "stages":
            self.__dict__["lr_cycle_decay"] = "stages"  # giving stages is choosing them; avoid a pointless error
        if self.stop_when_val_rises and not self.validation.enabled:
            raise ValueError(
                f"key 'stop_when_val_rises' = {self.stop_when_val_rises}: it watches the validation loss, and "
                f"validation is off; give a validation_config with a split, or set stop_when_val_rises null"
            )
        self._check_caches()
        self._check_memory_recipes()
        return self

    def _check_caches(self) -> None:
        """The config-level conditions of the caches (per-image shuffle_tags is checked when the cache is built)."""
        if self.latent_cache_dir and not self.cache_latents:
            raise ValueError(
                "key 'latent_cache_dir': it is used only with cache_latents true; set cache_latents "
                "true, or leave latent_cache_dir out"
            )
        if self.cache_text_embeddings and self.train_text_encoder:
            raise ValueError(
                "key 'cache_text_embeddings': the text encoder trains (disable_textenc_training is "
                "false), so its embeddings change every step; set disable_textenc_training true or "
                "turn cache_text_embeddings off"
            )
        if self.cache_text_embeddings and self.train_text_encoder_2:
            raise ValueError(
                "key 'cache_text_embeddings': SDXL's second text encoder trains (train_text_encoder_2 is true), so "
                "its embeddings change every step; set train_text_encoder_2 false or turn cache_text_embeddings off"
            )
        if self.cache_text_embeddings and self.shuffle_tags:
            raise ValueError(
                "key 'cache_text_embeddings': shuffle_tags is on, so the captions change every epoch "
                "and cannot be encoded once; turn one of them off"
            )

    def _check_memory_recipes(self) -> None:
        """What fused_backward_pass, bf16 weights and stochastic rounding need of the rest of the config (the
        process count and the resolved mixed precision are checked when the model is placed, trainer/setup.py)."""
        if self.fused_backward_pass and self.grad_accum > 1:
            raise ValueError(
                f"key 'fused_backward_pass': grad_accum is {self.grad_accum}, but the fused pass updates each weight "
                f"during the backward of every micro-batch, and holding the gradients over micro-batches would need "
                f"the full gradient buffer it exists to save. Use grad_accum 1 (raise batch_size, with "
                f"gradient_checkpointing if it does not fit), or turn fused_backward_pass off"
            )
        if self.fused_backward_pass and self.clip_grad_norm:
            raise ValueError(
                "key 'fused_backward_pass': clip_grad_norm needs the norm of all gradients before any weight "
                "changes, and the fused pass updates each weight as soon as its own gradient is ready. Set "
                "clip_grad_norm null, or turn fused_backward_pass off"
            )
        for key in ("fused_backward_pass", "stochastic_rounding"):
            if getattr(self, key) and self.optimizer not in PER_PARAMETER_OPTIMIZERS:
                raise ValueError(
                    f"key '{key}': it steps one optimizer per parameter, and optimizer '{self.optimizer}' computes "
                    f"its step size from all parameters together, so it would train differently. Use one of "
                    f"{', '.join(PER_PARAMETER_OPTIMIZERS)}"
                )
        if self.stochastic_rounding and self.weight_dtype != "bf16":
            raise ValueError(
                "key 'stochastic_rounding': it rounds updates into bf16 weights, and weight_dtype is fp32 (master "
                "weights need no rounding). Set weight_dtype bf16, or turn stochastic_rounding off"
            )
        if self.weight_dtype == "bf16" and self.mixed_precision == "fp16":
            raise ValueError(
                "key 'weight_dtype' = 'bf16' with mixed_precision fp16: fp16's gradient scaler does not take bf16 "
                "gradients. Use mixed_precision bf16 or auto (on a GPU with bf16), or no"
            )
        if self.optimizer == "adafactor" and self.lr_cycle_momentum:
            raise ValueError(
                "key 'lr_cycle_momentum': adafactor has no betas to cycle (its beta1 is off by default, which is "
                "part of its memory saving). Turn lr_cycle_momentum off, or use adamw / adamw8bit"
            )

    # --- derived values -------------------------------------------------------------------------------
    @property
    def validation(self) -> ValidationSettings:
        return self.validation_config or ValidationSettings(validate_training=False, val_split_mode="none")

    @property
    def train_text_encoder(self) -> bool:
        return not self.disable_textenc_training

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        """The text encoders that train, by model part name: "text_encoder", and SDXL's "text_encoder_2"."""
        parts = (("text_encoder", self.train_text_encoder), ("text_encoder_2", self.train_text_encoder_2))
        return tuple(name for name, trains in parts if trains)

    @property
    def trained_parts(self) -> tuple[str, ...]:
        """The model parts whose weights train, by name: the UNet and the text encoders that do."""
        return (() if self.disable_unet_training else ("unet",)) + self.trained_text_encoders

    @property
    def from_ed2(self) -> bool:
        """The config file was written for ED2 (ed2_compat.is_ed2_config): its step counts were batch counts."""
        return self._from_ed2

    @property
    def config_file(self) -> Path | None:
        return self._source[0]

    def reread(self) -> TrainConfig:
        """The config as its file says now (with the same command-line overrides): load_settings_every_epoch."""
        return load_config(*self._source)

    @property
    def notes(self) -> list[str]:
        """What loading the config noted: ED2 keys accepted but not used, renamed keys."""
        return self._notes


# A text encoder's LR bounds: the keys <part>_lr, <part>_lr_min, <part>_lr_scale (text_encoder_key).
LR_BOUNDS = ("lr", "lr_min", "lr_scale")


def text_encoder_key(config: TrainConfig, part: str, setting: str) -> str:
    """The key that sets text encoder `part`'s `setting` ("lr", "betas", ...): `<part>_<setting>`, except that
    SDXL's second text encoder takes the first's key where its own is null. Its LR bounds go together: with none
    of text_encoder_2_lr / _lr_min / _lr_scale given, all three are the first's. Its unfreeze_last_n_layers is
    always its own (the two encoders' layer counts differ)."""
    own = f"{part}_{setting}"
    if part != "text_encoder_2" or setting == "unfreeze_last_n_layers":
        return own
    given = [getattr(config, f"{part}_{bound}") is not None for bound in LR_BOUNDS]
    inherits = not any(given) if setting in LR_BOUNDS else getattr(config, own) is None
    return f"text_encoder_{setting}" if inherits else own


def text_encoder_setting(config: TrainConfig, part: str, setting: str) -> Any:
    """The value of text encoder `part`'s `setting` (see text_encoder_key)."""
    return getattr(config, text_encoder_key(config, part, setting))


def refuse_second_text_encoder(config: TrainConfig, sdxl: bool) -> None:
    """train_text_encoder_2 trains SDXL's second text encoder, which an SD 1.x/2.x model does not have."""
    if config.train_text_encoder_2 and not sdxl:
        raise ConfigError(
            f"key 'train_text_encoder_2' = true: it trains SDXL's second text encoder, and resume_ckpt "
            f"'{config.resume_ckpt}' is an SD 1.x/2.x model, which has one text encoder (disable_textenc_training "
            f"false trains it). Set train_text_encoder_2 false, or give an SDXL model as resume_ckpt."
        )


# Characters a run folder name cannot hold: the path separators, and those Windows refuses in file names (run
# folders get copied between systems).
NOT_IN_FOLDER_NAMES = '/\\:*?"<>|'


def folder_name_problem(name: str) -> str | None:
    """What keeps `name` from being a plain folder name, or None when it is one."""
    if not name.strip():
        return "it is empty"
    if name in (".", ".."):
        return f"'{name}' is a path to a folder, not a name"
    forbidden = next((char for char in name if char in NOT_IN_FOLDER_NAMES), None)
    if forbidden:
        return f"it contains '{forbidden}'"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "it contains a control character"
    if name.startswith("-"):
        return "it starts with '-', which commands such as rm and ls would read as an option"
    if name != name.strip():
        return "it starts or ends with a space"
    return None


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

# Byte-order marks and the encodings they name, UTF-32's before UTF-16's (a UTF-32 LE mark begins with the UTF-16 LE
# one). Windows editors write them: Notepad's "UTF-8 with BOM", and its "Unicode", which is UTF-16.
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"),
)


def read_text_file(path: Path, what: str) -> str:
    """The text of a file the user wrote (a config, a validation config, sample prompts): UTF-8, or the encoding
    its byte-order mark names. Anything else is a ConfigError naming the file and the first byte that is not
    text, never a traceback."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{what} file '{path}' is a folder, not a file: give the path of the file itself{_text_files_in(path)}."
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file '{path}' does not exist.") from None
    except OSError as error:
        raise ConfigError(f"{what} file '{path}' cannot be read: {error.strerror}.") from None
    encoding, marked = next(
        ((codec, name) for mark, codec, name in BYTE_ORDER_MARKS if data.startswith(mark)), ("utf-8", None)
    )
    if marked is None and b"\x00" in data:  # valid UTF-8, but no text holds NUL bytes; UTF-16 does
        raise _unreadable(path, what, "it holds NUL bytes: it looks like UTF-16 written without a byte-order mark")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise _unreadable(path, what, _decoding_problem(data, error, marked)) from None


def _unreadable(path: Path, what: str, problem: str) -> ConfigError:
    return ConfigError(
        f"{what} file '{path}' is not readable text: {problem}. Save it as UTF-8 (in most editors: "
        f"Save as, encoding UTF-8) and run again."
    )


def _text_files_in(folder: Path) -> str:
    """ ", such as 'folder/a.json' or 'folder/b.txt'": the files a user most likely meant, when a folder was given."""
    try:
        names = sorted(item.name for item in folder.iterdir() if item.suffix.lower() in (".json", ".txt"))
    except OSError:
        return ""
    return f", such as {' or '.join(repr(str(folder / name)) for name in names[:3])}" if names else ""


def _decoding_problem(data: bytes, error: UnicodeDecodeError, marked: str | None) -> str:
    """Where decoding failed; without a byte-order mark, UTF-8 was expected, and bytes that are not UTF-8 most
    likely come from the Latin-1 / Windows-1252 of older editors."""
    if marked:
        return f"it starts with a {marked} byte-order mark, but byte {error.start} after it is not {marked}"
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return (
        f"the byte 0x{data[error.start]:02x} at line {line}, column {column} is not UTF-8 (perhaps the file is "
        f"Latin-1 or Windows-1252)"
    )


def read_json_file(path: Path, what: str) -> dict:
    """Read a JSON object from `path`; syntax errors name the line and column."""
    text = read_text_file(path, what)
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


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def parse_overrides(tokens: list[str]) -> dict:
    """`--lr 2e-6 --gradient_checkpointing --data_root x` -> {"lr": 2e-6, "gradient_checkpointing": True, ...}.

    The schema says how to read each value (see _command_line_value); only a true/false key may stand alone."""
    overrides: dict = {}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"Unexpected command-line argument '{token}': overrides are written --key value.")
        key, has_value, text = token[2:].partition("=")
        if not has_value and index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            text, has_value = tokens[index + 1], True
            index += 1
        overrides[key] = _command_line_value(key, text if has_value else None)
        index += 1
    return overrides


def _command_line_value(key: str, text: str | None) -> Any:
    """The value of `--key text` (`text` None: the key stood alone).

    A text key takes the text as written: `--project_name 2024` is the name "2024", not a number pydantic would
    refuse. Other keys read it as JSON (`--lr 2e-6`, `--betas [0.9,0.99]`), falling back to the text. Alone, a
    true/false key means true; any other key would become True, that is 1 (a bare `--lr` trained at LR 1), so it
    is refused. Keys the schema does not know (ED2's legacy switches) pass as they are, for load_config to note or
    refuse by name."""
    field = TrainConfig.model_fields.get(key)
    kinds = _value_types(field.annotation) if field else None
    if text is None:
        if kinds is not None and kinds - {type(None)} != {bool}:
            raise ConfigError(
                f"key '{key}' on the command line has no value: write --{key} VALUE. Only true/false "
                f"keys, such as --gradient_checkpointing, may be given without one."
            )
        return True
    if kinds is not None and kinds <= {str, type(None)}:
        return None if text == "null" and type(None) in kinds else text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _value_types(annotation: Any) -> set:
    """The plain types a field's annotation allows: Optional[Literal["a", "b"]] -> {str, NoneType}."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_value_types(member) for member in get_args(annotation)))
    if get_origin(annotation) is Literal:
        return {type(choice) for choice in get_args(annotation)}
    return {get_origin(annotation) or annotation}


# The config keys that hold a path. load_config looks for a relative one from the working directory, else beside
# the config file (resolve_config_paths); a config written into another folder must rebase them. A
# validation_config file's own paths are taken from its folder (load_validation_settings).
PATH_KEYS = (
    "data_root",
    "save_ckpt_dir",
    "logdir",
    "sample_prompts",
    "model_cache_dir",
    "latent_cache_dir",
    "resume_ckpt",
    "resume_from",
    "single_file_config",
    "optimizer_config",
    "validation_config",
    "ema_resume_model",
    "vae_path",
)
# The values a path key may hold that are names, not paths: the built-in demo models, the project's newest state.
PATH_KEY_NAMES = {
    "resume_ckpt": ("tiny", "tiny-sdxl", "tiny-pretrained", "findlast"),
    "resume_from": ("latest",),
    "ema_resume_model": ("findlast",),
}
# resume_ckpt values that name an architecture built with random weights (trainer/random_model.py), not a path.
RANDOM_MODEL_PREFIX = "random:"


def holds_path(key: str, value: Any) -> bool:
    """True when `value`, given for config key `key`, is a path (a string under PATH_KEYS that is not a name).
    An empty string is no path: resolved, it would become '.', the working directory, and pass as a folder."""
    if not (key in PATH_KEYS and isinstance(value, str) and value.strip()):
        return False
    if key == "resume_ckpt" and value.startswith(RANDOM_MODEL_PREFIX):
        return False  # random:sd15 and the like name a built architecture
    return value not in PATH_KEY_NAMES.get(key, ())


def resolve_config_paths(data: dict, base_dir: Path | None) -> dict:
    """`data` with every path in it (see holds_path) taken from the working directory, else from `base_dir`,
    the config file's folder. A hub id in resume_ckpt exists in neither, so it stays as it is."""
    return {key: _resolve_path(value, base_dir) if holds_path(key, value) else value for key, value in data.items()}


def _resolve_path(value: str, base_dir: Path | None) -> str:
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


# Other trainers' names of our keys, for the unknown-key message: a user coming from diffusers' training
# examples, kohya's sd-scripts or OneTrainer writes their names. Only names whose meaning matches are listed.
DIFFUSERS_NAMES = {
    "pretrained_model_name_or_path": "resume_ckpt",
    "train_data_dir": "data_root",
    "output_dir": "logdir",
    "logging_dir": "logdir",
    "train_batch_size": "batch_size",
    "num_train_epochs": "max_epochs",
    "max_train_steps": "max_steps",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr",
    "adam_beta1": "betas",
    "adam_beta2": "betas",
    "adam_weight_decay": "weight_decay",
    "adam_epsilon": "epsilon",
    "use_8bit_adam": "optimizer",
    "max_grad_norm": "clip_grad_norm",
    "dataloader_num_workers": "num_workers",
    "enable_xformers_memory_efficient_attention": "attn_type",
    "random_flip": "flip_p",
    "noise_offset": "zero_frequency_noise_ratio",
    "snr_gamma": "min_snr_gamma",
    "train_text_encoder": "disable_textenc_training",
    "validation_prompt": "sample_prompts",
    "validation_prompts": "sample_prompts",
    "validation_epochs": "sample_every_n_epochs",
    "checkpoints_total_limit": "save_state_keep",
    "resume_from_checkpoint": "resume_from",
}
KOHYA_NAMES = {
    "pretrained_model_name_or_path": "resume_ckpt",
    "train_data_dir": "data_root",
    "output_dir": "logdir",
    "logging_dir": "logdir",
    "output_name": "project_name",
    "train_batch_size": "batch_size",
    "max_train_epochs": "max_epochs",
    "max_train_steps": "max_steps",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "lr",
    "optimizer_type": "optimizer",
    "use_8bit_adam": "optimizer",
    "max_grad_norm": "clip_grad_norm",
    "max_data_loader_n_workers": "num_workers",
    "xformers": "attn_type",
    "sdpa": "attn_type",
    "flip_aug": "flip_p",
    "noise_offset": "zero_frequency_noise_ratio",
    "multires_noise_discount": "pyramid_noise_discount",
    "zero_terminal_snr": "enable_zero_terminal_snr",
    "v_parameterization": "prediction_type",
    "shuffle_caption": "shuffle_tags",
    "keep_tokens": "keep_tags",
    "caption_dropout_rate": "cond_dropout",
    "min_timestep": "timestep_start",
    "max_timestep": "timestep_end",
    "cache_text_encoder_outputs": "cache_text_embeddings",
    "sample_every_n_steps": "sample_steps",
    "train_text_encoder": "disable_textenc_training",
    "resume": "resume_from",
}
ONETRAINER_NAMES = {
    "base_model_name": "resume_ckpt",
    "workspace_dir": "logdir",
    "learning_rate": "lr",
    "epochs": "max_epochs",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate_scheduler": "lr_scheduler",
    "learning_rate_warmup_steps": "lr_warmup_steps",
    "text_encoder_layer_skip": "clip_skip",
    "offset_noise_weight": "zero_frequency_noise_ratio",
    "latent_caching": "cache_latents",
    "dataloader_threads": "num_workers",
    "sample_definition_file_name": "sample_prompts",
}
# What to write instead, where the other name is a switch or holds another kind of value than ours.
WRITE_BETAS = 'write "betas": [beta1, beta2]'
WRITE_FLIP = "flip_p is a chance: 0.5 flips half the images"
WRITE_PROMPTS = "sample_prompts is a .txt file, one prompt a line"
FOREIGN_NAME_HINTS = {
    "adam_beta1": WRITE_BETAS,
    "adam_beta2": WRITE_BETAS,
    "random_flip": WRITE_FLIP,
    "flip_aug": WRITE_FLIP,
    "validation_prompt": WRITE_PROMPTS,
    "validation_prompts": WRITE_PROMPTS,
    "sample_definition_file_name": "sample_prompts is a .txt file or an ED2 sample .json",
    "use_8bit_adam": 'write "optimizer": "adamw8bit"',
    "enable_xformers_memory_efficient_attention": 'write "attn_type": "xformers"',
    "xformers": 'write "attn_type": "xformers"',
    "sdpa": 'write "attn_type": "sdp"',
    "v_parameterization": 'write "prediction_type": "v_prediction"',
    "train_text_encoder": 'the other way round: "disable_textenc_training": false trains it',
    "output_dir": "each run gets its own folder under logdir",
}


def _foreign_names() -> dict[str, tuple[str, str]]:
    """other trainers' name -> (our key, whose name it is: "diffusers'/kohya's")."""
    owners: dict[str, list[str]] = {}
    for table, owner in ((DIFFUSERS_NAMES, "diffusers'"), (KOHYA_NAMES, "kohya's"), (ONETRAINER_NAMES, "OneTrainer's")):
        for name in table:
            owners.setdefault(name, []).append(owner)
    ours = {**ONETRAINER_NAMES, **KOHYA_NAMES, **DIFFUSERS_NAMES}
    return {name: (ours[name], "/".join(whose)) for name, whose in owners.items()}


FOREIGN_NAMES = _foreign_names()


def _unknown_key(key: str, known: list, where: str) -> None:
    raise ConfigError(
        f"Unknown key '{key}' ({where}){_suggestion(key, known)} Run `python train.py --help_keys` for every valid key."
    )


def _suggestion(key: str, known: list) -> str:
    """ ": did you mean 'lr'? (learning_rate is diffusers'/kohya's/OneTrainer's name for it.)", or ".".

    Close matches are looked for among our keys and the other trainers' names of them, so that a typo of
    `learning_rate` still finds `lr`; only keys of `known` are suggested (a validation config has other keys)."""
    foreign = {name: meaning for name, meaning in FOREIGN_NAMES.items() if meaning[0] in known}
    matches = [key] if key in foreign else difflib.get_close_matches(key, [*known, *foreign], n=3, cutoff=0.6)
    if not matches:
        return "."
    suggested = dict.fromkeys(foreign[name][0] if name in foreign else name for name in matches)
    question = f": did you mean {' or '.join(repr(name) for name in suggested)}?"
    named = next((name for name in matches if name in foreign), None)
    return question + (f" ({_other_trainers_name(named, foreign[named][1])}.)" if named else "")


def _other_trainers_name(name: str, whose: str) -> str:
    hint = FOREIGN_NAME_HINTS.get(name)
    return f"{name} is {whose} name for it" + (f"; {hint}" if hint else "")


def _format_validation_error(error: ValidationError, data: dict, origin: Callable[[str | None], str]) -> str:
    """One paragraph: the problems grouped by where their values came from (`origin` of the key; None for a
    rule between keys), each naming the key and the value."""
    problems: dict[str, list[str]] = {}
    for issue in error.errors():
        key = str(issue["loc"][0]) if issue["loc"] else None
        problems.setdefault(origin(key), []).append(_describe_issue(issue, data))
    return " ".join(f"Invalid config ({where}): " + "; ".join(lines) + "." for where, lines in problems.items())


def _describe_issue(issue: dict, data: dict) -> str:
    message = issue["msg"].removeprefix("Value error, ")
    if not issue["loc"]:
        return message
    value = data.get(issue["loc"][0], issue.get("input"))
    return f"key '{'.'.join(str(part) for part in issue['loc'])}' = {json.dumps(value, default=str)}: {message}"


def _value_origin(config_path: Path | None, overrides: dict) -> Callable[[str | None], str]:
    """Where a key's value came from, for error messages: a value given on the command line is blamed on it, not
    on the config file it overrode; a rule between keys (key None) on both, when both gave values."""
    if config_path is None:
        return lambda key: "command line"
    in_file = f"config file '{config_path}'"
    both = f"{in_file} and the command line" if overrides else in_file
    return lambda key: "command line" if key in overrides else both if key is None else in_file


def load_validation_settings(value: Any, base_dir: Path | None, notes: list[str]) -> dict | None:
    """`validation_config` may be a path to a JSON file (as in ED2) or an inline object."""
    if value is None or isinstance(value, dict):
        data, where = value, "validation_config"
    else:
        path = Path(_resolve_path(str(value), base_dir))
        data, where = read_json_file(path, "validation_config"), f"validation config '{path}'"
        base_dir = path.parent
    if data is None:
        return None
    data = {
        key: value for key, value in ed2_compat.rename_validation_keys(data, notes, where).items() if value is not None
    }
    _check_known_keys(data, ValidationSettings, where)
    if data.get("manual_data_root"):
        data["manual_data_root"] = _resolve_path(data["manual_data_root"], base_dir)
    if data.get("extra_manual_datasets"):
        data["extra_manual_datasets"] = {
            name: _resolve_path(folder, base_dir) for name, folder in data["extra_manual_datasets"].items()
        }
    try:
        return ValidationSettings(**data).model_dump()
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, data, lambda key: where)) from None


def load_config(config_path: Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The effective config: JSON file, then command-line overrides, validated as a whole."""
    data: dict = {}
    notes: list[str] = []
    base_dir = None
    from_ed2 = False
    if config_path is not None:
        config_path = Path(config_path)
        data = read_json_file(config_path, "config")
        from_ed2 = ed2_compat.is_ed2_config(data)
        data = ed2_compat.take_noted_keys(data, notes, f"'{config_path}'")
        base_dir = config_path.parent
        _check_known_keys(data, TrainConfig, f"config file '{config_path}'")
    overrides = ed2_compat.take_noted_keys(overrides or {}, notes, "command line")
    _check_known_keys(overrides, TrainConfig, "command line")
    # A JSON null means "use the default" (ED2 let nulls beat its defaults and then crashed).
    data = {key: value for key, value in data.items() if value is not None}
    optimizer_file = _optimizer_file(data, overrides, from_ed2, base_dir, notes)
    if optimizer_file:
        data = _merge_optimizer_json(data, optimizer_file, notes)
    merged = {**data, **overrides}
    if from_ed2:  # the counts the ED2 files gave are in batches; the command line's are EveryCycle's
        merged = ed2_compat.convert_batch_counts(merged, set(data) - set(overrides), notes)
    data = resolve_config_paths(merged, base_dir)
    if "validation_config" in data:
        data["validation_config"] = load_validation_settings(data["validation_config"], base_dir, notes)
    try:
        config = TrainConfig(**data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, data, _value_origin(config_path, overrides))) from None
    if config.resume_ckpt == "findlast":
        config.resume_ckpt = find_last_checkpoint(config)
        notes.append(
            f"resume_ckpt 'findlast': the newest checkpoint under logdir '{config.logdir}' is "
            f"{config.resume_ckpt} (as ED2: whichever project saved it)"
        )
    if config.ema_resume_model == "findlast":
        config.ema_resume_model = find_last_checkpoint(config, ema=True)
        notes.append(f"ema_resume_model 'findlast': the newest EMA checkpoint is {config.ema_resume_model}")
    check_paths(config)
    _default_sdxl_resolution(config, notes)
    if config.train_text_encoder_2:
        refuse_second_text_encoder(config, names_sdxl_model(config.resume_ckpt))
    config._from_ed2 = from_ed2
    config._source = (config_path, dict(overrides))
    config._notes = notes + (ed2_compat.difference_notes(config) if from_ed2 else [])
    return config


def _optimizer_file(
    data: dict, overrides: dict, from_ed2: bool, base_dir: Path | None, notes: list[str]
) -> Path | None:
    """The optimizer.json to read: the one named; else, for an ED2 config, ./optimizer.json when the working folder
    has one (ED2's train.py reads it by default, from the working folder)."""
    named = overrides.get("optimizer_config", data.get("optimizer_config"))
    if named:
        return Path(_resolve_path(str(named), base_dir))
    default = Path(ed2_compat.DEFAULT_OPTIMIZER_FILE)
    if from_ed2 and default.is_file():
        notes.append(ed2_compat.default_optimizer_note(default))
        return default
    return None


def _merge_optimizer_json(data: dict, path: Path, notes: list[str]) -> dict:
    """ED2's precedence, with its faults fixed: optimizer.json's settings win over train.json's, except `lr`,
    where train.json's wins when given (ED2 issue #102); the command line wins over both."""
    settings = ed2_compat.read_optimizer_json(path, read_json_file, notes, _unknown_key)
    merged = dict(data)
    for key, value in settings.items():
        if key == "lr" and "lr" in data:
            notes.append(
                f"'lr' {data['lr']:g} from the config wins over optimizer_config's base lr {value:g} (as ED2)."
            )
        elif key == "optimizer_args":
            merged[key] = {**data.get(key, {}), **value}
        else:
            merged[key] = value
    merged["optimizer_config"] = str(path)
    return merged


# Keys the running loop reads as it goes (per step, epoch or save): with load_settings_every_epoch a change to one of
# them in the config file takes effect at the next epoch. Every other key shapes the plan, the model or the
# optimizer, fixed at the start: its change takes effect when the run is resumed (where resume allows it).
LIVE_KEYS = (
    "flip_p",
    "cond_dropout",
    "shuffle_tags",
    "keep_tags",
    "clip_grad_norm",
    "max_nan_steps",
    "min_snr_gamma",
    "loss_type",
    "zero_frequency_noise_ratio",
    "pyramid_noise_discount",
    "embedding_perturbation",
    "timestep_start",
    "timestep_end",
    "log_step",
    "sample_steps",
    "sample_every_n_epochs",
    "save_every_n_epochs",
    "stop_when_val_rises",
    "save_ckpts_from_n_epochs",
    "ckpt_every_n_minutes",
    "save_state_every_n_minutes",
    "save_state_keep",
    "ema_sample_nonema_model",
    "ema_sample_ema_model",
)


def settings_changes(config: TrainConfig) -> tuple[dict[str, Any], list[str]]:
    """The config file read again: the live keys whose values changed (key -> new value), and what to say (each
    change, and the changed keys that wait for a resume). A file that no longer loads changes nothing."""
    try:
        new = config.reread()
    except ConfigError as error:
        return {}, [f"load_settings_every_epoch: the config no longer loads, the settings stay as they were: {error}"]
    old_values, new_values = config.model_dump(), new.model_dump()
    changed = [key for key in new_values if new_values[key] != old_values[key]]
    live = {key: getattr(new, key) for key in changed if key in LIVE_KEYS}
    lines = [f"load_settings_every_epoch: {key} {old_values[key]!r} -> {new_values[key]!r}" for key in live]
    later = [key for key in changed if key not in LIVE_KEYS]
    if later:
        lines.append(
            f"load_settings_every_epoch: {', '.join(later)} changed in the file; they are fixed for the running plan "
            f"and take effect when the run is resumed"
        )
    return live, lines


def find_last_checkpoint(config: TrainConfig, ema: bool = False) -> str:
    """ED2's `findlast`: the newest complete diffusers checkpoint anywhere under logdir, whichever project saved it
    (ED2's chained sessions each get their own project_name). Hidden folders (saves in progress) are left out, and
    so are the EMA copies (`*_ema`), or, with `ema`, all but those; a newest one that ED2 saved after a crash
    (`errored-`) is refused, as ED2 does."""
    logdir, key = Path(config.logdir), "ema_resume_model" if ema else "resume_ckpt"
    candidates = [index.parent for index in logdir.rglob("model_index.json") if _usable_checkpoint(index, logdir, ema)]
    if not candidates:
        raise ConfigError(
            f"key '{key}' = 'findlast': no {'EMA ' if ema else ''}checkpoint (a folder with model_index.json"
            f"{' named *_ema' if ema else ''}) under logdir '{config.logdir}'. Train once first, or give a model path."
        )
    newest = max(candidates, key=lambda folder: (folder / "model_index.json").stat().st_mtime)
    if "errored" in newest.name:
        raise ConfigError(
            f"key '{key}' = 'findlast': the newest checkpoint, {newest}, was saved after a crash "
            f"(as ED2 does, it is not resumed). Give the checkpoint to resume as {key}."
        )
    return str(newest)


def _usable_checkpoint(index: Path, logdir: Path, ema: bool) -> bool:
    parts = index.parent.relative_to(logdir).parts
    return not any(part.startswith(".") for part in parts) and index.parent.name.endswith("_ema") == ema


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
    if config.ema_resume_model and not Path(config.ema_resume_model).exists():
        raise ConfigError(
            f"key 'ema_resume_model' = '{config.ema_resume_model}': no such folder or file. Give an EMA checkpoint "
            f"(a diffusers folder such as <run>/ckpts/<name>_ema, or its .safetensors), 'findlast', or null."
        )
    if config.vae_path and Path(config.vae_path).exists() and not (Path(config.vae_path) / "config.json").is_file():
        raise ConfigError(
            f"key 'vae_path' = '{config.vae_path}': not a diffusers VAE folder (no config.json inside). Give the "
            f"folder of an AutoencoderKL (config.json and its weights), a hub id such as "
            f"'madebyollin/sdxl-vae-fp16-fix', or null for the model's own VAE."
        )
    if config.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "key 'wandb' = true: the wandb package is not installed. Install it (pip install wandb; it is an "
            "optional extra), or set wandb to false: metrics.csv and TensorBoard log every run."
        )
    if config.sample_prompts:  # checked now, so a preview finds its faults too, before any model loads
        read_sample_prompts(config.sample_prompts)


def _default_sdxl_resolution(config: TrainConfig, notes: list[str]) -> None:
    """SDXL trains around 1024x1024 (its base was trained on buckets of about 1024² pixels): the default
    resolution for an SDXL resume_ckpt, when the config does not give one."""
    if "resolution" not in config.model_fields_set and names_sdxl_model(config.resume_ckpt):
        config.resolution = SDXL_RESOLUTION
        notes.append(
            f"resolution {SDXL_RESOLUTION}: resume_ckpt is an SDXL model and the config gives no resolution "
            f"(SD 1.x/2.x default to 512); set resolution to train at another size"
        )


def names_sdxl_model(resume_ckpt: str) -> bool:
    """Whether resume_ckpt is an SDXL model, read from its files without loading weights: 'tiny-sdxl'; a diffusers
    folder with text_encoder_2/; a single file whose text encoders sit under `conditioner.` (utils/convert.py
    is_sdxl_checkpoint); a hub id whose model_index.json (from the hub cache, or downloaded when online) lists
    text_encoder_2. What cannot be read counts as not SDXL: loading the model reports the problem."""
    if resume_ckpt == "tiny-sdxl":
        return True
    path = Path(resume_ckpt)
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    if path.is_file():
        from utils.convert import ConversionError, inspect_checkpoint, is_sdxl_checkpoint

        try:
            return is_sdxl_checkpoint(inspect_checkpoint(path))
        except ConversionError:
            return False
    if resume_ckpt.startswith(RANDOM_MODEL_PREFIX) or resume_ckpt.count("/") != 1:
        return False
    return _hub_model_lists_second_text_encoder(resume_ckpt)


def _hub_model_lists_second_text_encoder(repo_id: str) -> bool:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text(encoding="utf-8"))
    except (OSError, ValueError, EntryNotFoundError):  # offline and not cached, no such repo, no access, no index:
        return False  # the loader says what is wrong
    return "text_encoder_2" in index


def read_sample_prompts(path: str) -> list[str] | ed2_compat.SampleFile:
    """A sample prompt file, checked: a .txt gives its prompts (one a line, blank lines skipped), an ED2 .json its
    settings. Read when the config loads, and again before every sample round (ED2 lets prompts change mid-run)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".txt":
        lines = read_text_file(Path(path), "sample_prompts").splitlines()
        return [line.strip() for line in lines if line.strip()]
    if suffix != ".json":
        raise ConfigError(f"key 'sample_prompts' = '{path}': give a .txt (one prompt a line) or an ED2 sample .json.")
    data = read_json_file(Path(path), "sample_prompts")
    try:
        return ed2_compat.parse_sample_file(data, f"sample_prompts file '{path}'")
    except ValueError as error:
        raise ConfigError(str(error)) from None


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
