"""The RunPlan: the single source of truth for "how many steps".

The schedule preview, the LR finder, the progress bar, checkpoint cadence and resume all read it.
A step is an optimizer step: `grad_accum` micro-batches (the last step of an epoch may have fewer).
Every epoch has the same number of micro-batches, except with a rated data set (data/rated.py), whose later
epochs train fewer images: the plan then holds each epoch's count, and the steps of the run are their sum.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property


@dataclass(frozen=True)
class RunPlan:
    epoch_batches: tuple[int, ...]  # micro-batches of epochs 0, 1, ...; the last count holds for every later epoch
    grad_accum: int
    total_steps: int

    def batches_in_epoch(self, epoch: int) -> int:
        return self.epoch_batches[min(epoch, len(self.epoch_batches) - 1)]

    def steps_in_epoch(self, epoch: int) -> int:
        return math.ceil(self.batches_in_epoch(epoch) / self.grad_accum)

    @property
    def steps_per_epoch(self) -> int:
        """The steps of the first epoch: of every epoch, unless a rated data set shortens later ones. It is the unit
        that keys given in epochs (validation every_n_epochs, sample_every_n_epochs, lr_stepsize_epochs) and the
        plots' epoch axis convert with, as ED2's epoch_len (the first epoch's steps) is."""
        return self.steps_in_epoch(0)

    @property
    def varies(self) -> bool:
        """Whether epochs differ in steps (a rated data set)."""
        return len({self.steps_in_epoch(epoch) for epoch in range(len(self.epoch_batches))}) > 1

    @cached_property
    def _listed_starts(self) -> tuple[int, ...]:
        """The first step of each epoch of epoch_batches."""
        steps = (self.steps_in_epoch(epoch) for epoch in range(len(self.epoch_batches) - 1))
        return (0, *itertools.accumulate(steps))

    def first_step_of(self, epoch: int) -> int:
        """The run's step number at which epoch (0-based) starts."""
        last = len(self.epoch_batches) - 1
        if epoch <= last:
            return self._listed_starts[epoch]
        return self._listed_starts[last] + (epoch - last) * self.steps_in_epoch(last)

    def epoch_of(self, step: int) -> int:
        """The epoch that step (0-based: the step about to be taken) falls in."""
        last = len(self.epoch_batches) - 1
        if step >= self._listed_starts[last]:
            return last + (step - self._listed_starts[last]) // self.steps_in_epoch(last)
        return bisect.bisect_right(self._listed_starts, step) - 1

    def epochs_at(self, step: int) -> float:
        """Epochs done after `step` steps, counting the current epoch's share: 2.5 is half-way through epoch 3."""
        epoch = self.epoch_of(step)
        return epoch + (step - self.first_step_of(epoch)) / self.steps_in_epoch(epoch)

    @property
    def epochs(self) -> int:
        """Epochs started by the run (the last one may be partial)."""
        return self.epoch_of(self.total_steps - 1) + 1 if self.total_steps else 0

    @property
    def total_epochs_exact(self) -> float:
        return self.epochs_at(self.total_steps)

    def micro_batches_of(self, step_in_epoch: int, epoch: int = 0) -> range:
        """The indices, within the epoch's batch list, of the micro-batches that make up this step (epoch: needed
        only where epochs differ, for the last step of a shorter epoch)."""
        start = step_in_epoch * self.grad_accum
        return range(start, min(start + self.grad_accum, self.batches_in_epoch(epoch)))

    def with_total_steps(self, total_steps: int) -> RunPlan:
        return replace(self, total_steps=total_steps)


def plan_run(
    batches_per_epoch: int | Sequence[int], grad_accum: int, max_epochs: int | None, max_steps: int | None
) -> RunPlan:
    """The run length from the config; a schedule may still change it (stages, ending on a low point).
    batches_per_epoch: one count for every epoch, or each epoch's (the last holding for every later one)."""
    counts = (batches_per_epoch,) if isinstance(batches_per_epoch, int) else tuple(batches_per_epoch)
    if not counts or min(counts) < 1:
        raise ValueError("no training batches: the data set has no usable training images")
    plan = RunPlan(epoch_batches=counts, grad_accum=grad_accum, total_steps=0)
    return plan.with_total_steps(max_steps if max_steps is not None else plan.first_step_of(max_epochs or 0))
