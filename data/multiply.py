"""Image multipliers: how many copies of each image an epoch trains.

ED2's count (data/data_loader.py, DataLoaderMultiAspect): an epoch trains floor(sum of every image's
multiplier) samples, the same number every epoch: each image's whole part exactly, and the rest as
extra copies of images that have a fractional part, drawn afresh each epoch, each image at most once.

Batches are formed per group (an aspect bucket, or a batch_id within it), so how many batches an
epoch has depends on how the extra copies fall into the groups. In ED2 that varied from epoch to
epoch, and with it its steps per epoch. Here each group gets a fixed share of ED2's extra copies:
its sum of fractional parts, rounded by the largest-remainder method so that the shares add up to
ED2's count exactly. So batches per epoch, the LR schedule and its preview are known before
training. Which images of a group get its extra copies is drawn again each epoch from the run's
seed, each with a chance in proportion to its fraction.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def whole_copies(multiplier: float) -> int:
    return math.floor(multiplier)


def fraction(multiplier: float) -> float:
    return multiplier - math.floor(multiplier)


def epoch_size(multipliers: Sequence[float]) -> int:
    """ED2's samples per epoch: floor of the sum of the multipliers. fsum is the exact sum, so ten images at 2.3
    make the 23 meant (ED2's float sum, 22.999999999999996, trained 22)."""
    return math.floor(math.fsum(multipliers))


def extra_copies_per_group(groups: Sequence[Sequence[float]]) -> list[int]:
    """Each group's fixed number of extra copies per epoch, for the groups' multipliers: ED2's epoch size less the
    whole copies, shared out by the groups' sums of fractions (largest remainder first; ties to the earlier group)."""
    everything = [multiplier for group in groups for multiplier in group]
    extra = epoch_size(everything) - sum(map(whole_copies, everything))
    return largest_remainder_shares([math.fsum(map(fraction, group)) for group in groups], extra)


def largest_remainder_shares(sums: Sequence[float], total: int) -> list[int]:
    """Whole numbers adding up to `total` (the sums' own total, rounded), each its sum rounded down, plus one for the
    largest remainders (ties to the earlier)."""
    shares = [math.floor(value) for value in sums]
    remainders = sorted(
        (index for index, value in enumerate(sums) if value > shares[index]),
        key=lambda index: shares[index] - sums[index],
    )
    for index in remainders[: total - sum(shares)]:
        shares[index] += 1
    return shares


def draw_extra_copies(fractions: Sequence[float], count: int, rng: random.Random) -> list[int]:
    """Indices into fractions of the `count` images that get an extra copy (count: at most the sum of the fractions,
    rounded up).

    Systematic sampling over a shuffled order: lay the chances end to end on [0, count), then
    pick the images under the points offset, offset + 1, ..., offset + count - 1.
    """
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
