"""`accelerate launch --num_processes 2` on the CPU (gloo): the same config trains data-parallel, writes one set of
outputs, keeps the weights of both processes equal, learns like one process with the doubled batch, stops on a
SIGTERM to the launcher with one complete state, and resumes exactly (or, with another process count, with a
note). Marked multi_process: each test launches real process groups (about a minute each on two cores)."""

import csv
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_cli
from tests.conftest import ROOT
from tests.processes import kill_all, only_run_dir, start, wait_for_run_dir, wait_for_trained_steps, write_config
from utils.state import STATE_FOLDER, list_states, verify_state

pytestmark = pytest.mark.multi_process

LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
# Two processes share the machine's cores; after forwarding a SIGTERM the launcher waits this long for the save
# (30 s by default, which a loaded CI machine can exceed), as the README advises for real runs.
LAUNCH_ENV = {"OMP_NUM_THREADS": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}

# train.py whose training loss is NaN on the second process at its third micro-batch only.
NAN_ON_ONE_PROCESS = """
import math, os, sys
sys.path.insert(0, {root!r})
import trainer.step
real_loss, calls = trainer.step.training_loss, []

def nan_once_on_rank_1(*args, **kwargs):
    calls.append(1)
    loss = real_loss(*args, **kwargs)
    return loss * math.nan if os.environ["RANK"] == "1" and len(calls) == 3 else loss

trainer.step.training_loss = nan_once_on_rank_1
import train
sys.exit(train.main(sys.argv[1:]))
"""


def launch(folder: Path, *arguments: str, script: Path = ROOT / "train.py"):
    return start([*LAUNCH, str(script), "--config", str(folder / "config.json"), *arguments], folder, **LAUNCH_ENV)


def launched_run(folder: Path, *arguments: str, script: Path = ROOT / "train.py") -> str:
    process, output = launch(folder, *arguments, script=script)
    try:
        text = output.rest()
        assert process.wait(timeout=300) == 0, text
    finally:
        kill_all(process)  # a hung launch fails the test and leaves no worker behind
    return text


@pytest.fixture
def cleanup():
    """Processes a test starts by hand: whatever is left of them when it ends (a failure) is killed."""
    started: list = []
    yield started.append
    for process in started:
        kill_all(process)


def validation_losses(run_dir: Path) -> dict[int, float]:
    rows = csv.DictReader(open(run_dir / "metrics.csv"))
    return {int(row["step"]): float(row["loss_val"]) for row in rows if row["loss_val"]}


def state_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / STATE_FOLDER / f"state-gs{step:05d}"
    return {
        f"{model}.{key}": tensor
        for model in ("unet", "text_encoder")
        for key, tensor in load_file(folder / f"{model}.safetensors").items()
    }


