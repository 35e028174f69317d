"""Latent and text-embedding caches: encode once, before training, and reuse every epoch.

cache_latents: each training image is encoded by the VAE once per bucket and per flip that can occur (the
image's flip_p, else the run's: 0 -> unflipped only, 1 -> flipped only, in between -> both). What is kept is the
latent *distribution* (`latent_dist.parameters`: mean and logvar, stacked on the channels), not one sample, so
every step still draws a fresh latent from the global RNG exactly as an uncached encode does
(trainer/diffusion.py sample_cached_latents). The cache lives in memory (CPU) by default; with
latent_cache_dir, one safetensors file per (image content, bucket, flip, VAE), written atomically, read when a
batch needs it and reused by later runs: a changed image or another VAE gives another file name.

cache_text_embeddings: with frozen text encoders and captions that never change (no shuffle_tags), the text
conditioning of every caption an epoch can train on (each image's caption, and "" where caption dropout can
occur) is computed once, with clip_skip as in training (trainer/diffusion.py encode_text: the CLIP hidden states;
for SDXL both encoders' side by side and the pooled embedding), and kept on the CPU. SDXL's size and crop ids
need no cache: the dataset computes them from each image's size and bucket.

After the pass the parts the caches stand in for (the VAE, the text encoders) leave the accelerator device;
`TrainingCaches.parts_on_device` brings them back while something still needs them (validation, samples).

Several processes: each one encodes its share (every num_processes-th image or caption) and the shares are
combined with accelerate's gather_object, which every process waits on; disk files are written before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from data.buckets import Bucket
from data.images import ImageItem, ImageLoadError, load_image
from trainer.diffusion import encode_text, vae_distribution
from trainer.model import SDModel
from utils.checkpoint import atomic_path, file_sha256
from utils.config import ConfigError, TrainConfig

# Bump when the pixels fed to the VAE (data/images.py load_image) or the stored layout change: older files
# are then not reused.
CACHE_FORMAT = 1
LatentKey = tuple[str, Bucket, bool]  # (image path, bucket (width, height), flipped)


# --- what to cache ----------------------------------------------------------------------------------------


def possible_flips(item: ImageItem, run_flip_p: float) -> tuple[bool, ...]:
    """The flips an epoch can train item with: its own flip_p, else the run's."""
    probability = run_flip_p if item.flip_p is None else item.flip_p
    if probability <= 0.0:
        return (False,)
    return (True,) if probability >= 1.0 else (False, True)


@dataclass(frozen=True)
class LatentJob:
    """One latent to cache: an image at its bucket size, flipped or not."""

    item: ImageItem
    size: Bucket
    flip: bool

    @property
    def key(self) -> LatentKey:
        return latent_key(self.item, self.size, self.flip)


def latent_key(item: ImageItem, size: Bucket, flip: bool) -> LatentKey:
    return str(item.path), (int(size[0]), int(size[1])), bool(flip)


def latent_jobs(items: Sequence[ImageItem], item_buckets: Sequence[Bucket], run_flip_p: float) -> list[LatentJob]:
    """Every (image, bucket, flip) training can ask for, once each; images with multiply 0 never train."""
    jobs = {}
    for item, size in zip(items, item_buckets, strict=True):
        if item.multiply > 0:
            for flip in possible_flips(item, run_flip_p):
                job = LatentJob(item, (int(size[0]), int(size[1])), flip)
                jobs.setdefault(job.key, job)
    return list(jobs.values())


def jobs_by_image(jobs: Sequence[LatentJob]) -> list[list[LatentJob]]:
    """The jobs grouped per image file, in a fixed order (the shares of the processes are cut from it)."""
    grouped: dict[str, list[LatentJob]] = {}
    for job in jobs:
        grouped.setdefault(str(job.item.path), []).append(job)
    return [grouped[path] for path in sorted(grouped)]


def possible_captions(items: Sequence[ImageItem], config: TrainConfig) -> list[str]:
    """Every caption an epoch can train on when no caption is shuffled: each image's caption in file order
    (ImageItem.caption, what the loader builds without a shuffle), and "" where dropout can occur. An image
    whose own settings shuffle two or more tags is refused with a ConfigError."""
    captions, shuffled = set(), []
    for item in items:
        if item.multiply <= 0:
            continue
        shuffle = config.shuffle_tags if item.shuffle_tags is None else item.shuffle_tags
        keep = config.keep_tags if item.keep_tags is None else item.keep_tags
        if shuffle and len(item.tags) - keep >= 2:
            shuffled.append(str(item.path))
        dropout = config.cond_dropout if item.cond_dropout is None else item.cond_dropout
        captions.add(item.caption)
        if dropout > 0:
            captions.add("")
    if shuffled:
        raise ConfigError(
            f"key 'cache_text_embeddings': {len(shuffled)} image(s) shuffle their tags through their own settings "
            f"(shuffle_tags in a sidecar, folder or manifest file), so their captions change every epoch: "
            f"{', '.join(shuffled[:3])}{', ...' if len(shuffled) > 3 else ''}. Turn cache_text_embeddings off, or "
            f"shuffle_tags off for those images."
        )
    return sorted(captions)


