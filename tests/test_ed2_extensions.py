"""ED2's plugins (its doc/PLUGINS.md and plugins/plugins.py: hook names and keyword arguments from its train.py
main()), load_settings_every_epoch, and the optional wandb logging."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_DATA
from trainer.loop import Trainer
from utils.config import ConfigError, load_config

# ED2 train.py main(): the keyword arguments of each plugin_runner.run_on_* call.
ED2_HOOK_KWARGS = {
    "on_training_start": {"log_folder", "project_name"},
    "on_epoch_start": {
        "epoch",
        "global_step",
        "epoch_length",
        "project_name",
        "log_folder",
        "data_root",
        "arg_update_callback",
    },
    "on_step_start": {"epoch", "local_step", "global_step", "project_name", "log_folder", "batch", "ed_state"},
    "on_step_end": {
        "epoch",
        "global_step",
        "local_step",
        "project_name",
        "log_folder",
        "data_root",
        "batch",
        "ed_state",
    },
    "on_epoch_end": {"epoch", "global_step", "project_name", "log_folder", "data_root", "arg_update_callback"},
    "on_training_end": set(),
}

# A plugin as an ED2 user writes it: ED2's import of the base class, its hook names, **kwargs.
RECORDER = """
import json
from plugins.plugins import BasePlugin

LOG = {log!r}


class Recorder(BasePlugin):
    def _record(self, hook, kwargs):
        entry = {{"hook": hook, "keys": sorted(kwargs), "step": kwargs.get("global_step")}}
        with open(LOG, "a") as handle:
            handle.write(json.dumps(entry) + "\\n")

    def on_training_start(self, **kwargs):
        self._record("on_training_start", kwargs)

    def on_epoch_start(self, **kwargs):
        self._record("on_epoch_start", kwargs)

    def on_step_start(self, **kwargs):
        assert kwargs["ed_state"].unet is not None and kwargs["batch"]["captions"]
        self._record("on_step_start", kwargs)

    def on_step_end(self, **kwargs):
        self._record("on_step_end", kwargs)

    def on_epoch_end(self, **kwargs):
        self._record("on_epoch_end", kwargs)
        {epoch_end_extra}

    def on_model_save(self, **kwargs):
        self._record("on_model_save", kwargs)

    def on_training_end(self):  # ED2 calls it with no arguments
        self._record("on_training_end", {{}})
"""

RUN = {
    "resume_ckpt": "tiny",
    "resolution": 64,
    "batch_size": 4,
    "max_epochs": 2,
    "lr": 1e-4,
    "optimizer": "adamw",
    "mixed_precision": "no",
    "log_step": 1,
    "seed": 42,
    "project_name": "t",
}


def project(tmp_path: Path, model_cache: Path, module: str, epoch_end_extra: str = "pass", **settings) -> Path:
    """A config file with a plugins/ folder next to it, as an ED2 user's project folder holds them."""
    (tmp_path / "plugins").mkdir(exist_ok=True)
    log = tmp_path / "hooks.jsonl"
    source = RECORDER.format(log=str(log), epoch_end_extra=epoch_end_extra)
    (tmp_path / "plugins" / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    config = {
        **RUN,
        "data_root": str(DEMO_DATA),
        "logdir": str(tmp_path / "logs"),
        "model_cache_dir": str(model_cache),
        "plugins": [f"plugins.{module}.Recorder"],
        **settings,
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def recorded(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "hooks.jsonl").read_text().splitlines()]


def test_an_ed2_plugin_runs_unchanged_with_ed2s_hooks_and_arguments(model_cache, tmp_path):
    summary = Trainer(load_config(project(tmp_path, model_cache, "recorder_a"), {})).run()
    calls = recorded(tmp_path)
    hooks = [call["hook"] for call in calls]
    steps_per_epoch = summary["steps_per_epoch"]
    assert hooks[0] == "on_training_start" and hooks[-2:] == ["on_training_end", "on_model_save"]
    assert hooks.count("on_epoch_start") == hooks.count("on_epoch_end") == 2
    assert hooks.count("on_step_start") == hooks.count("on_step_end") == summary["steps"] == 2 * steps_per_epoch
    for call in calls:
        if call["hook"] in ED2_HOOK_KWARGS:
            assert set(call["keys"]) == ED2_HOOK_KWARGS[call["hook"]], call["hook"]
    assert set(next(c for c in calls if c["hook"] == "on_model_save")["keys"]) == {"ed_state", "save_folder"}
    epoch_starts = [call["step"] for call in calls if call["hook"] == "on_epoch_start"]
    assert epoch_starts == [0, steps_per_epoch]


def test_a_failing_plugin_stops_the_run_with_its_work_saved_and_names_itself(model_cache, tmp_path, capsys):
    config = load_config(
        project(tmp_path, model_cache, "recorder_b", epoch_end_extra="raise RuntimeError('out of ideas')"), {}
    )
    summary = Trainer(config).run()
    out = capsys.readouterr().out
    assert summary["exit_code"] == 1 and summary["stopped"] == "plugin failed"
    assert "plugin 'plugins.recorder_b.Recorder' failed in on_epoch_end: RuntimeError: out of ideas" in out
    assert summary["last_state"] and Path(summary["last_state"]).is_dir(), "the work is saved before the exit"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("plugins.no_such_file.Thing", "its module 'plugins.no_such_file' could not be imported"),
        ("plugins.plugins.Image", "is not a class extending plugins.plugins.BasePlugin"),
        ("Recorder", "give the class as module.Class"),
    ],
)
def test_a_plugin_that_cannot_load_is_a_config_error(model_cache, tmp_path, name, message):
    config = load_config(project(tmp_path, model_cache, "recorder_c"), {"plugins": [name]})
    with pytest.raises(ConfigError, match="key 'plugins'") as raised:
        Trainer(config)
    assert message in str(raised.value)


