"""`resume_ckpt: random:<name>`: the real architectures with random weights, built once into the model cache and
loaded like any diffusers folder. The builds here use the tiny model's configs (seconds); SD 1.5 at full size goes
through train.py on the CPU in the slow test at the end (EVERYCYCLE_SLOW_TESTS=1)."""

import json
import os
import resource
from dataclasses import replace

import pytest
import torch

import trainer.random_model as random_model
from bench import gpu_check
from tests.conftest import DEMO_DATA, tiny_config
from trainer.model import load_model
from trainer.single_file import BUNDLED
from trainer.tiny_model import DEFAULT_CACHE_DIR
from utils.config import ConfigError, holds_path


def test_an_unknown_name_lists_the_valid_ones(tmp_path):
    with pytest.raises(
        ConfigError, match="'random:sdxl': no such random model. Use one of: 'random:sd15', 'random:sd21'"
    ):
        random_model.random_model_path("random:sdxl", tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built, nothing left


@pytest.mark.parametrize("name, width, prediction", [("sd15", 768, "epsilon"), ("sd21", 1024, "v_prediction")])
def test_the_names_map_to_the_bundled_architectures(name, width, prediction):
    folder = BUNDLED / random_model.RANDOM_MODELS[name]
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == width
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction


def test_the_build_is_deterministic_and_leaves_the_callers_generators_alone(tiny_model_dir):
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first = random_model.build_random_pipeline(tiny_model_dir)
    assert torch.equal(torch.rand(3), expected_draw)
    second = random_model.build_random_pipeline(tiny_model_dir)
    for part in ("unet", "vae", "text_encoder"):
        weights = getattr(second, part).state_dict()
        assert all(torch.equal(tensor, weights[key]) for key, tensor in getattr(first, part).state_dict().items())
    assert not torch.equal(first.unet.conv_in.weight, torch.zeros_like(first.unet.conv_in.weight))


def test_built_once_then_loaded_like_any_diffusers_folder(model_cache, tiny_model_dir, tmp_path, monkeypatch):
    """A random model of the tiny architecture (the real ones take a minute and 4 GB): written atomically into
    the cache on first use, found there afterwards, and loaded by load_model as a run loads it."""
    builds = []
    build = random_model.build_random_pipeline
    monkeypatch.setitem(random_model.RANDOM_MODELS, "small", "tiny-architecture")
    monkeypatch.setattr(random_model, "bundled_config_dir", lambda name, cache_dir: tiny_model_dir)
    monkeypatch.setattr(random_model, "build_random_pipeline", lambda folder: builds.append(folder) or build(folder))
    cache = tmp_path / "cache"
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt="random:small", model_cache_dir=str(cache))

    model = load_model(config)
    again = load_model(config)

    assert builds == [tiny_model_dir]
    assert model.source == again.source == str(cache / f"random-small-v{random_model.RANDOM_VERSION}")
    assert sorted(p.name for p in cache.iterdir()) == [f"random-small-v{random_model.RANDOM_VERSION}"]
    reference = build(tiny_model_dir)
    assert all(torch.equal(tensor, reference.unet.state_dict()[key]) for key, tensor in model.unet.state_dict().items())
    assert model.unet.dtype == model.text_encoder.dtype == torch.float32


def test_a_random_name_is_not_a_path():
    """Needs the one-line change in utils/config.py's holds_path (a 'random:' resume_ckpt is a name, as 'tiny'),
    so that a config file's folder is never prepended to it."""
    assert not holds_path("resume_ckpt", "random:sd15")
    assert holds_path("data_root", "random:sd15")


@pytest.mark.skipif(
    os.environ.get("EVERYCYCLE_SLOW_TESTS") != "1",
    reason="SD 1.5 at full size on the CPU: 4 GB built "
    "once into the model cache (EVERYCYCLE_CACHE), then minutes and about 11 GB of memory per run; set "
    "EVERYCYCLE_SLOW_TESTS=1 to run it (figures: bench/results/full_size_cpu.txt)",
)
def test_sd15_at_full_size_trains_resumes_and_exports_on_the_cpu(tmp_path):
    """random:sd15 through train.py at 128 px, batch 1: 2 steps and a state, resumed for a third step, and the final
    single file loaded by diffusers' from_single_file with the bundled configs, offline (the diffusers folder's
    weights within fp16 rounding). In fp32: bf16 autocast is slower than fp32 on a CPU without bf16 units."""
    mode = replace(gpu_check.CPU, model="random:sd15", resolution=128, images=4, batch_size=1, steps=3, precision="no")
    session, setup = gpu_check.set_up(mode, tmp_path, DEFAULT_CACHE_DIR, gpu_check.throughput.Deadline(3600))
    first = session.train("full-size", session.config(max_steps=2))
    gpu_check.check_completed(first, 2)
    resumed = session.train("full-size", session.config(), extra=("--resume_from", "latest"))
    completed = gpu_check.check_completed(resumed, 3)
    assert "resumed from " in resumed.log and ": step 2 of 3" in resumed.log
    loads = gpu_check.check_checkpoint(resumed.summary(), session.single_file_config)

    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"\nfull size on the CPU: model {setup['model_seconds']} s (0: it was in the cache), first run "
        f"{first.seconds:.0f} s, resumed run {resumed.seconds:.0f} s, peak RSS of a run {peak_gib:.1f} GiB; "
        f"{gpu_check.format_details(completed | loads)}"
    )


def test_building_the_tiny_models_leaves_the_callers_generator_alone(tmp_path):
    """A run that builds `tiny` first (a fresh cache) must draw the same noise as one that finds it built: the
    builders seed torch inside a forked generator state."""
    import torch

    from trainer.tiny_model import tiny_model_path

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny_model_path(tmp_path)
    assert torch.equal(torch.rand(3), expected)
