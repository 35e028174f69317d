"""The real train.py end to end on one GPU, in under 9 minutes: SD 1.5 at full size (random:sd15), 512 px.

    scripts/gpu_check.sh OUT          # CUDA; writes OUT/gpu_check.json and OUT/gpu_check.md
    scripts/gpu_check.sh --cpu OUT    # the tiny model at 64 px on the CPU: the same checks, CUDA-only ones skipped

It prints the torch / CUDA / diffusers versions it runs with, generates a small image set, builds (or finds) the
model in the model cache, and then checks:
  runs     one short train.py run per setting: the defaults (bf16, sdp attention, adamw8bit), fp16 + GradScaler
           (with clip_grad_norm), fused AdamW, cache_latents + cache_text_embeddings, gradient checkpointing,
           xformers (when importable) and torch_compile. Each must exit 0 with a finite loss at every step, and its
           final checkpoint must load with diffusers' from_pretrained (the weights of the run's state, bit for bit)
           and from_single_file with the bundled configs, offline (the same weights within fp16 rounding).
  resume   a run stopped by SIGTERM after step 10 and continued with --resume_from latest, against the same run left
           alone: bit-equal final weights required with the config key `deterministic` (once the trainer has it) and
           on the CPU; on CUDA without the key the largest difference is reported.
  sweep    bench/gpu_throughput.py in the time left (its settings in priority order; torch.compile is left to the
           run above).
The exit status is 1 when a check failed or ran out of time. Runs write into /dev/shm when it has room (a save of
SD 1.5 is about 11 GB: RAM takes it at once, a cloud disk in tens of seconds) and each is removed once checked.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_check.py` puts bench/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_third_party_output  # noqa: E402  (standard library only)

quiet_third_party_output()  # first, as train.py does: torch, diffusers and transformers load below
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench import gpu_throughput as throughput  # noqa: E402
from bench.state_save_time import quiet_libraries  # noqa: E402
from trainer.model import resolve_model_source  # noqa: E402
from trainer.random_model import RANDOM_MODELS  # noqa: E402
from trainer.single_file import bundled_config_dir  # noqa: E402
from trainer.tiny_model import DEFAULT_CACHE_DIR, TINY_MODEL_NAME, tiny_model_path  # noqa: E402
from utils.config import RANDOM_MODEL_PREFIX, TrainConfig  # noqa: E402
from utils.convert import load_single_file_pipeline  # noqa: E402

GIB = 2**30
EXIT_SIGTERM = 128 + signal.SIGTERM
MODEL_PARTS = ("unet", "vae", "text_encoder")
# The config key the resume check asks for: torch.use_deterministic_algorithms in the trainer. cuBLAS needs a fixed
# workspace for it, set before CUDA starts, so the check sets it in the run's environment as well.
DETERMINISTIC_KEY = "deterministic"
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
# fp16 keeps 11 significant bits: a weight read back from the half-precision single file is within 2^-11 of its
# fp32 value, relative (values below 1e-3 are compared with 1e-3: fp16 rounds them at most 2^-11 * 1e-3 away).
# Twice that, so that the fp32 arithmetic of the comparison cannot fail a file that rounded exactly at the bound.
FP16_ROUNDING = 2**-10
SMALLEST_COMPARED = 1e-3
SHM = Path("/dev/shm")
SHM_NEEDED_GIB = 48  # two runs' saves of SD 1.5 at a time, with the resume check's states, and room to spare
MIN_CHECK_S = 20.0  # a check is not started with less time left: even the tiny model's run takes that long
# The sweep's imports, outside its own budget (which starts with its FLOP count), before it is stopped.
SWEEP_START_S = 30.0


@dataclass(frozen=True)
class Mode:
    """What every run of one check trains, and how the time is shared."""

    device: str
    model: str  # resume_ckpt
    resolution: int
    images: int
    batch_size: int
    steps: int  # of every run
    sigterm_after: int  # trained steps seen before the resume check's SIGTERM
    precision: str
    num_workers: int
    jobs: int  # train.py runs at a time: on an H200 two fit beside each other, and torch_compile compiles for minutes
    budget_s: float
    sweep_s: float  # kept for the throughput sweep at the end
    sweep_max_s: float  # what the sweep gets at most when the runs finish early


CUDA = Mode(
    device="cuda",
    model=f"{RANDOM_MODEL_PREFIX}sd15",
    resolution=512,
    images=16,
    batch_size=2,
    steps=20,
    sigterm_after=10,
    precision="auto",
    num_workers=2,
    jobs=2,
    budget_s=480.0,
    sweep_s=120.0,
    sweep_max_s=180.0,
)
CPU = replace(
    CUDA,
    device="cpu",
    model=TINY_MODEL_NAME,
    resolution=64,
    images=8,
    steps=4,
    sigterm_after=2,
    precision="bf16",  # the GPU's default, through accelerate's CPU autocast
    num_workers=0,
    jobs=1,
    budget_s=900.0,
    sweep_s=40.0,
    sweep_max_s=40.0,
)


@dataclass(frozen=True)
class Variant:
    """One setting a run checks: config keys on top of the defaults."""

    name: str  # for --only
    label: str
    keys: dict
    needs_cuda: str = ""  # why it cannot run on a CPU, when it cannot
    needs_module: str = ""


VARIANTS = (
    # First: its compile takes minutes, during which the other runs go on beside it.
    Variant("compile", "torch_compile", {"torch_compile": True}, needs_cuda="inductor on a CPU compiles for minutes"),
    Variant("defaults", "bf16, sdp attention, adamw8bit (the defaults)", {}),
    # clip_grad_norm too: under fp16 accelerate must unscale the gradients before clipping them.
    Variant(
        "fp16",
        "fp16 + GradScaler, clip_grad_norm",
        {"mixed_precision": "fp16", "clip_grad_norm": 1.0},
        needs_cuda="accelerate uses no GradScaler on a CPU",
    ),
    Variant("adamw", "adamw (fused on CUDA)", {"optimizer": "adamw"}),
    Variant(
        "caches",
        "cache_latents + cache_text_embeddings",
        {"cache_latents": True, "cache_text_embeddings": True, "disable_textenc_training": True},
    ),
    Variant("checkpointing", "gradient_checkpointing", {"gradient_checkpointing": True}),
    Variant(
        "xformers",
        "attn_type xformers",
        {"attn_type": "xformers"},
        needs_cuda="xformers runs on CUDA only",
        needs_module="xformers",
    ),
)
CHECK_NAMES = tuple(v.name for v in VARIANTS) + ("resume", "sweep")


class CheckFailed(Exception):
    pass


class RunTimeout(Exception):
    pass


@dataclass
class Check:
    name: str
    label: str
    status: str = "skipped"  # ok, failed, timeout, skipped
    reason: str = ""
    seconds: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass
class Run:
    """A finished train.py process: its folder holds config.json, train.log and logs/<run folder>."""

    folder: Path
    returncode: int
    seconds: float

    @property
    def log(self) -> str:
        return (self.folder / "train.log").read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.replace("\r", "\n").splitlines()[-lines:])

    @property
    def run_dir(self) -> Path:
        (run_dir,) = (self.folder / "logs").iterdir()
        return run_dir

    def summary(self) -> dict:
        return json.loads((self.run_dir / "run_summary.json").read_text(encoding="utf-8"))


@dataclass
class Session:
    """What every check of one invocation shares."""

    mode: Mode
    work: Path
    cache: Path
    images: Path
    single_file_config: Path  # the diffusers folder that describes the model's single-file checkpoints
    deadline: throughput.Deadline
    reserved_s: float  # of the time left, what the runs leave to the sweep
    processes: set = field(default_factory=set)  # running train.py processes, killed if the check is interrupted

    def time_for_checks(self) -> float:
        return self.deadline.left() - self.reserved_s

    def config(self, **keys) -> dict:
        mode = self.mode
        return {
            "resume_ckpt": mode.model,
            "model_cache_dir": str(self.cache),
            "data_root": str(self.images),
            "project_name": "check",
            "resolution": mode.resolution,
            "batch_size": mode.batch_size,
            "max_steps": mode.steps,
            "lr": 1e-5,
            "mixed_precision": mode.precision,
            "optimizer": "adamw8bit",
            "num_workers": mode.num_workers,
            "seed": 42,
            "log_step": 1,
            "save_state_keep": 1,
            **keys,
        }

    def train(self, name: str, config: dict, extra: tuple[str, ...] = (), sigterm_after: int | None = None) -> Run:
        """train.py in a process of its own, its output in <work>/<name>/train.log (appended: a resumed run adds to
        its stopped run's). `sigterm_after`: send SIGTERM once the run has logged that many trained steps."""
        folder = self.work / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({**config, "logdir": str(folder / "logs")}), encoding="utf-8")
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(folder / "config.json"), *extra]
        started = time.perf_counter()
        with open(folder / "train.log", "a", encoding="utf-8") as log:
            process = subprocess.Popen(
                command,
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=run_environment(config),
                start_new_session=True,
            )
        self.processes.add(process)
        try:
            if sigterm_after:
                self.signal_after(process, folder / "logs", sigterm_after)
            process.wait(timeout=max(self.time_for_checks(), 0.001))
        except subprocess.TimeoutExpired:
            raise RunTimeout(f"train.py ({name}) was still running at the time budget") from None
        finally:
            stop_process(process)
            self.processes.discard(process)
        return Run(folder, process.returncode, time.perf_counter() - started)

    def signal_after(self, process: subprocess.Popen, logdir: Path, steps: int) -> None:
        """SIGTERM as a cluster's scheduler sends it, once metrics.csv shows `steps` trained steps."""
        while process.poll() is None and self.time_for_checks() > 0:
            metrics = list(logdir.glob("*/metrics.csv"))
            if metrics and len(trained_losses(metrics[0])) >= steps:
                process.send_signal(signal.SIGTERM)
                return
            time.sleep(0.02)

    def stop_all(self) -> None:
        for process in list(self.processes):
            stop_process(process)


