"""The graphs our users look at first: the LR over the run and the losses (train and validation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402

# A curve of more steps than this is drawn (and previewed) at evenly spaced steps: a plot cannot show more, and a
# table of millions of rows would make the preview slow.
PLOTTED_POINTS = 100_000


def plotted_steps(total_steps: int) -> list[int]:
    """Every step of the run, or for a run of more than PLOTTED_POINTS steps evenly spaced ones, the first and the
    last step among them: at most PLOTTED_POINTS steps either way."""
    if total_steps <= PLOTTED_POINTS:
        return list(range(total_steps))
    stride = math.ceil(total_steps / (PLOTTED_POINTS - 1))
    return list(range(0, total_steps - 1, stride)) + [total_steps - 1]


def _epoch_ticks(axis, total_steps: int, steps_per_epoch: int | None) -> None:
    """A secondary x axis in epochs, so stepsize rules (k x epoch size) can be read off the plot."""
    if not steps_per_epoch:
        return
    top = axis.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
    top.set_xlabel("epoch")


def plot_lr(
    steps: Sequence[int],
    series: dict[str, Sequence[float]],
    path: Path,
    steps_per_epoch: int | None = None,
    title: str = "Learning rate",
) -> Path:
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


def plot_losses(
    train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: Path, steps_per_epoch: int | None = None
) -> Path:
    figure, axis = plt.subplots(figsize=(9, 4))
    if train:
        steps, values = zip(*train, strict=True)
        axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (raw)")
        axis.plot(steps, _moving_average(values, 25), color="tab:blue", label="train (moving average)")
    if val:
        steps, values = zip(*val, strict=True)
        axis.plot(steps, values, "o-", color="tab:orange", markersize=3, label="validation (stabilized)")
        best = min(range(len(values)), key=values.__getitem__)
        axis.annotate(
            f"min {values[best]:.4f} @ {steps[best]}",
            (steps[best], values[best]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="tab:orange",
        )
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
