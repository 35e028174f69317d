"""Why and how a run stops early: a signal (SIGINT / SIGTERM: finish the step, save, exit 128+n), divergence or a
failed save (exit 1, nothing more saved)."""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from trainer.progress import Progress
from utils.checkpoint import BEST_SUFFIX
from utils.config import TrainConfig
from utils.launch import launched_processes, resume_command

EXIT_FAILED = 1  # divergence (max_nan_steps) or a failed save


@dataclass(frozen=True)
class Stop:
    """Why a run ends before its last step, and how."""

    reason: str
    exit_code: int
    save: bool  # save a state and a checkpoint before exiting
    message: str = ""
    complete: bool = False  # early stopping: the run ends as a complete one (final save, copy, samples; exit 0)

    @classmethod
    def by_signal(cls, name: str) -> Stop:
        return cls(name, 128 + signal.Signals[name].value, save=True)

    @classmethod
    def failed(cls, reason: str, message: str) -> Stop:
        return cls(reason, EXIT_FAILED, save=False, message=message)


class StopRequest:
    """The first stop asked on this process: signal handlers (and the tests' stop_at_step) call it, the run reads
    `.stop` between its units of work."""

    def __init__(self):
        self.stop: Stop | None = None

    def __call__(self, stop: Stop) -> None:
        self.stop = self.stop or stop


class SetUpStopped(Exception):
    """A stop asked before the run could start: nothing was trained and no run folder was written."""

    def __init__(self, stop: Stop):
        super().__init__(stop.reason)
        self.stop = stop


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
            print(
                f"\n{name} again: exiting at once, without saving. The last complete state and checkpoint are intact.",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(128 + signum)
        received.append(name)
        first_at.append(time.monotonic())
        print(
            f"\n{name}: finishing the current step, then saving a state and a checkpoint "
            f"(send it again to exit at once).",
            file=sys.stderr,
            flush=True,
        )
        request_stop(Stop.by_signal(name))

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def diverged(config: TrainConfig, progress: Progress) -> Stop:
    """max_nan_steps NaN/inf losses in a row: the run stops with its last good state (no new one is saved:
    weights that give NaN losses are not worth keeping)."""
    first = progress.global_step - progress.nonfinite_in_a_row + 1
    lower = config.lr / 10
    return Stop.failed(
        "diverged",
        (
            f"the loss was NaN/inf for {progress.nonfinite_in_a_row} steps in a row (steps {first}-"
            f"{progress.global_step}; max_nan_steps {config.max_nan_steps}), so the run stops without saving. "
            f"Last good state: {progress.last_state or 'none saved yet'}. Lower the learning rate (lr is "
            f"{config.lr:g}; try {lower:g}) and "
            + (f"resume: {resume_command(changes={'lr': f'{lower:g}'})}" if progress.last_state else "start again.")
        ),
    )


def validation_rose(config: TrainConfig, progress: Progress) -> Stop:
    """stop_when_val_rises: the validation loss stayed above its minimum for that many validations in a row."""
    step, loss = progress.val_minimum()
    count = progress.validations_since_minimum()
    return Stop(
        "validation loss rising",
        0,
        save=True,
        complete=True,
        message=(
            f"early stop: the validation loss stayed above its minimum ({loss:.5f} at step {step}) for {count} "
            f"validations in a row (stop_when_val_rises {config.stop_when_val_rises}); "
            + (
                f"the checkpoint of the minimum is ckpts/*-gs{step:05d}{BEST_SUFFIX}"
                if step
                else "the base model scored lowest: no training step improved on it"
            )
        ),
    )


def outranking(current: Stop | None, new: Stop | None) -> Stop | None:
    """The stop that decides how the run ends: the first one asked, except that a failure (a save that did not
    work) outranks an early stop, which would otherwise report success."""
    if current is None or (current.complete and new is not None):
        return new or current
    return current


def save_failed(what: str, error: OSError, progress: Progress) -> Stop:
    """A save (or a log, or samples) failed: nothing half-written was left (atomic writes) and the previous saves
    are intact."""
    step, checkpoints = progress.global_step, progress.checkpoints
    disk_full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
    return Stop.failed(
        "save failed",
        (
            f"saving the {what} at step {step} failed{disk_full}: {error}. No half-written file was left and the "
            f"previous saves are intact: last state {progress.last_state or 'none'}, last checkpoint "
            f"{checkpoints[-1]['diffusers'] if checkpoints else 'none'}. Free some space, then resume: "
            f"{resume_command()}"
        ),
    )


def how_it_stopped(stop: Stop, progress: Progress, total_steps: int) -> str:
    """The last line of a stopped run: the error, or where it stopped and the command that resumes it."""
    if not stop.save:
        return f"error: {stop.message}"
    if stop.complete:
        return stop.message
    return (
        (f"error: {stop.message}\n" if stop.message else "")
        + f"stopped ({stop.reason}) after step {progress.global_step} of {total_steps}; state "
        f"{progress.last_state}. To resume:\n    {resume_command()}"
    )
