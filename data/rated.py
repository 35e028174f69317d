"""Rated data sets (ED2's `rated_dataset`): later epochs train fewer images, the better rated ones more often.

ED2's rule (train.py, data/every_dream.py EveryDreamBatch.shuffle, data/data_loader.py DataLoaderMultiAspect):
- `rated_dataset_target_dropout_percent` P (0 to 100, default 50) gives the shrink t = 1 - P/100.
- Epoch 0 trains the whole set. After epoch n (0-based) ends, the next epoch trains the share
  (max_epochs - n x t) / max_epochs of the images: epochs 0 and 1 the whole set, then a share that falls by
  t / max_epochs an epoch; the last epoch, max_epochs - 1, trains (max_epochs - (max_epochs - 2) x t) / max_epochs
  (60% for 10 epochs at P = 50: the P% target itself is never reached).
- A share of 1 is a normal epoch, multipliers applied. A share below 1 trains ceil(N x share) of the N training
  images, each once: no multiplied copies in those epochs. The images are drawn without putting back, each with a
  chance that follows its rating ("double that rating -> double the chance").
- `rating` comes from an image's .yaml, a local.yaml / global.yaml or a manifest entry; unset (or 0) is 1.

EveryCycle trains the same number of images in every epoch as ED2. So that the number of batches of every epoch is
known before training (the RunPlan, the LR schedule and its preview count them), each batch group (an aspect bucket,
or a batch_id within it) gets a fixed share of an epoch's picks: the sum of its images' chances were each picked in
proportion to its rating (capped at certain; data/multiply.py inclusion_chances), rounded by the largest-remainder
method. In ED2 the picks fell into buckets by chance, so its batches per epoch varied. Within a group the picks are
drawn as ED2 draws them, one at a time without putting back, by rating, from (seed, epoch): with a single group
(every image in one bucket) the choice follows ED2's distribution exactly. Images with multiply 0 are left out here
as in every epoch (ED2 read multiply 0 as 1).
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from data.multiply import inclusion_chances, largest_remainder_shares


@dataclass(frozen=True)
class RatedEpochs:
    """The run's rated data set settings: the epoch count the shrink is spread over, and ED2's target percent."""

    max_epochs: int
    target_dropout_percent: float

    def share(self, epoch: int) -> float:
        """ED2's dropout_fraction for `epoch` (0-based): the share of the images it trains; 1: all, multiplied."""
        # A run that a schedule lengthens past max_epochs (lr_end_at_low) trains its later epochs as the last one.
        epoch = min(epoch, self.max_epochs - 1)
        if epoch <= 1:  # ED2 trains epoch 0 whole, and the shuffle after it (epoch_n 0) gives a share of 1
            return 1.0
        ended = epoch - 1  # ED2's epoch_n: the shuffle for this epoch runs when that one ends
        shrink = 1.0 - (self.target_dropout_percent / 100.0)  # ED2 train.py: rated_dataset_dropout_target
        return (self.max_epochs - (ended * shrink)) / self.max_epochs

    def picked_count(self, epoch: int, num_images: int) -> int | None:
        """Images `epoch` trains, each once, out of `num_images`; None: a whole epoch, multipliers applied."""
        share = self.share(epoch)
        if share >= 1.0:
            return None
        # ED2's __pick_random_subset: math.ceil(num_images * dropout_fraction), kept within [0, num_images].
        return max(min(math.ceil(num_images * share), num_images), 0)


def picks_per_group(ratings_by_group: Sequence[Sequence[float]], count: int) -> list[int]:
    """Each group's fixed number of the epoch's `count` picks, for the groups' ratings (0: never picked)."""
    everything = [rating for group in ratings_by_group for rating in group]
    chances = iter(inclusion_chances(everything, count))
    sums = [math.fsum(next(chances) for _ in group) for group in ratings_by_group]
    return largest_remainder_shares(sums, count)


def draw_by_rating(ratings: Sequence[float], count: int, rng: random.Random) -> list[int]:
    """Indices of `count` of the ratings (0: never picked), sorted, drawn as ED2's __pick_random_subset draws: one at
    a time without putting back, each with a chance in proportion to its rating among those left.

    Efraimidis and Spirakis's keys give that distribution in one pass: the `count` largest of u ** (1 / rating), u
    uniform; compared as log(u) / rating, which does not underflow for small ratings (1 - random() is never 0).
    """
    keys = [(math.log(1.0 - rng.random()) / rating, index) for index, rating in enumerate(ratings) if rating > 0]
    return sorted(index for _, index in heapq.nlargest(count, keys))
