"""Where a run is and what it has measured so far: saved in every state, read back on resume, summarised at the
end of the run."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field


@dataclass
class Progress:
    """The run's position and history; saved in every state (the clocks excepted)."""

    global_step: int = 0
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    skipped_updates: list[tuple[int, str]] = field(default_factory=list)  # (step, why the update was skipped)
    nonfinite_in_a_row: int = 0
    failed_images: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, reason): load failures
    last_state: str | None = None
    last_save_time: float = field(default_factory=time.monotonic)
    last_state_time: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict:
        """The checkpoints are left out: a resumed run lists the ones in its ckpts folder."""
        return {key: value for key, value in asdict(self).items() if key != "checkpoints" and not key.endswith("_time")}

    @classmethod
    def from_json(cls, data: dict) -> Progress:
        pairs = ("val_losses", "train_losses", "skipped_updates", "failed_images")
        return cls(**{**data, **{key: [tuple(entry) for entry in data[key]] for key in pairs}})

    def record_update(self, loss: float, trained: bool) -> str | None:
        """Count the step's outcome: a finite loss is kept; a NaN/inf one, or a step with no image to train on,
        skipped its update, and the reason is returned (and kept) for the log."""
        if math.isfinite(loss):
            self.train_losses.append((self.global_step, loss))
            self.nonfinite_in_a_row = 0
            return None
        if trained:
            self.nonfinite_in_a_row += 1
        reason = f"loss is {loss}" if trained else "no image of the step could be loaded"
        self.skipped_updates.append((self.global_step, reason))
        return reason

    def val_minimum(self) -> tuple[int, float] | None:
        """The (step, loss) of the lowest validation loss so far (the first one, on a tie)."""
        return min(self.val_losses, key=lambda entry: entry[1]) if self.val_losses else None

    def validations_since_minimum(self) -> int:
        """How many validations came after the lowest one (0: the last validation is the lowest so far)."""
        best = self.val_minimum()
        return sum(step > best[0] for step, _ in self.val_losses) if best else 0

    def recent_train_loss(self, window: int) -> float:
        """The mean of the last `window` finite training losses (the progress bar's figure)."""
        recent = [value for _, value in self.train_losses[-window:]]
        return sum(recent) / len(recent) if recent else math.nan


def show_step(logger, bar, progress: Progress, plan, log_step: int, loss: float, lrs: dict, images_per_second: float):
    """One step's row in metrics.csv (and TensorBoard every `log_step` steps) and the progress bar's figures.
    `lrs`: the LR each param group trained with, by group name (logged as lr_<group>: lr_unet, lr_text_encoder,
    lr_text_encoder_2)."""
    step = progress.global_step
    measured = {"loss_train": loss, **{f"lr_{group}": lr for group, lr in lrs.items()}}
    logger.log(step, plan.epochs_at(step), step % log_step == 0, images_per_second=images_per_second, **measured)
    # refresh=False: update() redraws at most every mininterval (0.1 s), not at every step.
    bar.set_postfix(
        loss=f"{progress.recent_train_loss(log_step):.4f}",
        lr=f"{lrs.get('unet', next(iter(lrs.values()), math.nan)):.3g}",  # the UNet's; a frozen UNet has none
        img_s=f"{images_per_second:.1f}",
        refresh=False,
    )
    bar.update(1)
