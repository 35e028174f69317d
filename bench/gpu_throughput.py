"""Training throughput, memory and MFU of SD 1.5 at 512 px on one GPU, in one command (under 8 minutes on an H200).

    python bench/gpu_throughput.py                 # SD 1.5 architecture, random weights, needs CUDA
    python bench/gpu_throughput.py --tiny          # the tiny demo model at 64 px; runs on a CPU (the tests use it)

Each setting builds the model from the bundled configs (random weights, nothing downloaded), takes the
trainer's own step (trainer.diffusion.training_loss, optimizer.optimizers.build_optimizer, configure_for_training)
for a few warmup and a few timed steps, and records images/s, peak GPU memory and MFU. TF32 is set as the
trainer sets it (use_tf32 with the config's allow_tf32, on by default). The text encoder is
frozen, as with `disable_textenc_training`: it runs forward every step with no gradients, in the low-precision
dtype like the VAE, while the UNet keeps fp32 master weights under autocast (what the trainer does).

The sweep, in priority order, inside a time budget (settings that no longer fit are skipped and say so):
  batch    the default recipe (bf16, sdp attention, VAE encode every step, fused AdamW) over batch sizes
  variant  one change at a time at the reference batch: fp16 + GradScaler, xformers, cached latents,
           8-bit AdamW, gradient checkpointing, all three memory savers together, and channels_last
  memory   each memory recipe at small batches, so its peak memory can be fitted as fixed + per-image
  verify   the predicted largest batch for 24 GB and 80 GB cards, run under a memory cap
  compile  torch.compile of the UNet, last because compiling takes minutes; interrupted at the budget

The results go to bench/results/<gpu-name>.json (rewritten after every setting, so an interrupted run keeps
what it measured) and a markdown table for the README is printed.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import re
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_throughput.py` puts bench/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from bench.flops import FlopsPerImage, flops_per_image, latent_side, parameter_counts  # noqa: E402
from optimizer.optimizers import build_optimizer, model_param_groups  # noqa: E402
from trainer.diffusion import training_loss  # noqa: E402
from trainer.model import SDModel, configure_for_training, use_tf32  # noqa: E402
from trainer.single_file import bundled_config_dir  # noqa: E402
from trainer.tiny_model import DEFAULT_CACHE_DIR, tiny_model_path  # noqa: E402
from utils.config import TrainConfig, load_config  # noqa: E402

GIB = 2**30
CAPTION = "a photo of a benchmark subject, detailed, sharp focus"

# Dense (no sparsity) BF16/FP16 tensor-core peaks with FP32 accumulation, TFLOP/s, from NVIDIA's datasheets and
# architecture whitepapers; the datasheets headline "with sparsity" figures, twice these. The first name found
# in torch.cuda.get_device_name() wins, so the more specific names come first. The "about 790 TFLOP/s"
# for an H200 is nearer what a large bf16 matmul achieves (recorded as matmul_tflops); --peak_tflops 790 uses it.
PEAK_TFLOPS = (
    ("H200 NVL", 835.5),
    ("H200", 989.4),  # H200 SXM: the H100 SXM's compute with more, faster memory
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
PEAK_SOURCE = "NVIDIA datasheet/whitepaper, dense BF16 tensor cores (half the 'with sparsity' figure)"

# Card sizes of the memory advice, in GiB (a "24 GB" card has 24564 MiB), less what PyTorch's peak statistics
# do not see: the CUDA context and library workspaces.
CARDS_GIB = (12, 24, 80)
VERIFIED_CARDS_GIB = (24, 80)
HEADROOM_GIB = 1.0


@dataclass(frozen=True)
class Setting:
    """One point of the sweep; the defaults are the trainer's defaults on a bf16 GPU."""

    batch_size: int
    precision: str = "bf16"  # or fp16, with a GradScaler
    attention: str = "sdp"  # torch scaled_dot_product_attention, or xformers
    cached_latents: bool = False  # False: the VAE encodes every batch, as the trainer does
    optimizer: str = "adamw"  # torch AdamW, fused on CUDA; or bitsandbytes' adamw8bit
    gradient_checkpointing: bool = False
    channels_last: bool = False  # the config key: configure_for_training converts the UNet (and VAE) to NHWC
    compile: bool = False

    @property
    def name(self) -> str:
        parts = [self.precision, self.attention, "cached" if self.cached_latents else "vae", self.optimizer]
        parts += ["ckpt"] * self.gradient_checkpointing + ["channels_last"] * self.channels_last
        parts += ["compile"] * self.compile
        return " ".join(parts)

    def at_batch(self, batch_size: int) -> Setting:
        return replace(self, batch_size=batch_size)


