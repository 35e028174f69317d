"""ED2 configs load as ED2 users wrote them, with ED2's known config faults fixed (one test each)."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from optimizer.lr import plan_schedule
from tests.conftest import DEMO_DATA, ROOT
from utils.config import ConfigError, load_config
from utils.ed2_compat import NOTED_KEYS


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_every_legacy_key_is_accepted_with_a_note(tmp_path):
    legacy = {
        key: True for key in ("amp", "useadam8bit", "lowvram", "disable_xformers", "ed1_mode", "scale_lr", "notebook")
    }
    config = load_config(write(tmp_path / "train.json", {"data_root": str(DEMO_DATA), **legacy}))
    for key in legacy:
        assert any(f"'{key}'" in note for note in config.notes), f"{key} was ignored silently"


def test_every_ed2_train_json_key_is_accepted(tmp_path):
    """ED2's documented train.json keys (ed2.md §1.2): each is a schema key or a noted key."""
    ed2_keys = {
        "amp": True,
        "disable_amp": False,
        "attn_type": "sdp",
        "batch_size": 4,
        "grad_accum": 1,
        "gradient_checkpointing": True,
        "ckpt_every_n_minutes": None,
        "save_every_n_epochs": 20,
        "save_ckpts_from_n_epochs": 0,
        "save_ckpt_dir": None,
        "save_full_precision": False,
        "save_optimizer": False,
        "no_save_ckpt": False,
        "no_prepend_last": False,
        "clip_grad_norm": None,
        "clip_skip": 0,
        "cond_dropout": 0.04,
        "data_root": str(DEMO_DATA),
        "disable_textenc_training": False,
        "disable_unet_training": False,
        "embedding_perturbation": 0.0,
        "flip_p": 0.0,
        "gpuid": 0,
        "logdir": str(tmp_path / "logs"),
        "log_step": 25,
        "loss_type": "mse_huber",
        "lr": 1e-6,
        "lr_scheduler": "constant",
        "lr_warmup_steps": None,
        "lr_decay_steps": 0,
        "max_epochs": 40,
        "optimizer_config": None,
        "plugins": None,
        "project_name": "project_abc",
        "run_name": None,
        "resolution": 512,
        "resume_ckpt": "tiny",
        "sample_prompts": None,
        "sample_steps": 300,
        "seed": -1,
        "shuffle_tags": False,
        "keep_tags": 0,
        "timestep_start": 0,
        "timestep_end": 1000,
        "train_sampler": "ddpm",
        "wandb": False,
        "validation_config": None,
        "write_schedule": False,
        "rated_dataset": False,
        "rated_dataset_target_dropout_percent": 50,
        "zero_frequency_noise_ratio": 0.02,
        "pyramid_noise_discount": 0.03,
        "enable_zero_terminal_snr": False,
        "min_snr_gamma": 5.0,
        "load_settings_every_epoch": False,
        "ema_decay_rate": None,
        "ema_strength_target": None,
        "ema_update_interval": None,
        "ema_device": None,
        "ema_sample_nonema_model": False,
        "ema_sample_ema_model": False,
        "ema_resume_model": None,
        "notebook": False,
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
    config = load_config(
        write(
            tmp_path / "t.json",
            {"data_root": str(DEMO_DATA), "grad_accum": None, "ema_update_interval": None, "log_step": None},
        )
    )
    assert config.grad_accum == 1 and config.log_step == 25


def optimizer_json(tmp_path, base=None, overrides=None, freezing=None, **top):
    data = {"base": base or {}, "text_encoder_overrides": overrides or {}, **top}
    if freezing is not None:
        data["text_encoder_freezing"] = freezing
    return write(tmp_path / "optimizer.json", data)


def test_optimizer_json_sections_apply(tmp_path):
    path = optimizer_json(
        tmp_path,
        base={"optimizer": "adamw", "lr": 2e-6, "lr_scheduler": "cosine", "betas": [0.9, 0.99], "weight_decay": 0.02},
        overrides={"lr": 5e-7, "weight_decay": 0.0},
        freezing={"unfreeze_last_n_layers": 2},
    )
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path)})
    assert (config.optimizer, config.lr, config.lr_scheduler) == ("adamw", 2e-6, "cosine")
    assert config.betas == (0.9, 0.99) and config.weight_decay == 0.02
    assert config.text_encoder_lr == 5e-7 and config.text_encoder_weight_decay == 0.0
    assert config.text_encoder_unfreeze_last_n_layers == 2


