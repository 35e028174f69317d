"""From a config to the training and validation items: scan, skip the bad, split. No model needed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from data.images import ImageItem, ScanResult, scan_images
from data.loader import BucketBatches
from data.sidecars import DataSettingsError
from data.split import split_items
from utils.config import ConfigError, TrainConfig


@dataclass
class PreparedData:
    train: list[ImageItem]
    val: list[ImageItem]
    skipped: list  # SkippedImage(path, reason), from data_root and the manual validation folder
    found: int
    batches: BucketBatches
    # Notes from the settings files: ED2 keys that are not used, unknown keys, undecodable text.
    warnings: list[str] = field(default_factory=list)

    def batches_per_process(self, num_processes: int) -> int:
        """Micro-batches each of `num_processes` trains per epoch: the epoch's batches are dealt out across them, so
        one optimizer step of the group trains num_processes x batch_size x grad_accum images."""
        try:
            return self.batches.batches_per_rank(num_processes)
        except ValueError as error:
            raise ConfigError(f"key 'batch_size' = {self.batches.batch_size}: {error}.") from None

    def global_batch_line(self, num_processes: int, grad_accum: int) -> str:
        """What one optimizer step of a group of processes trains, in words."""
        per_step = num_processes * self.batches.batch_size * grad_accum
        return (f"{num_processes} processes: a step trains {num_processes} x batch_size {self.batches.batch_size} x "
                f"grad_accum {grad_accum} = {per_step} images (global batch)")

    def summary(self) -> str:
        """One line of counts, then one 'warning:' line per note from the settings files."""
        counts = (
            f"images: {self.found} found, {len(self.skipped)} skipped, {len(self.train)} train, "
            f"{len(self.val)} held out for validation; {self.batches.samples_per_epoch} samples "
            f"(with multipliers) in {self.batches.num_batches} batches per epoch"
        )
        return "\n".join([counts] + [f"warning: {line}" for line in self.warnings])


def _scan(data_root: str, key: str) -> ScanResult:
    try:
        result = scan_images(Path(data_root))
    except DataSettingsError as error:
        raise ConfigError(f"key '{key}' = '{data_root}': {error}") from None
    if not result.items:
        reasons = "".join(f"\n  {s.path}: {s.reason}" for s in result.skipped[:10])
        raise ConfigError(
            f"key '{key}' = '{data_root}': no usable images found (jpg, jpeg, png, webp, bmp, in the folder "
            f"and its subfolders, or listed in the .json manifest)." + (f" Skipped:{reasons}" if reasons else "")
        )
    return result


def as_validation_item(item: ImageItem) -> ImageItem:
    """Validation sees each image once per pass, never flipped, dropped or shuffled, whatever its files say."""
    return replace(item, multiply=1.0, flip_p=0.0, cond_dropout=0.0, shuffle_tags=False)


def prepare_data(config: TrainConfig) -> PreparedData:
    scanned = _scan(config.data_root, "data_root")
    settings = config.validation
    skipped = list(scanned.skipped)
    warnings = list(scanned.warnings)
    manual = None
    if settings.enabled and settings.val_split_mode == "manual":
        manual_scan = _scan(settings.manual_data_root, "validation_config.manual_data_root")
        manual, skipped = manual_scan.items, skipped + list(manual_scan.skipped)
        warnings += manual_scan.warnings
    mode = settings.val_split_mode if settings.enabled else "none"
    train, val = split_items(scanned.items, mode, settings.auto_split_proportion, settings.seed, manual)
    try:
        batches = BucketBatches(train, config.batch_size, config.resolution)
    except ValueError as error:  # e.g. every training image has multiply 0
        raise ConfigError(f"key 'data_root' = '{config.data_root}': {error}") from None
    return PreparedData(train=train, val=[as_validation_item(item) for item in val], skipped=skipped,
                        found=len(scanned.items), batches=batches, warnings=warnings)