# --- keys of the disk cache --------------------------------------------------------------------------------


def vae_identity(vae, mixed_precision: str) -> str:
    """A short hash of the VAE: its config, the precision, and each weight's name, shape, dtype and the bytes of
    up to 1024 evenly spaced values (exact, device-independent and cheap; a fine-tune changes nearly every
    weight, so it changes the sampled ones too)."""
    digest = hashlib.sha256()
    config = {key: value for key, value in dict(vae.config).items() if not key.startswith("_")}
    digest.update(
        json.dumps(
            {"config": config, "precision": mixed_precision, "format": CACHE_FORMAT}, sort_keys=True, default=str
        ).encode()
    )
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        values = flat[:: max(1, flat.numel() // 1024)].cpu().contiguous()
        digest.update(f"{name}{list(tensor.shape)}{tensor.dtype}".encode())
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_file(cache_dir: Path, vae_id: str, image_sha: str, size: Bucket, flip: bool) -> Path:
    """<cache_dir>/vae-<id>/<sha[:2]>/<image sha256>-<w>x<h>-<flip|noflip>.safetensors"""
    name = f"{image_sha}-{size[0]}x{size[1]}-{'flip' if flip else 'noflip'}.safetensors"
    return Path(cache_dir) / f"vae-{vae_id}" / image_sha[:2] / name


def write_latent_file(path: Path, parameters: torch.Tensor, job: LatentJob) -> None:
    metadata = {
        "source": str(job.item.path),
        "size": f"{job.size[0]}x{job.size[1]}",
        "flip": str(job.flip),
        "format": str(CACHE_FORMAT),
    }
    with atomic_path(path) as temporary:
        save_file({"parameters": parameters.contiguous()}, str(temporary), metadata=metadata)


# --- the lookups the dataset uses --------------------------------------------------------------------------


class LatentLookup:
    """(image, bucket, flip) -> its cached latent distribution parameters [2C, h, w] on the CPU: a tensor kept
    in memory or a file read on demand. An image that could not be loaded in the pass raises ImageLoadError, as
    a failed decode does, so the step leaves it out and reports it."""

    def __init__(
        self, entries: dict[LatentKey, torch.Tensor | str], failures: dict[str, str], encoded: int = 0, reused: int = 0
    ):
        self.entries = entries
        self.failures = failures
        self.encoded = encoded  # latents the VAE computed in the pass (all processes)
        self.reused = reused  # latents found in latent_cache_dir

    def __call__(self, item: ImageItem, size: Bucket, flip: bool) -> torch.Tensor:
        path = str(item.path)
        if path in self.failures:
            raise ImageLoadError(self.failures[path])
        entry = self.entries.get(latent_key(item, size, flip))
        if entry is None:
            raise ImageLoadError(f"{path}: no cached latent for bucket {size[0]}x{size[1]}, flip {flip}")
        if isinstance(entry, torch.Tensor):
            return entry
        try:
            return load_file(entry)["parameters"]
        except Exception as error:
            raise ImageLoadError(
                f"cached latent {entry} of {path} is unreadable ({type(error).__name__}: "
                f"{error}); delete it to have it encoded again"
            ) from error

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.entries.values() if isinstance(t, torch.Tensor))


class TextEmbeddings:
    """caption -> its cached text conditioning on the CPU, tensors by batch key (encode_text's, one row each:
    encoder_hidden_states [tokens, width], and for SDXL pooled_embeds [width])."""

    def __init__(self, conditioning: dict[str, dict[str, torch.Tensor]]):
        self.conditioning = conditioning

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        try:
            return self.conditioning[caption]
        except KeyError:
            raise KeyError(f"caption {caption!r} is not in the text-embedding cache") from None

    def __len__(self) -> int:
        return len(self.conditioning)

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for entry in self.conditioning.values() for t in entry.values())


# --- the pass ----------------------------------------------------------------------------------------------


