"""Sample images during training, with fixed seeds so the same prompt is comparable across steps and runs.

`sample_prompts` is a .txt (one prompt a line) or an ED2 sample .json (prompts, negative prompts, seeds,
sizes, guidance scales per file or per sample, scheduler, steps, random training captions). The file is
read again before every round, as ED2 does, so prompts can be edited while the run goes on. Each round
writes one grid per prompt, one column per guidance scale, to samples/gs<step>-p<index>.png, and records
it in samples/index.json (step -> prompt index -> file, prompt, seed, size), which compare.py reads.

Prompt weighting ("a red++ cat", "(red)1.3", and A1111's "(red:1.3)") is read by compel, as in ED2; for SDXL
through both text encoders (their penultimate layers side by side, and the second one's pooled embedding).

SDXL models sample through StableDiffusionXLPipeline (trainer/model.py SDModel.pipeline), conditioned as
uncropped images of the sample's size. Every pipeline stops at the latents, which trainer/diffusion.py
decode_latents decodes: SDXL's VAE decodes in fp32 under fp16 mixed precision (vae_dtype).

Sampling uses private generators and restores every random state it could touch, so it never changes the
training RNG: a run with samples trains exactly like one without.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.diffusion import decode_latents
from trainer.model import SDModel, evaluating
from trainer.sample_index import record_in_index
from utils.config import ConfigError, TrainConfig, read_sample_prompts
from utils.ed2_compat import (
    SAMPLE_GUIDANCE_SCALES,
    SAMPLE_INFERENCE_STEPS,
    SAMPLE_SCHEDULERS,
    SampleEntry,
    SampleFile,
    optimizer_steps,
)

RANDOM_CAPTIONS = 4  # prompts taken from the data's captions when the file gives none (as ED2)
# A1111's weighting, "(red:1.3)", which compel would read as text: rewritten to compel's "(red)1.3".
A1111_WEIGHT = re.compile(r"\(([^():]+):\s*(\d*\.?\d+)\s*\)")
# What may be weighting syntax, for the note when compel is not installed.
MAYBE_WEIGHTED = re.compile(r"[()]|[+-](?=[\s,]|$)")


# ---------------------------------------------------------------------------------------------------------
# What to sample
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None  # None: the run's seed; -1: a new random seed every round (as ED2)
    size: tuple[int, int] | None = None  # (width, height); None: from aspect_ratio, else square
    aspect_ratio: float | None = None  # width / height, at about resolution² pixels
    cfgs: tuple[float, ...] | None = None  # this sample's guidance scales; None: the file's
    random_caption: bool = False  # the prompt is a caption of the data, drawn again every round


@dataclass(frozen=True)
class SampleSettings:
    requests: tuple[SampleRequest, ...]
    cfgs: tuple[float, ...] = SAMPLE_GUIDANCE_SCALES
    scheduler: str = "ddim"
    num_inference_steps: int = SAMPLE_INFERENCE_STEPS
    batch_size: int = 1
    every_n_steps: int | None = None  # the file's generate_samples_every_n_steps, which beats sample_steps
    resolution: int | None = None  # the file's default image side; None: the training resolution
    show_progress_bars: bool = False
    pretrain: bool = False  # the file's generate_pretrain_samples: a round before the first step
    captions: tuple[str, ...] = ()  # the data's distinct captions, sorted: what random_caption draws from


def read_prompts(path: str, items) -> SampleSettings:
    """The sample settings of a .txt or ED2 .json file. Captions of `items`, the run's images, stand in for
    missing prompts: give training and validation images together, so that runs with and without a validation
    split sample the same captions."""
    captions = tuple(sorted({item.caption for item in items if item.caption}))
    read = read_sample_prompts(path)
    if isinstance(read, SampleFile):
        return _settings_from_json(read, captions)
    prompts = read or spread_captions(captions, min(RANDOM_CAPTIONS, len(captions)))
    return SampleSettings(requests=tuple(SampleRequest(prompt) for prompt in prompts), captions=captions)


def spread_captions(captions: tuple[str, ...], count: int) -> list[str]:
    """`count` of the sorted distinct `captions`, spread evenly (repeating when there are fewer).

    No RNG: two runs on the same data sample the same captions, so their samples can be compared."""
    total = len(captions)
    if not total:
        return []
    return [captions[i * total // count] if count <= total else captions[i % total] for i in range(count)]


def _settings_from_json(parsed: SampleFile, captions: tuple[str, ...]) -> SampleSettings:
    requests = [_request_from_entry(entry, parsed) for entry in parsed.samples or []]
    if not requests:  # no `samples`: a few training captions, as ED2
        chosen = spread_captions(captions, min(RANDOM_CAPTIONS, len(captions)))
        requests = [SampleRequest(caption, seed=parsed.seed) for caption in chosen]
    return SampleSettings(
        requests=tuple(requests),
        cfgs=tuple(parsed.cfgs),
        scheduler=parsed.scheduler,
        num_inference_steps=parsed.num_inference_steps,
        batch_size=parsed.batch_size,
        every_n_steps=parsed.generate_samples_every_n_steps,
        resolution=parsed.resolution,
        show_progress_bars=parsed.show_progress_bars,
        pretrain=parsed.generate_pretrain_samples,
        captions=captions,
    )


def _request_from_entry(entry: SampleEntry, parsed: SampleFile) -> SampleRequest:
    return SampleRequest(
        prompt=entry.prompt,
        negative_prompt=entry.negative_prompt,
        seed=entry.seed if entry.seed is not None else parsed.seed,
        size=entry.size,
        aspect_ratio=entry.aspect_ratio,
        cfgs=tuple(entry.cfgs) if entry.cfgs else None,
        random_caption=entry.random_caption,
    )


class SamplePrompts:
    """A run's sample prompt file, read again before every round: ED2 lets prompts and seeds change while the run
    goes on. A file that has become invalid is reported, and the previous prompts are kept. The interval
    (generate_samples_every_n_steps) stays as read at the start: every process of a multi-GPU run must reach the
    same sample steps, and only the main process reads the file again."""

    def __init__(self, path: str, items, config: TrainConfig, say: Callable[[str], None] = print) -> None:
        self.path, self.items, self.say = path, items, say
        # An ED2 config counts generate_samples_every_n_steps in batches (see ed2_compat.convert_batch_counts).
        self.batches_per_step = config.grad_accum if config.from_ed2 else 1
        self.settings = self.read = self._read()
        for note in _notes(self.settings, self.batches_per_step):
            say(f"sample_prompts: {note}")

    def reread(self) -> SampleSettings:
        """The file as it is now (with the interval of the start), or the last good read when it is not valid."""
        try:
            read = self._read()
        except ConfigError as error:
            self.say(
                f"warning: {error} The previous sample prompts are kept; the file is read again at the next round."
            )
            return self.settings
        if read.every_n_steps != self.read.every_n_steps:
            self.say(
                f"sample_prompts: generate_samples_every_n_steps changed in the file; this run keeps the "
                f"interval it started with, {self.settings.every_n_steps or 'sample_steps'} (ED2 would switch)"
            )
        self.read = read
        self.settings = replace(read, every_n_steps=self.settings.every_n_steps)
        return self.settings

    def _read(self) -> SampleSettings:
        settings = read_prompts(self.path, self.items)
        if settings.every_n_steps and self.batches_per_step > 1:
            settings = replace(settings, every_n_steps=optimizer_steps(settings.every_n_steps, self.batches_per_step))
        return settings


def sample_prompts_of(config: TrainConfig, items, say: Callable[[str], None]) -> SamplePrompts | None:
    """The run's sample prompts (None when sample_prompts is unset); `items`: the images captions may come from."""
    return SamplePrompts(config.sample_prompts, items, config, say) if config.sample_prompts else None


