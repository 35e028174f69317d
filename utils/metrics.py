"""Run logs: metrics.csv (for our plots and compare.py) and TensorBoard, written by the main process only."""

from __future__ import annotations

import contextlib
import csv
import math
from pathlib import Path

# lr_<group>: the LR of each optimizer param group (optimizer/optimizers.py model_param_groups names them).
METRIC_COLUMNS = (
    "step",
    "epoch",
    "lr_unet",
    "lr_text_encoder",
    "lr_text_encoder_2",
    "loss_train",
    "loss_val",
    "images_per_second",
)
TENSORBOARD_TAGS = {
    "lr_unet": "lr/unet",
    "lr_text_encoder": "lr/text_encoder",
    "lr_text_encoder_2": "lr/text_encoder_2",
    "loss_train": "loss/train",
    "loss_val": "loss/val",
    "images_per_second": "performance/images_per_second",
}


WANDB_RUN_ID_FILE = "wandb_run_id.txt"  # a resumed run logs on into the same Weights & Biases run


def start_wandb(run_dir: Path, project: str, settings: dict):
    """A Weights & Biases run for this run folder (the package is an optional extra, checked when the config
    loads); its files go under <run_dir>/wandb. WANDB_MODE=offline keeps everything local."""
    import wandb

    id_file = Path(run_dir) / WANDB_RUN_ID_FILE
    run = wandb.init(
        project=project,
        name=Path(run_dir).name,
        id=id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else None,
        resume="allow",
        dir=str(run_dir),
        config=settings,
        settings=wandb.Settings(quiet=True, console="off"),  # our console stays ours; the run page has the rest
    )
    id_file.write_text(run.id + "\n", encoding="utf-8")
    return run


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, purge_step: int | None = None, wandb_run=None):
        """`purge_step`: a resumed run hides the TensorBoard events its interrupted run wrote from that step on.
        `wandb_run`: a Weights & Biases run that receives what TensorBoard receives."""
        self.enabled = enabled
        self._wandb = wandb_run
        self.error: OSError | None = None  # the first metrics.csv write that failed (a full disk); none after it
        self.csv_path = Path(run_dir) / "metrics.csv"
        self._writer = None
        self._csv = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            columns = _header_of(self.csv_path)
            self._csv = open(self.csv_path, "a", newline="", encoding="utf-8")
            # A resumed run appends under the header its file has (one written before lr_text_encoder_2 existed
            # lacks that column, which such a run never filled).
            self._rows = csv.DictWriter(self._csv, fieldnames=columns or METRIC_COLUMNS, extrasaction="ignore")
            if not columns:
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
        scalars = {TENSORBOARD_TAGS[key]: value for key, value in values.items() if _finite(value)}
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        if self._wandb:
            self._wandb.log(scalars, step=step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar (extra validation sets), beside the fixed metrics.csv columns."""
        if self.enabled and math.isfinite(value):
            self._writer.add_scalar(tag, value, step)
            if self._wandb:
                self._wandb.log({tag: value}, step=step)

    def image(self, tag: str, array_hwc, step: int) -> None:
        if self.enabled:
            self._writer.add_image(tag, array_hwc, step, dataformats="HWC")
            if self._wandb:
                import wandb

                self._wandb.log({tag: wandb.Image(array_hwc)}, step=step)

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            if self._wandb:
                self._wandb.finish()
            with contextlib.suppress(OSError):  # a full disk was reported when it happened
                self._csv.close()


def _header_of(csv_path: Path) -> list[str] | None:
    """The column names of an existing metrics.csv (None for a new or empty file)."""
    if not csv_path.is_file():
        return None
    with open(csv_path, newline="", encoding="utf-8") as handle:
        return next(csv.reader(handle), None)


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


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
