"""Bucketed batches, the per-epoch batch order, and a DataLoader that decodes whole batches.

Every batch holds images of one aspect bucket. The number of batches per epoch depends
only on the items and the batch size, so the trainer knows steps per epoch (and can build
its LR schedule) before any randomness. The order of an epoch's batches is a pure function
of (seed, epoch), so a run resumed at batch i of epoch e sees exactly the batches the
interrupted run would have seen.

Unlike ED2, a bucket whose size is not a multiple of batch_size ends in a smaller "runt"
batch; it is never padded with duplicates.

Failed decodes: an image that passed the scan but cannot be decoded at training time is
dropped from its batch and listed under the batch's "failed" key, so one bad file costs
one image, not the run. Only a batch in which every image fails raises ImageLoadError.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypedDict

import torch
from torch.utils.data import DataLoader, Dataset

from data.buckets import Bucket, assign_bucket, bucket_sizes
from data.images import ImageItem, ImageLoadError, SkippedImage, load_image


class Batch(TypedDict):
    pixel_values: torch.Tensor  # [B, 3, H, W] float32 in [-1, 1]
    captions: list[str]
    paths: list[str]
    failed: list[SkippedImage]  # images dropped because they could not be decoded


def assign_buckets(items: Sequence[ImageItem], resolution: int) -> list[Bucket]:
    """The bucket of each item, in item order."""
    buckets = bucket_sizes(resolution)
    return [assign_bucket(item.width, item.height, buckets) for item in items]


def _derived_rng(purpose: str, *numbers: int) -> random.Random:
    # random.Random hashes a str seed with SHA-512, so the stream is the same in every
    # process and on every platform; hash() would not be, and the global RNG is untouched.
    return random.Random(f"everycycle/{purpose}/" + "/".join(str(number) for number in numbers))


class BucketBatches:
    """Groups training items by bucket and plans each epoch's batches."""

    def __init__(self, items: Sequence[ImageItem], batch_size: int, resolution: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not items:
            raise ValueError("no training images to batch")
        self.batch_size = batch_size
        self.item_buckets = assign_buckets(items, resolution)
        self.bucket_members: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(self.item_buckets):
            self.bucket_members.setdefault(bucket, []).append(index)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on one process: sum over buckets of ceil(bucket size / batch size)."""
        return sum(
            -(-len(members) // self.batch_size)  # ceiling division
            for members in self.bucket_members.values()
        )

    def batches_per_rank(self, world_size: int) -> int:
        """Batches each of world_size processes gets per epoch (the remainder is dropped)."""
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if self.num_batches < world_size:
            raise ValueError(
                f"{self.num_batches} batch(es) per epoch cannot feed {world_size} ranks"
            )
        return self.num_batches // world_size

    def epoch_batches(
        self, epoch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> list[list[int]]:
        """This rank's batches (lists of item indices) for epoch, in training order.

        Items are shuffled within each bucket, cut into batches, and the batches shuffled
        together. With several ranks, the shuffled list is dealt round-robin so that ranks
        get disjoint whole batches; the last num_batches % world_size batches of the order
        are dropped so every rank takes the same number of steps. Because the order changes
        each epoch, a different few batches sit out each epoch.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        per_rank = self.batches_per_rank(world_size)
        rng = _derived_rng("batches", seed, epoch)
        batches: list[list[int]] = []
        for bucket in sorted(self.bucket_members):
            members = list(self.bucket_members[bucket])
            rng.shuffle(members)
            batches += [
                members[start : start + self.batch_size]
                for start in range(0, len(members), self.batch_size)
            ]
        rng.shuffle(batches)
        return batches[: per_rank * world_size][rank::world_size]


class ImageBatchDataset(Dataset):
    """Decodes one whole batch per fetch; index it with a list of item indices.

    Build one per epoch: the epoch is fixed at construction because it seeds the flips,
    and worker processes hold copies of the dataset that a later set_epoch() would miss.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        bucket_batches: BucketBatches,
        *,
        seed: int,
        epoch: int,
        flip_p: float = 0.0,
    ) -> None:
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if len(items) != len(bucket_batches.item_buckets):
            raise ValueError("items must be the list the BucketBatches was built from")
        self.items = list(items)
        self.item_buckets = bucket_batches.item_buckets
        self.seed = seed
        self.epoch = epoch
        self.flip_p = flip_p

    def should_flip(self, index: int) -> bool:
        """Whether item index is mirrored this epoch: reproducible, from a private RNG."""
        if self.flip_p == 0.0:
            return False
        return _derived_rng("flip", self.seed, self.epoch, index).random() < self.flip_p

    def __getitem__(self, indices: Sequence[int]) -> Batch:
        size = self._shared_bucket(indices)
        pixel_values, captions, paths, failed = [], [], [], []
        for index in indices:
            item = self.items[index]
            try:
                pixel_values.append(load_image(item, size, self.should_flip(index)))
            except ImageLoadError as error:
                failed.append(SkippedImage(item.path, str(error)))
                continue
            captions.append(item.caption)
            paths.append(str(item.path))
        if not pixel_values:
            reasons = "; ".join(entry.reason for entry in failed)
            raise ImageLoadError(f"no image in the batch could be loaded: {reasons}")
        return Batch(
            pixel_values=torch.stack(pixel_values), captions=captions, paths=paths, failed=failed
        )

    def _shared_bucket(self, indices: Sequence[int]) -> Bucket:
        buckets = {self.item_buckets[index] for index in indices}
        if len(buckets) != 1:
            raise ValueError(f"a batch must hold exactly one bucket, got {sorted(buckets)}")
        return buckets.pop()


def make_loader(
    dataset: ImageBatchDataset,
    batches: Sequence[Sequence[int]],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding one Batch per entry of batches, in order.

    batch_size=None turns off torch's own batching: each sampled index list already is a
    batch. Workers are not persistent, matching one dataset and one loader per epoch; to
    resume mid-epoch pass batches=bucket_batches.epoch_batches(epoch, seed)[next_batch:].
    """
    return DataLoader(
        dataset,
        sampler=[list(batch) for batch in batches],
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Each iter() draws a worker base seed; a private generator keeps that draw off the
        # global torch RNG, so the training noise sequence does not depend on the loader.
        generator=torch.Generator(),
    )
