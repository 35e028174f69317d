"""ED2 configs load as ED2 users wrote them, with ED2's known config faults fixed (one test each)."""

import json
import os
import time

import pytest

from optimizer.lr import plan_schedule
from tests.conftest import DEMO_DATA
from utils.config import ConfigError, load_config
from utils.ed2_compat import NOTED_KEYS


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_every_legacy_key_is_accepted_with_a_note(tmp_path):
    legacy = {key: True for key in ("amp", "useadam8bit", "lowvram", "disable_xformers", "ed1_mode", "scale_lr",
                                    "notebook")}
    config = load_config(write(tmp_path / "train.json", {"data_root": str(DEMO_DATA), **legacy}))
    for key in legacy:
        assert any(f"'{key}'" in note for note in config.notes), f"{key} was ignored silently"


def test_every_ed2_train_json_key_is_accepted(tmp_path):
    """ED2's documented train.json keys (ed2.md §1.2): each is a schema key or a noted key."""
    ed2_keys = {
        "amp": True, "disable_amp": False, "attn_type": "sdp", "batch_size": 4, "grad_accum": 1,
        "gradient_checkpointing": True, "ckpt_every_n_minutes": None, "save_every_n_epochs": 20,
        "save_ckpts_from_n_epochs": 0, "save_ckpt_dir": None, "save_full_precision": False, "save_optimizer": False,
        "no_save_ckpt": False, "no_prepend_last": False, "clip_grad_norm": None, "clip_skip": 0, "cond_dropout": 0.04,
        "data_root": str(DEMO_DATA), "disable_textenc_training": False, "disable_unet_training": False,
        "embedding_perturbation": 0.0, "flip_p": 0.0, "gpuid": 0, "logdir": str(tmp_path / "logs"), "log_step": 25,
        "loss_type": "mse_huber", "lr": 1e-6, "lr_scheduler": "constant", "lr_warmup_steps": None,
        "lr_decay_steps": 0, "max_epochs": 40, "optimizer_config": None, "plugins": None,
        "project_name": "project_abc", "run_name": None, "resolution": 512, "resume_ckpt": "tiny",
        "sample_prompts": None, "sample_steps": 300, "seed": -1, "shuffle_tags": False, "keep_tags": 0,
        "timestep_start": 0, "timestep_end": 1000, "train_sampler": "ddpm", "wandb": False,
        "validation_config": None, "write_schedule": False, "rated_dataset": False,
        "rated_dataset_target_dropout_percent": 50, "zero_frequency_noise_ratio": 0.02,
        "pyramid_noise_discount": 0.03, "enable_zero_terminal_snr": False, "min_snr_gamma": 5.0,
        "load_settings_every_epoch": False, "ema_decay_rate": None, "ema_strength_target": None,
        "ema_update_interval": None, "ema_device": None, "ema_sample_nonema_model": False,
        "ema_sample_ema_model": False, "ema_resume_model": None, "notebook": False,
    }
    config = load_config(write(tmp_path / "train.json", ed2_keys))
    assert config.loss_type == "mse_huber" and config.pyramid_noise_discount == 0.03
    assert config.min_snr_gamma == 5.0 and config.seed == -1
    assert set(NOTED_KEYS) & set(ed2_keys) <= {note.split("'")[3] for note in config.notes if note.count("'") >= 4}


def test_disable_amp_means_full_precision(tmp_path):
    config = load_config(write(tmp_path / "t.json", {"data_root": str(DEMO_DATA), "disable_amp": True}))
    assert config.mixed_precision == "no"


def test_json_null_uses_the_default_instead_of_crashing(tmp_path):
    """ED2 let `"ema_update_interval": null` beat its default and then crashed on None * grad_accum."""
    config = load_config(write(tmp_path / "t.json", {"data_root": str(DEMO_DATA), "grad_accum": None,
                                                     "ema_update_interval": None, "log_step": None}))
    assert config.grad_accum == 1 and config.log_step == 25


def optimizer_json(tmp_path, base=None, overrides=None, freezing=None, **top):
    data = {"base": base or {}, "text_encoder_overrides": overrides or {}, **top}
    if freezing is not None:
        data["text_encoder_freezing"] = freezing
    return write(tmp_path / "optimizer.json", data)


def test_optimizer_json_sections_apply(tmp_path):
    path = optimizer_json(tmp_path, base={"optimizer": "adamw", "lr": 2e-6, "lr_scheduler": "cosine",
                                          "betas": [0.9, 0.99], "weight_decay": 0.02},
                          overrides={"lr": 5e-7, "weight_decay": 0.0}, freezing={"unfreeze_last_n_layers": 2})
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path)})
    assert (config.optimizer, config.lr, config.lr_scheduler) == ("adamw", 2e-6, "cosine")
    assert config.betas == (0.9, 0.99) and config.weight_decay == 0.02
    assert config.text_encoder_lr == 5e-7 and config.text_encoder_weight_decay == 0.0
    assert config.text_encoder_unfreeze_last_n_layers == 2


