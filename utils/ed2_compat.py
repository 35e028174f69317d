"""EveryDream2 configs, read as ED2 users wrote them: legacy keys, optimizer.json, old validation names, the
sample prompt .json, and step counts ED2 makes in batches.

ED2's behaviour is the reference (its documented keys and files), with its known faults fixed:
- a key EveryCycle does not use is never ignored silently: it is accepted with a one-line note;
- in optimizer.json a 0 means 0 (ED2 treated it as unset) and a null means "use the default" (ED2 let
  nulls override its defaults and crashed); a missing "doc" section is fine (ED2 raised KeyError);
- an unknown optimizer name is an error (ED2 silently used AdamW8bit);
- a sample .json is checked when the config loads (ED2 found its faults at the first sample round).
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ED2 train.json keys that EveryCycle accepts but does not use, each with what happens instead.
NOTED_KEYS: dict[str, str] = {
    "config": "ignored inside a config file: the file given with --config is the config",
    "amp": "ED2 legacy key, ignored (derived from disable_amp there); use mixed_precision",
    "useadam8bit": 'ED2 legacy key, ignored; use "optimizer": "adamw8bit"',
    "lowvram": "ED2 legacy key, ignored; use gradient_checkpointing and a smaller batch_size",
    "disable_xformers": "ED2 legacy key, ignored; attn_type chooses the attention kernel (sdp by default)",
    "ed1_mode": "ED2 legacy key, ignored",
    "scale_lr": "ignored: ED2 documents it but never implemented it; set lr directly",
    "notebook": "ignored (unused in ED2 too)",
    "gpuid": "ignored: choose the GPU with CUDA_VISIBLE_DEVICES, or several with `accelerate launch`",
    "run_name": "ignored: the run folder is named <project_name>-<timestamp>",
    "write_schedule": "ignored: the batch order is a pure function of (seed, epoch) and is not written",
    "no_prepend_last": "ignored: checkpoints are named by epoch and step; run_summary.json names the final one",
    "save_optimizer": "ignored: the optimizer state is always kept in the resumable state (state/)",
    "train_sampler": "ignored: noise is always added with DDPM's formula, which ddim and pndm share",
}

# Validation config: ED2's old names and keys it reads but never used.
VALIDATION_RENAMED = {"val_split_proportion": "auto_split_proportion", "val_data_root": "manual_data_root"}
# None: documentation only, read past silently (ED2's validation files carry a "documentation" block).
VALIDATION_NOTED = {
    "use_relative_loss": "ignored: ED2 reads it but never used it; the loss is absolute",
    "documentation": None,
}

# optimizer.json section keys -> TrainConfig keys, for the UNet (base) and the text encoder (overrides).
BASE_KEYS = {
    "optimizer": "optimizer",
    "lr": "lr",
    "lr_scheduler": "lr_scheduler",
    "lr_warmup_steps": "lr_warmup_steps",
    "lr_decay_steps": "lr_decay_steps",
    "betas": "betas",
    "epsilon": "epsilon",
    "weight_decay": "weight_decay",
}
TEXT_ENCODER_KEYS = {
    "lr": "text_encoder_lr",
    "lr_scheduler": "text_encoder_lr_scheduler",
    "lr_warmup_steps": "text_encoder_lr_warmup_steps",
    "lr_decay_steps": "text_encoder_lr_decay_steps",
    "betas": "text_encoder_betas",
    "epsilon": "text_encoder_epsilon",
    "weight_decay": "text_encoder_weight_decay",
}
FREEZING_KEYS = {"unfreeze_last_n_layers": "text_encoder_unfreeze_last_n_layers"}
# ED2 trains SD 1.x/2.x only; for SDXL's second text encoder EveryCycle reads sections of the same form, named after
# its text_encoder_2_* keys: text_encoder_2_overrides and text_encoder_2_freezing.
SECOND_ENCODER_PREFIX = "text_encoder_2_"


def _for_second_encoder(mapping: dict) -> dict:
    return {key: SECOND_ENCODER_PREFIX + name.removeprefix("text_encoder_") for key, name in mapping.items()}


# optimizer.json section -> (its keys -> TrainConfig keys, the notes of keys it ignores)
ENCODER_OVERRIDES = {
    "text_encoder_overrides": TEXT_ENCODER_KEYS,
    "text_encoder_2_overrides": _for_second_encoder(TEXT_ENCODER_KEYS),
}
ENCODER_FREEZING = {
    "text_encoder_freezing": FREEZING_KEYS,
    "text_encoder_2_freezing": _for_second_encoder(FREEZING_KEYS),
}
# Keys of ED2's adaptive optimizers (dadapt, prodigy): passed to those optimizers, noted for the others.
ADAPTIVE_KEYS = ("d0", "decouple", "momentum", "growth_rate", "safeguard_warmup", "no_prox")
OPTIMIZER_NOTED = {
    "doc": None,  # documentation only
    "apply_grad_scaler_step_tweaks": "ignored: fp16 runs use accelerate's standard dynamic grad scaler",
    "log_grad_norm": "ignored: gradient norms are not logged",
    "text_encoder_lr_scale": "ignored: ED2 documents it but never implemented it; EveryCycle's key of that "
    "name in train.json does work",
}
FREEZING_NOTED = {
    "freeze_embeddings": "ignored: as in ED2, the embeddings train only when every layer is unfrozen",
    "freeze_final_layer_norm": "ignored: the final layer norm trains whenever any layer is unfrozen",
    "freeze_front_n_layers": "ignored: ED2 legacy key; use unfreeze_last_n_layers",
}


def take_noted_keys(data: dict, notes: list[str], where: str) -> dict:
    """Drop the ED2 keys EveryCycle does not use, noting each once (never silently)."""
    kept = {}
    for key, value in data.items():
        if key in NOTED_KEYS:
            notes.append(f"{where}: '{key}' {NOTED_KEYS[key]}.")
        else:
            kept[key] = value
    if kept.pop("disable_amp", None):
        kept.setdefault("mixed_precision", "no")
        notes.append(f"{where}: 'disable_amp' is true: mixed_precision set to 'no'.")
    return kept


def rename_validation_keys(data: dict, notes: list[str], where: str) -> dict:
    renamed = {}
    for key, value in data.items():
        if key in VALIDATION_RENAMED:
            new = VALIDATION_RENAMED[key]
            notes.append(f"{where}: '{key}' is ED2's old name of '{new}'; read as '{new}'.")
            renamed.setdefault(new, value)
        elif key in VALIDATION_NOTED:
            if VALIDATION_NOTED[key]:
                notes.append(f"{where}: '{key}' {VALIDATION_NOTED[key]}.")
        else:
            renamed[key] = value
    return renamed


def read_optimizer_json(
    path: Path, read_json: Callable[[Path, str], dict], notes: list[str], unknown_key: Callable[[str, list, str], None]
) -> dict:
    """optimizer.json -> TrainConfig keys. Nulls mean "use the default" and are left out; 0 means 0."""
    where = f"optimizer_config '{path}'"
    data = read_json(path, "optimizer_config")
    settings: dict = {}
    for key, value in data.items():
        if key == "base":
            settings.update(_section(value, BASE_KEYS, where + " base", notes, unknown_key))
        elif key in ENCODER_OVERRIDES:
            overrides = dict(value or {})
            te_optimizer = overrides.pop("optimizer", None)
            if te_optimizer is not None:
                notes.append(
                    f"{where}: {key}.optimizer '{te_optimizer}' is not used: all models "
                    f"share one optimizer (its settings per model still apply)."
                )
            settings.update(_section(overrides, ENCODER_OVERRIDES[key], f"{where} {key}", notes, unknown_key))
        elif key in ENCODER_FREEZING:
            settings.update(
                _section(value or {}, ENCODER_FREEZING[key], f"{where} {key}", notes, unknown_key, FREEZING_NOTED)
            )
        elif key in OPTIMIZER_NOTED:
            if OPTIMIZER_NOTED[key]:
                notes.append(f"{where}: '{key}' {OPTIMIZER_NOTED[key]}.")
        else:
            unknown_key(key, ["base", *ENCODER_OVERRIDES, *ENCODER_FREEZING, *OPTIMIZER_NOTED], where)
    return settings


def _section(section: dict, mapping: dict, where: str, notes: list[str], unknown_key, noted=None) -> dict:
    noted = noted or {}
    settings = {}
    for key, value in section.items():
        if key in noted:
            if value is not None:
                notes.append(f"{where}: '{key}' {noted[key]}.")
        elif key in ADAPTIVE_KEYS:
            if value is not None:
                settings.setdefault("optimizer_args", {})[key] = value
        elif key in mapping:
            if value is not None:
                settings[mapping[key]] = value
        else:
            unknown_key(key, list(mapping) + list(noted) + list(ADAPTIVE_KEYS), where)
    return settings


# --- configs written for ED2 ------------------------------------------------------------------------

# ED2's train.py reads ./optimizer.json when the config names no optimizer file (its --optimizer_config default).
DEFAULT_OPTIMIZER_FILE = "optimizer.json"
# The keys ED2 counts in batches: its global_step grows by one per batch, and its LR schedulers step once per batch
# (optimizer/optimizers.py EveryDreamOptimizer.step). EveryCycle counts optimizer steps of grad_accum batches each.
BATCH_COUNTED_KEYS = (
    "sample_steps",
    "log_step",
    "lr_warmup_steps",
    "lr_decay_steps",
    "text_encoder_lr_warmup_steps",
    "text_encoder_lr_decay_steps",
    "text_encoder_2_lr_warmup_steps",
    "text_encoder_2_lr_decay_steps",
)


def is_ed2_config(data: dict) -> bool:
    """True for a config written for ED2: it holds a key only ED2 has. Every train.json ED2 ships holds several
    (gpuid, wandb, write_schedule, notebook ...); EveryCycle's own configs hold none."""
    return any(key in NOTED_KEYS or key == "disable_amp" for key in data)


