"""Run logs: metrics.csv (for our plots and compare.py) and TensorBoard, written by the main process only."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path

METRIC_COLUMNS = ("step", "epoch", "lr_unet", "lr_text_encoder", "loss_train", "loss_val", "images_per_second")
TENSORBOARD_TAGS = {
    "lr_unet": "lr/unet",
    "lr_text_encoder": "lr/text_encoder",
    "loss_train": "loss/train",
    "loss_val": "loss/val",
    "images_per_second": "performance/images_per_second",
}


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None):
        """`purge_step`: a resumed run hides the TensorBoard events its interrupted run wrote from that step on."""
        self.enabled = enabled
        self.error: OSError | None = None  # the first metrics.csv write that failed (a full disk); none after it
        self.csv_path = Path(run_dir) / "metrics.csv"
        self._writer = None
        self._csv = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            is_new = not self.csv_path.exists()
            self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
            self._rows = csv.DictWriter(self._csv, fieldnames=METRIC_COLUMNS)
            if is_new:
                self._rows.writeheader()

    def log(self, step: int, epoch: float, to_tensorboard: bool = True, **values: float | None) -> None:
        """One metrics.csv row; TensorBoard too when `to_tensorboard` (it is given fewer, averaged points)."""
        if not self.enabled or self.error:
            return
        try:
            self._rows.writerow({"step": step, "epoch": f"{epoch:.4f}", **{k: _fmt(v) for k, v in values.items()}})
            self._csv.flush()
        except OSError as error:  # the run stops on it (Trainer); a row cut short is dropped on resume
            self.error = error
            return
        if not to_tensorboard:
            return
        for key, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(TENSORBOARD_TAGS[key], value, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar (extra validation sets), beside the fixed metrics.csv columns."""
        if self.enabled and math.isfinite(value):
            self._writer.add_scalar(tag, value, step)

    def image(self, tag: str, array_hwc, step: int) -> None:
        if self.enabled:
            self._writer.add_image(tag, array_hwc, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            with contextlib.suppress(OSError):  # a full disk was reported when it happened
                self._csv.close()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.8g}"


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> [(step, value)] for the cells that hold a value."""
    series: dict[str, list[tuple[int, float]]] = {name: [] for name in METRIC_COLUMNS[2:]}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for name in series:
                if row.get(name):
                    series[name].append((int(row["step"]), float(row[name])))
    return series