ALL_MEMORY_SAVERS = {"cached_latents": True, "optimizer": "adamw8bit", "gradient_checkpointing": True}
# The changes measured one at a time against the default recipe at the reference batch.
VARIANTS = (
    {"precision": "fp16"},
    {"attention": "xformers"},
    {"cached_latents": True},
    {"optimizer": "adamw8bit"},
    {"gradient_checkpointing": True},
    ALL_MEMORY_SAVERS,
    {"channels_last": True},
)
# The recipes whose peak memory is modelled, as Settings without a batch size.
MEMORY_RECIPES = {
    "default": Setting(0),
    "cached latents": Setting(0, cached_latents=True),
    "8-bit AdamW": Setting(0, optimizer="adamw8bit"),
    "checkpointing": Setting(0, gradient_checkpointing=True),
    "all three": Setting(0, **ALL_MEMORY_SAVERS),
}
MIN_SETTING_SECONDS = 10.0  # a setting is not started with less left: model build, warmup, one timed step


@dataclass(frozen=True)
class SweepSize:
    """How much of everything one run does."""

    resolution: int
    batch_sizes: tuple[int, ...]
    reference_batch: int
    memory_batches: tuple[int, ...]
    warmup_steps: int
    timed_steps: int
    setting_seconds: float  # timed steps stop after this long (at least one is taken)
    cards_gib: tuple[int, ...]  # card sizes to predict the largest batch for


FULL = SweepSize(
    512, (1, 2, 4, 8, 16, 32), 16, (1, 4), warmup_steps=2, timed_steps=8, setting_seconds=15.0, cards_gib=CARDS_GIB
)
# The card sizes are about SD 1.5 at 512 px; the tiny model's memory says nothing about them.
TINY = SweepSize(64, (1, 2, 4), 2, (1,), warmup_steps=1, timed_steps=2, setting_seconds=5.0, cards_gib=())


@dataclass
class Result:
    group: str
    setting: Setting
    status: str  # ok, oom, skipped, timeout, error
    reason: str = ""
    card_gib: int | None = None  # verify: the card emulated by a memory cap
    measured: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "name": self.setting.name,
            **asdict(self.setting),
            "status": self.status,
            "reason": self.reason,
            "card_gib": self.card_gib,
            **self.measured,
        }


class SettingTimeout(BaseException):
    """A setting ran into the sweep's deadline. A BaseException, like KeyboardInterrupt, so that no library's
    `except Exception` swallows it halfway through a step."""


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


