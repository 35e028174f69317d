"""Image multipliers: how many copies of each image an epoch trains, with a fixed count per bucket.

The whole part of a multiplier repeats the image exactly that many times every epoch. The
fractional parts of a bucket's images add up to a number of extra copies, rounded half up,
that is the same every epoch: so batches per epoch, and with them the LR schedule, are known
before training. Which images get those extra copies is drawn afresh each epoch, each with a
chance equal to its fraction (scaled slightly so that the chances add up to the whole count).

ED2 redraws the fractional copies each epoch too, but their number varies, so its steps per
epoch change from epoch to epoch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def whole_copies(multiplier: float) -> int:
    return math.floor(multiplier)


def fraction(multiplier: float) -> float:
    return multiplier - math.floor(multiplier)


def extra_copy_count(fractions: Sequence[float]) -> int:
    """Extra copies per epoch from these fractional parts: their sum rounded half up."""
    # fsum: the exact sum of the floats, so the count cannot depend on the order of the images.
    return math.floor(math.fsum(fractions) + 0.5)


def draw_extra_copies(fractions: Sequence[float], rng: random.Random) -> list[int]:
    """Indices into fractions of the images that get an extra copy: exactly extra_copy_count of them.

    Systematic sampling over a shuffled order: lay the chances end to end on [0, count), then
    pick the images under the points offset, offset + 1, ..., offset + count - 1.
    """
    count = extra_copy_count(fractions)
    chances = inclusion_chances(fractions, count)
    order = list(range(len(fractions)))
    rng.shuffle(order)
    offset = rng.random()
    picked, end = [], 0.0
    for position, index in enumerate(order):
        start = end
        # Pinning the last end to count makes the picks add up to exactly count despite rounding.
        end = float(count) if position == len(order) - 1 else end + chances[index]
        if math.ceil(end - offset) > math.ceil(start - offset):  # a point lies in [start, end)
            picked.append(index)
    return sorted(picked)


def inclusion_chances(fractions: Sequence[float], count: int) -> list[float]:
    """Each image's chance of an extra copy: its fraction scaled so the chances sum to count.

    A chance cannot exceed 1: an image whose scaled fraction reaches 1 is always picked, and the
    others are scaled again to share what is left.
    """
    chances = [0.0] * len(fractions)
    undecided = [index for index, value in enumerate(fractions) if value > 0]
    remaining = count
    while remaining > 0 and undecided:
        scale = remaining / math.fsum(fractions[index] for index in undecided)
        certain = [index for index in undecided if fractions[index] * scale >= 1.0]
        if not certain:
            for index in undecided:
                chances[index] = fractions[index] * scale
            break
        for index in certain:
            chances[index] = 1.0
        undecided = [index for index in undecided if index not in certain]
        remaining -= len(certain)
    return chances