def run_environment(config: dict) -> dict:
    """Offline, unbuffered, and cuBLAS's fixed workspace when the run asks for deterministic algorithms."""
    deterministic = CUBLAS_DETERMINISTIC if config.get(DETERMINISTIC_KEY) else {}
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **deterministic}


def stop_process(process: subprocess.Popen) -> None:
    """The process and what it started (DataLoader workers, compile workers): it runs in a session of its own."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def trained_losses(metrics: Path) -> list[float]:
    with open(metrics, newline="", encoding="utf-8") as handle:
        return [float(row["loss_train"]) for row in csv.DictReader(handle) if row.get("loss_train")]


# --- set-up: images and the model ----------------------------------------------------------------------------
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")


def generate_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    """`count` square PNGs with a caption each: a coloured shape on another colour. Square, so that every batch
    has one shape and torch_compile compiles once."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        rng = random.Random(seed + index)
        background, colour = rng.sample(sorted(COLOURS), 2)
        shape = rng.choice(SHAPES)
        image = Image.new("RGB", (size, size), COLOURS[background])
        draw_shape(ImageDraw.Draw(image), shape, COLOURS[colour], size, rng)
        stem = f"{index:02d}-{colour}-{shape}"
        image.save(folder / f"{stem}.png")
        (folder / f"{stem}.txt").write_text(f"a {colour} {shape} on a {background} background", encoding="utf-8")
    return folder


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, size: int, rng: random.Random) -> None:
    side = rng.randint(size // 4, size // 2)
    left, top = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left, top + side), (left + side, top + side), (left + side // 2, top)], fill=colour)


def single_file_config(mode: Mode, cache: Path) -> Path:
    """What from_single_file is given to read the run's single file: the bundled configs of its architecture, or
    the tiny model's own folder (the bundled ones describe full-size models only)."""
    if mode.model == TINY_MODEL_NAME:
        return tiny_model_path(cache)
    return bundled_config_dir(RANDOM_MODELS[mode.model.removeprefix(RANDOM_MODEL_PREFIX)], cache)


def set_up(mode: Mode, work: Path, cache: Path, deadline: throughput.Deadline) -> tuple[Session, dict]:
    """The images, and the model built once here so that no run builds it (two at a time would both build)."""
    images = generate_images(work / "images", mode.images, mode.resolution)
    started = time.perf_counter()
    folder = Path(resolve_model_source(mode.model, str(cache)))
    seconds = round(time.perf_counter() - started, 1)
    setup = {"images": mode.images, "model_folder": str(folder), "model_seconds": seconds}
    return Session(mode, work, cache, images, single_file_config(mode, cache), deadline, mode.sweep_s), setup


# --- what a finished run must show ---------------------------------------------------------------------------
def check_completed(run: Run, steps: int) -> dict:
    """Exit 0 (no device or dtype error, no crash), and a finite loss at each of the run's steps."""
    if run.returncode != 0:
        raise CheckFailed(f"train.py exited with {run.returncode}:\n{run.tail()}")
    losses = trained_losses(run.run_dir / "metrics.csv")
    if len(losses) != steps or not all(math.isfinite(loss) for loss in losses):
        raise CheckFailed(f"expected {steps} finite losses in metrics.csv, got {losses}")
    return {"first_loss": losses[0], "last_loss": losses[-1], "run_s": round(run.seconds, 1)}


def check_checkpoint(summary: dict, config_dir: Path) -> dict:
    """The final checkpoint as users load it: the diffusers folder with from_pretrained holds the state's weights
    bit for bit; the single file with from_single_file (bundled configs, offline) holds them within fp16 rounding."""
    from diffusers import StableDiffusionPipeline

    final, state = summary["final_checkpoint"], Path(summary["last_state"])
    pretrained = StableDiffusionPipeline.from_pretrained(final["diffusers"], local_files_only=True)
    for part in (p for p in MODEL_PARTS if (state / f"{p}.safetensors").is_file()):
        if largest_difference(load_file(state / f"{part}.safetensors"), getattr(pretrained, part).state_dict()):
            raise CheckFailed(f"the diffusers checkpoint's {part} differs from the run's state")
    single = load_single_file_pipeline(final["single_file"], config_dir=config_dir)
    relative = max(
        largest_difference(params(getattr(single, part)), params(getattr(pretrained, part)), relative=True)
        for part in MODEL_PARTS
    )
    if relative > FP16_ROUNDING:
        raise CheckFailed(
            f"the single file's weights differ from the diffusers folder's by {relative:.3g} (relative), "
            f"more than fp16 rounding ({FP16_ROUNDING:.3g})"
        )
    return {"from_pretrained": "state's weights", "from_single_file_rel_diff": relative}


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters only: buffers such as CLIP's position ids are not part of what the file stores."""
    return dict(module.named_parameters())


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], relative: bool = False) -> float:
    """The largest elementwise difference over the tensors of two state dicts with the same keys; relative: to the
    size of b's value (at least SMALLEST_COMPARED)."""
    if set(a) != set(b):
        raise CheckFailed(f"different tensors: {sorted(set(a) ^ set(b))[:5]}")
    largest = 0.0
    for key, tensor in a.items():
        expected = b[key].detach().float()
        # A NaN anywhere counts as the largest difference: max() would pass it over.
        difference = torch.nan_to_num((tensor.detach().float() - expected).abs(), nan=math.inf)
        if relative:
            difference = difference / expected.abs().clamp_min(SMALLEST_COMPARED)
        largest = max(largest, difference.max().item() if difference.numel() else 0.0)
    return largest