def test_train_json_lr_wins_over_optimizer_json(tmp_path):
    path = optimizer_json(tmp_path, base={"lr": 2e-6})
    config = load_config(write(tmp_path / "t.json", {"data_root": str(DEMO_DATA), "lr": 3e-6,
                                                     "optimizer_config": "optimizer.json"}))
    assert config.lr == 3e-6 and any("wins over optimizer_config" in note for note in config.notes)


def test_zero_in_optimizer_json_means_zero(tmp_path):
    """ED2's `x or fallback` chains turned 0 warmup into the automatic 2% warmup."""
    path = optimizer_json(tmp_path, base={"lr_scheduler": "cosine", "lr_warmup_steps": 0},
                          overrides={"weight_decay": 0.0})
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path), "weight_decay": 0.05})
    assert config.lr_warmup_steps == 0 and config.text_encoder_weight_decay == 0.0
    _, functions, _ = plan_schedule(config, batches_per_epoch=10)
    assert functions["unet"](0) == config.lr  # no warmup ramp


def test_optimizer_json_nulls_and_missing_doc(tmp_path):
    path = write(tmp_path / "optimizer.json", {"base": {"optimizer": None, "lr": None, "lr_scheduler": None},
                                               "text_encoder_overrides": {"optimizer": None, "lr": None}})
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path)})
    assert config.optimizer == "adamw8bit" and config.lr == 1e-6 and config.text_encoder_lr is None


def test_unknown_optimizer_name_is_an_error(tmp_path):
    """ED2 silently fell back to AdamW8bit."""
    path = optimizer_json(tmp_path, base={"optimizer": "adamw_8bit"})
    with pytest.raises(ConfigError, match="key 'optimizer' = \"adamw_8bit\".*did you mean"):
        load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path)})


def test_unknown_optimizer_json_key_is_refused_with_suggestion(tmp_path):
    path = optimizer_json(tmp_path, base={"weight_decy": 0.1})
    with pytest.raises(ConfigError, match="'weight_decy'.*did you mean 'weight_decay'"):
        load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path)})


def test_validation_old_names_are_read_with_a_note(tmp_path):
    manual = tmp_path / "val"
    manual.mkdir()
    path = write(tmp_path / "val.json", {"val_split_mode": "manual", "val_data_root": str(manual),
                                         "val_split_proportion": 0.1, "use_relative_loss": False})
    config = load_config(None, {"data_root": str(DEMO_DATA), "validation_config": str(path)})
    assert config.validation.manual_data_root == str(manual) and config.validation.auto_split_proportion == 0.1
    assert sum("old name" in note for note in config.notes) == 2
    assert any("use_relative_loss" in note for note in config.notes)


def test_findlast_picks_the_newest_checkpoint_of_the_project(tmp_path):
    logs = tmp_path / "logs"
    for index, name in enumerate(["proj-20260101-000000/ckpts/proj-ep001-gs00010",
                                  "proj-20260102-000000/ckpts/proj-ep002-gs00020",
                                  "other-20260103-000000/ckpts/other-ep009-gs00090",
                                  "proj-20260102-000000/ckpts/.proj-ep003-gs00030.tmp-1"]):
        folder = logs / name
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        stamp = time.time() - 100 + index
        os.utime(folder / "model_index.json", (stamp, stamp))
    config = load_config(None, {"data_root": str(DEMO_DATA), "logdir": str(logs), "project_name": "proj",
                                "resume_ckpt": "findlast"})
    assert config.resume_ckpt.endswith("proj-ep002-gs00020")
    with pytest.raises(ConfigError, match="findlast.*no checkpoint of project 'nothing'"):
        load_config(None, {"data_root": str(DEMO_DATA), "logdir": str(logs), "project_name": "nothing",
                           "resume_ckpt": "findlast"})


def test_ed2_default_optimizer_json_runs_unet_constant_and_text_encoder_cosine(tmp_path):
    """ED2's shipped optimizer.json: UNet constant 1e-6, text encoder cosine at 5e-7 with automatic decay/warmup."""
    path = optimizer_json(tmp_path, base={"optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "constant",
                                          "lr_decay_steps": None, "lr_warmup_steps": None},
                          overrides={"optimizer": None, "lr": 5e-7, "lr_scheduler": "cosine"},
                          doc={"base": "..."}, apply_grad_scaler_step_tweaks=True)
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path), "max_epochs": 10})
    _, functions, _ = plan_schedule(config, batches_per_epoch=10)  # 100 steps: decay 150, warmup 3
    assert {functions["unet"](k) for k in range(100)} == {1e-6}
    text = [functions["text_encoder"](k) for k in range(100)]
    assert text[0] == 0 and text[3] == pytest.approx(5e-7) and text[99] < text[50] < text[3]