def test_train_json_lr_wins_over_optimizer_json(tmp_path):
    optimizer_json(tmp_path, base={"lr": 2e-6})
    config = load_config(
        write(tmp_path / "t.json", {"data_root": str(DEMO_DATA), "lr": 3e-6, "optimizer_config": "optimizer.json"})
    )
    assert config.lr == 3e-6 and any("wins over optimizer_config" in note for note in config.notes)


def test_zero_in_optimizer_json_means_zero(tmp_path):
    """ED2's `x or fallback` chains turned 0 warmup into the automatic 2% warmup."""
    path = optimizer_json(
        tmp_path, base={"lr_scheduler": "cosine", "lr_warmup_steps": 0}, overrides={"weight_decay": 0.0}
    )
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path), "weight_decay": 0.05})
    assert config.lr_warmup_steps == 0 and config.text_encoder_weight_decay == 0.0
    _, schedules, _ = plan_schedule(config, batches_per_epoch=10)
    assert schedules.lr["unet"](0) == config.lr  # no warmup ramp


def test_optimizer_json_nulls_and_missing_doc(tmp_path):
    path = write(
        tmp_path / "optimizer.json",
        {
            "base": {"optimizer": None, "lr": None, "lr_scheduler": None},
            "text_encoder_overrides": {"optimizer": None, "lr": None},
        },
    )
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
    path = write(
        tmp_path / "val.json",
        {
            "val_split_mode": "manual",
            "val_data_root": str(manual),
            "val_split_proportion": 0.1,
            "use_relative_loss": False,
        },
    )
    config = load_config(None, {"data_root": str(DEMO_DATA), "validation_config": str(path)})
    assert config.validation.manual_data_root == str(manual) and config.validation.auto_split_proportion == 0.1
    assert sum("old name" in note for note in config.notes) == 2
    assert any("use_relative_loss" in note for note in config.notes)


def fake_checkpoint(logs, name: str, age: int):
    folder = logs / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    stamp = time.time() - 100 + age
    os.utime(folder / "model_index.json", (stamp, stamp))
    return folder


def test_findlast_takes_the_newest_checkpoint_of_any_project(tmp_path):
    """ED2 train.py find_last_checkpoint: os.walk over logdir, the newest model_index.json by mtime whatever the
    project; `_ema` folders left out; an `errored` newest one refused (doc/CHAINING.md: a new project_name per
    session)."""
    logs = tmp_path / "logs"
    for age, name in enumerate(
        [
            "proj_ch0-20260101-000000/ckpts/proj_ch0-ep001-gs00010",
            "proj_ch0-20260102-000000/ckpts/proj_ch0-ep002-gs00020",
            "proj_ch1-20260103-000000/ckpts/proj_ch1-ep009-gs00090",
            "proj_ch1-20260103-000000/ckpts/.proj_ch1-ep010-gs00100.tmp-1",
            "ed2_run_20260104/ckpts/last-proj-ep10-gs00100_ema",
        ]
    ):
        fake_checkpoint(logs, name, age)
    config = load_config(
        None, {"data_root": str(DEMO_DATA), "logdir": str(logs), "project_name": "proj_ch2", "resume_ckpt": "findlast"}
    )
    assert config.resume_ckpt.endswith("proj_ch1-ep009-gs00090")
    assert any("newest checkpoint under logdir" in note for note in config.notes)
    fake_checkpoint(logs, "ed2_run_20260105/ckpts/errored-proj-ep03-gs00030", 10)
    with pytest.raises(ConfigError, match="findlast.*errored-proj-ep03-gs00030.*saved after a crash"):
        load_config(None, {"data_root": str(DEMO_DATA), "logdir": str(logs), "resume_ckpt": "findlast"})
    with pytest.raises(ConfigError, match="findlast.*no checkpoint"):
        load_config(None, {"data_root": str(DEMO_DATA), "logdir": str(tmp_path / "empty"), "resume_ckpt": "findlast"})


