"""From a config to the training and validation items: scan, skip the bad, split. No model needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.images import ImageItem, ScanResult, scan_images
from data.loader import BucketBatches
from data.split import split_items
from utils.config import ConfigError, TrainConfig


@dataclass
class PreparedData:
    train: list[ImageItem]
    val: list[ImageItem]
    skipped: list  # SkippedImage(path, reason), from data_root and the manual validation folder
    found: int
    batches: BucketBatches

    def summary(self) -> str:
        return (f"images: {self.found} found, {len(self.skipped)} skipped, {len(self.train)} train, "
                f"{len(self.val)} held out for validation; {self.batches.num_batches} batches per epoch")


def _scan(folder: str, key: str) -> ScanResult:
    result = scan_images(Path(folder))
    if not result.items:
        reasons = "".join(f"\n  {s.path}: {s.reason}" for s in result.skipped[:10])
        raise ConfigError(
            f"key '{key}' = '{folder}': no usable images found (jpg, jpeg, png, webp, bmp, searched recursively)."
            + (f" Skipped:{reasons}" if reasons else "")
        )
    return result


def prepare_data(config: TrainConfig) -> PreparedData:
    scanned = _scan(config.data_root, "data_root")
    settings = config.validation
    skipped = list(scanned.skipped)
    manual = None
    if settings.enabled and settings.val_split_mode == "manual":
        manual_scan = _scan(settings.manual_data_root, "validation_config.manual_data_root")
        manual, skipped = manual_scan.items, skipped + list(manual_scan.skipped)
    mode = settings.val_split_mode if settings.enabled else "none"
    train, val = split_items(scanned.items, mode, settings.auto_split_proportion, settings.seed, manual)
    batches = BucketBatches(train, config.batch_size, config.resolution)
    return PreparedData(train=train, val=val, skipped=skipped, found=len(scanned.items), batches=batches)