def test_two_processes_write_one_run_keep_equal_weights_and_learn_like_the_doubled_batch(model_cache, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        folder.mkdir()
        # cache_latents: each process encodes half of the images, and the halves are shared
        write_config(folder, model_cache, max_steps=12, lr=1e-3, lr_min=1e-4, no_save_ckpt=False, cache_latents=True)
    text = launched_run(two)

    run_dir = only_run_dir(two)  # one run folder, not one per process
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["processes"]["count"] == 2 and summary["processes"]["weights_identical"], summary["processes"]
    # 16 training images in 4 batches of 4, dealt out to 2 processes: 2 steps of 8 images per epoch.
    assert summary["steps_per_epoch"] == 2 and summary["steps"] == 12
    assert "a step trains 2 x batch_size 4 x grad_accum 1 = 8 images" in text
    assert text.count("done: 12 steps") == 1  # the main process reports
    assert "latent cache: 32 latents of 16 images" in text and "0 reused, 32 encoded" in text, text  # 2 flips each
    steps = [int(row["step"]) for row in csv.DictReader(open(run_dir / "metrics.csv")) if row["loss_train"]]
    assert steps == list(range(1, 13))  # every step logged once
    assert [path.name for path in list_states(run_dir / STATE_FOLDER)] == ["state-gs00012"]
    assert sorted(path.name for path in (run_dir / "ckpts").iterdir()) == [
        "sig-ep005-gs00012",
        "sig-ep005-gs00012.safetensors",
    ]

    # One process with grad_accum 2 trains the same 8 images per step (the two processes' batches): the same
    # curve, up to the noise each process draws on its own.
    assert train_cli.main(["--config", str(one / "config.json"), "--grad_accum", "2"]) == 0
    parallel, accumulated = validation_losses(run_dir), validation_losses(only_run_dir(one))
    assert sorted(parallel) == sorted(accumulated) == list(range(0, 13, 2))
    # The same model and the same fixed validation noise; two processes average their halves' losses, one process
    # sums all images in another order, so the float sums may differ in the last bits (seen: 1.1769736 vs
    # 1.1769738): a relative tolerance of 1e-6, far below any change training makes.
    assert parallel[0] == pytest.approx(accumulated[0], rel=1e-6)
    assert parallel[12] < 0.9 * parallel[0]  # it learned
    for step in parallel:
        assert abs(parallel[step] - accumulated[step]) <= 0.02 * accumulated[step], (step, parallel, accumulated)


def test_sigterm_to_the_launcher_saves_one_state_that_resumes_exactly_or_with_another_process_count(
    model_cache, tmp_path, cleanup
):
    stopped_dir, reference_dir = tmp_path / "stopped", tmp_path / "reference"
    for folder in (stopped_dir, reference_dir):
        folder.mkdir()
        write_config(folder, model_cache)
    process, output = launch(stopped_dir)
    cleanup(process)
    output.wait_for("run: ")
    wait_for_trained_steps(wait_for_run_dir(stopped_dir) / "metrics.csv", 2)
    process.send_signal(signal.SIGTERM)  # as a spot instance's shutdown does to the launcher
    text = output.rest()
    assert process.wait(timeout=120) != 0, text  # the launcher reports its workers' exit code 143
    run_dir = only_run_dir(stopped_dir)
    (state,) = list_states(run_dir / STATE_FOLDER)  # both processes stopped after the same step; one state
    stopped_at = verify_state(state)["step"]
    assert text.count(f"stopped (SIGTERM) after step {stopped_at} of 200") == 1, text
    assert "accelerate launch --multi_gpu --num_processes 2" in text  # the printed resume command
    moved = shutil.copytree(run_dir, tmp_path / "copy" / run_dir.name)

    end = stopped_at + 3
    launched_run(stopped_dir, "--resume_from", "latest", "--max_steps", str(end))
    launched_run(reference_dir, "--max_steps", str(end))
    resumed, alone = state_weights(run_dir, end), state_weights(only_run_dir(reference_dir), end)
    assert all(torch.equal(resumed[key], alone[key]) for key in alone)

    # The same state on one process: it goes on from the same step and says what changes.
    one_state = moved / STATE_FOLDER / state.name
    process, output = start(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(stopped_dir / "config.json"),
            "--resume_from",
            str(one_state),
            "--max_steps",
            str(end),
        ],
        tmp_path,
        **LAUNCH_ENV,
    )
    cleanup(process)
    text = output.rest()
    assert process.wait(timeout=300) == 0, text
    assert "the state was saved by 2 process(es) and this run has 1" in text
    assert "a step now trains 4 images instead of 8, an epoch has 4 steps instead of 2" in text
    assert verify_state(moved / STATE_FOLDER / f"state-gs{end:05d}")["step"] == end


def test_a_nan_loss_on_one_process_skips_the_update_on_every_process(model_cache, tmp_path):
    """Without agreement the healthy process would wait forever in the gradient all-reduce."""
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_ON_ONE_PROCESS.format(root=str(ROOT)))
    write_config(tmp_path, model_cache, max_steps=5)
    launched_run(tmp_path, script=script)
    summary = json.loads((only_run_dir(tmp_path) / "run_summary.json").read_text())
    assert summary["skipped_updates"] == [[3, "loss is nan"]]
    assert summary["steps"] == 5 and summary["processes"]["weights_identical"]


def test_a_text_encoder_whose_last_layers_go_unused_trains_on_two_processes(model_cache, tmp_path):
    """clip_skip 2 (and SDXL's penultimate layer) leave the text encoder's last layer without a gradient; DDP must
    be told that parameters may go unused, or its gradient reduction never completes."""
    write_config(tmp_path, model_cache, max_steps=2, clip_skip=2, validation_config=None)
    launched_run(tmp_path)
    summary = json.loads((only_run_dir(tmp_path) / "run_summary.json").read_text())
    assert summary["steps"] == 2 and summary["processes"]["weights_identical"], summary