class TimeLimit:
    """Interrupt what runs past `seconds`: a step cannot be stopped from outside, and torch.compile's first step
    can take minutes. `fired` tells afterwards whether the interrupt came: a library that catches it mid-call can
    hand back another exception in its place (seen once in CI as an "error" at a 0.05 s deadline)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.fired = False
        self.reason = f"stopped at the sweep's time budget ({seconds:.0f} s were left)"

    def _interrupt(self, signum, frame):
        self.fired = True
        raise SettingTimeout(self.reason)

    def __enter__(self) -> TimeLimit:
        self._previous = signal.signal(signal.SIGALRM, self._interrupt)
        # The interrupt can land between torch.no_grad()'s switch and its `with` body, whose exit then never
        # runs: put the grad mode back, or everything after this (other tests, other settings) runs without
        # gradients.
        self._grad_enabled = torch.is_grad_enabled()
        signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 0.001))  # 0 would disarm the timer instead
        return self

    def __exit__(self, *exc_info) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        torch.set_grad_enabled(self._grad_enabled)


@contextmanager
def memory_cap(device: torch.device, cap_gib: float | None):
    """Emulate a smaller card: the caching allocator refuses to hold more than `cap_gib`."""
    if cap_gib is None:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


# --- the model and the step --------------------------------------------------------------------------------
def weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_random_model(config_dir: Path, device: torch.device, setting: Setting) -> SDModel:
    """SD components from a diffusers config folder with random weights, placed as the trainer places them:
    the UNet in fp32 (the trained master weights), the frozen VAE and text encoder in the low-precision dtype."""
    torch.manual_seed(0)
    dtype = weight_dtype(setting.precision)
    with torch.device(device):  # initialise on the GPU: random init of 860M parameters on a CPU takes long
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder")).to(dtype)
    # With cached latents the VAE never runs (only its config, the latent scale, is read): keep it off the GPU.
    with torch.device("meta" if setting.cached_latents else device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")).to(dtype)
    return SDModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(config_dir / "tokenizer"),
        noise_scheduler=DDPMScheduler.from_pretrained(config_dir / "scheduler"),
        source=str(config_dir),
    )


def train_config(setting: Setting) -> TrainConfig:
    """The trainer's config for a setting: its defaults, a frozen text encoder, and the setting's choices."""
    return load_config(
        None,
        {
            "data_root": str(ROOT / "bench"),  # must exist; the benchmark feeds synthetic batches
            "batch_size": setting.batch_size,
            "mixed_precision": setting.precision,
            "attn_type": setting.attention,
            "optimizer": setting.optimizer,
            "gradient_checkpointing": setting.gradient_checkpointing,
            "cache_latents": setting.cached_latents,  # configure_for_training leaves the VAE alone with cached latents
            "channels_last": setting.channels_last,
            "disable_textenc_training": True,
        },
    )


def synthetic_batch(model: SDModel, setting: Setting, resolution: int, device: torch.device) -> dict:
    """What the data loader yields (pixels in [-1, 1], captions, per-image loss scales), or, with cache_latents,
    what the latent cache holds instead of the pixels: the VAE's latent distribution parameters (mean and logvar,
    [B, 2C, h, w] in the VAE's dtype), from which training_loss samples each step. Already on the device: loading
    and the host-to-device copy are not measured."""
    batch = {"captions": [CAPTION] * setting.batch_size, "loss_scales": torch.ones(setting.batch_size)}
    if setting.cached_latents:
        side = latent_side(model.vae, resolution)
        channels = 2 * model.vae.config.latent_channels
        batch["latents"] = torch.randn(setting.batch_size, channels, side, side, device=device, dtype=model.vae.dtype)
    else:
        batch["pixel_values"] = torch.rand(setting.batch_size, 3, resolution, resolution, device=device) * 2 - 1
    return batch


def training_step(
    loss_of: Callable,
    model: SDModel,
    batch: dict,
    config: TrainConfig,
    optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    dtype: torch.dtype,
) -> bool:
    """One optimizer step as the trainer takes it (autocast, and a GradScaler for fp16, which is what accelerate
    applies). Returns False when the scaler skipped the update because of inf/NaN gradients."""
    with torch.autocast(device.type, dtype=dtype):
        loss = loss_of(model, batch, config, device)
    applied = True
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skips a step
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # the trainer reads every loss, which waits for the step
    return applied


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], bool], size: SweepSize, device: torch.device) -> dict:
    """Warmup steps (the first one pays for cuDNN autotuning, allocator growth, compilation), then timed steps
    until `timed_steps` or `setting_seconds`, whichever comes first."""
    started = time.perf_counter()
    step()
    synchronize(device)
    first_step_seconds = time.perf_counter() - started
    for _ in range(size.warmup_steps - 1):
        step()
    synchronize(device)
    started, timed, skipped = time.perf_counter(), 0, 0
    while timed < size.timed_steps and (timed == 0 or time.perf_counter() - started < size.setting_seconds):
        skipped += not step()
        timed += 1
    synchronize(device)
    return {
        "first_step_seconds": first_step_seconds,
        "timed_steps": timed,
        "seconds": time.perf_counter() - started,
        "skipped_updates": skipped,
    }


def peak_memory(device: torch.device) -> dict:
    """Peaks since the setting started: allocated (live tensors) and reserved (what the caching allocator holds,
    which is what runs out on a real card)."""
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }


@dataclass
class Bench:
    """What every setting of one run shares."""

    config_dir: Path
    device: torch.device
    size: SweepSize
    flops: FlopsPerImage
    peak_tflops: float

    def measure(self, setting: Setting, size: SweepSize) -> dict:
        config = train_config(setting)
        model = build_random_model(self.config_dir, self.device, setting)
        use_tf32(self.device, config.allow_tf32)  # the trainer's set-up order: TF32, then configure_for_training
        configure_for_training(model, config)
        optimizer = build_optimizer(config, model_param_groups(config, model.unet, model.text_encoder))
        for group in optimizer.param_groups:
            group["lr"] = config.lr  # the LR scheduler's job in the trainer; the optimizers start at 0
        if setting.compile:
            model.unet = torch.compile(model.unet)
        scaler = torch.amp.GradScaler(self.device.type) if setting.precision == "fp16" else None
        batch = synthetic_batch(model, setting, self.size.resolution, self.device)
        # training_loss samples cached latents when the batch has them, else encodes the pixels (the trainer's path)
        step = partial(
            training_step,
            training_loss,
            model,
            batch,
            config,
            optimizer,
            scaler,
            self.device,
            weight_dtype(setting.precision),
        )
        timing = time_steps(step, size, self.device)
        return timing | peak_memory(self.device) | self.rates(setting, timing)

    def rates(self, setting: Setting, timing: dict) -> dict:
        images_per_second = setting.batch_size * timing["timed_steps"] / timing["seconds"]
        achieved = images_per_second * self.flops.training_step(setting.cached_latents) / 1e12
        return {"images_per_second": images_per_second, "achieved_tflops": achieved, "mfu": achieved / self.peak_tflops}


def unavailable_reason(setting: Setting, device: torch.device) -> str | None:
    if setting.attention == "xformers" and (device.type != "cuda" or importlib.util.find_spec("xformers") is None):
        return "xformers needs a CUDA GPU and `pip install xformers`"
    if setting.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "adamw8bit needs `pip install bitsandbytes`"
    if setting.compile and device.type != "cuda":
        return "torch.compile is measured on CUDA only (inductor on a CPU compiles for minutes)"
    if setting.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    return None


def free_memory(device: torch.device) -> None:
    """Start every setting from an empty allocator, so its peak is its own. Modules hold reference cycles, so the
    previous setting's model is only gone after a collection (which takes a while: CUDA only, where it counts)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_setting(
    bench: Bench,
    group: str,
    setting: Setting,
    deadline: Deadline,
    needs_seconds: float,
    size: SweepSize | None = None,
    card_gib: int | None = None,
) -> Result:
    """Measure one setting, or say why not: unavailable here, out of time, out of memory, or an error (kept in
    the report rather than losing the rest of a GPU session)."""
    result = Result(group, setting, "skipped", card_gib=card_gib)
    reason = unavailable_reason(setting, bench.device)
    if reason or deadline.left() < needs_seconds:
        result.reason = reason or f"time budget: needs {needs_seconds:.0f} s, {max(deadline.left(), 0):.0f} s left"
        return result
    free_memory(bench.device)
    cap = card_gib - HEADROOM_GIB if card_gib else None
    limit = TimeLimit(deadline.left())
    try:
        with limit, memory_cap(bench.device, cap):
            result.measured = bench.measure(setting, size or bench.size)
        result.status = "ok"
    except torch.OutOfMemoryError:
        result.status = "oom"
    except (SettingTimeout, Exception) as error:  # noqa: BLE001 - one broken setting must not cost the rest
        if limit.fired:  # whatever came out, the interrupt caused it
            result.status, result.reason = "timeout", limit.reason
        else:
            result.status, result.reason = "error", f"{type(error).__name__}: {error}"
    finally:
        if setting.compile:
            torch._dynamo.reset()  # drop the compiled graphs and their memory
    return result