# --- the checks ----------------------------------------------------------------------------------------------
def check_variant(session: Session, variant: Variant) -> dict:
    run = session.train(variant.name, session.config(**variant.keys))
    try:
        return check_completed(run, session.mode.steps) | check_checkpoint(run.summary(), session.single_file_config)
    finally:
        shutil.rmtree(run.folder, ignore_errors=True)  # the saves of SD 1.5 take 11 GB, of RAM in /dev/shm


def check_resume(session: Session) -> dict:
    """SIGTERM during a run, `--resume_from latest`, and the same run left alone: the same final weights."""
    mode = session.mode
    deterministic = DETERMINISTIC_KEY in TrainConfig.model_fields
    config = session.config(**({DETERMINISTIC_KEY: True} if deterministic else {}))
    stopped_at = stopped_step(session.train("resume", config, sigterm_after=mode.sigterm_after), mode.steps)
    resumed = session.train("resume", config, extra=("--resume_from", "latest"))
    check_completed(resumed, mode.steps)
    loads = check_checkpoint(resumed.summary(), session.single_file_config)  # a resumed run's checkpoint loads too
    alone = session.train("resume-alone", config)
    check_completed(alone, mode.steps)
    difference = states_difference(Path(resumed.summary()["last_state"]), Path(alone.summary()["last_state"]))
    details = {
        "stopped_at_step": stopped_at,
        "deterministic_key": deterministic,
        "bit_equal": difference == 0.0,
        "max_abs_diff": difference,
        **loads,
    }
    if difference and (deterministic or mode.device == "cpu"):
        raise CheckFailed(f"the resumed run's final weights differ from the run left alone by up to {difference:.3g}")
    if not deterministic:
        details["note"] = f"no '{DETERMINISTIC_KEY}' config key: " + (
            "bit-equal on the CPU without it" if mode.device == "cpu" else "the difference is reported, not checked"
        )
    for run in (resumed, alone):
        shutil.rmtree(run.folder, ignore_errors=True)
    return details