@dataclass
class _Share:
    """What one process cached: picklable, combined across processes with gather_object."""

    entries: dict = field(default_factory=dict)  # LatentKey -> CPU tensor, or file path (str)
    failures: dict = field(default_factory=dict)  # image path -> reason
    encoded: int = 0
    reused: int = 0


class _PixelChunks(Dataset):
    """Decodes one chunk of jobs (same bucket) per index, like the training loader (data/images.py load_image);
    images that fail are returned with their reason."""

    def __init__(self, chunks: list[list[LatentJob]]):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int):
        done, pixels, failed = [], [], []
        for job in self.chunks[index]:
            try:
                pixels.append(load_image(job.item, job.size, job.flip))
                done.append(job)
            except ImageLoadError as error:
                failed.append((job, str(error)))
        return done, (torch.stack(pixels) if pixels else None), failed


def chunks_of(jobs: Sequence[LatentJob], size: int) -> list[list[LatentJob]]:
    """Jobs grouped by bucket (one VAE call needs one size), in chunks of at most `size`."""
    by_bucket: dict[Bucket, list[LatentJob]] = {}
    for job in jobs:
        by_bucket.setdefault(job.size, []).append(job)
    return [
        group[start : start + size]
        for bucket in sorted(by_bucket)
        for group in [by_bucket[bucket]]
        for start in range(0, len(group), size)
    ]


def _encode_share(
    model: SDModel,
    images: list[list[LatentJob]],
    config: TrainConfig,
    accelerator,
    cache_dir: Path | None,
    vae_id: str,
    num_workers: int,
    show_progress: bool,
) -> _Share:
    share = _Share()
    targets: dict[LatentKey, Path] = {}
    todo: list[LatentJob] = []
    for jobs in images:
        if cache_dir is None:
            todo += jobs
            continue
        try:
            image_sha = file_sha256(jobs[0].item.path)
        except OSError as error:
            share.failures[str(jobs[0].item.path)] = f"cannot load {jobs[0].item.path}: {error}"
            continue
        for job in jobs:
            target = latent_file(cache_dir, vae_id, image_sha, job.size, job.flip)
            targets[job.key] = target
            if target.is_file():
                share.entries[job.key] = str(target)
                share.reused += 1
            else:
                todo.append(job)
    loader = DataLoader(
        _PixelChunks(chunks_of(todo, config.batch_size)),
        batch_size=None,
        num_workers=num_workers,
        generator=torch.Generator(),
    )  # keeps the global RNG as it is
    with tqdm(total=len(todo), disable=not show_progress, desc="caching latents", unit="latent") as bar:
        for done, pixels, failed in loader:
            for job, reason in failed:
                share.failures[str(job.item.path)] = reason
            if pixels is not None:
                with accelerator.autocast():
                    parameters = vae_distribution(model, pixels).parameters.cpu()  # mean, logvar
                for job, row in zip(done, parameters, strict=True):
                    row = row.clone()  # its own storage: a view would keep (and pickle) the whole batch
                    if cache_dir is None:
                        share.entries[job.key] = row
                    else:
                        write_latent_file(targets[job.key], row, job)
                        share.entries[job.key] = str(targets[job.key])
                    share.encoded += 1
            bar.update(len(done) + len(failed))
    return share


def _combined(shares: list[_Share]) -> _Share:
    total = _Share()
    for share in shares:
        total.entries.update(share.entries)
        total.failures.update(share.failures)
        total.encoded += share.encoded
        total.reused += share.reused
    return total


def build_latent_cache(
    model: SDModel,
    items: Sequence[ImageItem],
    item_buckets: Sequence[Bucket],
    config: TrainConfig,
    accelerator,
    say: Callable[[str], None],
    num_workers: int = 0,
) -> LatentLookup:
    """The pass: this process encodes its share of the images (all of them with one process; `num_workers`
    DataLoader workers decode them), then the shares are combined. Reports how many latents were reused from
    latent_cache_dir and how many encoded."""
    started = time.monotonic()
    images = jobs_by_image(latent_jobs(items, item_buckets, config.flip_p))
    cache_dir = Path(config.latent_cache_dir) if config.latent_cache_dir else None
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"key 'latent_cache_dir' = '{cache_dir}': cannot create the folder ({error}).") from None
    vae_id = vae_identity(model.vae, accelerator.mixed_precision) if cache_dir is not None else ""
    share = _encode_share(
        model,
        images[accelerator.process_index :: accelerator.num_processes],
        config,
        accelerator,
        cache_dir,
        vae_id,
        num_workers,
        show_progress=accelerator.is_main_process,
    )
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # every process's files are written before any reads them
    total = _combined(gather_object([share]))
    lookup = LatentLookup(total.entries, total.failures, total.encoded, total.reused)
    where = (
        f"in {cache_dir / f'vae-{vae_id}'}"
        if cache_dir is not None
        else f"in memory ({lookup.memory_bytes / 2**20:.1f} MiB)"
    )
    say(
        f"latent cache: {len(lookup)} latents of {len(images)} images (per bucket and flip) {where}: "
        f"{lookup.reused} reused, {lookup.encoded} encoded in {time.monotonic() - started:.1f} s"
        + (
            f"; {len(lookup.failures)} image(s) could not be loaded and are left out of every step"
            if lookup.failures
            else ""
        )
    )
    return lookup


