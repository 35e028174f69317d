"""Seconds from `python train.py` to the first optimizer step, phase by phase, for SD 1.5 from local files.

    python bench/startup.py --save bench/results/startup_cpu.txt     # random:sd15 at 128 px on a CPU, 512 on CUDA

The real command line runs in a child process (`train.main`, as `python train.py --config ...` runs it), with the
Trainer's set-up functions wrapped to record when each starts and ends; the child prints the times after its first
optimizer step and exits there (the final save is not part of the start). The run: random:sd15 from the model
cache (built there first if missing, before the clock starts), 16 generated images, the recipe performance.md gives
small cards (adamw8bit, cache_latents, cache_text_embeddings, a frozen text encoder), and a validation split, so
that every phase of a start happens. The child runs with `-X importtime`: its imports are also split by package,
including those the set-up makes late (bitsandbytes with the optimizer, TensorBoard with the logs).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import of this script: the interpreter's start is measured up to here

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/startup.py` puts bench/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_third_party_output  # noqa: E402  (standard library only)

MARK = "STARTUP_TIMES "
# (module, name, phase) wrapped in the child, in the order the Trainer's constructor and run() call them. The names
# are those the caller looks up (trainer.loop imports the set-up functions; build_model_and_optimizer calls
# trainer.setup's load_model).
PHASES = (
    ("trainer.loop", "make_accelerator", "accelerator"),
    ("trainer.loop", "find_state_to_resume", "resume lookup"),
    ("trainer.setup", "prepare_data", "data scan"),
    ("trainer.setup", "plan_schedule", "LR schedule plan"),
    ("trainer.setup", "load_model", "model load (from_pretrained)"),
    ("trainer.loop", "build_model_and_optimizer", "placement, optimizer (after the model load)"),
    ("trainer.loop", "run_fingerprint", "run fingerprint"),
    ("trainer.loop", "build_validators", "validators"),
    ("trainer.loop", "build_caches", "caches (latents, text embeddings)"),
    ("trainer.loop", "claim_run_dir", "run folder"),
    ("trainer.loop", "open_logs", "logs (metrics.csv, TensorBoard)"),
    ("trainer.loop", "Trainer.validate", "baseline validation"),
)
NESTED = {"placement, optimizer (after the model load)": "model load (from_pretrained)"}  # reported without it
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \| *(\S+)$")


# --- the child: train.main with its set-up timed -----------------------------------------------------------------
def wrap(module: str, name: str, phase: str, marks: list) -> None:
    owner = importlib.import_module(module)
    *path, name = name.split(".")
    for attribute in path:  # a method: Trainer.validate
        owner = getattr(owner, attribute)
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        started = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            marks.append((phase, started, time.time()))

    setattr(owner, name, timed)


def stop_after_the_first_step(marks: list, imported: float) -> None:
    """The first optimizer step is where the start ends: say the times and exit, without the final save."""
    import trainer.loop

    step = trainer.loop.optimizer_step

    def first_step(*args, **kwargs):
        started = time.time()
        step(*args, **kwargs)
        marks.append(("first optimizer step", started, time.time()))
        print(MARK + json.dumps({"started": STARTED, "imported": imported, "marks": marks}), flush=True)
        os._exit(0)

    trainer.loop.optimizer_step = first_step


def child(config: Path) -> None:
    from accelerate import PartialState  # noqa: F401

    import train  # what `python train.py` imports first, and what its main imports before the Trainer
    import trainer.loop  # noqa: F401

    imported = time.time()
    marks: list = []
    for module, name, phase in PHASES:
        wrap(module, name, phase, marks)
    stop_after_the_first_step(marks, imported)
    train.main(["--config", str(config)])
    raise SystemExit("startup: the run ended before its first optimizer step")


# --- the parent: the run, and the report ------------------------------------------------------------------------
def write_config(folder: Path, model: str, resolution: int, cache: Path) -> Path:
    from bench.gpu_check import generate_images

    images = generate_images(folder / "images", 16, resolution)
    config = {
        "resume_ckpt": model,
        "model_cache_dir": str(cache),
        "data_root": str(images),
        "logdir": str(folder / "logs"),
        "project_name": "startup",
        "resolution": resolution,
        "batch_size": 1,
        "max_steps": 10,
        "cache_latents": True,
        "cache_text_embeddings": True,
        "disable_textenc_training": True,
        "validation_config": {"auto_split_proportion": 0.125},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def run_child(config: Path) -> tuple[float, dict, str]:
    """(when the child was started, its times, its import-time log)."""
    command = [sys.executable, "-X", "importtime", str(Path(__file__).resolve()), "--child", str(config)]
    spawned = time.time()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=config.parent,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    line = next((line for line in done.stdout.splitlines() if line.startswith(MARK)), None)
    if line is None:
        raise SystemExit(
            f"startup: the child printed no times (exit {done.returncode}):\n{done.stdout[-2000:]}"
            f"\n{done.stderr[-3000:]}"
        )
    return spawned, json.loads(line.removeprefix(MARK)), done.stderr


def import_seconds(importtime_log: str) -> dict[str, float]:
    """Import seconds per top-level package, from `-X importtime`: each module's own time (not the cumulative,
    which would count torch again inside diffusers) added to its package's."""
    seconds: dict[str, float] = defaultdict(float)
    for line in importtime_log.splitlines():
        found = IMPORT_LINE.match(line)
        if found:
            seconds[found.group(2).split(".")[0]] += int(found.group(1)) / 1e6
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def phase_rows(spawned: float, times: dict) -> list[tuple[str, float]]:
    """(phase, seconds) in the order they happened; nested phases are reported without what they contain."""
    rows = [
        ("interpreter start", times["started"] - spawned),
        ("imports (train.py, trainer.loop, accelerate)", times["imported"] - times["started"]),
    ]
    durations = {phase: end - start for phase, start, end in times["marks"]}
    for phase, seconds in durations.items():
        rows.append((phase, seconds - durations.get(NESTED.get(phase, ""), 0.0)))
    first_step_start = next(start for phase, start, _ in times["marks"] if phase == "first optimizer step")
    accounted = sum(seconds for phase, seconds in rows if phase != "first optimizer step")
    rows.append(("other (between the phases)", first_step_start - spawned - accounted))
    return rows