def optimizer_steps(batches: int, grad_accum: int) -> int:
    """ED2's count of `batches` as optimizer steps, rounded half up; a count that was not 0 stays at least 1."""
    return max(1, math.floor(batches / grad_accum + 0.5))


def convert_batch_counts(data: dict, ed2_keys: set, notes: list[str]) -> dict:
    """`data` with the step counts that an ED2 config gave (`ed2_keys`) turned from batches into optimizer steps,
    noted with the numbers. 0 and null keep their meaning (off / automatic)."""
    grad_accum = data.get("grad_accum", 1)
    if not _is_count(grad_accum) or grad_accum < 2:
        return data
    converted = dict(data)
    changes = []
    for key in BATCH_COUNTED_KEYS:
        if key in ed2_keys and _is_count(data.get(key)) and data[key] > 0:
            converted[key] = optimizer_steps(data[key], grad_accum)
            changes.append(f"{key} {data[key]} -> {converted[key]}")
    if changes:
        notes.append(
            f"ED2 config with grad_accum {grad_accum}: ED2 counts these in batches, EveryCycle in optimizer "
            f"steps of {grad_accum} batches, so they were converted: {', '.join(changes)}."
        )
    return converted


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_optimizer_note(path: Path) -> str:
    return (
        f"'optimizer_config' not given: {path} in the working folder is read, as ED2 does by default; name another "
        f"file with optimizer_config to use that one instead."
    )


