"""The batches a run trains on, epoch by epoch. The order of an epoch is a function of (seed, epoch) alone, so a
resumed run skips exactly the batches its interrupted run consumed, on any number of processes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from accelerate import Accelerator

from data.images import ImageLoadError, SkippedImage
from data.loader import ImageBatchDataset, make_loader
from data.plan import RunPlan
from data.prepare import PreparedData
from trainer.cache import TrainingCaches
from utils.config import TrainConfig
from utils.plugins import PluginRunner


@dataclass
class EpochFeed:
    config: TrainConfig
    data: PreparedData
    plan: RunPlan
    seed: int
    accelerator: Accelerator
    caches: TrainingCaches
    num_workers: int
    plugins: PluginRunner  # their transform_caption / transform_pil_image run as each image loads

    def epoch_iterators(self, first_epoch: int, first_step: int) -> Iterator:
        """Each epoch's batch iterator in turn, from `first_step` of `first_epoch` on. With workers, the next
        epoch's loader is started when an epoch starts: its workers fork and load its first batches while this
        epoch trains, so no epoch begins with a stall (a loader is built per epoch, see data/loader.py)."""
        ahead = self.num_workers > 0
        upcoming = iter(self.epoch_loader(first_epoch, first_step))
        for epoch in range(first_epoch, self.plan.epochs):
            current = upcoming
            has_next = epoch + 1 < self.plan.epochs
            upcoming = iter(self.epoch_loader(epoch + 1)) if ahead and has_next else None
            yield current
            if upcoming is None and has_next:
                upcoming = iter(self.epoch_loader(epoch + 1))

    def epoch_loader(self, epoch: int, first_step: int = 0):
        """The epoch's batches from its `first_step` on."""
        config, accelerator = self.config, self.accelerator
        batches = self.data.batches.epoch_batches(
            epoch, self.seed, accelerator.process_index, accelerator.num_processes
        )[first_step * self.plan.grad_accum :]
        dataset = ImageBatchDataset(
            self.data.train,
            self.data.batches,
            seed=self.seed,
            epoch=epoch,
            flip_p=config.flip_p,
            cond_dropout=config.cond_dropout,
            shuffle_tags=config.shuffle_tags,
            keep_tags=config.keep_tags,
            latents=self.caches.latents,
            text_embeddings=self.caches.text_embeddings,
            transform_caption=self._plugin_transform("transform_caption"),
            transform_image=self._plugin_transform("transform_pil_image"),
        )
        return make_loader(
            dataset,
            batches,
            num_workers=self.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            prefetch_factor=config.prefetch_factor,
        )

    def _plugin_transform(self, hook: str):
        return partial(self.plugins.transform, hook) if self.plugins.overriding(hook) else None

    def micro_batches(self, loader, epoch: int, step_in_epoch: int) -> tuple[list[dict], list[SkippedImage]]:
        """This step's micro-batches, and the images that failed to load (the loader drops them and lists them
        under "failed"). A micro-batch in which every image failed is left out."""
        batches, failed = [], []
        for _ in self.plan.micro_batches_of(step_in_epoch, epoch):
            try:
                batch = next(loader)
            except ImageLoadError as error:
                failed.append(SkippedImage(Path("(a whole micro-batch)"), str(error)))
                continue
            failed.extend(batch.get("failed", []))
            batches.append(batch)
        return batches, failed