# --- the plan of the sweep ---------------------------------------------------------------------------------
def plan_sweep(size: SweepSize) -> list[tuple[str, Setting]]:
    """The batch, variant and memory groups in order, each setting once (verify and compile come later)."""
    baseline = Setting(size.reference_batch)
    planned = [("batch", baseline.at_batch(b)) for b in size.batch_sizes]
    planned += [("variant", replace(baseline, **change)) for change in VARIANTS]
    planned += [("memory", recipe.at_batch(b)) for recipe in MEMORY_RECIPES.values() for b in size.memory_batches]
    seen, unique = set(), []
    for group, setting in planned:
        if setting not in seen:
            seen.add(setting)
            unique.append((group, setting))
    return unique


# --- the memory model --------------------------------------------------------------------------------------
def linear_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares peak = fixed + per_image * batch: weights, gradients and optimizer states are fixed,
    activations grow with the batch."""
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    spread = sum((b - mean_b) ** 2 for b, _ in points)
    per_image = sum((b - mean_b) * (m - mean_m) for b, m in points) / spread
    return mean_m - per_image * mean_b, per_image


def largest_batch(fixed_gib: float, per_image_gib: float, card_gib: float) -> int:
    """The largest batch whose predicted peak fits the card less its headroom; 0 when not even one image does."""
    room = card_gib - HEADROOM_GIB - fixed_gib
    return max(0, math.floor(room / per_image_gib)) if per_image_gib > 0 else 0


def memory_fits(results: list[Result], cards_gib: tuple[int, ...]) -> list[dict]:
    """For each memory recipe measured at two or more batch sizes: its fit and largest batch per card."""
    fits = []
    for name, recipe in MEMORY_RECIPES.items():
        points = sorted(
            {
                (r.setting.batch_size, r.measured["peak_reserved_gib"])
                for r in results
                if r.ok
                and r.group != "verify"
                and r.setting == recipe.at_batch(r.setting.batch_size)
                and r.measured["peak_reserved_gib"] is not None
            }
        )
        if len({b for b, _ in points}) < 2:
            continue
        fixed, per_image = linear_fit(points)
        fits.append(
            {
                "recipe": name,
                "setting": recipe.name,
                "points": [list(p) for p in points],
                "fixed_gib": fixed,
                "per_image_gib": per_image,
                "largest_batch": {str(card): largest_batch(fixed, per_image, card) for card in cards_gib},
                "verified": {},
            }
        )
    return fits


def verification_plan(fits: list[dict], device_gib: float) -> list[tuple[dict, int, Setting]]:
    """The predicted largest batch of every recipe on the 24 GB and 80 GB cards this GPU can emulate."""
    return [
        (fit, card, MEMORY_RECIPES[fit["recipe"]].at_batch(fit["largest_batch"][str(card)]))
        for card in VERIFIED_CARDS_GIB
        if card <= device_gib
        for fit in fits
        if fit["largest_batch"].get(str(card), 0) >= 1
    ]


# --- peak FLOP/s and the device ----------------------------------------------------------------------------
def datasheet_peak_tflops(device_name: str) -> float | None:
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return tflops
    return None


def matmul_tflops(device: torch.device) -> float:
    """What a large matmul achieves here (bf16 on a GPU, fp32 on a CPU): the practical ceiling, and the
    peak used for MFU where the datasheet table has no entry."""
    side, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    repeats = 50 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * side**3 * repeats / (time.perf_counter() - started) / 1e12


def choose_peak(device: torch.device, device_name: str, override: float | None, measured: float) -> tuple[float, str]:
    if override:
        return override, "--peak_tflops"
    datasheet = datasheet_peak_tflops(device_name) if device.type == "cuda" else None
    if datasheet:
        return datasheet, PEAK_SOURCE
    return measured, "measured: a large matmul on this device (no datasheet entry for it)"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_device(device: torch.device, tiny: bool) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-tiny" if tiny else "")
    memory = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    return {
        "name": name,
        "slug": slug,
        "total_memory_gib": memory,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{package: package_version(package) for package in ("diffusers", "xformers", "bitsandbytes")},
    }


# --- the run -----------------------------------------------------------------------------------------------
def pick_device(requested: str | None, tiny: bool) -> torch.device:
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not tiny:
        raise SystemExit("gpu_throughput: SD 1.5 at 512 px needs a CUDA GPU; `--tiny` runs the sweep on a CPU.")
    return device


def model_config_dir(tiny: bool, cache_dir: Path) -> Path:
    return tiny_model_path(cache_dir) if tiny else bundled_config_dir("sd1", cache_dir)


class Run:
    """One benchmark run: the sweep in priority order, the report rewritten after every setting."""

    def __init__(self, options: argparse.Namespace, command: str):
        self.deadline = Deadline(options.budget_s)
        self.options = options
        self.size = TINY if options.tiny else FULL
        self.device = pick_device(options.device, options.tiny)
        config_dir = model_config_dir(options.tiny, Path(options.cache_dir))
        flops = flops_per_image(config_dir, self.size.resolution)
        self.device_info = describe_device(self.device, options.tiny)
        measured = matmul_tflops(self.device)
        peak, source = choose_peak(self.device, self.device_info["name"], options.peak_tflops, measured)
        self.bench = Bench(config_dir, self.device, self.size, flops, peak)
        self.results: list[Result] = []
        self.fits: list[dict] = []
        self.path = Path(options.out) / f"{self.device_info['slug']}.json"
        self.header = {
            "benchmark": "bench/gpu_throughput.py",
            "command": command,
            "model": "tiny" if options.tiny else "sd1 (SD 1.5 architecture, random weights)",
            "resolution": self.size.resolution,
            "parameters": parameter_counts(config_dir),
            "device": self.device_info,
            "sweep": asdict(self.size),
            "budget_s": options.budget_s,
            "flops_per_image": flops.as_dict(),
            "peak": {"tflops": peak, "source": source, "matmul_tflops": measured},
        }

    def execute(self) -> dict:
        for group, setting in plan_sweep(self.size):
            self.record(run_setting(self.bench, group, setting, self.deadline, MIN_SETTING_SECONDS))
        self.fits = memory_fits(self.results, self.size.cards_gib)
        self.verify_fits()
        compiled = Setting(self.size.reference_batch, compile=True)
        self.record(run_setting(self.bench, "compile", compiled, self.deadline, self.options.compile_budget_s))
        return self.report()

    def verify_fits(self) -> None:
        """Run each predicted largest batch under a memory cap of the card's size: 'ok' confirms the prediction."""
        two_steps = replace(self.size, warmup_steps=1, timed_steps=1)  # the peak comes in the second step
        device_gib = self.device_info["total_memory_gib"] or 0
        for fit, card, setting in verification_plan(self.fits, device_gib):
            result = run_setting(self.bench, "verify", setting, self.deadline, MIN_SETTING_SECONDS, two_steps, card)
            fit["verified"][str(card)] = result.status
            self.record(result)

    def record(self, result: Result) -> None:
        self.results.append(result)
        print(progress_line(result), flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.report(), indent=2) + "\n", encoding="utf-8")

    def report(self) -> dict:
        return self.header | {
            "elapsed_s": self.options.budget_s - self.deadline.left(),
            "settings": [r.as_dict() for r in self.results],
            "memory_fit": self.fits,
        }


