"""EveryDream2 configs, read as ED2 users wrote them: legacy keys, optimizer.json, old validation names.

ED2's behaviour is the reference (its documented keys and files), with its known faults fixed:
- a key EveryCycle does not use is never ignored silently: it is accepted with a one-line note;
- in optimizer.json a 0 means 0 (ED2 treated it as unset) and a null means "use the default" (ED2 let
  nulls override its defaults and crashed); a missing "doc" section is fine (ED2 raised KeyError);
- an unknown optimizer name is an error (ED2 silently used AdamW8bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

# ED2 train.json keys that EveryCycle accepts but does not use, each with what happens instead.
NOTED_KEYS: dict[str, str] = {
    "config": "ignored inside a config file: the file given with --config is the config",
    "amp": "ED2 legacy key, ignored (derived from disable_amp there); use mixed_precision",
    "useadam8bit": "ED2 legacy key, ignored; use \"optimizer\": \"adamw8bit\"",
    "lowvram": "ED2 legacy key, ignored; use gradient_checkpointing and a smaller batch_size",
    "disable_xformers": "ED2 legacy key, ignored; attn_type chooses the attention kernel (sdp by default)",
    "ed1_mode": "ED2 legacy key, ignored",
    "scale_lr": "ignored: ED2 documents it but never implemented it; set lr directly",
    "notebook": "ignored (unused in ED2 too)",
    "gpuid": "ignored: choose the GPU with CUDA_VISIBLE_DEVICES, or several with `accelerate launch`",
    "wandb": "ignored: EveryCycle logs to TensorBoard (and metrics.csv)",
    "run_name": "ignored: the run folder is named <project_name>-<timestamp>",
    "plugins": "ignored: ED2 plugins are not supported",
    "load_settings_every_epoch": "ignored: the config is read once at the start",
    "write_schedule": "ignored: the batch order is a pure function of (seed, epoch) and is not written",
    "rated_dataset": "ignored: rated data sets are not supported; every image trains each epoch",
    "rated_dataset_target_dropout_percent": "ignored: rated data sets are not supported",
    "no_prepend_last": "ignored: checkpoints are named by epoch and step; run_summary.json names the final one",
    "save_optimizer": "ignored: the optimizer state is always kept in the resumable state (state/)",
    "train_sampler": "ignored: noise is always added with DDPM's formula, which ddim and pndm share",
    "ema_decay_rate": "ignored: EMA is not supported yet; the trained weights are saved",
    "ema_strength_target": "ignored: EMA is not supported yet",
    "ema_update_interval": "ignored: EMA is not supported yet",
    "ema_device": "ignored: EMA is not supported yet",
    "ema_sample_nonema_model": "ignored: EMA is not supported yet; samples use the trained weights",
    "ema_sample_ema_model": "ignored: EMA is not supported yet; samples use the trained weights",
    "ema_resume_model": "ignored: EMA is not supported yet",
}

# Validation config: ED2's old names and keys it reads but never used.
VALIDATION_RENAMED = {"val_split_proportion": "auto_split_proportion", "val_data_root": "manual_data_root"}
VALIDATION_NOTED = {"use_relative_loss": "ignored: ED2 reads it but never used it; the loss is absolute"}

# optimizer.json section keys -> TrainConfig keys, for the UNet (base) and the text encoder (overrides).
BASE_KEYS = {
    "optimizer": "optimizer", "lr": "lr", "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps",
    "lr_decay_steps": "lr_decay_steps", "betas": "betas", "epsilon": "epsilon", "weight_decay": "weight_decay",
}
TEXT_ENCODER_KEYS = {
    "lr": "text_encoder_lr", "lr_scheduler": "text_encoder_lr_scheduler",
    "lr_warmup_steps": "text_encoder_lr_warmup_steps", "lr_decay_steps": "text_encoder_lr_decay_steps",
    "betas": "text_encoder_betas", "epsilon": "text_encoder_epsilon", "weight_decay": "text_encoder_weight_decay",
}
FREEZING_KEYS = {"unfreeze_last_n_layers": "text_encoder_unfreeze_last_n_layers"}
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
            notes.append(f"{where}: '{key}' {VALIDATION_NOTED[key]}.")
        else:
            renamed[key] = value
    return renamed


def read_optimizer_json(path: Path, read_json: Callable[[Path, str], dict], notes: list[str],
                        unknown_key: Callable[[str, list, str], None]) -> dict:
    """optimizer.json -> TrainConfig keys. Nulls mean "use the default" and are left out; 0 means 0."""
    where = f"optimizer_config '{path}'"
    data = read_json(path, "optimizer_config")
    settings: dict = {}
    for key, value in data.items():
        if key == "base":
            settings.update(_section(value, BASE_KEYS, where + " base", notes, unknown_key))
        elif key == "text_encoder_overrides":
            overrides = dict(value or {})
            te_optimizer = overrides.pop("optimizer", None)
            if te_optimizer is not None:
                notes.append(f"{where}: text_encoder_overrides.optimizer '{te_optimizer}' is not used: both models "
                             f"share one optimizer (its settings per model still apply).")
            settings.update(_section(overrides, TEXT_ENCODER_KEYS, where + " text_encoder_overrides", notes,
                                     unknown_key))
        elif key == "text_encoder_freezing":
            settings.update(_section(value or {}, FREEZING_KEYS, where + " text_encoder_freezing", notes,
                                     unknown_key, noted=FREEZING_NOTED))
        elif key in OPTIMIZER_NOTED:
            if OPTIMIZER_NOTED[key]:
                notes.append(f"{where}: '{key}' {OPTIMIZER_NOTED[key]}.")
        else:
            unknown_key(key, ["base", "text_encoder_overrides", "text_encoder_freezing", *OPTIMIZER_NOTED], where)
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
