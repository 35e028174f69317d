"""Sample images during training, with fixed seeds so the same prompt is comparable across steps and runs.

`sample_prompts` is a .txt (one prompt a line) or an ED2 sample .json (prompts, negative prompts, seeds,
sizes, guidance scales, scheduler, steps). Each round writes one grid per prompt, one column per guidance
scale, to samples/gs<step>-p<index>.png, and records it in samples/index.json (step -> prompt index ->
file, prompt, seed, size), which compare.py reads.

Sampling uses private generators and restores every random state it could touch, so it never changes the
training RNG: a run with samples trains exactly like one without.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.model import SDModel
from trainer.sample_index import record_in_index
from utils.config import ConfigError, read_json_file

SAMPLE_GUIDANCE_SCALES = (7.0, 4.0, 1.0)
SAMPLE_INFERENCE_STEPS = 30  # ED2's default
RANDOM_CAPTIONS = 4  # prompts taken from the data's captions when the file gives none (as ED2)

# ED2's scheduler names -> (diffusers class, options); built from the model's own scheduler config.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),  # needs scipy
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm++_2s_k": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),  # needs torchsde
    "dpm++_sde_k": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0, "use_karras_sigmas": True}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2m_sde_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                       "use_karras_sigmas": True}),
}


# ---------------------------------------------------------------------------------------------------------
# What to sample
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    seed: Optional[int] = None  # None: the run's seed; -1: a new random seed every round (as ED2)
    size: Optional[tuple[int, int]] = None  # (width, height); None: from aspect_ratio, else square
    aspect_ratio: Optional[float] = None  # width / height, at about resolution² pixels


@dataclass(frozen=True)
class SampleSettings:
    requests: tuple[SampleRequest, ...]
    cfgs: tuple[float, ...] = SAMPLE_GUIDANCE_SCALES
    scheduler: str = "ddim"
    num_inference_steps: int = SAMPLE_INFERENCE_STEPS
    batch_size: int = 1
    every_n_steps: Optional[int] = None  # the file's generate_samples_every_n_steps, which beats sample_steps
    resolution: Optional[int] = None  # the file's default image side; None: the training resolution
    show_progress_bars: bool = False


class _SampleEntry(BaseModel):
    """One item of the JSON's `samples` list."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = ""
    negative_prompt: str = ""
    seed: Optional[int] = Field(None, ge=-1)
    size: Optional[tuple[int, int]] = None
    aspect_ratio: Optional[float] = Field(None, gt=0)
    random_caption: bool = False

    @field_validator("size")
    @classmethod
    def _multiples_of_8(cls, size):
        if size is not None and any(side < 8 or side % 8 for side in size):
            raise ValueError("must be [width, height], each a positive multiple of 8 (e.g. [512, 512])")
        return size

    @model_validator(mode="after")
    def _prompt_and_size_consistent(self):
        if self.size is not None and self.aspect_ratio is not None:
            raise ValueError("give size or aspect_ratio, not both")
        if not self.prompt and not self.random_caption:
            raise ValueError("give a prompt, or random_caption: true to use a training caption")
        return self


class _SampleFile(BaseModel):
    """ED2's sample JSON."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=-1)
    cfgs: list[float] = Field(list(SAMPLE_GUIDANCE_SCALES), min_length=1)
    scheduler: str = "ddim"
    num_inference_steps: int = Field(SAMPLE_INFERENCE_STEPS, ge=1, le=1000)
    show_progress_bars: bool = False
    generate_pretrain_samples: bool = False
    generate_samples_every_n_steps: Optional[int] = Field(None, ge=1)
    resolution: Optional[int] = Field(None, ge=8)
    samples: Optional[list[_SampleEntry]] = None

    @field_validator("cfgs")
    @classmethod
    def _non_negative(cls, cfgs):
        if any(scale < 0 for scale in cfgs):
            raise ValueError("guidance scales must be >= 0 (1 or less: no classifier-free guidance)")
        return cfgs

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, name):
        if name not in SCHEDULERS:
            close = difflib.get_close_matches(name, list(SCHEDULERS), n=3, cutoff=0.5)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(SCHEDULERS)}{hint}")
        return name

    @field_validator("resolution")
    @classmethod
    def _resolution_multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value

    @field_validator("generate_pretrain_samples")
    @classmethod
    def _no_pretrain_samples(cls, value):
        if value:  # the step-0 round is not wired into the loop; say so rather than ignore it
            raise ValueError("true is not supported: samples start at the first sample step. Set it to false")
        return value


def read_prompts(path: str, items) -> SampleSettings:
    """The sample settings of a .txt or ED2 .json file. Captions of `items`, the run's images, stand in for
    missing prompts: give training and validation images together, so that runs with and without a validation
    split sample the same captions."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return _settings_from_json(Path(path), items)
    if suffix != ".txt":
        raise ConfigError(f"key 'sample_prompts' = '{path}': give a .txt (one prompt a line) or an ED2 sample .json.")
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line] or _default_captions(items)
    return SampleSettings(requests=tuple(SampleRequest(prompt) for prompt in prompts))