def stopped_step(run: Run, steps: int) -> int:
    """The step the SIGTERM'd run stopped at, once it exited as it should: 143, with the command that resumes."""
    if run.returncode != EXIT_SIGTERM:
        raise CheckFailed(f"the run sent SIGTERM exited with {run.returncode}, not {EXIT_SIGTERM}:\n{run.tail()}")
    if "To resume:" not in run.log:
        raise CheckFailed(f"the stopped run printed no resume command:\n{run.tail()}")
    step = run.summary()["steps"]
    if not 0 < step < steps:
        raise CheckFailed(f"the run stopped at step {step}, not between 1 and {steps - 1}")
    return step


def states_difference(first: Path, second: Path) -> float:
    """The largest difference between the trained weights of two states (0.0: bit-equal)."""
    parts = sorted(p.stem for p in first.glob("*.safetensors") if p.stem in MODEL_PARTS)
    return max(
        largest_difference(load_file(first / f"{part}.safetensors"), load_file(second / f"{part}.safetensors"))
        for part in parts
    )


def run_sweep(session: Session, seconds: float) -> dict:
    """bench/gpu_throughput.py within `seconds`, in a process of its own (it measures the GPU's memory)."""
    out = session.work / "sweep"
    command = [
        sys.executable,
        str(ROOT / "bench" / "gpu_throughput.py"),
        "--out",
        str(out),
        "--cache_dir",
        str(session.cache),
        "--budget_s",
        f"{seconds:.0f}",
        "--compile_budget_s",
        f"{seconds + 1:.0f}",
    ]  # never: torch_compile is checked through train.py
    if session.mode.device == "cpu":
        command += ["--tiny", "--device", "cpu"]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + SWEEP_START_S, env=run_environment({})
        )
    except subprocess.TimeoutExpired:
        raise RunTimeout("bench/gpu_throughput.py ran past its budget") from None
    if done.returncode != 0:
        raise CheckFailed(f"bench/gpu_throughput.py exited with {done.returncode}:\n{done.stderr[-3000:]}")
    (report,) = out.glob("*.json")
    return json.loads(report.read_text(encoding="utf-8"))


