import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "demo" / "data"

# Tests never reach a model hub: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One tiny model build per test session, shared by every test that trains or converts."""
    from trainer.tiny_model import tiny_model_path

    cache = tmp_path_factory.mktemp("model-cache")
    tiny_model_path(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> Path:
    from trainer.tiny_model import tiny_model_path

    return tiny_model_path(model_cache)


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A private copy of the demo images, for tests that add or break files."""
    target = tmp_path / "data"
    shutil.copytree(DEMO_DATA, target)
    return target


def tiny_config(model_cache: Path, data_root: Path, logdir: Path, **overrides):
    """A config for a short CPU run of the tiny model."""
    from utils.config import load_config

    values = {
        "resume_ckpt": "tiny",
        "model_cache_dir": str(model_cache),
        "data_root": str(data_root),
        "logdir": str(logdir),
        "project_name": "t",
        "resolution": 64,
        "batch_size": 4,
        "max_epochs": 2,
        "lr": 1e-4,
        "optimizer": "adamw",
        "mixed_precision": "no",
        "cond_dropout": 0.0,
        "log_step": 1,
        "seed": 42,
        "validation_config": {"auto_split_proportion": 0.2, "every_n_epochs": 1, "timesteps": 2},
    }
    values.update(overrides)
    return load_config(None, values)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "multi_process: launches real process groups with accelerate (gloo on the CPU); part of CI, "
        "skip locally with -m 'not multi_process'",
    )