def difference_notes(config) -> list[str]:
    """Notes for an ED2 config whose settings EveryCycle reads differently on purpose (docs/ed2.md lists each)."""
    notes = []
    if config.keep_tags and config.shuffle_tags:
        notes.append(
            f"'keep_tags' {config.keep_tags}: the first {config.keep_tags} tags stay in place when tags are "
            f"shuffled. ED2's keep_tags had no effect (it always kept 0), so captions differ from ED2's."
        )
    if config.rated_dataset:
        notes.append(
            "'rated_dataset': each aspect bucket gets a fixed share of an epoch's picks (ED2 leaves it to chance), so "
            "every epoch's step count is known in advance; the automatic lr_decay_steps counts the real, shrinking "
            "epochs (ED2 counts each as long as the first)."
        )
    if config.load_settings_every_epoch:
        notes.append(
            "'load_settings_every_epoch': only the keys the loop reads as it goes take effect mid-run; a change to "
            "another key (lr, batch_size, ...) is named and waits for a resume (ED2 re-reads every key)."
        )
    if config.plugins:
        notes.append(
            "'plugins': hooks get EveryCycle's batch (pixel_values or latents, captions, paths; no 'tokens'), and "
            "arg_update_callback refuses to change grad_accum mid-run."
        )
    return notes


