"""train.py with one fault armed, for tests/test_faults.py.

Each seam below is a public function the trainer calls at a known moment of a run. The runner wraps every seam
before the run starts: it counts their calls (and, with a timeline file, writes one line per call), and at the
n-th call of the armed seam it delivers the fault, then lets the call go on:

    SIGTERM, SIGINT   the signal to this process (its handler asks the run to stop after the current unit)
    SIGKILL           the process dies at once, in the middle of whatever the seam was doing
    disk full         a filler file takes every free byte of the file system that holds `fill`
    second run        the test is asked (through `control`) to start a second run on the same folder, and this
                      run waits, with its folder locked, until that one has ended

The test runs it in processes forked from a server that has imported torch, diffusers and the trainer once per
session (a fresh interpreter takes 12-24 s to import them on a 2-core CI machine). To reproduce one case by hand:

    .venv/bin/python tests/fault_runner.py '{"seam": "save_single_file", "call": 2, "kind": "SIGKILL"}' \\
        --config <the test's config.json>

(there, a second run is started with subprocess).
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# seam -> (module, attribute): where the trainer looks the function up when it calls it, so patching there reaches
# the call (trainer.setup imports load_model by name, trainer.step training_loss, trainer.sampling make_samples).
SEAMS = {
    "load_model": ("trainer.setup", "load_model"),  # set-up: the model loads
    "validation": ("trainer.validation", "StabilizedLoss.__call__"),  # first call: the baseline
    "training_loss": ("trainer.step", "training_loss"),  # a step's forward (one micro-batch per step here)
    "make_samples": ("trainer.sampling", "make_samples"),  # a sample round (sampling.sample_round calls it)
    # utils.checkpoint.save_checkpoint imports it when it runs: called once the diffusers folder is complete and
    # before the single file is written, so a fault here lands in the middle of a checkpoint save.
    "save_single_file": ("utils.convert", "save_single_file"),
    "write_tensors": ("utils.state", "write_tensors"),  # each file of a state, inside its temporary folder
}
KINDS = ("SIGTERM", "SIGINT", "SIGKILL", "disk full", "second run")
FIRED = "fault_runner: fired"  # the line the runner prints when it delivers its fault


def use_one_thread() -> None:
    """One intra-op thread: on a machine with more runnable threads than cores, torch's OpenMP threads wait for
    each other at every op (a 4-step tiny run took 21 s with 2 threads and 5.5 s with 1). Every run of the suite
    uses the same count, so their floats stay comparable bit for bit."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # forked from the server: torch is imported, its thread pool not started
        sys.modules["torch"].set_num_threads(1)


def redirect_output(path: Path) -> None:
    """stdout and stderr of this process (and of anything it starts) into one file, line by line."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for stream, target in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.flush()
        os.dup2(fd, target)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


def fill_disk(path: Path) -> None:
    """Write `path` until the file system says ENOSPC, in ever smaller blocks: not one free byte is left."""
    with open(path, "ab", buffering=0) as filler:
        for size in (1 << 20, 1 << 12, 1):
            block = bytes(size)
            try:
                while True:
                    filler.write(block)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


def ask_for_second_run(control, argv: list[str]) -> None:
    """The test starts the second run and answers when it has ended; by hand (no control), a subprocess."""
    if control is not None:
        control.send({"pid": os.getpid()})
        control.recv()
        return
    second = [sys.executable, str(ROOT / "train.py"), *argv, "--resume_from", "latest"]
    code = subprocess.run(second).returncode
    print(f"fault_runner: the second run exited with {code}", flush=True)


def deliver(fault: dict, control, argv: list[str]) -> None:
    kind = fault["kind"]
    print(f"{FIRED} {kind} at call {fault['call']} of {fault['seam']}", flush=True)
    if kind in ("SIGTERM", "SIGINT", "SIGKILL"):
        os.kill(os.getpid(), signal.Signals[kind])  # SIGTERM / SIGINT: handled at once, then the call goes on
    elif kind == "disk full":
        fill_disk(Path(fault["fill"]))
    elif kind == "second run":
        ask_for_second_run(control, argv)
    else:
        raise ValueError(f"unknown fault kind {kind!r}")


class Seams:
    """Counts the calls of every seam; delivers the fault at the armed one."""

    def __init__(self, fault: dict | None, control, argv: list[str], timeline: Path | None):
        self.fault, self.control, self.argv, self.timeline = fault, control, argv, timeline
        self.calls = dict.fromkeys(SEAMS, 0)

    def install(self) -> None:
        for seam, (module_name, attribute) in SEAMS.items():
            owner = importlib.import_module(module_name)
            *path, name = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, self.wrap(seam, getattr(owner, name)))

    def wrap(self, seam: str, function: Callable) -> Callable:
        def counted(*args, **kwargs):
            self.calls[seam] += 1
            self.record(seam)
            fault = self.fault
            if fault and fault["seam"] == seam and fault["call"] == self.calls[seam]:
                deliver(fault, self.control, self.argv)
            return function(*args, **kwargs)

        return counted

    def record(self, seam: str) -> None:
        """One timeline line per call: the seam, its call number, and how many steps had started by then."""
        if self.timeline is None:
            return
        event = {"seam": seam, "call": self.calls[seam], "steps_started": self.calls["training_loss"]}
        with open(self.timeline, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


def run_train(
    argv: list[str], output: Path | None = None, fault: dict | None = None, control=None, timeline: Path | None = None
) -> None:
    """train.py's main with `fault` armed; exits with its exit code (a fork server's child, or the script)."""
    if output is not None:
        redirect_output(output)
    use_one_thread()
    sys.argv = ["train.py", *argv]  # what the printed resume command and the run lock's owner line show
    sys.path.insert(0, str(ROOT))
    Seams(fault, control, argv, timeline).install()
    import train

    sys.exit(train.main(argv))


if __name__ == "__main__":
    run_train(sys.argv[2:], fault=json.loads(sys.argv[1]) or None)
