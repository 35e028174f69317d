"""Aspect-ratio buckets, generated from a rule instead of ED2's hand-written tables.

The rule, for a resolution r (a multiple of 64, at least 64): a bucket is a (width, height)
with both sides multiples of 64, area <= r*r and aspect ratio <= 4:1, that cannot grow by
64 in either direction without breaking one of those limits. Keeping only these "maximal"
rectangles gives one bucket per short side, each about as large as the area budget allows.
Buckets smaller than 3/4 of r*r are then dropped: at those sizes the 4:1 cap, not the area,
is the binding limit, and training them would waste most of the pixel budget. The square
r x r always survives, so every resolution has at least one bucket (64 -> only 64x64).
"""

from __future__ import annotations

import math

BUCKET_STEP = 64  # SD's VAE downsamples by 8 and the UNet by a further 8 in its deepest block.
MAX_ASPECT_RATIO = 4.0
MIN_AREA_FRACTION = 0.75

Bucket = tuple[int, int]  # (width, height) in pixels


def validate_resolution(resolution: int) -> None:
    """Raise ValueError unless resolution is an int multiple of 64 that is at least 64."""
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ValueError(f"resolution must be an integer, got {resolution!r}")
    if resolution < BUCKET_STEP or resolution % BUCKET_STEP:
        raise ValueError(
            f"resolution must be a multiple of {BUCKET_STEP} and at least {BUCKET_STEP} "
            f"(e.g. 64, 512, 768), got {resolution}"
        )


def bucket_sizes(resolution: int) -> list[Bucket]:
    """All buckets for resolution, sorted by width (which also orders them tall to wide)."""
    validate_resolution(resolution)
    max_area = resolution * resolution
    landscape = [
        (long_side, short_side)
        for short_side in range(BUCKET_STEP, resolution + 1, BUCKET_STEP)
        if (long_side := _longest_side_for(short_side, max_area)) is not None
        and _is_maximal(long_side, short_side, max_area)
        and long_side * short_side >= MIN_AREA_FRACTION * max_area
    ]
    both_orientations = set(landscape) | {(height, width) for width, height in landscape}
    return sorted(both_orientations)


def _longest_side_for(short_side: int, max_area: int) -> int | None:
    """Longest multiple-of-64 side that fits the area and the aspect cap beside short_side."""
    by_area = (max_area // short_side) // BUCKET_STEP * BUCKET_STEP
    by_aspect = int(short_side * MAX_ASPECT_RATIO) // BUCKET_STEP * BUCKET_STEP
    long_side = min(by_area, by_aspect)
    return long_side if long_side >= short_side else None


def _is_maximal(long_side: int, short_side: int, max_area: int) -> bool:
    # The long side is already as long as allowed; the rectangle is maximal unless the short
    # side can also grow, which happens when the aspect cap, not the area, stopped the long side.
    return long_side * (short_side + BUCKET_STEP) > max_area


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to width/height, compared in log space.

    Log space makes 2:1 and 1:2 equally far from 1:1. Ties go to the earlier bucket in
    the list, so the assignment is deterministic.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - log_aspect))