@torch.no_grad()
def build_text_cache(
    model: SDModel, items: Sequence[ImageItem], config: TrainConfig, accelerator, say: Callable[[str], None]
) -> TextEmbeddings:
    """The text conditioning of every caption training can use (trainer/diffusion.py encode_text, clip_skip
    applied), this process's share encoded in chunks of batch_size, then the shares combined."""
    started = time.monotonic()
    captions = possible_captions(items, config)
    mine = captions[accelerator.process_index :: accelerator.num_processes]
    encoded: dict[str, dict[str, torch.Tensor]] = {}
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start : start + config.batch_size]
        with accelerator.autocast():
            tensors = encode_text(model, chunk, config.clip_skip, accelerator.device)
        tensors = {key: value.cpu() for key, value in tensors.items()}
        for row, caption in enumerate(chunk):  # each row its own storage: a view would keep (and pickle) the chunk
            encoded[caption] = {key: value[row].clone() for key, value in tensors.items()}
    combined: dict[str, dict[str, torch.Tensor]] = {}
    for part in gather_object([encoded]):
        combined.update(part)
    embeddings = TextEmbeddings(combined)
    say(
        f"text-embedding cache: {len(embeddings)} distinct captions encoded in {time.monotonic() - started:.1f} s "
        f"({embeddings.memory_bytes / 2**20:.1f} MiB in memory)"
    )
    return embeddings


# --- what the trainer holds --------------------------------------------------------------------------------


@dataclass
class TrainingCaches:
    """The run's caches, and the model parts they let leave the accelerator device."""

    latents: LatentLookup | None = None
    text_embeddings: TextEmbeddings | None = None
    model: SDModel | None = None
    device: torch.device | None = None
    offloaded: tuple[str, ...] = ()  # model parts moved to the CPU after the pass

    def text_encoder_names(self) -> tuple[str, ...]:
        """The model's text encoders: SDXL has a second one."""
        return tuple(name for name in ("text_encoder", "text_encoder_2") if getattr(self.model, name, None) is not None)

    def offload(self) -> None:
        """Move the VAE (with cached latents) and the frozen text encoders (with cached embeddings) to the CPU, so
        the training steps have that GPU memory. Nothing moves when training runs on the CPU."""
        if self.model is None or self.device is None or self.device.type == "cpu":
            return
        parts = (("vae",) if self.latents is not None else ()) + (
            self.text_encoder_names() if self.text_embeddings is not None else ()
        )
        for part in parts:
            getattr(self.model, part).to("cpu")
        self.offloaded = parts
        if parts and self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def parts_on_device(self, *parts: str) -> Iterator[None]:
        """Bring offloaded parts back to the device for a while (validation needs the text encoder, samples need
        both), then off again. "text_encoder" stands for every text encoder of the model (SDXL's two)."""
        if "text_encoder" in parts:
            parts = tuple(dict.fromkeys(parts + self.text_encoder_names()))
        moving = [getattr(self.model, part) for part in parts if part in self.offloaded]
        for module in moving:
            module.to(self.device)
        try:
            yield
        finally:
            for module in moving:
                module.to("cpu")


def build_caches(
    config: TrainConfig,
    items: Sequence[ImageItem],
    item_buckets: Sequence[Bucket],
    model: SDModel,
    accelerator,
    say: Callable[[str], None],
    num_workers: int = 0,
) -> TrainingCaches:
    """The first pass before training: text embeddings (cheap, and its data check fails fast), then latents;
    then the parts they replace leave the device."""
    caches = TrainingCaches(model=model, device=accelerator.device)
    if config.cache_text_embeddings:
        caches.text_embeddings = build_text_cache(model, items, config, accelerator, say)
    if config.cache_latents:
        caches.latents = build_latent_cache(model, items, item_buckets, config, accelerator, say, num_workers)
    caches.offload()
    if caches.offloaded:
        say(f"moved to the CPU while training: {', '.join(caches.offloaded)}")
    return caches
