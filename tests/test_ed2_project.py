"""An ED2 project folder (train.json, optimizer.json, validation json, nested data with sidecars and per-folder
files) trains unchanged. Only the base model is swapped for the tiny one, as there is no network here."""

import json
import shutil
from pathlib import Path

from tests.conftest import ROOT
from trainer.loop import train
from utils.config import load_config

PROJECT = ROOT / "tests" / "fixtures" / "ed2_project"


def test_ed2_project_trains_unchanged(model_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT)  # ED2 resolves the project's relative paths from where it is run
    config = load_config(
        PROJECT / "train.json",
        {
            "resume_ckpt": "tiny",
            "model_cache_dir": str(model_cache),
            "resolution": 64,
            "max_epochs": 2,
            "logdir": str(tmp_path / "logs"),
            "save_every_n_epochs": None,
            "sample_prompts": None,
        },
    )
    noted = " ".join(config.notes)
    for legacy in ("amp", "useadam8bit", "lowvram", "disable_xformers", "scale_lr", "val_split_proportion"):
        assert f"'{legacy}'" in noted
    optimizer = json.loads((PROJECT / "optimizer.json").read_text())
    assert config.optimizer == optimizer["base"]["optimizer"]
    summary = train(config)
    assert summary["finite"] and summary["steps"] > 0
    assert summary["images"]["validation"] > 0 and summary["val_loss"]["min"] is not None
    assert (tmp_path / "logs").glob("project_abc-*/ckpts/*.safetensors")


ED2_REPO = ROOT / "tests" / "fixtures" / "ed2_repo"


def test_ed2_chained_sessions_with_new_project_names_continue_from_the_last(model_cache, tmp_path, monkeypatch):
    """ED2 doc/CHAINING.md: chain0.json, then chain1.json with "resume_ckpt": "findlast" and its own project_name;
    ED2 train.py find_last_checkpoint takes the newest checkpoint anywhere under logdir."""
    folder = tmp_path / "EveryDream2trainer"
    shutil.copytree(ED2_REPO, folder)
    monkeypatch.chdir(folder)  # ED2 is run from its folder: chain0.json's optimizer.json comes from there
    common = {
        "data_root": "training_data",
        "model_cache_dir": str(model_cache),
        "logdir": str(tmp_path / "logs"),
        "resolution": 64,
        "batch_size": 2,
        "max_epochs": 1,
        "sample_prompts": None,
        "seed": 7,
    }
    first = train(load_config(Path("chain0.json"), {**common, "resume_ckpt": "tiny", "project_name": "lh_ch0"}))
    second_config = load_config(Path("chain1.json"), {**common, "project_name": "lh_ch1"})
    assert second_config.resume_ckpt == first["final_checkpoint"]["diffusers"]
    second = train(second_config)
    assert second["finite"] and second["steps"] == first["steps"] == 2  # floor(3 + 1.5) = 4 samples, 2 batches