def _notes(settings: SampleSettings, batches_per_step: int) -> list[str]:
    """What this file gets that ED2 would do otherwise (docs/ed2.md lists each)."""
    notes = []
    if settings.every_n_steps and batches_per_step > 1:
        notes.append(
            f"generate_samples_every_n_steps is counted in batches in ED2: every {settings.every_n_steps} "
            f"optimizer steps of {batches_per_step} batches here"
        )
    if any(request.cfgs for request in settings.requests):
        notes.append("a sample's own cfgs are its guidance scales (ED2's code used the file's cfgs for every sample)")
    if any(request.random_caption for request in settings.requests):
        notes.append(
            "random_caption draws a caption of the data each round, seeded by the run's seed and step (ED2 "
            "took one of the current batch's captions)"
        )
    prompts = [text for request in settings.requests for text in (request.prompt, request.negative_prompt)]
    if any(A1111_WEIGHT.search(prompt) for prompt in prompts):
        notes.append("A1111 weighting (word:1.2) is read as compel's (word)1.2 (ED2 passed it to compel as text)")
    if importlib.util.find_spec("compel") is None and any(MAYBE_WEIGHTED.search(prompt) for prompt in prompts):
        notes.append(
            "the compel package is not installed, so prompt weighting is read as plain text: pip install compel"
        )
    return notes


