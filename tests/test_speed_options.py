"""The speed keys: channels_last, torch_compile, TF32, DataLoader workers and prefetch, and the next epoch's loader
started ahead. Each must reach what it configures, and none may change what training computes."""

import os

import pytest
import torch
from accelerate.utils import is_compiled_module
from diffusers import UNet2DConditionModel
from safetensors import safe_open

import trainer.step
from data.loader import item_of
from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import Trainer
from trainer.model import configure_for_training, load_model, use_tf32
from trainer.setup import resolve_num_workers
from utils.config import ConfigError, TrainConfig, load_config
from utils.state import read_state

SLOW = os.environ.get("EVERYCYCLE_SLOW_TESTS") == "1"


@pytest.fixture(autouse=True)
def one_thread():
    """Two cores shared with other jobs: one intra-op thread keeps the timings of these runs stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_up_trainer(model_cache, logdir, **overrides) -> Trainer:
    """A tiny run without validation (5 steps per epoch), set up but not trained."""
    values = {"validation_config": None, "max_steps": 2} | overrides
    return Trainer(tiny_config(model_cache, DEMO_DATA, logdir, **values))


def train_losses(trainer: Trainer) -> list[float]:
    try:
        trainer.train()
    finally:
        trainer.logger.close()
    return [loss for _, loss in trainer.progress.train_losses]


def conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def is_channels_last(weight: torch.Tensor) -> bool:
    return weight.is_contiguous(memory_format=torch.channels_last)


# --- channels_last ------------------------------------------------------------------------------------------
def test_channels_last_converts_the_convolutions_and_trains_the_same(model_cache, tmp_path):
    # one after the other: set_up seeds the global RNG that the training then draws from
    expected = train_losses(set_up_trainer(model_cache, tmp_path / "plain"))
    fast = set_up_trainer(model_cache, tmp_path / "channels_last", channels_last=True)
    for module in (fast.model.unet, fast.model.vae):  # the VAE encodes every step here: converted too
        weights = conv_weights(module)
        assert weights and all(is_channels_last(w) for w in weights)
        # 1x1 kernels are both layouts at once; the 3x3 ones prove the layout really changed
        assert any(not w.is_contiguous() for w in weights)
    got = train_losses(fast)
    assert len(got) == 2
    assert got == pytest.approx(expected, rel=1e-4)  # other convolution kernels: rounding differences only
    assert all(is_channels_last(w) for w in conv_weights(fast.model.unet))  # the optimizer kept the layout


@pytest.mark.skipif("cache_latents" not in TrainConfig.model_fields, reason="cache_latents not in the config yet")
def test_channels_last_leaves_the_vae_alone_when_latents_are_cached(model_cache, tmp_path):
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, channels_last=True, cache_latents=True)
    model = load_model(config)
    configure_for_training(model, config)
    assert all(is_channels_last(w) for w in conv_weights(model.unet))
    assert all(w.is_contiguous() for w in conv_weights(model.vae))  # it only encodes once, into the cache


# --- torch_compile ------------------------------------------------------------------------------------------
def plain_keys(state_dict_keys) -> bool:
    return not any("_orig_mod" in key for key in state_dict_keys)


def steps_through_a_compiled_unet(monkeypatch) -> list[bool]:
    """Filled as the trainer steps: whether each micro-batch's loss went through a compiled UNet."""
    real_loss, seen = trainer.step.training_loss, []

    def loss_noting_the_unet(model, *args):
        seen.append(is_compiled_module(model.unet))
        return real_loss(model, *args)

    monkeypatch.setattr(trainer.step, "training_loss", loss_noting_the_unet)
    return seen


