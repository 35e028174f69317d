"""An ED2 project folder (train.json, optimizer.json, validation json, nested data with sidecars and per-folder
files) trains unchanged. Only the base model is swapped for the tiny one, as there is no network here."""

import json

from tests.conftest import ROOT
from trainer.loop import train
from utils.config import load_config

PROJECT = ROOT / "tests" / "fixtures" / "ed2_project"


def test_ed2_project_trains_unchanged(model_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT)  # ED2 resolves the project's relative paths from where it is run
    config = load_config(PROJECT / "train.json", {
        "resume_ckpt": "tiny", "model_cache_dir": str(model_cache), "resolution": 64, "max_epochs": 2,
        "logdir": str(tmp_path / "logs"), "save_every_n_epochs": None, "sample_prompts": None})
    noted = " ".join(config.notes)
    for legacy in ("amp", "useadam8bit", "lowvram", "disable_xformers", "scale_lr", "val_split_proportion"):
        assert f"'{legacy}'" in noted
    optimizer = json.loads((PROJECT / "optimizer.json").read_text())
    assert config.optimizer == optimizer["base"]["optimizer"]
    summary = train(config)
    assert summary["finite"] and summary["steps"] > 0
    assert summary["images"]["validation"] > 0 and summary["val_loss"]["min"] is not None
    assert (tmp_path / "logs").glob("project_abc-*/ckpts/*.safetensors")