def size_for_aspect_ratio(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """(width, height) in multiples of 64 with about resolution² pixels."""
    width = max(64, round(resolution * math.sqrt(aspect_ratio) / 64) * 64)
    height = max(64, round(resolution / math.sqrt(aspect_ratio) / 64) * 64)
    return width, height


def build_scheduler(name: str, model_scheduler_config):
    import diffusers

    class_name, options = SAMPLE_SCHEDULERS[name]
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
def make_samples(
    model: SDModel, settings: SampleSettings, out_dir: Path, step: int, resolution: int, device, seed: int
) -> list[tuple[Path, np.ndarray]]:
    """One grid per request (one column per guidance scale), saved as samples/gs<step>-p<i>.png and listed
    in samples/index.json. Returns (path, grid as HWC uint8) per request, in request order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    captions = iter(_round_captions(settings, seed, step))
    requests = [
        _concrete(request, settings, seed, captions, settings.resolution or resolution) for request in settings.requests
    ]
    pipeline = model.pipeline(scheduler=build_scheduler(settings.scheduler, model.noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=not settings.show_progress_bars)
    grids: dict[int, np.ndarray] = {}
    with training_rng_untouched(device), evaluating(model), _autocast_for(model, device):
        for batch in batches_of_alike(requests, settings.batch_size):
            alike = [requests[i] for i in batch]
            prompts = _prompt_arguments(pipeline, alike)
            columns = [
                _generate(model, pipeline, alike, prompts, scale, settings.num_inference_steps)
                for scale in alike[0].cfgs
            ]
            for position, index in enumerate(batch):
                grids[index] = np.concatenate([column[position] for column in columns], axis=1)
    results = []
    for index, _request in enumerate(requests):
        path = out_dir / f"gs{step:05d}-p{index}.png"
        Image.fromarray(grids[index]).save(path)
        results.append((path, grids[index]))
    record_in_index(
        out_dir,
        step,
        [
            index_entry(path, asked, request, settings)
            for (path, _), asked, request in zip(results, settings.requests, requests, strict=True)
        ],
    )
    return results


def sample_round(
    model: SDModel,
    settings: SampleSettings,
    run_dir: Path,
    step: int,
    resolution: int,
    device,
    seed: int,
    weights: dict[str, Callable[[], contextlib.AbstractContextManager]],
) -> list[tuple[str, np.ndarray]]:
    """A sample round: make_samples once per set of weights, each applied by its context manager ("trained" under
    samples/, "ema" under samples/ema/). Returns (TensorBoard tag, grid) pairs; raises OSError when the disk
    refuses."""
    grids = []
    for name, applied in weights.items():
        folder, tag = ("samples/ema", "samples_ema") if name == "ema" else ("samples", "samples")
        with applied():
            made = make_samples(model, settings, run_dir / folder, step, resolution, device, seed)
        grids += [(f"{tag}/prompt_{index}", grid) for index, (_, grid) in enumerate(made)]
    return grids


@dataclass(frozen=True)
class RunSamples:
    """A run's sample rounds: its prompts (read again before each round), where the grids go, and which weights
    draw them (name -> a context manager that puts them in the model)."""

    prompts: SamplePrompts
    run_dir: Path
    resolution: int
    device: torch.device
    seed: int
    weights: dict[str, Callable[[], contextlib.AbstractContextManager]]

    def due(self, step: int, plan, config: TrainConfig) -> bool:
        return samples_due(step, plan, config, self.prompts.settings)

    def round(self, model: SDModel, step: int) -> list[tuple[str, np.ndarray]]:
        """`sample_round` at `step`; raises OSError when the disk refuses."""
        settings = self.prompts.reread()
        return sample_round(model, settings, self.run_dir, step, self.resolution, self.device, self.seed, self.weights)


def index_entry(path: Path, asked: SampleRequest, request: SampleRequest, settings: SampleSettings) -> dict:
    """The index's record of one sample: what was made (`request`), and whether its seed or caption was drawn
    for this round (`asked` had seed -1, or random_caption)."""
    entry = {
        "file": path.name,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "size": list(request.size),
        "cfgs": list(request.cfgs),
        "scheduler": settings.scheduler,
        "num_inference_steps": settings.num_inference_steps,
    }
    if asked.seed == -1:
        entry["random_seed"] = True
    if asked.random_caption:
        entry["random_caption"] = True
    return entry


def _round_captions(settings: SampleSettings, run_seed: int, step: int) -> list[str]:
    """The captions this round's random_caption samples take: different ones while the data has enough, drawn by a
    generator seeded with the run's seed and the step, so a resumed run draws what the interrupted one would."""
    count = sum(request.random_caption for request in settings.requests)
    captions = list(settings.captions)
    random.Random(f"everycycle/sample_captions/{run_seed}/{step}").shuffle(captions)
    return [captions[index % len(captions)] for index in range(count)] if captions else []


def _concrete(
    request: SampleRequest, settings: SampleSettings, run_seed: int, captions: Iterator[str], resolution: int
) -> SampleRequest:
    """Fill in the run's defaults and this round's draws (a random caption: the next of `captions`). Seed -1 draws
    from the OS, so the training RNG is not consumed."""
    seed = run_seed if request.seed is None else request.seed
    if seed == -1:
        seed = random.SystemRandom().randrange(2**31)
    prompt = next(captions, request.prompt) if request.random_caption else request.prompt
    size = request.size
    if size is None:
        size = size_for_aspect_ratio(request.aspect_ratio, resolution) if request.aspect_ratio else (resolution,) * 2
    return replace(request, prompt=prompt, seed=seed, size=tuple(size), cfgs=request.cfgs or settings.cfgs)


def batches_of_alike(requests: list[SampleRequest], batch_size: int) -> list[list[int]]:
    """Indices of the requests, grouped by image size and guidance scales (one pipeline call per group and scale)
    in chunks of batch_size."""
    alike: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        alike.setdefault((request.size, request.cfgs), []).append(index)
    return [group[start : start + batch_size] for group in alike.values() for start in range(0, len(group), batch_size)]


def _generate(
    model: SDModel, pipeline, requests: list[SampleRequest], prompts: dict, guidance_scale: float, steps: int
) -> np.ndarray:
    """uint8 HWC images, one per request (`prompts`: their _prompt_arguments). Each request has its own CPU
    generator, seeded afresh for every guidance scale: the same starting noise in every column, on every device
    and in every batch."""
    width, height = requests[0].size
    generators = [torch.Generator(device="cpu").manual_seed(request.seed) for request in requests]
    latents = pipeline(
        **prompts,
        width=width,
        height=height,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        generator=generators,
        output_type="latent",
    ).images
    images = pipeline.image_processor.postprocess(decode_latents(model, latents), output_type="np")
    return (np.nan_to_num(images) * 255).round().clip(0, 255).astype(np.uint8)


def _prompt_arguments(pipeline, requests: list[SampleRequest]) -> dict:
    """The pipeline's prompts: as text, or, when one of them uses weighting syntax, as compel's embeddings (as
    ED2 makes them). Plain prompts keep the pipeline's own encoding, so their samples stay as they were."""
    prompts = [request.prompt for request in requests]
    negative = [request.negative_prompt for request in requests]
    if not any(map(_weighted, prompts + negative)):
        return {"prompt": prompts, "negative_prompt": negative}
    from compel import Compel  # only here: _weighted found compel installed

    texts = [[_compel_syntax(text) for text in group] for group in (prompts, negative)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return _sdxl_compel_arguments(pipeline, *texts)
    compel = Compel(tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder)
    positive, negative_embeddings = compel.pad_conditioning_tensors_to_same_length([compel(group) for group in texts])
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeddings}


def _sdxl_compel_arguments(pipeline, prompts: list[str], negative: list[str]) -> dict:
    """compel's weighted embeddings for SDXL, as StableDiffusionXLPipeline.encode_prompt makes plain ones: each
    encoder's penultimate hidden states (not normalized) side by side, and the second encoder's pooled embedding
    (compel's own CompelForSDXL builds the same pair of Compel objects)."""
    from compel import Compel, ReturnedEmbeddingsType

    penultimate = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    first = Compel(
        tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, returned_embeddings_type=penultimate
    )
    second = Compel(
        tokenizer=pipeline.tokenizer_2,
        text_encoder=pipeline.text_encoder_2,
        returned_embeddings_type=penultimate,
        requires_pooled=True,
    )
    hidden_1 = first.pad_conditioning_tensors_to_same_length([first(group) for group in (prompts, negative)])
    (positive_2, pooled), (negative_2, negative_pooled) = (second(group) for group in (prompts, negative))
    hidden_2 = second.pad_conditioning_tensors_to_same_length([positive_2, negative_2])
    positive, negative_embeddings = (torch.cat(pair, dim=-1) for pair in zip(hidden_1, hidden_2, strict=True))
    return {
        "prompt_embeds": positive,
        "negative_prompt_embeds": negative_embeddings,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


def _compel_syntax(prompt: str) -> str:
    return A1111_WEIGHT.sub(r"(\1)\2", prompt)


def _weighted(prompt: str) -> bool:
    """True when compel reads the prompt as anything but its plain text at weight 1 (False without compel)."""
    if not prompt or importlib.util.find_spec("compel") is None:
        return False
    from compel import Compel
    from compel.prompt_parser import FlattenedPrompt, Fragment

    parts = Compel.parse_prompt_string(_compel_syntax(prompt)).prompts
    plain = len(parts) == 1 and isinstance(parts[0], FlattenedPrompt) and len(parts[0].children) == 1
    fragment = parts[0].children[0] if plain else None
    return not (isinstance(fragment, Fragment) and fragment.weight == 1.0 and fragment.text == prompt)


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


def _autocast_for(model: SDModel, device):
    """Under mixed precision the frozen parts (VAE, text encoders) are fp16/bf16 while the UNet keeps fp32
    weights; autocast lets the pipeline pass tensors between them. SDXL's VAE may be fp32 under fp16
    (trainer/diffusion.py vae_dtype): its text encoders tell the precision then."""
    frozen = [model.vae, model.text_encoder_2, model.text_encoder]
    low = [part.dtype for part in frozen if part is not None and part.dtype in (torch.float16, torch.bfloat16)]
    return torch.autocast(device.type, dtype=low[0] if low else torch.float32, enabled=bool(low))
