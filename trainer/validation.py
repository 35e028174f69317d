"""Stabilized loss: the same images, the same noise and the same timesteps at every pass.

The raw training loss of a diffusion model swings with the timestep and noise drawn at each step. Scoring a
fixed set of images at fixed timesteps spread over the noise schedule, with noise drawn from private
generators, gives a curve that moves only when the model does. Nothing here touches the global RNG, so
turning validation on or off does not change the training trajectory. The LR finder's probe loss is the
same measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.images import ImageItem, load_image, size_and_crop
from data.loader import assign_buckets
from trainer.diffusion import HIDDEN_STATES, added_conditioning, denoising_loss, encode_latents, encode_text
from trainer.model import SDModel, evaluating


@dataclass
class _FixedBatch:
    latents: torch.Tensor  # on the CPU; moved to the device per pass
    captions: list[str]
    noise_seed: int
    time_ids: torch.Tensor  # [B, 6]: SDXL's size and crop conditioning of the unflipped images at their bucket


def fixed_timesteps(count: int, num_train_timesteps: int) -> list[int]:
    """The centres of `count` equal slices of the noise schedule (8 slices of 1000: 62, 187, ..., 937)."""
    return [int((k + 0.5) * num_train_timesteps / count) for k in range(count)]


def group_into_fixed_batches(items: list[ImageItem], resolution: int, batch_size: int):
    """Items grouped by bucket, in path order: a fixed composition for every pass."""
    by_bucket: dict[tuple[int, int], list[ImageItem]] = {}
    for item, bucket in zip(items, assign_buckets(items, resolution), strict=True):
        by_bucket.setdefault(bucket, []).append(item)
    for size in sorted(by_bucket):
        group = by_bucket[size]
        for start in range(0, len(group), batch_size):
            yield size, group[start : start + batch_size]


class StabilizedLoss:
    def __init__(
        self,
        model: SDModel,
        items: list[ImageItem],
        resolution: int,
        batch_size: int,
        num_timesteps: int,
        seed: int,
        clip_skip: int,
    ):
        self.clip_skip = clip_skip
        self.timesteps = fixed_timesteps(num_timesteps, model.noise_scheduler.config.num_train_timesteps)
        self.num_images = len(items)
        self.batches = [
            _FixedBatch(
                latents=encode_latents(
                    model, torch.stack([load_image(i, size, flip=False) for i in group]), sample=False
                ).cpu(),
                captions=[i.caption for i in group],
                noise_seed=seed * 100_003 + index,
                time_ids=torch.tensor([size_and_crop(i, size) for i in group], dtype=torch.float32),
            )
            for index, (size, group) in enumerate(group_into_fixed_batches(items, resolution, batch_size))
        ]

    @torch.no_grad()
    def __call__(self, model: SDModel, accelerator=None) -> float:
        """Mean loss over every image and fixed timestep. With several processes each scores its share of the
        batches and the sums are added up, so every process gets the same mean of the whole set."""
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        device = model.unet.device
        total, count = 0.0, 0
        with evaluating(model):
            for batch in self.batches[rank::world]:
                latents = batch.latents.to(device)
                text = encode_text(model, batch.captions, self.clip_skip, device)
                added = added_conditioning(model, text, batch.time_ids)
                generator = torch.Generator(device="cpu").manual_seed(batch.noise_seed)
                for t in self.timesteps:
                    noise = torch.randn(latents.shape, generator=generator).to(device)
                    timesteps = torch.full((latents.shape[0],), t, device=device, dtype=torch.long)
                    loss = denoising_loss(model, latents, text[HIDDEN_STATES], noise, timesteps, added_cond=added)
                    total += loss.sum().item()
                    count += loss.numel()
        if world > 1:
            sums = accelerator.reduce(torch.tensor([total, float(count)], device=device, dtype=torch.float64), "sum")
            total, count = sums[0].item(), int(sums[1].item())
        return total / max(count, 1)


def validation_due(step: int, plan, every_n_epochs: float) -> bool:
    """Every `every_n_epochs` (counted in steps, at least one) and at the run's last step."""
    every = max(1, round(every_n_epochs * plan.steps_per_epoch))
    return step % every == 0 or step == plan.total_steps


def validation_sets(held_out: StabilizedLoss | None, extra: dict, ema_validate: bool) -> dict[str, StabilizedLoss]:
    """What a validation pass scores, by name, in order: the extra sets, the held-out split with the EMA's weights
    ("val_ema", when ema_validate), and last the held-out split itself ("val")."""
    sets = dict(extra)
    if held_out:
        sets.update({"val_ema": held_out} if ema_validate else {})
        sets["val"] = held_out
    return sets


def score_sets(model: SDModel, sets: dict[str, StabilizedLoss], accelerator, weights_of) -> dict[str, float]:
    """Each set's loss under autocast; "val_ema" inside `weights_of(ema=True)` (the EMA's weights swapped in)."""
    losses = {}
    for name, validator in sets.items():
        with accelerator.autocast(), weights_of(ema=name == "val_ema"):
            losses[name] = validator(model, accelerator)
    return losses
