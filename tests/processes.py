"""Running train.py in real processes for the tests: a config for short runs, the output read line by line, waits
for trained steps."""

import contextlib
import csv
import json
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from tests.conftest import DEMO_DATA


def write_config(folder: Path, model_cache: Path, **overrides) -> Path:
    values = {
        "resume_ckpt": "tiny",
        "model_cache_dir": str(model_cache),
        "data_root": str(DEMO_DATA),
        "logdir": str(folder / "logs"),
        "project_name": "sig",
        "resolution": 64,
        "batch_size": 4,
        "max_steps": 200,
        "lr": 1e-4,
        "lr_scheduler": "cyclic",
        "lr_decay_steps": 3,
        "lr_min": 1e-5,
        "optimizer": "adamw",
        "mixed_precision": "no",
        "cond_dropout": 0.1,
        "flip_p": 0.5,
        "log_step": 1,
        "seed": 42,
        "no_save_ckpt": True,
        "validation_config": {"auto_split_proportion": 0.2, "every_n_epochs": 1, "timesteps": 2},
    }
    path = folder / "config.json"
    path.write_text(json.dumps({**values, **overrides}))
    return path


class Output:
    """The merged stdout/stderr of a process, read line by line in the background."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            line = self._queue.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"the process ended before printing {text!r}:\n" + "".join(self.lines[-30:]))
            self.lines.append(line)

    def rest(self, silence: float = 60) -> str:
        """Everything up to the end of the output; a process silent for `silence` seconds fails the test."""
        while True:
            try:
                line = self._queue.get(timeout=silence)
            except queue.Empty:
                raise AssertionError(
                    f"no output for {silence} s; the last lines:\n" + "".join(self.lines[-40:])
                ) from None
            if line is None:
                return "".join(self.lines)
            self.lines.append(line)


def start(command: list[str], folder: Path, **env) -> tuple[subprocess.Popen, Output]:
    """The command in a session of its own, so that `kill_all` also reaches what it started (a launcher's workers)."""
    process = subprocess.Popen(
        command,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env},
        start_new_session=True,
    )
    return process, Output(process)


def kill_all(process: subprocess.Popen) -> None:
    """The process and every process it started, if any is left: a failed test leaves nothing running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def wait_for_trained_steps(metrics: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            rows = list(csv.DictReader(open(metrics)))
            if sum(1 for row in rows if row["loss_train"]) >= steps:
                return
        time.sleep(0.05)
    raise AssertionError(f"{metrics}: fewer than {steps} trained steps after {timeout} s")


def only_run_dir(folder: Path) -> Path:
    (run_dir,) = (folder / "logs").iterdir()
    return run_dir


def wait_for_run_dir(folder: Path, timeout: float = 120) -> Path:
    """The run folder a started process creates under folder/logs."""
    deadline = time.monotonic() + timeout
    while not (folder / "logs").is_dir() or not any((folder / "logs").iterdir()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no run folder under {folder / 'logs'} after {timeout} s")
        time.sleep(0.05)
    return only_run_dir(folder)
