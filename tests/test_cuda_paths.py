"""The CUDA-only branches, as far as a CPU reaches them (docs/cuda-paths.md lists every branch and where it is
covered): bf16 autocast through accelerate with the frozen parts in bf16, the grad scaler's state in a resumable
state, the CUDA generator states' shapes through the state files, the precision and launcher choices a GPU makes,
and the refusal of xformers without one."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import trainer.setup as setup
import utils.state as state
from tests.conftest import ROOT
from trainer.model import enable_xformers
from utils.config import ConfigError

# What torch.cuda.get_rng_state_all() returns for two GPUs: one Philox state per device, 8 bytes of seed and 8 of
# offset (uint8, shape [16]).
CUDA_RNG = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "available, bf16, expected", [(True, True, "bf16"), (True, False, "fp16"), (False, False, "no")]
)
def test_auto_precision_follows_the_gpu(monkeypatch, available, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert setup.resolve_mixed_precision("auto") == expected
    assert setup.resolve_mixed_precision("fp16") == "fp16"


@pytest.mark.parametrize("processes, gpu, on_cpus", [(2, False, True), (2, True, False), (1, False, False)])
def test_a_launch_trains_on_the_cpus_only_without_a_gpu(monkeypatch, processes, gpu, on_cpus):
    monkeypatch.setattr(setup, "launched_processes", lambda: processes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert setup.launched_on_cpus() is on_cpus


# accelerate keeps one AcceleratorState per process, and the tests before this one set it up without mixed
# precision: the bf16 run gets a process of its own.
BF16_RUN = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.conftest import DEMO_DATA, ROOT, tiny_config
from trainer.loop import Trainer

run = Trainer(tiny_config({model_cache!r}, DEMO_DATA, {logdir!r}, mixed_precision="bf16", validation_config=None,
                          max_steps=2, disable_textenc_training=True, sample_prompts={prompts!r}))
model = run.unwrapped_model()
assert (model.vae.dtype, model.text_encoder.dtype, model.unet.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
before = model.unet.conv_in.weight.detach().clone()
with run.accelerator.autocast():
    assert model.unet.conv_in(torch.zeros(1, 4, 8, 8)).dtype == torch.bfloat16
run.train()
run.sample()
run.close()
losses = [loss for _, loss in run.progress.train_losses]
assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
assert model.unet.conv_in.weight.dtype == torch.float32 and not torch.equal(model.unet.conv_in.weight, before)
assert list((run.run_dir / "samples").glob("gs00002-*.png"))
print("bf16 run ok")
"""


def test_bf16_autocast_through_accelerate_on_the_cpu(model_cache, tmp_path):
    """The GPU's default recipe on the CPU: the frozen VAE and text encoder in bf16, the trained UNet in fp32
    master weights under accelerate's autocast, a finite loss every step, and samples taken under autocast."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    script = BF16_RUN.format(
        root=str(ROOT), model_cache=str(model_cache), logdir=str(tmp_path / "logs"), prompts=str(prompts)
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "bf16 run ok" in result.stdout, result.stdout + result.stderr


def test_a_grad_scalers_state_survives_a_resumable_state(tmp_path):
    """fp16's GradScaler (accelerate makes one on CUDA only; torch has the same one for the CPU): an overflow skips
    the update and halves the scale, and the scaler's state goes through trainer_state.json as the trainer saves it."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    for loss in (weight.sum() * float("inf"), weight.sum(), weight.sum(), weight.sum()):
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**10  # halved by the overflow, doubled after two clean steps
    assert torch.allclose(weight.detach(), torch.full((3,), 0.7))  # three updates: the overflow's was skipped

    saved = state.write_state(state.TrainingState(4, {"grad_scaler": scaler.state_dict()}, {}, {}, {}), tmp_path)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(state.read_state(saved.path).info["grad_scaler"])
    assert restored.state_dict() == scaler.state_dict()


def test_cuda_generator_states_go_through_the_state_files(monkeypatch, tmp_path):
    """capture_rng on a GPU adds one uint8 state per device; the state files keep their shapes and bytes, and
    restore_rng puts them back, or says why not when the GPU count changed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [t.clone() for t in CUDA_RNG])
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)

    captured = {"processes": [state.capture_rng()]}
    saved = state.write_state(state.TrainingState(1, {}, {}, {}, captured), tmp_path)
    rng = state.read_state(saved.path).rng["processes"][0]
    assert [(t.dtype, t.shape) for t in rng["cuda"]] == [(torch.uint8, torch.Size([16]))] * 2
    assert all(torch.equal(got, expected) for got, expected in zip(rng["cuda"], CUDA_RNG, strict=True))

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert state.restore_rng(rng) == [] and all(torch.equal(a, b) for a, b in zip(restored[0], CUDA_RNG, strict=True))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "2 CUDA generator state(s) for 1 GPU(s)" in state.restore_rng(rng)[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert state.restore_rng(rng) == ["the state holds CUDA generator states but there is no GPU now"]


def test_xformers_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="key 'attn_type' = 'xformers': xformers needs a CUDA GPU"):
        enable_xformers(SimpleNamespace(unet=None))