def check_compiled_run(model_cache, logdir, monkeypatch, backend, steps=2) -> tuple[Trainer, dict]:
    """A run with torch_compile through Trainer.run(): set-up, steps, final state and checkpoint. `backend` None
    compiles for real (inductor); otherwise torch.compile is called with that backend."""
    real_compile, compiled = torch.compile, []
    torch._dynamo.reset()

    def compile_with_backend(module, **kwargs):
        compiled.append(module)
        return real_compile(module, **kwargs) if backend is None else real_compile(module, backend=backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_with_backend)
    stepped_through = steps_through_a_compiled_unet(monkeypatch)
    run = Trainer(
        tiny_config(
            model_cache,
            DEMO_DATA,
            logdir,
            validation_config=None,
            max_steps=steps,
            torch_compile=True,
            save_full_precision=True,
        )
    )
    summary = run.run()
    assert summary["exit_code"] == 0 and summary["steps"] == steps
    assert len(compiled) == 1 and stepped_through == [True] * steps  # the UNet, and only it; every step
    assert not is_compiled_module(run.unwrapped_model().unet)

    # the resumable state and both checkpoint formats keep the UNet's own keys
    state = read_state(summary["last_state"])
    unet_keys = set(run.unwrapped_model().unet.state_dict())
    assert set(state.weights["unet"]) == unet_keys and plain_keys(state.weights["unet"])
    final = summary["final_checkpoint"]
    loaded, info = UNet2DConditionModel.from_pretrained(final["diffusers"], subfolder="unet", output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with safe_open(final["single_file"], "pt") as handle:
        assert plain_keys(handle.keys())
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state.weights["unet"][key]), key
    return run, summary


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()  # drop the compiled graphs of a test


def test_torch_compile_trains_saves_and_resumes_with_plain_keys(model_cache, tmp_path, monkeypatch):
    """The wiring with dynamo's eager backend: the UNet is captured by torch.compile and runs through the compiled
    wrapper, but no C++ is built (inductor takes minutes on this CPU; the slow test below does it for real)."""
    expected = train_losses(set_up_trainer(model_cache, tmp_path / "plain"))
    compiled, summary = check_compiled_run(model_cache, tmp_path / "compiled", monkeypatch, backend="eager")
    assert [loss for _, loss in compiled.progress.train_losses] == pytest.approx(expected, rel=1e-6)

    # resuming loads the plain-key state into the compiled run and goes on
    stepped_through = steps_through_a_compiled_unet(monkeypatch)
    resumed = Trainer(
        tiny_config(
            model_cache,
            DEMO_DATA,
            tmp_path / "compiled",
            validation_config=None,
            max_steps=3,
            torch_compile=True,
            resume_from="latest",
        )
    )
    again = resumed.run()
    assert again["exit_code"] == 0 and again["steps"] == 3 and again["resumed_from"] == summary["last_state"]
    assert stepped_through == [True]  # step 3, through the compiled UNet


@pytest.mark.skipif(
    not SLOW,
    reason="torch.compile with inductor builds C++ kernels for the tiny UNet: about 3 "
    "minutes on a 2-core CPU the first time (seconds once /tmp/torchinductor_* holds them); set "
    "EVERYCYCLE_SLOW_TESTS=1 to run it",
)
def test_torch_compile_with_inductor(model_cache, tmp_path, monkeypatch):
    check_compiled_run(model_cache, tmp_path, monkeypatch, backend=None, steps=1)


