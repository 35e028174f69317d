"""What keeps a run's work safe: stop requests (signals, divergence, a failed save), the resume command,
and the checks made before training starts (writable folders, enough disk for the saves)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from utils.config import ConfigError

EXIT_FAILED = 1  # divergence (max_nan_steps) or a failed save
GIGABYTE = 1024**3
# Bytes of optimizer state per trained parameter (fp32 moments; 8-bit optimizers keep one byte per moment).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "prodigy": 16, "dadapt_adam": 12,
                         "dadapt_lion": 8, "dadapt_sgd": 8, "coordinate_dowg": 8, "scalar_dowg": 4}


@dataclass(frozen=True)
class Stop:
    """Why a run ends before its last step, and how."""

    reason: str
    exit_code: int
    save: bool  # save a state and a checkpoint before exiting
    message: str = ""

    @classmethod
    def by_signal(cls, name: str) -> "Stop":
        return cls(name, 128 + signal.Signals[name].value, save=True)

    @classmethod
    def failed(cls, reason: str, message: str) -> "Stop":
        return cls(reason, EXIT_FAILED, save=False, message=message)


@contextlib.contextmanager
def stop_signals_handled(request_stop: Callable[[Stop], None]) -> Iterator[None]:
    """SIGINT and SIGTERM ask the run to stop after the current step (it saves a state and a checkpoint);
    a second one exits at once. That exit is a SystemExit raised in the main thread: it unwinds through the
    atomic writers, which delete their temporary files, so no half-written file is left behind."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    received: list[str] = []
    first_at: list[float] = []
    # Under a launcher, Ctrl-C reaches every process from the terminal and once more from the launcher, which
    # forwards it: a repeat within this many seconds is the same request.
    same_request_seconds = 3.0 if launched_processes() > 1 else 0.0

    def handle(signum, _frame):
        name = signal.Signals(signum).name
        if received and time.monotonic() - first_at[0] < same_request_seconds:
            return
        if received:
            print(f"\n{name} again: exiting at once, without saving. The last complete state and checkpoint "
                  f"are intact.", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        received.append(name)
        first_at.append(time.monotonic())
        print(f"\n{name}: finishing the current step, then saving a state and a checkpoint "
              f"(send it again to exit at once).", file=sys.stderr, flush=True)
        request_stop(Stop.by_signal(name))

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resume_command(argv: Optional[list[str]] = None, changes: Optional[dict] = None) -> str:
    """The command that continues this run: the original command line with `--resume_from latest` (and the
    `changes`, e.g. a lower lr) in place of any earlier value of those keys."""
    argv = list(sys.argv if argv is None else argv)
    changes = {"resume_from": "latest", **(changes or {})}
    if not argv or Path(argv[0]).name != "train.py":
        keys = ", ".join(f'"{key}": {json.dumps(value)}' for key, value in changes.items())
        return f"run it again with {keys} (or the same keys on the command line)"
    kept, index = [], 1
    while index < len(argv):
        key = argv[index][2:].partition("=")[0] if argv[index].startswith("--") else None
        if key in changes:  # drop `--key value` / `--key=value`, as train.py would read them
            has_value = "=" not in argv[index] and index + 1 < len(argv) and not argv[index + 1].startswith("--")
            index += 2 if has_value else 1
            continue
        kept.append(argv[index])
        index += 1
    added = [token for key, value in changes.items() for token in (f"--{key}", str(value))]
    return shlex.join([*launcher_prefix(), argv[0], *kept, *added])


def launched_processes() -> int:
    """The number of processes of the launch this one belongs to (torchrun-style launchers, accelerate launch
    among them, set WORLD_SIZE in every process); 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_prefix() -> list[str]:
    """How this process was started: `python`, or `accelerate launch` with its process count (and the machines',
    from LOCAL_WORLD_SIZE)."""
    processes = launched_processes()
    if processes == 1:
        return ["python"]
    machines = processes // int(os.environ.get("LOCAL_WORLD_SIZE", str(processes)))
    prefix = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
    if machines > 1:  # each machine adds its own --machine_rank and the main machine's address
        prefix += ["--num_machines", str(machines)]
    return prefix


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and write a probe file: a clear error now rather than a crash at the first save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"key '{key}': cannot write to the folder '{folder}' ({error.strerror or error}). Give a folder you can "
            f"write to, or fix its permissions."
        ) from None


@dataclass(frozen=True)
class SaveSizes:
    state_bytes: int
    checkpoint_bytes: int
    states_on_disk: int  # at most, while a new state is written before the oldest is pruned
    checkpoints: int  # planned (epoch saves and the final one; time-based ones come on top)

    @property
    def total(self) -> int:
        return self.states_on_disk * self.state_bytes + self.checkpoints * self.checkpoint_bytes


def estimate_save_sizes(trained_params: int, all_params: int, optimizer: str, states_kept: int, checkpoints: int,
                        single_file: bool, half: bool) -> SaveSizes:
    """Bytes the saves will need, from parameter counts: fp32 weights + optimizer state per state; a diffusers
    folder (fp32) and the single file (fp16 unless full precision) per checkpoint."""
    state = trained_params * (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8))
    checkpoint = all_params * 4 + (all_params * (2 if half else 4) if single_file else 0)
    return SaveSizes(state, checkpoint, states_kept + 1, checkpoints)


def disk_space_note(sizes: SaveSizes, folder: Path) -> str:
    """One line for the start of the run; a warning with the numbers when the disk looks too small."""
    free = shutil.disk_usage(folder).free
    need = (f"{sizes.total / GIGABYTE:.2f} GB ({sizes.checkpoints} checkpoint(s) of "
            f"{sizes.checkpoint_bytes / GIGABYTE:.2f} GB, up to {sizes.states_on_disk} state(s) of "
            f"{sizes.state_bytes / GIGABYTE:.2f} GB)")
    if free >= sizes.total:
        return f"disk: the saves need about {need}; {free / GIGABYTE:.2f} GB free on {folder}"
    return (f"warning: the saves of this run need about {need} but only {free / GIGABYTE:.2f} GB are free on "
            f"{folder}. Free some space, lower save_state_keep or save less often: a save that finds the disk full "
            f"stops the run with its last good state.")
