"""Signals and kills, with real processes: SIGTERM saves and prints the command that resumes (and resuming is
exact), a second SIGINT exits at once leaving nothing half-written, and a kill -9 in the middle of a save leaves
the previous states intact for `latest`."""

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train as train_cli
from tests.conftest import ROOT
from tests.processes import Output, only_run_dir, start, wait_for_run_dir, wait_for_trained_steps, write_config
from utils.launch import resume_command
from utils.state import STATE_FOLDER, list_states, newest_complete_state, verify_state

# Runs train.main like train.py, and can make the writing of one state hang after its first file, so that a
# signal lands in the middle of a save.
HANGING_SAVE = """
import os, sys, time
sys.path.insert(0, {root!r})
import utils.state
hang_in = os.environ.get("HANG_IN_STATE")
write_tensors = utils.state.write_tensors

def write_then_hang(path, tensors):
    write_tensors(path, tensors)
    if hang_in and hang_in in path.parent.name:
        print("SAVING", flush=True)
        time.sleep(120)

utils.state.write_tensors = write_then_hang
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_sigterm_saves_prints_the_resume_command_and_resuming_is_exact(model_cache, tmp_path):
    config_path = write_config(tmp_path, model_cache)
    train_py = str(ROOT / "train.py")
    process, output = start([sys.executable, train_py, "--config", str(config_path)], tmp_path)
    # wait until the run is training: run folder, then two trained steps in metrics.csv
    output.wait_for("run: ")
    wait_for_trained_steps(wait_for_run_dir(tmp_path) / "metrics.csv", 2)
    process.send_signal(signal.SIGTERM)
    text = output.rest()
    assert process.wait(timeout=60) == 143, text
    stopped_at = int(re.search(r"stopped \(SIGTERM\) after step (\d+) of 200", text).group(1))
    assert 2 <= stopped_at < 10, text
    command = shlex.join(["python", train_py, "--config", str(config_path), "--resume_from", "latest"])
    assert f"To resume:\n    {command}\n" in text
    run_dir = only_run_dir(tmp_path)
    assert verify_state(run_dir / STATE_FOLDER / f"state-gs{stopped_at:05d}")["step"] == stopped_at

    # The printed command, through the command line (in this process), three more steps than were done.
    end = stopped_at + 3
    assert train_cli.main(shlex.split(command)[2:] + ["--max_steps", str(end)]) == 0
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference_config = write_config(reference_dir, model_cache, max_steps=end)
    assert train_cli.main(["--config", str(reference_config)]) == 0
    for model in ("unet", "text_encoder"):
        resumed = load_file(run_dir / STATE_FOLDER / f"state-gs{end:05d}" / f"{model}.safetensors")
        alone = load_file(only_run_dir(reference_dir) / STATE_FOLDER / f"state-gs{end:05d}" / f"{model}.safetensors")
        assert all(torch.equal(resumed[key], alone[key]) for key in alone), f"{model} differs"


def hanging_run(tmp_path: Path, model_cache: Path, hang_in: str) -> tuple[subprocess.Popen, Output, Path]:
    """A run that saves a state after every step and hangs in the middle of writing `hang_in`."""
    config_path = write_config(
        tmp_path, model_cache, save_state_every_n_minutes=1e-9, save_state_keep=3, validation_config=None
    )
    script = tmp_path / "hanging_save.py"
    script.write_text(HANGING_SAVE.format(root=str(ROOT)))
    process, output = start(
        [sys.executable, str(script), "--config", str(config_path)], tmp_path, HANG_IN_STATE=hang_in
    )
    output.wait_for("SAVING")
    return process, output, only_run_dir(tmp_path) / STATE_FOLDER


def test_a_second_sigint_exits_at_once_and_leaves_nothing_half_written(model_cache, tmp_path):
    process, output, states = hanging_run(tmp_path, model_cache, "state-gs00003")
    process.send_signal(signal.SIGINT)
    output.wait_for("SIGINT: finishing the current step")
    process.send_signal(signal.SIGINT)
    text = output.rest()
    assert process.wait(timeout=30) == 130, text
    assert "SIGINT again: exiting at once, without saving" in text
    assert sorted(p.name for p in states.iterdir()) == ["state-gs00001", "state-gs00002"], "no temporary left"
    assert all(verify_state(state) for state in list_states(states))
    assert newest_complete_state([states.parent]).found == states / "state-gs00002"


def test_kill_9_during_a_save_keeps_the_previous_states_for_latest(model_cache, tmp_path, capsys):
    process, output, states = hanging_run(tmp_path, model_cache, "state-gs00003")
    process.kill()
    assert process.wait(timeout=30) == -signal.SIGKILL
    leftovers = [p for p in states.iterdir() if p.name.startswith(".state-gs00003.tmp-")]
    assert leftovers, "the killed save leaves its temporary folder (hidden, never taken for a state)"
    assert newest_complete_state([states.parent]).found == states / "state-gs00002"

    config_path = tmp_path / "config.json"
    assert train_cli.main(["--config", str(config_path), "--resume_from", "latest", "--max_steps", "4"]) == 0
    out = capsys.readouterr().out
    assert f"removed {leftovers[0]}, left by a save that was killed" in out
    assert f"resumed from {states / 'state-gs00002'}: step 2 of 4" in out
    assert not [p for p in states.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train.py", "--config", "c.json", "--lr", "2e-6"],
            "python train.py --config c.json --lr 2e-6 --resume_from latest",
        ),
        (
            ["/x/train.py", "--config", "c.json", "--resume_from", "/old/state", "--seed", "3"],
            "python /x/train.py --config c.json --seed 3 --resume_from latest",
        ),
        (
            ["train.py", "--resume_from=/old/state", "--config", "my config.json"],
            "python train.py --config 'my config.json' --resume_from latest",
        ),
    ],
)
def test_the_resume_command_keeps_the_original_arguments(argv, expected):
    assert resume_command(argv) == expected


def test_the_resume_command_replaces_a_changed_key():
    argv = ["train.py", "--config", "c.json", "--lr", "1e-4", "--gradient_checkpointing", "--lr=3"]
    assert (
        resume_command(argv, {"lr": "1e-05"})
        == "python train.py --config c.json --gradient_checkpointing --resume_from latest --lr 1e-05"
    )
    assert (
        resume_command(["pytest"], {"lr": 1e-05})
        == 'run it again with "resume_from": "latest", "lr": 1e-05 (or the same keys on the command line)'
    )


@pytest.mark.parametrize(
    "world, local_world, launcher",
    [
        ("2", "2", "accelerate launch --multi_gpu --num_processes 2"),
        ("16", "8", "accelerate launch --multi_gpu --num_processes 16 --num_machines 2"),
    ],
)
def test_the_resume_command_of_a_launched_process_launches_again(monkeypatch, world, local_world, launcher):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert (
        resume_command(["train.py", "--config", "c.json"])
        == f"{launcher} train.py --config c.json --resume_from latest"
    )
