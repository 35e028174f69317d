"""The RunPlan: the single source of truth for "how many steps".

The schedule preview, the LR finder, the progress bar, checkpoint cadence and resume all read it.
A step is an optimizer step: `grad_accum` micro-batches (the last step of an epoch may have fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RunPlan:
    batches_per_epoch: int  # micro-batches in one pass over the training items
    grad_accum: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.batches_per_epoch / self.grad_accum)

    @property
    def epochs(self) -> int:
        """Epochs started by the run (the last one may be partial)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    @property
    def total_epochs_exact(self) -> float:
        return self.total_steps / self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches_of(self, step_in_epoch: int) -> range:
        """The indices, within the epoch's batch list, of the micro-batches that make up this step."""
        start = step_in_epoch * self.grad_accum
        return range(start, min(start + self.grad_accum, self.batches_per_epoch))

    def with_total_steps(self, total_steps: int) -> RunPlan:
        return replace(self, total_steps=total_steps)


def plan_run(batches_per_epoch: int, grad_accum: int, max_epochs: int | None, max_steps: int | None) -> RunPlan:
    """The run length from the config; a schedule may still change it (stages, ending on a low point)."""
    if batches_per_epoch < 1:
        raise ValueError("no training batches: the data set has no usable training images")
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total = max_steps if max_steps is not None else (max_epochs or 0) * steps_per_epoch
    return RunPlan(batches_per_epoch=batches_per_epoch, grad_accum=grad_accum, total_steps=total)