# --- running the checks --------------------------------------------------------------------------------------
def run_check(session: Session, check: Check, task: Callable[[], dict]) -> None:
    """One check, whatever happens: a failure is recorded with its reason and the others go on."""
    if session.time_for_checks() < MIN_CHECK_S:
        check.reason = f"time budget: {max(session.time_for_checks(), 0):.0f} s left for the runs"
    else:
        started = time.perf_counter()
        try:
            check.details = task()
            check.status = "ok"
        except RunTimeout as timeout:
            check.status, check.reason = "timeout", str(timeout)
        except Exception as error:  # noqa: BLE001 - one broken setting must not cost the rest of the check
            check.status, check.reason = "failed", f"{type(error).__name__}: {error}"
        check.seconds = time.perf_counter() - started
    print(progress_line(check), flush=True)


def unavailable(variant: Variant, mode: Mode) -> str:
    if variant.needs_cuda and mode.device != "cuda":
        return f"needs CUDA ({variant.needs_cuda})"
    if variant.needs_module and importlib.util.find_spec(variant.needs_module) is None:
        return f"{variant.needs_module} is not installed"
    return ""


def planned_checks(session: Session, selected: set[str]) -> list[tuple[Check, Callable[[], dict] | None]]:
    """Every check in its order, with the task that runs it; None for one that is skipped (the reason is set)."""
    planned = []
    for variant in VARIANTS:
        check = Check(variant.name, variant.label)
        check.reason = "not selected (--only)" if variant.name not in selected else unavailable(variant, session.mode)
        planned.append((check, None if check.reason else lambda v=variant: check_variant(session, v)))
    resume = Check("resume", f"SIGTERM after step {session.mode.sigterm_after}, --resume_from latest")
    resume.reason = "" if "resume" in selected else "not selected (--only)"
    # The resume check's three runs go second, beside the compile: together they are the longest chain.
    planned.insert(1, (resume, None if resume.reason else lambda: check_resume(session)))
    return planned


