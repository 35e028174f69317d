"""Captions as a main prompt plus tags, and how one training caption is built from them.

A caption text is split at commas: the first chunk is the main prompt, the rest are tags
("a photo of alice, red hair, smiling" -> "a photo of alice" + ["red hair", "smiling"]).
Empty chunks are dropped and the parts are joined again with ", ".

Building a training caption (ED2's rules, with its faults fixed):
- shuffle: the tags after the first keep_tags are put in a random order; the main prompt and
  the first keep_tags tags never move (ED2's keep_tags was a no-op). Tags with a weight (from
  YAML) tend to come earlier: the order is a weighted random permutation, so with
  max_caption_length a heavier tag is also more likely to survive the cut.
- max_caption_length (characters): tags are dropped from the end until the caption fits; the
  main prompt is never cut, even when it alone is longer.
The caller owns the random generator, so each sample of each epoch gets its own reproducible
order (ED2 used one permutation for every caption with the same tag count in an epoch).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

CAPTION_SEPARATOR = ","
JOINER = ", "


@dataclass(frozen=True)
class Tag:
    text: str
    weight: float = 1.0  # > 0; only matters when tags are shuffled


def split_caption(text: str) -> tuple[str, tuple[Tag, ...]]:
    """'main, tag a, tag b' -> ('main', (Tag('tag a'), Tag('tag b')))."""
    main_prompt, _, rest = text.partition(CAPTION_SEPARATOR)
    return main_prompt.strip(), tags_from_text(rest)


def tags_from_text(text: str) -> tuple[Tag, ...]:
    return tuple(Tag(chunk.strip()) for chunk in text.split(CAPTION_SEPARATOR) if chunk.strip())


def build_caption(
    main_prompt: str,
    tags: Sequence[Tag],
    *,
    keep_tags: int = 0,
    max_length: int | None = None,
    rng: random.Random | None = None,
) -> str:
    """The caption text; the tags after the first keep_tags are shuffled when rng is given."""
    ordered = list(tags)
    if rng is not None:
        ordered = ordered[:keep_tags] + _weighted_shuffle(ordered[keep_tags:], rng)
    return _join_within(main_prompt, [tag.text for tag in ordered], max_length)


def _weighted_shuffle(tags: list[Tag], rng: random.Random) -> list[Tag]:
    # Efraimidis-Spirakis: sorting by u ** (1 / weight) draws a permutation in which each next
    # tag is picked with probability proportional to its weight; equal weights give a uniform one.
    return sorted(tags, key=lambda tag: rng.random() ** (1.0 / tag.weight), reverse=True)


def _join_within(main_prompt: str, tag_texts: list[str], max_length: int | None) -> str:
    parts = [main_prompt] if main_prompt else []
    for text in tag_texts:
        # The first part always stays, so the cap never empties a caption.
        longer = JOINER.join(parts + [text])
        if max_length is not None and parts and len(longer) > max_length:
            break
        parts.append(text)
    return JOINER.join(parts)
