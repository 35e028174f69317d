"""`resume_ckpt: tiny-pretrained`: the committed model (scripts/pretrain_tiny.py) loads as a run loads it, its files
are the ones its manifest names, and it draws the colour and the shape it is asked for."""

import json

import numpy as np
import pytest

from scripts.pretrain_tiny import (
    COLOURS,
    EVAL_PROMPTS,
    EVAL_SCHEDULER,
    EVAL_SEEDS,
    MANIFEST,
    make_dataset,
    measure_accuracy,
    parse_args,
    prompt_accuracy,
    random_scene,
)
from tests.conftest import DEMO_DATA, tiny_config
from trainer.model import load_model
from trainer.sampling import build_scheduler
from trainer.tiny_model import TINY_PRETRAINED_MODEL_NAME, TINY_PRETRAINED_PATH
from utils.checkpoint import file_sha256
from utils.config import holds_path

MAX_WEIGHT_BYTES = 10 * 2**20  # "a few MB" committed


def test_the_measure_reads_clean_drawings_exactly():
    """describe (dominant hue of the high-chroma pixels, bounding-box fill ratio) names every drawn scene right:
    the measure itself is not where the accuracy below is lost."""
    images, scenes = make_dataset(150, seed=123)

    assert measure_accuracy(images, scenes) == 1.0


def test_the_measure_can_tell_a_wrong_drawing():
    """The same images under shuffled descriptions: most are read as not what those say."""
    images, scenes = make_dataset(60, seed=7)
    rng = np.random.default_rng(0)
    others = [random_scene(rng) for _ in scenes]
    differ = [(a.colour, a.shape) != (b.colour, b.shape) for a, b in zip(scenes, others, strict=True)]

    assert measure_accuracy(images, others) == pytest.approx(1 - np.mean(differ), abs=1e-9)


def test_the_manifest_names_every_file_with_its_sha256():
    manifest = json.loads((TINY_PRETRAINED_PATH / MANIFEST).read_text(encoding="utf-8"))
    on_disk = {
        path.relative_to(TINY_PRETRAINED_PATH).as_posix()
        for path in TINY_PRETRAINED_PATH.rglob("*")
        if path.is_file() and path.name != MANIFEST
    }

    assert set(manifest["sha256"]) == on_disk
    for name, digest in manifest["sha256"].items():
        assert file_sha256(TINY_PRETRAINED_PATH / name) == digest, name
    weights = [TINY_PRETRAINED_PATH / name for name in manifest["sha256"] if name.endswith(".safetensors")]
    assert len(weights) == 3  # unet, vae, text_encoder
    assert sum(path.stat().st_size for path in weights) < MAX_WEIGHT_BYTES


def test_vae_from_a_folder_without_a_vae_is_refused_plainly(tmp_path, capsys):
    """--vae-from names a folder with no VAE weights: one clear line naming the option and the folder, exit 2
    (argparse's usage error), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--vae-from", str(tmp_path)])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--vae-from {tmp_path}: no vae/diffusion_pytorch_model.safetensors there" in error
    assert "Traceback" not in error


def test_vae_from_the_committed_model_is_accepted():
    assert parse_args(["--vae-from", str(TINY_PRETRAINED_PATH)]).vae_from == TINY_PRETRAINED_PATH


def test_the_name_is_no_path():
    assert not holds_path("resume_ckpt", TINY_PRETRAINED_MODEL_NAME)


@pytest.fixture(scope="module")
def pretrained_model(tmp_path_factory):
    """tiny-pretrained, loaded by load_model from a config that names it, as a run loads it."""
    folder = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(folder / "cache", DEMO_DATA, folder / "logs", resume_ckpt=TINY_PRETRAINED_MODEL_NAME)
    return load_model(config)


def test_loads_as_a_stable_diffusion_model(pretrained_model):
    assert pretrained_model.source == str(TINY_PRETRAINED_PATH)
    assert not pretrained_model.is_sdxl
    assert pretrained_model.prediction_type == "epsilon"


# Issue 16's goal: 80% of the prompt set drawn as asked. The committed model (seed 0, the 1000-step VAE, 6000 UNet
# steps with an EMA of the weights) reads exactly that, 24 of 30, with the same six samples wrong at 1 and at 2 torch
# threads (the sampling is deterministic on a CPU); a regression in the model or the sampling path fails it.
GOAL = 0.8


def test_draws_the_colour_and_shape_it_is_asked_for(pretrained_model):
    """Each prompt "a <colour> <shape>" (5 colours x 3 shapes) with each fixed seed: the decoded sample's dominant
    hue names the colour and its bounding-box fill ratio the shape (scripts/pretrain_tiny.py describe)."""
    pipeline = pretrained_model.pipeline(build_scheduler(EVAL_SCHEDULER, pretrained_model.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)

    accuracy, records = prompt_accuracy(pipeline)

    assert len(records) == len(EVAL_PROMPTS) * len(EVAL_SEEDS) == len(COLOURS) * 3 * len(EVAL_SEEDS)
    wrong = [(record["prompt"], record["seed"], record["seen"]) for record in records if not record["right"]]
    assert accuracy >= GOAL, f"accuracy {accuracy:.0%}; drawn otherwise: {wrong}"