def spread_captions(items, count: int) -> list[str]:
    """`count` captions spread evenly over the sorted distinct ones (repeating when there are fewer).

    No RNG: two runs on the same data sample the same captions, so their samples can be compared."""
    captions = sorted({item.caption for item in items if item.caption})
    total = len(captions)
    if not total:
        return []
    return [captions[i * total // count] if count <= total else captions[i % total] for i in range(count)]


def _default_captions(items) -> list[str]:
    """What an empty file samples: up to RANDOM_CAPTIONS different captions of the data (as ED2)."""
    distinct = len({item.caption for item in items if item.caption})
    return spread_captions(items, min(RANDOM_CAPTIONS, distinct))


def _settings_from_json(path: Path, items) -> SampleSettings:
    data = read_json_file(path, "sample_prompts")
    try:
        parsed = _SampleFile(**data)
    except ValidationError as error:
        raise ConfigError(_describe_errors(error, path)) from None
    _check_scheduler_available(parsed.scheduler, path)
    entries = parsed.samples or []
    captions = iter(spread_captions(items, sum(entry.random_caption for entry in entries)))
    requests = [_request_from_entry(entry, parsed, captions) for entry in entries]
    if not requests:  # no `samples`: a few training captions, as ED2
        requests = [SampleRequest(caption, seed=parsed.seed) for caption in _default_captions(items)]
    return SampleSettings(requests=tuple(requests), cfgs=tuple(parsed.cfgs), scheduler=parsed.scheduler,
                          num_inference_steps=parsed.num_inference_steps, batch_size=parsed.batch_size,
                          every_n_steps=parsed.generate_samples_every_n_steps, resolution=parsed.resolution,
                          show_progress_bars=parsed.show_progress_bars)


def _request_from_entry(entry: _SampleEntry, parsed: _SampleFile, captions) -> SampleRequest:
    prompt = next(captions, entry.prompt) if entry.random_caption else entry.prompt
    return SampleRequest(prompt=prompt, negative_prompt=entry.negative_prompt,
                         seed=entry.seed if entry.seed is not None else parsed.seed,
                         size=entry.size, aspect_ratio=entry.aspect_ratio)


def size_for_aspect_ratio(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """(width, height) in multiples of 64 with about resolution² pixels."""
    width = max(64, round(resolution * math.sqrt(aspect_ratio) / 64) * 64)
    height = max(64, round(resolution / math.sqrt(aspect_ratio) / 64) * 64)
    return width, height


def _describe_errors(error: ValidationError, path: Path) -> str:
    problems = []
    for issue in error.errors():
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in issue["loc"]).lstrip(".")
        if issue["type"] == "extra_forbidden":
            known = _SampleEntry.model_fields if "samples" in issue["loc"][:1] else _SampleFile.model_fields
            close = difflib.get_close_matches(str(issue["loc"][-1]), list(known), n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            problems.append(f"unknown key '{key}'{hint}")
        else:
            value = json.dumps(issue.get("input"), default=str)
            problems.append(f"key '{key}' = {value}: {issue['msg'].removeprefix('Value error, ')}")
    return f"sample_prompts file '{path}': " + "; ".join(problems) + "."


def _check_scheduler_available(name: str, path: Path) -> None:
    """lms and dpm++_sde need optional packages: say so before training, not at the first sample step."""
    try:
        build_scheduler(name, {})
    except ImportError as error:
        raise ConfigError(f"sample_prompts file '{path}': key 'scheduler' = '{name}': {str(error).strip()}") from None


def build_scheduler(name: str, model_scheduler_config):
    import diffusers

    class_name, options = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(model_scheduler_config, **options)


# ---------------------------------------------------------------------------------------------------------
# When to sample
# ---------------------------------------------------------------------------------------------------------

def sample_interval(steps_per_epoch: int, config, settings: SampleSettings) -> int:
    """Optimizer steps between rounds: sample_every_n_epochs, else the file's generate_samples_every_n_steps,
    else sample_steps."""
    if config.sample_every_n_epochs:
        return max(1, round(config.sample_every_n_epochs * steps_per_epoch))
    return settings.every_n_steps or config.sample_steps


def samples_due(step: int, plan, config, settings: SampleSettings) -> bool:
    """True after the optimizer steps that get a sample round. The last step is left out: the end of the run
    samples the final weights anyway (Trainer.finish)."""
    return step % sample_interval(plan.steps_per_epoch, config, settings) == 0 and step < plan.total_steps


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def make_samples(model: SDModel, settings: SampleSettings, out_dir: Path, step: int, resolution: int, device,
                 seed: int) -> list[tuple[Path, np.ndarray]]:
    """One grid per request (one column per guidance scale), saved as samples/gs<step>-p<i>.png and listed
    in samples/index.json. Returns (path, grid as HWC uint8) per request, in request order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    requests = [_concrete(request, seed, settings.resolution or resolution) for request in settings.requests]
    pipeline = model.pipeline(scheduler=build_scheduler(settings.scheduler, model.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=not settings.show_progress_bars)
    grids: dict[int, np.ndarray] = {}
    with training_rng_untouched(device), inference_mode(model), _autocast_for(model, device):
        for batch in batches_of_equal_size(requests, settings.batch_size):
            columns = [_generate(pipeline, [requests[i] for i in batch], scale, settings.num_inference_steps)
                       for scale in settings.cfgs]
            for position, index in enumerate(batch):
                grids[index] = np.concatenate([column[position] for column in columns], axis=1)
    results = []
    for index, request in enumerate(requests):
        path = out_dir / f"gs{step:05d}-p{index}.png"
        Image.fromarray(grids[index]).save(path)
        results.append((path, grids[index]))
    record_in_index(out_dir, step, [index_entry(path, request, settings) for (path, _), request in
                                    zip(results, requests)])
    return results


def index_entry(path: Path, request: SampleRequest, settings: SampleSettings) -> dict:
    return {"file": path.name, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
            "seed": request.seed, "size": list(request.size), "cfgs": list(settings.cfgs),
            "scheduler": settings.scheduler, "num_inference_steps": settings.num_inference_steps}


def _concrete(request: SampleRequest, run_seed: int, resolution: int) -> SampleRequest:
    """Fill in the run's defaults; seed -1 draws from the OS, so the training RNG is not consumed."""
    seed = run_seed if request.seed is None else request.seed
    if seed == -1:
        seed = random.SystemRandom().randrange(2**31)
    size = request.size
    if size is None:
        size = size_for_aspect_ratio(request.aspect_ratio, resolution) if request.aspect_ratio else (resolution,) * 2
    return replace(request, seed=seed, size=tuple(size))


def batches_of_equal_size(requests: list[SampleRequest], batch_size: int) -> list[list[int]]:
    """Indices of the requests, grouped by image size (one pipeline call per group) in chunks of batch_size."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, request in enumerate(requests):
        by_size.setdefault(request.size, []).append(index)
    return [group[start:start + batch_size] for group in by_size.values()
            for start in range(0, len(group), batch_size)]


def _generate(pipeline, requests: list[SampleRequest], guidance_scale: float, steps: int) -> np.ndarray:
    """uint8 HWC images, one per request. Each request has its own CPU generator, seeded afresh for every
    guidance scale: the same starting noise in every column, on every device and in every batch."""
    width, height = requests[0].size
    generators = [torch.Generator(device="cpu").manual_seed(request.seed) for request in requests]
    images = pipeline([r.prompt for r in requests], negative_prompt=[r.negative_prompt for r in requests],
                      width=width, height=height, guidance_scale=guidance_scale, num_inference_steps=steps,
                      generator=generators, output_type="np").images
    return (np.nan_to_num(images) * 255).round().clip(0, 255).astype(np.uint8)


@contextlib.contextmanager
def training_rng_untouched(device):
    """Restore torch (CPU and CUDA), numpy and Python random states afterwards: sampling must not shift the
    noise, timesteps, dropout or data order of the training steps that follow."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def inference_mode(model: SDModel):
    """eval() for sampling (no dropout), then back to each part's training mode."""
    modes = (model.unet.training, model.text_encoder.training)
    model.unet.eval()
    model.text_encoder.eval()
    try:
        yield
    finally:
        model.unet.train(modes[0])
        model.text_encoder.train(modes[1])


def _autocast_for(model: SDModel, device):
    """Under mixed precision the frozen VAE (and text encoder) are fp16/bf16 while the UNet keeps fp32
    weights; autocast lets the pipeline pass tensors between them."""
    dtype = model.vae.dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))