# --- TF32 ---------------------------------------------------------------------------------------------------
def test_tf32_is_switched_on_cuda_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        use_tf32(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        use_tf32(torch.device("cuda"))  # only flags: nothing touches a GPU
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        use_tf32(torch.device("cuda"), allowed=False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --- data loading -------------------------------------------------------------------------------------------
def test_workers_and_prefetch_reach_the_dataloader(model_cache, tmp_path):
    trainer = set_up_trainer(model_cache, tmp_path, num_workers=2, prefetch_factor=3)
    loader = trainer.feed.epoch_loader(0)
    assert (loader.num_workers, loader.prefetch_factor, loader.pin_memory) == (2, 3, False)  # pinned on CUDA only
    trainer.logger.close()
    auto = set_up_trainer(model_cache, tmp_path)  # num_workers -1 (auto) on the CPU: the main process loads
    loader = auto.feed.epoch_loader(0)
    assert (auto.feed.num_workers, loader.num_workers, loader.prefetch_factor) == (0, 0, None)
    auto.logger.close()


@pytest.mark.parametrize(
    ("setting", "device", "cpus", "processes", "batches", "expected"),
    [
        (-1, "cpu", 16, 1, 100, 0),  # on the CPU the cores train
        (-1, "cuda", 16, 1, 100, 8),  # at most 8
        (-1, "cuda", 16, 4, 100, 3),  # 4 CPUs per process, one of them for the process itself
        (-1, "cuda", 2, 2, 100, 0),  # one CPU per process: nothing to spare
        (-1, "cuda", 16, 1, 5, 5),  # not more workers than batches in an epoch
        (3, "cpu", 16, 1, 100, 3),  # a number is used as given
        (0, "cuda", 16, 1, 100, 0),
    ],
)
def test_automatic_worker_count(monkeypatch, setting, device, cpus, processes, batches, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert resolve_num_workers(setting, torch.device(device), processes, batches) == expected


def record_loaders_and_steps(trainer: Trainer) -> list[tuple[str, int]]:
    """Filled as the trainer runs: ("loader", epoch) when an epoch's loader is built, ("step", n) before step n."""
    events, build, step = [], trainer.feed.epoch_loader, trainer.train_step

    def epoch_loader(epoch, first_step=0):
        events.append(("loader", epoch))
        return build(epoch, first_step)

    def train_step(*args):
        events.append(("step", trainer.progress.global_step + 1))
        return step(*args)

    trainer.feed.epoch_loader, trainer.train_step = epoch_loader, train_step
    return events


def test_next_epochs_loader_starts_ahead_with_workers(model_cache, tmp_path):
    """With workers the loader of epoch e+1 starts when epoch e starts (no stall at the boundary); the batches, and
    so the losses, are those of a run that loads in the main process."""
    runs = {}
    for workers in (0, 1):
        trainer = set_up_trainer(
            model_cache, tmp_path / str(workers), num_workers=workers, max_steps=None, max_epochs=2
        )
        events = record_loaders_and_steps(trainer)
        runs[workers] = train_losses(trainer), events
    losses, events = runs[1]
    assert events[:3] == [("loader", 0), ("loader", 1), ("step", 1)]
    assert runs[0][1][:6] == [("loader", 0)] + [("step", k) for k in range(1, 6)]  # without workers: lazily
    assert runs[0][1][6] == ("loader", 1)
    assert len(losses) == 10 and losses == runs[0][0]


def test_resumed_epoch_iterators_start_mid_epoch(model_cache, tmp_path):
    trainer = set_up_trainer(model_cache, tmp_path, num_workers=1, max_steps=None, max_epochs=3)
    calls, feed = [], trainer.feed
    build = feed.epoch_loader
    feed.epoch_loader = lambda epoch, first_step=0: calls.append((epoch, first_step)) or build(epoch, first_step)
    iterators = trainer.feed.epoch_iterators(1, 2)
    first = next(iterators)
    assert calls == [(1, 2), (2, 0)]
    train = trainer.data.train
    expected = [
        [str(train[item_of(sample, len(train))].path) for sample in batch]
        for batch in trainer.data.batches.epoch_batches(1, trainer.seed)[2:]
    ]
    assert [batch["paths"] for batch in first] == expected
    assert len(list(next(iterators))) == trainer.plan.steps_per_epoch
    trainer.logger.close()


# --- the config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("prefetch_factor", 0),
        ("num_workers", -2),
        ("channels_last", "maybe"),
        ("torch_compile", 3),
        ("allow_tf32", "often"),
    ],
)
def test_config_refuses_nonsense(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_config(None, {"data_root": str(DEMO_DATA), key: value})


def test_speed_keys_default_to_the_plain_behaviour():
    config = load_config(None, {"data_root": str(DEMO_DATA)})
    assert (config.channels_last, config.torch_compile, config.allow_tf32) == (False, False, True)
    assert (config.num_workers, config.prefetch_factor) == (-1, 2)


# --- the step-overhead benchmark ----------------------------------------------------------------------------
def test_step_overhead_bench_runs(monkeypatch, capsys):
    """bench/step_overhead.py drives the trainer's own loop through its public seams (Trainer.steps, its feed's
    epoch_loader) and times optimizer_step: a one-round run keeps it working as the trainer changes, and leaves
    optimizer_step as it was."""
    import bench.step_overhead as bench
    import trainer.loop as loop

    original = loop.optimizer_step
    ratio = bench.main(["--rounds", "1", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert ratio > 0 and out.rstrip().splitlines()[-1] == f"overhead_ratio={ratio:.3f}"
    assert "cache_latents: " in out and loop.optimizer_step is original