def test_settings_reread_each_epoch_take_effect_when_live(model_cache, tmp_path, capsys):
    """A plugin edits the config file at the end of epoch 1 (as a user would mid-run): log_step, a key the loop
    reads as it goes, takes its new value; lr, fixed by the plan, waits for a resume and is said to."""
    config_path = tmp_path / "train.json"
    edit = (
        "import json; path = LOG.replace('hooks.jsonl', 'train.json'); data = json.load(open(path)); "
        "data.update(log_step=7, lr=3e-4); json.dump(data, open(path, 'w'))"
    )
    project(tmp_path, model_cache, "recorder_d", epoch_end_extra=edit, load_settings_every_epoch=True)
    trainer = Trainer(load_config(config_path, {}))
    trainer.run()
    out = capsys.readouterr().out
    assert "load_settings_every_epoch: log_step 1 -> 7" in out
    assert "load_settings_every_epoch: lr changed in the file" in out and "take effect when the run is resumed" in out
    assert (trainer.config.log_step, trainer.config.lr) == (7, 1e-4)


def test_wandb_logs_offline_when_asked(model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    config_path = project(tmp_path, model_cache, "recorder_e", wandb=True, max_epochs=None, max_steps=2, plugins=[])
    summary = Trainer(load_config(config_path, {})).run()
    run_dir = Path(summary["run_dir"])
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline_runs = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb")), "the offline run holds its logged data"


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="key 'wandb' = true: the wandb package is not installed"):
        load_config(None, {"data_root": str(DEMO_DATA), "wandb": True})


def test_ed2s_shipped_keys_are_settings_now():
    config = load_config(None, {"data_root": str(DEMO_DATA), "wandb": False, "load_settings_every_epoch": False})
    assert not [note for note in config.notes if "wandb" in note or "load_settings" in note]


TRANSFORMER = """
from PIL import Image
from plugins.plugins import BasePlugin


class Transformer(BasePlugin):
    def transform_caption(self, caption):
        return caption.upper() + " ZORB"

    def transform_pil_image(self, img):
        return Image.new("RGB", (8, 8), (255, 0, 0))  # another size: the loader brings it back to the bucket's
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_plugin_transforms_apply_to_every_loaded_caption_and_image(model_cache, tmp_path, workers):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / f"transformer_{workers}.py").write_text(TRANSFORMER, encoding="utf-8")
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**RUN, "data_root": str(DEMO_DATA), "logdir": str(tmp_path / "logs")}))
    config = load_config(
        path,
        {
            "model_cache_dir": str(model_cache),
            "plugins": [f"plugins.transformer_{workers}.Transformer"],
            "num_workers": workers,
            "validation_config": None,
        },
    )
    trainer = Trainer(config)
    batch = next(iter(trainer.feed.epoch_loader(0)))
    assert all(caption.endswith(" ZORB") and caption == caption.upper() for caption in batch["captions"])
    pixels = batch["pixel_values"]
    assert pixels.shape[-2:] == (64, 64)
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels, red.expand_as(pixels), rtol=0, atol=1e-6)
    trainer.close()


def test_a_transform_plugin_with_a_cache_is_refused(model_cache, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "transformer_c.py").write_text(TRANSFORMER, encoding="utf-8")
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**RUN, "data_root": str(DEMO_DATA), "logdir": str(tmp_path / "logs")}))
    config = load_config(
        path,
        {"model_cache_dir": str(model_cache), "plugins": ["plugins.transformer_c.Transformer"], "cache_latents": True},
    )
    with pytest.raises(ConfigError, match="transforms the images as they load .* cache_latents is on"):
        Trainer(config)


def test_an_ed2_config_using_these_features_is_told_where_they_differ(tmp_path):
    """docs/ed2.md lists the differences kept on purpose; an ED2 config that triggers one gets the note."""
    path = tmp_path / "train.json"
    ed2 = {"gpuid": 0, "data_root": str(DEMO_DATA), "max_epochs": 4, "rated_dataset": True}
    path.write_text(json.dumps({**ed2, "load_settings_every_epoch": True, "plugins": ["plugins.example_plugin.X"]}))
    notes = load_config(path, {}).notes
    for key in ("rated_dataset", "load_settings_every_epoch", "plugins"):
        assert any(note.startswith(f"'{key}': ") for note in notes), key