def report(spawned: float, times: dict, imports: dict[str, float], header: str) -> str:
    rows = phase_rows(spawned, times)
    to_first_step = sum(seconds for phase, seconds in rows if phase != "first optimizer step")
    lines = [header, "", f"{'phase':<48} {'seconds':>8} {'share':>6}"]
    for phase, seconds in rows:
        share = f"{seconds / to_first_step:6.0%}" if phase != "first optimizer step" else ""
        lines.append(f"{phase:<48} {seconds:8.2f} {share}")
    lines += [
        f"{'from `python train.py` to the first step':<48} {to_first_step:8.2f}",
        "",
        "imports by package (-X importtime, each module's own time; those made late are inside the phases):",
    ]
    lines += [f"  {package:<24} {seconds:6.2f} s" for package, seconds in list(imports.items())[:12]]
    return "\n".join(lines) + "\n"


def header(argv: list[str], model: str, resolution: int) -> str:
    """The command, the machine (with its load: other jobs on it slow every phase) and the run."""
    import torch

    device = f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU"
    return "\n".join(
        [
            f"# python bench/startup.py {' '.join(argv)}".rstrip(),
            f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {device}, {platform.machine()}, {os.cpu_count()} CPUs (load "
            f"{os.getloadavg()[0]:.2f}), torch {torch.__version__}, python {platform.python_version()}",
            f"{model} from local files, {resolution} px, batch 1, 16 images (2 held out for validation), adamw8bit, "
            f"cache_latents + cache_text_embeddings, frozen text encoder",
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="random:sd15", help="resume_ckpt (tiny: a quick try of the script)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 on CUDA, 128 on a CPU")
    parser.add_argument("--cache_dir", type=Path, default=None, help="the model cache (default: EveryCycle's)")
    parser.add_argument("--save", type=Path, default=None, help="also write the report to this file")
    options = parser.parse_args(argv)
    if options.child:
        child(options.child)
    quiet_third_party_output()
    import torch

    from trainer.model import resolve_model_source
    from trainer.tiny_model import DEFAULT_CACHE_DIR

    resolution = options.resolution or (512 if torch.cuda.is_available() else 128)
    cache = options.cache_dir or DEFAULT_CACHE_DIR
    resolve_model_source(options.model, str(cache))  # built once, before the clock: a build is no start
    with tempfile.TemporaryDirectory(prefix="startup-") as folder:
        spawned, times, importtime_log = run_child(write_config(Path(folder), options.model, resolution, cache))
    argv = sys.argv[1:] if argv is None else argv
    text = report(spawned, times, import_seconds(importtime_log), header(argv, options.model, resolution))
    print(text, end="")
    if options.save:
        options.save.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
