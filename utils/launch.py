"""How this process was launched (plain `python` or `accelerate launch` with N processes), and the command that
continues a stopped run under the same launcher."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path


def resume_command(argv: list[str] | None = None, changes: dict | None = None) -> str:
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
