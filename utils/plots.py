"""The graphs our users look at first: the LR over the run and the losses (train and validation)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def _epoch_ticks(axis, total_steps: int, steps_per_epoch: Optional[int]) -> None:
    """A secondary x axis in epochs, so stepsize rules (k x epoch size) can be read off the plot."""
    if not steps_per_epoch:
        return
    top = axis.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
    top.set_xlabel("epoch")


def plot_lr(steps: Sequence[int], series: dict[str, Sequence[float]], path: Path,
            steps_per_epoch: Optional[int] = None, title: str = "Learning rate") -> Path:
    figure, axis = plt.subplots(figsize=(9, 4))
    for label, values in series.items():
        axis.plot(steps, values, label=label, linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("learning rate")
    axis.set_title(title)
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axis.grid(alpha=0.3)
    if len(series) > 1:
        axis.legend()
    _epoch_ticks(axis, len(steps), steps_per_epoch)
    return _save(figure, path)


def plot_losses(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: Path,
                steps_per_epoch: Optional[int] = None) -> Path:
    figure, axis = plt.subplots(figsize=(9, 4))
    if train:
        steps, values = zip(*train)
        axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
        axis.plot(steps, _moving_average(values, 25), color="tab:blue", label="train (moving average)")
    if val:
        steps, values = zip(*val)
        axis.plot(steps, values, "o-", color="tab:orange", markersize=3, label="validation (stabilized)")
        best = min(range(len(values)), key=values.__getitem__)
        axis.annotate(f"min {values[best]:.4f} @ {steps[best]}", (steps[best], values[best]),
                      textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8, color="tab:orange")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title("Loss")
    axis.grid(alpha=0.3)
    axis.legend()
    _epoch_ticks(axis, 0, steps_per_epoch)
    return _save(figure, path)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