# --- output ------------------------------------------------------------------------------------------------
def progress_line(result: Result) -> str:
    label = f"[{result.group}] {result.setting.name} b{result.setting.batch_size}"
    if result.card_gib:
        label += f" (capped at a {result.card_gib} GB card)"
    if not result.ok:
        return f"{label}: {result.status} {result.reason}".rstrip()
    m = result.measured
    memory = f", {m['peak_allocated_gib']:.1f} GiB" if m["peak_allocated_gib"] is not None else ""
    return f"{label}: {m['images_per_second']:.2f} images/s{memory}, MFU {m['mfu']:.1%}"


def format_gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def format_si(value: float, unit: str, digits: int, scale_of: float | None = None) -> str:
    """1.117e12 FLOP -> '1.117 TFLOP', with the prefix of `scale_of` (default: the value) so that the parts of
    one count share a unit; the tiny model's counts are millions, SD 1.5's trillions."""
    reference = value if scale_of is None else scale_of
    factor, prefix = next(((f, p) for f, p in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if reference >= f / 10), (1, ""))
    return f"{value / factor:.{digits}f} {prefix}{unit}"


def throughput_table(report: dict) -> list[str]:
    rows = [
        "| group | setting | batch | images/s | peak GiB (allocated) | MFU | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["settings"]:
        if s["status"] == "ok":
            note = [f"compiled in {s['first_step_seconds']:.0f} s"] * s["compile"]
            note += [f"{s['skipped_updates']} fp16 updates skipped"] * bool(s["skipped_updates"])
            note += [f"capped at {s['card_gib']} GB"] * bool(s["card_gib"])
            rows.append(
                f"| {s['group']} | {s['name']} | {s['batch_size']} | {s['images_per_second']:.2f} | "
                f"{format_gib(s['peak_allocated_gib'])} | {s['mfu']:.1%} | {'; '.join(note)} |"
            )
        else:
            rows.append(f"| {s['group']} | {s['name']} | {s['batch_size']} | | | | {s['status']}: {s['reason']} |")
    return rows


def memory_table(report: dict) -> list[str]:
    cards = [str(c) for c in report["sweep"]["cards_gib"]]
    rows = [
        "| recipe | fixed GiB | GiB per image | " + " | ".join(f"largest batch, {c} GB" for c in cards) + " |",
        "|---|---|---|" + "---|" * len(cards),
    ]
    for fit in report["memory_fit"]:
        cells = [
            f"{fit['largest_batch'][c]}" + (f" ({fit['verified'][c]})" if c in fit["verified"] else "") for c in cards
        ]
        rows.append(
            f"| {fit['recipe']} | {fit['fixed_gib']:.1f} | {fit['per_image_gib']:.2f} | " + " | ".join(cells) + " |"
        )
    return rows


def markdown(report: dict) -> str:
    flops, peak, device = report["flops_per_image"], report["peak"], report["device"]
    parts = ("unet_forward", "unet_forward_backward", "vae_encode", "text_encoder_forward")
    counted = ", ".join(
        f"{part.replace('_', ' ')} {format_si(flops[part], 'FLOP', 3, flops['unet_forward_backward'])}"
        for part in parts
    )
    lines = [
        f"### {device['name']}: {report['model']}, {report['resolution']} px (torch {device['torch']})",
        "",
        f"FLOPs per image, counted: {counted}. MFU against {format_si(peak['tflops'] * 1e12, 'FLOP/s', 1)} "
        f"({peak['source']}); a large matmul reached {format_si(peak['matmul_tflops'] * 1e12, 'FLOP/s', 1)}.",
        "",
    ]
    lines += throughput_table(report)
    if report["memory_fit"]:
        lines += [
            "",
            "Peak reserved memory fitted as fixed + per image x batch; the largest batch leaves "
            f"{HEADROOM_GIB:.0f} GiB for the CUDA context (in brackets: the run of that batch under a memory "
            "cap of the card's size).",
            "",
        ]
        lines += memory_table(report)
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny demo model at 64 px (CPU allowed; for tests)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the JSON results")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR), help="where model configs are materialised")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu (--tiny only)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak FLOP/s for MFU, in TFLOP/s (default: the datasheet table by GPU name)",
    )
    parser.add_argument(
        "--budget_s",
        type=float,
        default=420.0,
        help="time for the whole sweep; settings that no longer fit are skipped",
    )
    parser.add_argument(
        "--compile_budget_s",
        type=float,
        default=180.0,
        help="torch.compile runs only with this much of the budget left",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    run = Run(parse_args(argv), " ".join(["python bench/gpu_throughput.py", *argv]))
    report = run.execute()
    print(f"\nwrote {run.path}\n\n{markdown(report)}")
    return report


if __name__ == "__main__":
    # diffusers warns at every cast of the frozen VAE to bf16/fp16 (once per setting); the trainer casts it alike.
    diffusers.utils.logging.set_verbosity_error()
    main()