def test_ed2_default_optimizer_json_runs_unet_constant_and_text_encoder_cosine(tmp_path):
    """ED2's shipped optimizer.json: UNet constant 1e-6, text encoder cosine at 5e-7 with automatic decay/warmup."""
    path = optimizer_json(
        tmp_path,
        base={
            "optimizer": "adamw8bit",
            "lr": 1e-6,
            "lr_scheduler": "constant",
            "lr_decay_steps": None,
            "lr_warmup_steps": None,
        },
        overrides={"optimizer": None, "lr": 5e-7, "lr_scheduler": "cosine"},
        doc={"base": "..."},
        apply_grad_scaler_step_tweaks=True,
    )
    config = load_config(None, {"data_root": str(DEMO_DATA), "optimizer_config": str(path), "max_epochs": 10})
    _, schedules, _ = plan_schedule(config, batches_per_epoch=10)  # 100 steps: decay 150, warmup 3
    assert {schedules.lr["unet"](k) for k in range(100)} == {1e-6}
    text = [schedules.lr["text_encoder"](k) for k in range(100)]
    assert text[0] == 0 and text[3] == pytest.approx(5e-7) and text[99] < text[50] < text[3]


# --- ED2's own files, as its repository ships them (tests/fixtures/ed2_repo: its structure, our text) -------------

ED2_REPO = ROOT / "tests" / "fixtures" / "ed2_repo"
ED2_TRAINING_DATA = ED2_REPO / "training_data"


@pytest.fixture
def ed2_repo(tmp_path, monkeypatch):
    """A copy of ED2's trainer folder, as the working folder: ED2 is run from there and reads its paths from there."""
    folder = tmp_path / "EveryDream2trainer"
    shutil.copytree(ED2_REPO, folder)
    monkeypatch.chdir(folder)
    return folder


def ed2_overrides(tmp_path, **more):
    """What a user changes on another machine: the data folder, the base model, where logs go."""
    return {"data_root": str(ED2_TRAINING_DATA), "resume_ckpt": "tiny", "logdir": str(tmp_path / "logs"), **more}


@pytest.mark.parametrize("name", ["train.json", "trainSD21.json", "cfgs/train_coco.json"])
def test_ed2s_shipped_configs_load_with_their_documented_validation_files(ed2_repo, tmp_path, name):
    """ED2 data/every_dream_validation.py EveryDreamValidator.__init__ reads the validation file with json.load and
    takes the keys it knows: the "documentation" block of validation_default.json and cfgs/validation_coco.json is
    read past, like optimizer.json's "doc"; "validate_training": "true" (a string) is on."""
    (ed2_repo / "E:" / "datasets" / "harbours" / "val").mkdir(parents=True)  # validation_coco.json's manual folder
    config = load_config(Path(name), ed2_overrides(tmp_path))
    assert config.validation.validate_training is True and config.from_ed2
    assert not any("documentation" in note for note in config.notes)
    if name == "cfgs/train_coco.json":
        assert (config.validation.val_split_mode, config.validation.stabilize_training_loss) == ("manual", True)
        assert sum("old name" in note for note in config.notes) == 2  # val_data_root, val_split_proportion
    else:
        assert (config.validation.val_split_mode, config.validation.auto_split_proportion) == ("automatic", 0.15)


