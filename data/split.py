"""Hold-out validation split, with ED2's semantics (data/every_dream_validation.py, get_random_split): the items
sorted by path, shuffled by a generator seeded with the validation seed, and the first ceil(proportion x count)
held out. So the same images are held out as in ED2."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from data.images import ImageItem

SPLIT_MODES = ("automatic", "manual", "none")


def split_items(
    items: Sequence[ImageItem],
    mode: str,
    proportion: float,
    seed: int,
    manual_items: Sequence[ImageItem] | None = None,
) -> tuple[list[ImageItem], list[ImageItem]]:
    """Return (train, val), each sorted by path.

    automatic: val is a seeded random share of the items, removed from train.
    manual:    val is manual_items (a separate folder); train keeps every item.
    none:      train keeps every item; val is empty.
    """
    train = sorted(items, key=_by_path)
    if mode == "automatic":
        return _automatic_split(train, proportion, seed)
    if mode == "manual":
        if manual_items is None:
            raise ValueError("val_split_mode 'manual' needs manual_items (manual_data_root)")
        return train, sorted(manual_items, key=_by_path)
    if mode == "none":
        return train, []
    raise ValueError(f"unknown val_split_mode {mode!r}; expected one of {SPLIT_MODES}")


def validation_count(num_items: int, proportion: float) -> int:
    """How many of num_items an automatic split holds out: ceil(num_items x proportion), as ED2.

    The product is taken without float noise (0.1 x 30 is 3.0000000000000004 in floating point, which ED2 rounded
    up to 4; here it holds out 3). Unlike ED2, a proportion of 0 holds out none (ED2 held out one), and at least
    one item is always left to train on (ED2 could hold out a data set's only image and then crash).
    """
    if not 0.0 <= proportion < 1.0:
        raise ValueError(f"auto_split_proportion must be in [0, 1), got {proportion}")
    if proportion == 0.0 or num_items < 2:
        return 0
    # 12 significant digits drop the float noise of the product, never a real fraction of an item.
    held_out = math.ceil(round(num_items * proportion, 12 - len(str(num_items))))
    return min(max(held_out, 1), num_items - 1)


def _automatic_split(
    sorted_items: list[ImageItem], proportion: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    # ED2 sorts by the path text before shuffling (Path order differs, e.g. "a-b.png" against "a/b.png").
    shuffled = sorted(sorted_items, key=lambda item: str(item.path))
    # A private generator: drawing the split must not shift the training run's global RNG.
    random.Random(seed).shuffle(shuffled)
    held_out = shuffled[: validation_count(len(shuffled), proportion)]
    held_out_paths = {item.path for item in held_out}
    train = [item for item in sorted_items if item.path not in held_out_paths]
    return train, sorted(held_out, key=_by_path)


def _by_path(item: ImageItem) -> Path:
    return item.path
