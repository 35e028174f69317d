"""Hold-out validation split, with ED2's semantics (items sorted by path, seeded shuffle)."""

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
    """How many of num_items an automatic split holds out.

    Rounds half up (so 20 items at 0.2 give 4, and float noise such as 0.29 * 100 =
    28.999... still gives 29), holds out at least one item whenever a split is asked for
    and possible, and always leaves at least one item to train on.
    """
    if not 0.0 <= proportion < 1.0:
        raise ValueError(f"auto_split_proportion must be in [0, 1), got {proportion}")
    if proportion == 0.0 or num_items < 2:
        return 0
    rounded = math.floor(num_items * proportion + 0.5)
    return min(max(rounded, 1), num_items - 1)


def _automatic_split(
    sorted_items: list[ImageItem], proportion: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    shuffled = list(sorted_items)
    # A private generator: drawing the split must not shift the training run's global RNG.
    random.Random(seed).shuffle(shuffled)
    held_out = shuffled[: validation_count(len(shuffled), proportion)]
    held_out_paths = {item.path for item in held_out}
    train = [item for item in sorted_items if item.path not in held_out_paths]
    return train, sorted(held_out, key=_by_path)


def _by_path(item: ImageItem) -> Path:
    return item.path