def test_ed2s_sample_prompts_json_is_checked_when_the_config_loads(ed2_repo, tmp_path, capsys):
    """ED2 utils/sample_generator.py SampleGenerator._reload_config_json reads every key of its shipped
    sample_prompts.json (CRLF line ends, tabs): it loads here, and a fault stops the config, so --plot_schedule finds
    it before any model loads."""
    import train

    config = load_config(Path("train.json"), ed2_overrides(tmp_path, sample_prompts="sample_prompts.json"))
    assert config.sample_prompts.endswith("sample_prompts.json")
    broken = (ed2_repo / "sample_prompts.json").read_bytes().replace(b'"cfgs": [1,11]', b'"cfg": [1,11]')
    (ed2_repo / "broken.json").write_bytes(broken)
    overrides = ed2_overrides(tmp_path, sample_prompts="broken.json")
    with pytest.raises(ConfigError, match=r"broken.json.*unknown key 'samples\[2\].cfg' \(did you mean 'cfgs'\?\)"):
        load_config(Path("train.json"), overrides)
    arguments = ["--config", "train.json", "--plot_schedule", str(tmp_path / "preview")]
    arguments += [f"--{key}={value}" for key, value in overrides.items()]
    assert train.main(arguments) != 0
    assert "unknown key 'samples[2].cfg'" in capsys.readouterr().err
    assert not (tmp_path / "preview").exists()


def test_an_ed2_config_without_optimizer_config_reads_optimizer_json_of_the_working_folder(ed2_repo, tmp_path):
    """ED2 train.py: --optimizer_config defaults to "optimizer.json", read from os.curdir when it exists (main: the
    optimizer_config_path lines). chain0.json names none: the working folder's optimizer.json applies, noted."""
    config = load_config(Path("chain0.json"), ed2_overrides(tmp_path))
    assert config.optimizer_config == "optimizer.json" and config.text_encoder_lr == 5e-7
    assert config.lr == 2.5e-6  # chain0.json's lr wins over optimizer.json's, as in ED2
    assert any("'optimizer_config' not given" in note for note in config.notes)
    (ed2_repo / "optimizer.json").unlink()
    assert load_config(Path("chain0.json"), ed2_overrides(tmp_path)).optimizer_config is None
    (ed2_repo / "optimizer.json").write_text('{"base": {"lr_scheduler": "cosine"}}')
    ours = write(tmp_path / "ours.json", {"data_root": str(ED2_TRAINING_DATA)})  # not an ED2 config
    assert load_config(ours).optimizer_config is None


def test_ed2_step_counts_are_batches_and_are_converted_with_grad_accum(ed2_repo, tmp_path):
    """ED2 train.py main loop: global_step grows by one per batch, samples when (global_step + 1) % sample_steps
    == 0, logs when (global_step + 1) % log_step == 0; optimizer/optimizers.py EveryDreamOptimizer.step steps its
    LR schedulers every batch. chain2.json has grad_accum 5: 300 batches are 60 optimizer steps, 25 are 5."""
    (ed2_repo / "optimizer.json").write_text(
        json.dumps({"base": {"lr_scheduler": "cosine", "lr_warmup_steps": 100, "lr_decay_steps": 1000}})
    )
    config = load_config(Path("chain2.json"), ed2_overrides(tmp_path))
    assert (config.grad_accum, config.sample_steps, config.log_step) == (5, 60, 5)
    assert (config.lr_warmup_steps, config.lr_decay_steps) == (20, 200)
    (note,) = [note for note in config.notes if "counts these in batches" in note]
    assert "sample_steps 300 -> 60" in note and "lr_warmup_steps 100 -> 20" in note
    typed = load_config(Path("chain2.json"), ed2_overrides(tmp_path, sample_steps=300))  # the command line's: ours
    assert (typed.sample_steps, typed.log_step) == (300, 5)
    assert load_config(Path("chain0.json"), ed2_overrides(tmp_path)).sample_steps == 300  # grad_accum 1


def test_keep_tags_in_an_ed2_config_is_noted_as_working(ed2_repo, tmp_path):
    """ED2 data/image_train_item.py ImageCaption.__get_shuffled_tags sets keep_tags = min(keep_tags, 0): ED2 kept
    no tag in place. Here keep_tags works, and an ED2 config that sets it is told so."""
    config = load_config(Path("train.json"), ed2_overrides(tmp_path, shuffle_tags=True, keep_tags=2))
    assert any("'keep_tags' 2" in note and "no effect" in note for note in config.notes)
