"""One run per run folder: an OS file lock (filelock, fcntl.flock on Linux) held for the whole run.

The lock belongs to the process: it is released when the process ends, however it ends (kill -9 included), so
a crash never leaves a stale lock behind. Who holds it is written beside it, for the refusal message."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import filelock

from utils.config import ConfigError

LOCK_NAME = ".everycycle.lock"
OWNER_NAME = ".everycycle.lock.owner"


class RunLock:
    def __init__(self, run_dir: Path, command: str):
        self.run_dir, self.command = Path(run_dir), command
        self._lock = filelock.FileLock(str(self.run_dir / LOCK_NAME), timeout=0)

    def acquire(self) -> RunLock:
        """Take the lock, or refuse with a ConfigError naming the folder and the process that holds it."""
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise ConfigError(
                f"the run folder '{self.run_dir}' is in use by another run ({self._owner()}). Two runs writing into "
                f"one folder would mix their logs, states and checkpoints. Wait for it to finish or stop it (its "
                f"state lets you resume later), or start a new run without resume_from."
            ) from None
        owner = (
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: {self.command}"
        )
        (self.run_dir / OWNER_NAME).write_text(owner + "\n", encoding="utf-8")
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.run_dir / OWNER_NAME).unlink(missing_ok=True)
            self._lock.release()

    def _owner(self) -> str:
        try:
            return (self.run_dir / OWNER_NAME).read_text(encoding="utf-8").strip()
        except OSError:
            return "owner unknown"