# --- ED2's sample prompt .json ------------------------------------------------------------------------

SAMPLE_GUIDANCE_SCALES = (7.0, 4.0, 1.0)
SAMPLE_INFERENCE_STEPS = 30  # ED2's default
# ED2's scheduler names -> (diffusers class, options); trainer/sampling.py builds them from the model's config.
SAMPLE_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm++_2s_k": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
    "dpm++_sde_k": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0, "use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2m_sde_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
}
# Schedulers that need a package diffusers does not install.
SCHEDULER_PACKAGES = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}


def _guidance_scales(cfgs: list[float] | None) -> list[float] | None:
    if cfgs is not None and any(scale < 0 for scale in cfgs):
        raise ValueError("guidance scales must be >= 0 (1 or less: no classifier-free guidance)")
    return cfgs


class SampleEntry(BaseModel):
    """One item of the file's `samples` list."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = Field(None, ge=-1)  # -1: a new random seed every round
    size: tuple[int, int] | None = None
    aspect_ratio: float | None = Field(None, gt=0)
    random_caption: bool = False  # a training caption, drawn again every round
    cfgs: list[float] | None = Field(None, min_length=1)  # this sample's guidance scales

    _check_cfgs = field_validator("cfgs")(_guidance_scales)

    @field_validator("size")
    @classmethod
    def _multiples_of_8(cls, size):
        if size is not None and any(side < 8 or side % 8 for side in size):
            raise ValueError("must be [width, height], each a positive multiple of 8 (e.g. [512, 512])")
        return size

    @model_validator(mode="after")
    def _prompt_and_size_consistent(self):
        if self.size is not None and self.aspect_ratio is not None:
            raise ValueError("give size or aspect_ratio, not both")
        if not self.prompt and not self.random_caption:
            raise ValueError("give a prompt, or random_caption: true to use a training caption")
        return self


class SampleFile(BaseModel):
    """ED2's sample .json (its doc/LOGGING.md), every key."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-1)
    cfgs: list[float] = Field(list(SAMPLE_GUIDANCE_SCALES), min_length=1)
    scheduler: str = "ddim"
    num_inference_steps: int = Field(SAMPLE_INFERENCE_STEPS, ge=1, le=1000)
    show_progress_bars: bool = False
    generate_pretrain_samples: bool = False  # a round before the first step
    generate_samples_every_n_steps: int | None = Field(None, ge=1)
    resolution: int | None = Field(None, ge=8)
    samples: list[SampleEntry] | None = None

    _check_cfgs = field_validator("cfgs")(_guidance_scales)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name):
        if name not in SAMPLE_SCHEDULERS:
            close = difflib.get_close_matches(name, list(SAMPLE_SCHEDULERS), n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(SAMPLE_SCHEDULERS)}{hint}")
        package = SCHEDULER_PACKAGES.get(SAMPLE_SCHEDULERS[name][0])
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"needs the {package} package, which is not installed: pip install {package}, or choose "
                f"another scheduler"
            )
        return name

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value


def parse_sample_file(data: dict, where: str) -> SampleFile:
    """The checked sample file; ValueError with every problem named, key by key, otherwise."""
    try:
        return SampleFile(**data)
    except ValidationError as error:
        raise ValueError(f"{where}: " + "; ".join(map(_sample_problem, error.errors())) + ".") from None


def _sample_problem(issue: dict) -> str:
    key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in issue["loc"]).lstrip(".")
    if issue["type"] == "extra_forbidden":
        known = SampleEntry.model_fields if "samples" in issue["loc"][:1] else SampleFile.model_fields
        close = difflib.get_close_matches(str(issue["loc"][-1]), list(known), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return f"unknown key '{key}'{hint}"
    value = json.dumps(issue.get("input"), default=str)
    return f"key '{key}' = {value}: {issue['msg'].removeprefix('Value error, ')}"