def run_planned(session: Session, planned: list[tuple[Check, Callable[[], dict] | None]]) -> None:
    with ThreadPoolExecutor(max_workers=session.mode.jobs) as pool:
        for check, task in planned:
            if task is None:
                print(progress_line(check), flush=True)
            else:
                pool.submit(run_check, session, check, task)


def sweep_check(session: Session, selected: set[str]) -> tuple[Check, dict | None]:
    check = Check("sweep", "throughput sweep (bench/gpu_throughput.py)")
    if "sweep" not in selected:
        check.reason = "not selected (--only)"
        print(progress_line(check), flush=True)
        return check, None
    session.reserved_s = 0.0  # the runs are done: what they left is the sweep's
    seconds = min(session.mode.sweep_max_s, session.deadline.left())
    reports = []

    def sweep() -> dict:
        reports.append(run_sweep(session, seconds))
        return sweep_details(reports[0])

    run_check(session, check, sweep)
    return check, reports[0] if reports else None


def sweep_details(report: dict) -> dict:
    settings = report["settings"]
    return {
        "settings_measured": sum(s["status"] == "ok" for s in settings),
        "settings": len(settings),
        "budget_s": report["budget_s"],
    }


# --- output --------------------------------------------------------------------------------------------------
def progress_line(check: Check) -> str:
    text = f"[{check.status}] {check.label}"
    if check.seconds:
        text += f" ({check.seconds:.0f} s)"
    if check.reason:
        text += f": {check.reason}"
    if check.details:
        text += f": {format_details(check.details)}"
    return text


def format_details(details: dict) -> str:
    return "; ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in details.items()
    )


def environment(mode: Mode) -> dict:
    """What the check ran with: the device, and the versions of torch, CUDA, cuDNN and the libraries."""
    device = torch.device(mode.device)
    info = throughput.describe_device(device, tiny=mode.device == "cpu")
    info |= {name: throughput.package_version(name) for name in ("transformers", "accelerate")}
    info["cudnn"] = torch.backends.cudnn.version() if mode.device == "cuda" else None
    info["python"] = platform.python_version()
    return info


def versions_line(info: dict) -> str:
    return (
        f"{info['name']}: torch {info['torch']} (CUDA {info['cuda']}, cuDNN {info['cudnn']}), diffusers "
        f"{info['diffusers']}, transformers {info['transformers']}, accelerate {info['accelerate']}, "
        f"bitsandbytes {info['bitsandbytes']}, xformers {info['xformers']}, python {info['python']}"
    )


