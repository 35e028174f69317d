"""Bucketed batches, the per-epoch batch order, and a DataLoader that decodes whole batches.

Every batch holds images of one aspect bucket. Images with a batch_id (ED2's batch_id.txt or
`batch_id:` key) are batched only with images of the same batch_id; the last, incomplete batch of
such a group joins the bucket's other images (ED2's data/data_loader.py does the same with these
"runts"). Image multipliers (data/multiply.py) decide how many samples of each image an epoch
holds, with a fixed count per group, so the number of batches per epoch is the same every epoch
and the trainer knows steps per epoch (and can build its LR schedule) before any randomness.
A rated data set (data/rated.py) trains fewer images in later epochs: each such epoch's count per
group is fixed too, so every epoch's number of batches is known before training as well.
The samples and order of an epoch's batches are a pure function of (seed, epoch), so a run
resumed at batch i of epoch e sees exactly the batches the interrupted run would have seen.

A sample is an int: copy * number of items + item index. Copy 0 of item i is just i, so with
every multiplier 1 the samples are the item indices. Flips, tag shuffles and caption dropout
are seeded by (seed, epoch, sample): two copies of one image in an epoch differ.

Unlike ED2, a bucket whose size is not a multiple of batch_size ends in a smaller "runt"
batch; it is never padded with duplicates.

Cached latents: given a latent lookup (trainer/cache.py), a batch carries "latents", the VAE
distribution parameters cached for each (image, bucket, flip), instead of "pixel_values", and no
image is decoded; given a text-embedding lookup it also carries the cached text conditioning of each
caption ("encoder_hidden_states", and for SDXL "pooled_embeds").

Every batch carries "add_time_ids", each image's original size, crop and target size (data/images.py
size_and_crop): SDXL's size conditioning, ignored by SD 1.x/2.x.

Failed decodes: an image that passed the scan but cannot be decoded at training time is
dropped from its batch and listed under the batch's "failed" key, so one bad file costs
one image, not the run. Only a batch in which every image fails raises ImageLoadError.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial
from typing import NotRequired, TypedDict, TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data.buckets import Bucket, assign_bucket, bucket_sizes
from data.captions import build_caption
from data.images import ImageItem, ImageLoadError, SkippedImage, load_image, size_and_crop
from data.multiply import draw_extra_copies, extra_copies_per_group, fraction, whole_copies
from data.rated import RatedEpochs, draw_by_rating, picks_per_group

T = TypeVar("T")
# A batch group: (batch_id, bucket). Images without a batch_id share the group DEFAULT_BATCH_ID of their bucket.
Group = tuple[str, Bucket]
DEFAULT_BATCH_ID = ""


class Batch(TypedDict):
    pixel_values: NotRequired[torch.Tensor]  # [B, 3, H, W] float32 in [-1, 1]; absent with cached latents
    latents: NotRequired[torch.Tensor]  # [B, 2C, h, w]: cached VAE mean and logvar, instead of pixel_values
    encoder_hidden_states: NotRequired[torch.Tensor]  # [B, 77, D]: cached CLIP hidden states of the captions
    pooled_embeds: NotRequired[torch.Tensor]  # [B, P]: SDXL's cached pooled embeddings of the captions
    add_time_ids: torch.Tensor  # [B, 6] float32: original (h, w), crop (top, left), target (h, w) of each image
    captions: list[str]  # built per sample: tags shuffled, dropout applied (an empty caption)
    paths: list[str]
    loss_scales: torch.Tensor  # [B] float32: each image's loss_scale, to multiply its loss by
    failed: list[SkippedImage]  # images dropped because they could not be decoded


def assign_buckets(items: Sequence[ImageItem], resolution: int) -> list[Bucket]:
    """The bucket of each item, in item order."""
    buckets = bucket_sizes(resolution)
    return [assign_bucket(item.width, item.height, buckets) for item in items]


def item_of(sample: int, num_items: int) -> int:
    """The item index of a sample (see the module docstring)."""
    return sample % num_items


def _sample(item: int, copy: int, num_items: int) -> int:
    return copy * num_items + item


def _derived_rng(purpose: str, *numbers: int) -> random.Random:
    # random.Random hashes a str seed with SHA-512, so the stream is the same in every
    # process and on every platform; hash() would not be, and the global RNG is untouched.
    return random.Random(f"everycycle/{purpose}/" + "/".join(str(number) for number in numbers))


class BucketBatches:
    """Groups training items by bucket (and batch_id) and plans each epoch's samples and batches.

    `rated`: a rated data set's settings (ED2's rated_dataset); None: every epoch is a whole one.
    """

    def __init__(
        self, items: Sequence[ImageItem], batch_size: int, resolution: int, rated: RatedEpochs | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not items:
            raise ValueError("no training images to batch")
        self.batch_size = batch_size
        self.num_items = len(items)
        self.multipliers = [item.multiply for item in items]
        self.item_buckets = assign_buckets(items, resolution)
        self.group_members: dict[Group, list[int]] = {}
        for index, (item, bucket) in enumerate(zip(items, self.item_buckets, strict=True)):
            self.group_members.setdefault((item.batch_id or DEFAULT_BATCH_ID, bucket), []).append(index)
        self.group_members = dict(sorted(self.group_members.items()))
        shares = extra_copies_per_group(
            [[self.multipliers[index] for index in members] for members in self.group_members.values()]
        )
        self.extra_copies = dict(zip(self.group_members, shares, strict=True))
        self.whole_epoch_counts = {
            group: sum(whole_copies(self.multipliers[index]) for index in members) + self.extra_copies[group]
            for group, members in self.group_members.items()
        }
        self.rated = rated
        # An image with multiply 0 is left out of every epoch, so it is never picked in a rated one either.
        self.ratings = [item.rating if item.multiply > 0 else 0.0 for item in items]
        self.rated_images = sum(rating > 0 for rating in self.ratings)  # the N of ED2's ceil(N x share)
        self._rated_counts: dict[int, dict[Group, int]] = {}  # per number of picks: a rated epoch's group counts
        if self.samples_per_epoch == 0:
            raise ValueError("every training image has multiply 0: there is nothing to train on")

    @property
    def planned_epochs(self) -> int:
        """Epochs whose sizes may differ: a rated data set's max_epochs, else 1; later epochs are as the last."""
        return self.rated.max_epochs if self.rated else 1

    def picked_count(self, epoch: int) -> int | None:
        """Images a rated epoch trains, each once; None: a whole epoch, multipliers applied."""
        return self.rated.picked_count(epoch, self.rated_images) if self.rated else None

    def group_sample_counts(self, epoch: int) -> dict[Group, int]:
        """Samples of each group in epoch: its whole copies plus its fixed count of extra copies, or in a rated
        epoch its fixed share of the epoch's picks."""
        picked = self.picked_count(epoch)
        if picked is None:
            return self.whole_epoch_counts
        if picked not in self._rated_counts:
            ratings = [[self.ratings[index] for index in members] for members in self.group_members.values()]
            shares = picks_per_group(ratings, picked)
            self._rated_counts[picked] = dict(zip(self.group_members, shares, strict=True))
        return self._rated_counts[picked]

    @property
    def samples_per_epoch(self) -> int:
        """Images trained in a whole epoch (the first), multipliers included."""
        return self.samples_in_epoch(0)

    def samples_in_epoch(self, epoch: int) -> int:
        return sum(self.group_sample_counts(epoch).values())

    @property
    def num_batches(self) -> int:
        """Batches of a whole epoch (the first) on one process: per group, ceil(samples / batch size)."""
        return self.batches_in_epoch(0)

    def batches_in_epoch(self, epoch: int) -> int:
        return sum(-(-count // self.batch_size) for count in self._batched_counts(epoch).values())  # ceiling division

    @property
    def smaller_batches(self) -> int:
        """Batches of a whole epoch smaller than batch_size: the last of each group whose count is not a multiple."""
        return sum(1 for count in self._batched_counts(0).values() if count % self.batch_size)

    def _batched_counts(self, epoch: int) -> dict[Group, int]:
        """Samples each group is cut into batches with: a batch_id group's runt counts with its bucket's default
        group (see epoch_batches)."""
        batched: dict[Group, int] = {}
        for group, count in self.group_sample_counts(epoch).items():
            runt = 0 if group[0] == DEFAULT_BATCH_ID else count % self.batch_size
            batched[group] = batched.get(group, 0) + count - runt
            default = (DEFAULT_BATCH_ID, group[1])
            batched[default] = batched.get(default, 0) + runt
        return {group: count for group, count in batched.items() if count}

    def batches_per_rank(self, world_size: int, epoch: int = 0) -> int:
        """Batches each of world_size processes gets in epoch (the remainder is dropped)."""
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        batches = self.batches_in_epoch(epoch)
        if batches < world_size:
            which = f"epoch {epoch + 1} of the rated data set has" if self.picked_count(epoch) else "per epoch"
            raise ValueError(
                f"{batches} batch(es) {which} cannot feed {world_size} processes: each process "
                f"needs at least one whole batch per epoch; lower batch_size ({self.batch_size}), add "
                f"images, or use at most {batches} processes"
            )
        return batches // world_size

    def batches_per_rank_by_epoch(self, world_size: int) -> tuple[int, ...]:
        """batches_per_rank of epochs 0 to planned_epochs - 1; every later epoch has as many as the last."""
        return tuple(self.batches_per_rank(world_size, epoch) for epoch in range(self.planned_epochs))

    def epoch_samples(self, epoch: int, seed: int) -> dict[Group, list[int]]:
        """Each group's samples in epoch, sorted: whole copies, plus this epoch's extra copies; in a rated epoch,
        the epoch's picks, each image once."""
        if self.picked_count(epoch) is not None:
            return self._rated_samples(epoch, seed)
        rng = _derived_rng("multiply", seed, epoch)
        samples = {}
        for group, members in self.group_members.items():
            chosen = [
                _sample(index, copy, self.num_items)
                for index in members
                for copy in range(whole_copies(self.multipliers[index]))
            ]
            fractions = [fraction(self.multipliers[index]) for index in members]
            chosen += [
                _sample(members[pick], whole_copies(self.multipliers[members[pick]]), self.num_items)
                for pick in draw_extra_copies(fractions, self.extra_copies[group], rng)
            ]
            samples[group] = sorted(chosen)
        return samples

    def _rated_samples(self, epoch: int, seed: int) -> dict[Group, list[int]]:
        """Each group's picks of a rated epoch, drawn by rating: copy 0 of each picked image, so the item index."""
        rng = _derived_rng("rated", seed, epoch)
        counts = self.group_sample_counts(epoch)
        return {
            group: [
                members[pick] for pick in draw_by_rating([self.ratings[index] for index in members], counts[group], rng)
            ]
            for group, members in self.group_members.items()
        }

    def epoch_batches(self, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
        """This rank's batches (lists of samples) for epoch, in training order.

        Samples are shuffled within each group, cut into batches, and the batches shuffled
        together. A batch_id group's runt joins its bucket's default group before that one is
        cut. With several ranks, the shuffled list is dealt round-robin so that ranks
        get disjoint whole batches; the last num_batches % world_size batches of the order
        are dropped so every rank takes the same number of steps. Because the order changes
        each epoch, a different few batches sit out each epoch.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        per_rank = self.batches_per_rank(world_size, epoch)
        rng = _derived_rng("batches", seed, epoch)
        samples = self.epoch_samples(epoch, seed)
        batches: list[list[int]] = []
        for (batch_id, bucket), members in list(samples.items()):
            if batch_id != DEFAULT_BATCH_ID:
                rng.shuffle(members)
                whole = len(members) - len(members) % self.batch_size
                samples.setdefault((DEFAULT_BATCH_ID, bucket), []).extend(members[whole:])
                batches += self._cut(members[:whole])
        for (batch_id, _), members in samples.items():
            if batch_id == DEFAULT_BATCH_ID:
                rng.shuffle(members)
                batches += self._cut(members)
        rng.shuffle(batches)
        return batches[: per_rank * world_size][rank::world_size]

    def _cut(self, samples: list[int]) -> list[list[int]]:
        return [samples[start : start + self.batch_size] for start in range(0, len(samples), self.batch_size)]


class ImageBatchDataset(Dataset):
    """Decodes one whole batch per fetch; index it with a list of samples.

    Build one per epoch: the epoch is fixed at construction because it seeds the flips, tag
    shuffles and caption dropout, and worker processes hold copies of the dataset that a later
    set_epoch() would miss. flip_p, cond_dropout, shuffle_tags and keep_tags are the run's
    values, used for every image that does not set its own; they default to off.

    `latents(item, bucket, flip)` returns an image's cached latent distribution parameters (or raises
    ImageLoadError, as a failed decode would); `text_embeddings(caption)` its caption's cached text conditioning,
    tensors by batch key (trainer/cache.py TextEmbeddings).
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        bucket_batches: BucketBatches,
        *,
        seed: int,
        epoch: int,
        flip_p: float = 0.0,
        cond_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        latents: Callable[[ImageItem, Bucket, bool], torch.Tensor] | None = None,
        text_embeddings: Callable[[str], dict[str, torch.Tensor]] | None = None,
        transform_caption: Callable[[str], str] | None = None,
        transform_image: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        for name, probability in (("flip_p", flip_p), ("cond_dropout", cond_dropout)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {probability}")
        if keep_tags < 0:
            raise ValueError(f"keep_tags must be at least 0, got {keep_tags}")
        if len(items) != len(bucket_batches.item_buckets):
            raise ValueError("items must be the list the BucketBatches was built from")
        self.items = list(items)
        self.item_buckets = bucket_batches.item_buckets
        self.seed = seed
        self.epoch = epoch
        self.flip_p = flip_p
        self.cond_dropout = cond_dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tags = keep_tags
        self.latents = latents
        self.text_embeddings = text_embeddings
        self.transform_caption, self.transform_image = transform_caption, transform_image  # ED2 plugins' hooks

    def item(self, sample: int) -> ImageItem:
        return self.items[item_of(sample, len(self.items))]

    def should_flip(self, sample: int) -> bool:
        """Whether sample is mirrored this epoch: reproducible, from a private RNG."""
        probability = _own_or_run(self.item(sample).flip_p, self.flip_p)
        if probability == 0.0:
            return False
        return self._rng("flip", sample).random() < probability

    def caption(self, sample: int) -> str:
        """The caption sample trains on this epoch: empty when dropped, else tags shuffled if on."""
        item = self.item(sample)
        dropout = _own_or_run(item.cond_dropout, self.cond_dropout)
        if dropout > 0.0 and self._rng("cond_dropout", sample).random() < dropout:
            return ""
        shuffle = _own_or_run(item.shuffle_tags, self.shuffle_tags)
        return build_caption(
            item.main_prompt,
            item.tags,
            keep_tags=_own_or_run(item.keep_tags, self.keep_tags),
            max_length=item.max_caption_length,
            rng=self._rng("shuffle_tags", sample) if shuffle else None,
        )

    def _rng(self, purpose: str, sample: int) -> random.Random:
        return _derived_rng(purpose, self.seed, self.epoch, sample)

    def __getitem__(self, samples: Sequence[int]) -> Batch:
        size = self._shared_bucket(samples)
        load = self.latents if self.latents is not None else partial(load_image, transform=self.transform_image)
        tensors, captions, paths, loss_scales, time_ids, failed = [], [], [], [], [], []
        for sample in samples:
            item = self.item(sample)
            try:
                tensors.append(load(item, size, self.should_flip(sample)))
            except ImageLoadError as error:
                failed.append(SkippedImage(item.path, str(error)))
                continue
            caption = self.caption(sample)
            captions.append(self.transform_caption(caption) if self.transform_caption else caption)
            paths.append(str(item.path))
            loss_scales.append(item.loss_scale)
            time_ids.append(size_and_crop(item, size))
        if not tensors:
            reasons = "; ".join(entry.reason for entry in failed)
            raise ImageLoadError(f"no image in the batch could be loaded: {reasons}")
        images = "latents" if self.latents is not None else "pixel_values"
        batch: Batch = {
            images: torch.stack(tensors),
            "captions": captions,
            "paths": paths,
            "loss_scales": torch.tensor(loss_scales, dtype=torch.float32),
            "add_time_ids": torch.tensor(time_ids, dtype=torch.float32),
            "failed": failed,
        }
        if self.text_embeddings is not None:
            cached = [self.text_embeddings(caption) for caption in captions]
            batch.update({key: torch.stack([entry[key] for entry in cached]) for key in cached[0]})
        return batch

    def _shared_bucket(self, samples: Sequence[int]) -> Bucket:
        buckets = {self.item_buckets[item_of(sample, len(self.items))] for sample in samples}
        if len(buckets) != 1:
            raise ValueError(f"a batch must hold exactly one bucket, got {sorted(buckets)}")
        return buckets.pop()


def _own_or_run(own_value: T | None, run_value: T) -> T:
    """An image's own setting when it has one (None: not set), else the run's."""
    return run_value if own_value is None else own_value


def make_loader(
    dataset: ImageBatchDataset,
    batches: Sequence[Sequence[int]],
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader yielding one Batch per entry of batches, in order.

    batch_size=None turns off torch's own batching: each sampled index list already is a
    batch. Workers are not persistent, matching one dataset and one loader per epoch (the
    trainer starts the next epoch's loader ahead, so its workers are ready at the boundary);
    to resume mid-epoch pass batches=bucket_batches.epoch_batches(epoch, seed)[next_batch:].
    prefetch_factor: batches each worker loads ahead (ignored without workers).
    """
    return DataLoader(
        dataset,
        sampler=[list(batch) for batch in batches],
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        # Each iter() draws a worker base seed; a private generator keeps that draw off the
        # global torch RNG, so the training noise sequence does not depend on the loader.
        generator=torch.Generator(),
    )