def markdown(report: dict) -> str:
    mode = report["mode"]
    lines = [
        f"## gpu_check: {mode['model']} at {mode['resolution']} px, {mode['steps']} steps per run",
        "",
        versions_line(report["environment"]) + ".",
        "",
        f"{report['elapsed_s']:.0f} s of a {mode['budget_s']:.0f} s budget; "
        f"{'passed' if report['passed'] else 'FAILED'}.",
        "",
        "| check | status | seconds | details |",
        "|---|---|---|---|",
    ]
    for check in report["checks"]:
        text = check["reason"].replace("\n", " ")[:300] or format_details(check["details"])
        lines.append(f"| {check['label']} | {check['status']} | {check['seconds']:.0f} | {text} |")
    forecast = report["memory_forecast"]
    lines += ["", f"Memory forecast: {forecast['status']}: {forecast['reason']}"]
    if report["throughput"]:
        lines += ["", throughput.markdown(report["throughput"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


# --- the command ---------------------------------------------------------------------------------------------
def work_folder(requested: str | None, mode: Mode) -> Path:
    """A fresh folder for the runs: in RAM (/dev/shm) for SD 1.5 when it has room, else the temporary folder."""
    root = Path(requested) if requested else Path(tempfile.gettempdir())
    if not requested and mode.device == "cuda" and SHM.is_dir() and shutil.disk_usage(SHM).free >= SHM_NEEDED_GIB * GIB:
        root = SHM
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="gpu_check-", dir=root))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--cpu", action="store_true", help="the tiny model at 64 px on the CPU (CUDA checks skipped)")
    parser.add_argument(
        "--only",
        default=",".join(CHECK_NAMES),
        help=f"comma-separated checks to run, of: {', '.join(CHECK_NAMES)} (default: all)",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=None,
        help=f"seconds for all of it (default: {CUDA.budget_s:.0f}; --cpu: {CPU.budget_s:.0f})",
    )
    parser.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE_DIR, help="the model cache (model_cache_dir)")
    parser.add_argument("--work_dir", default=None, help="where the runs write (default: /dev/shm or the temp folder)")
    options = parser.parse_args(argv)
    unknown = set(options.only.split(",")) - set(CHECK_NAMES)
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(CHECK_NAMES)}")
    return options


def choose_mode(options: argparse.Namespace) -> Mode:
    if not options.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; `--cpu` runs the check on the tiny model.")
    mode = CPU if options.cpu else CUDA
    return replace(mode, budget_s=options.budget_s) if options.budget_s else mode


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    mode = choose_mode(options)
    deadline = throughput.Deadline(mode.budget_s)
    info = environment(mode)
    print(versions_line(info), flush=True)
    selected = set(options.only.split(","))
    work = work_folder(options.work_dir, mode)
    session = None
    try:
        session, setup = set_up(mode, work, options.cache_dir, deadline)
        print(f"set-up: {format_details(setup)}", flush=True)
        planned = planned_checks(session, selected)
        run_planned(session, planned)
        sweep, sweep_report = sweep_check(session, selected)
    finally:
        if session:
            session.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    checks = [check for check, _ in planned] + [sweep]
    report = {
        "check": "bench/gpu_check.py",
        "command": " ".join(["scripts/gpu_check.sh", *(argv or sys.argv[1:])]),
        "mode": asdict(mode),
        "environment": info,
        "setup": setup,
        "elapsed_s": mode.budget_s - deadline.left(),
        "passed": not any(check.status in ("failed", "timeout") for check in checks),
        "checks": [asdict(check) for check in checks],
        "memory_forecast": {"status": "skipped", "reason": "the trainer has no memory forecast yet"},
        "throughput": sweep_report,
    }
    write_report(report, options.out)
    print(f"\nwrote {options.out / 'gpu_check.json'} and gpu_check.md\n\n{markdown(report)}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    quiet_libraries()  # the progress bars of the checkpoint loads here; the runs' output goes to their train.log
    sys.exit(main())
