"""From a config to the training and validation items: scan, skip the bad, split. No model needed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from data.images import IMAGE_EXTENSIONS, ImageItem, ScanResult, scan_images
from data.loader import BucketBatches
from data.multiply import fraction
from data.rated import RatedEpochs
from data.sidecars import DataSettingsError
from data.split import split_items, validation_count
from utils.config import ConfigError, TrainConfig

IMAGE_KINDS = ", ".join(sorted(extension.lstrip(".") for extension in IMAGE_EXTENSIONS))
EXTRA_VALIDATION_KEY = "validation_config.extra_manual_datasets"
EMPTY_CAPTION_NOTE = "empty caption (the image is used with no text, like a dropped caption)"


@dataclass
class PreparedData:
    train: list[ImageItem]
    val: list[ImageItem]
    skipped: list  # SkippedImage(path, reason), from data_root and every validation folder
    found: int
    batches: BucketBatches
    # Notes from the scans: ED2 keys that are not used, unknown keys, undecodable text, folder links not followed.
    notes: list[str] = field(default_factory=list)
    # Images of any set (training or validation) whose caption is empty: each is a warning of its own.
    empty_captions: list[Path] = field(default_factory=list)
    # ED2's extra_manual_datasets, by name, as validation items; a folder without images is left out.
    extra_validation: dict[str, list[ImageItem]] = field(default_factory=dict)

    @property
    def warnings(self) -> list[str]:
        """Every data warning, one line each: what the trainer writes to data_warnings.txt."""
        return self.notes + [f"{EMPTY_CAPTION_NOTE}: {path}" for path in self.empty_captions]

    def batches_per_process(self, num_processes: int) -> int:
        """Micro-batches each of `num_processes` trains per epoch (the first, with a rated data set): the epoch's
        batches are dealt out across them, so one optimizer step of the group trains num_processes x batch_size x
        grad_accum images."""
        return self.epoch_batches_per_process(num_processes)[0]

    def epoch_batches_per_process(self, num_processes: int) -> tuple[int, ...]:
        """batches_per_process of each epoch, for the RunPlan: one count, or with a rated data set one per epoch
        up to max_epochs (a later epoch has as many as the last)."""
        try:
            return self.batches.batches_per_rank_by_epoch(num_processes)
        except ValueError as error:
            raise ConfigError(f"key 'batch_size' = {self.batches.batch_size}: {error}.") from None

    def global_batch_line(self, num_processes: int, grad_accum: int) -> str:
        """What one optimizer step of a group of processes trains, in words."""
        per_step = num_processes * self.batches.batch_size * grad_accum
        return (
            f"{num_processes} processes: a step trains {num_processes} x batch_size {self.batches.batch_size} x "
            f"grad_accum {grad_accum} = {per_step} images (global batch)"
        )

    def summary(self) -> str:
        """One line of counts, then one 'warning:' line per note, and the number of empty captions (not each)."""
        counts = (
            f"images: {self.found} found, {len(self.skipped)} skipped, {len(self.train)} train, "
            f"{len(self.val)} held out for validation; {self.batches.samples_per_epoch} samples "
            f"(with multipliers) in {self.batches.num_batches} batches per epoch"
        )
        lines = [counts] + ([self.rated_line()] if self.batches.rated else [])
        lines += [f"warning: {line}" for line in self.notes]
        if self.empty_captions:
            lines.append(
                f"warning: {len(self.empty_captions)} image(s) with an {EMPTY_CAPTION_NOTE}, each listed in "
                f"data_warnings.txt"
            )
        return "\n".join(lines)

    def rated_line(self) -> str:
        """A rated data set's shrinking epochs, in words (their steps are in the RunPlan and the preview)."""
        batches = self.batches
        last = batches.planned_epochs - 1
        if batches.picked_count(last) is None:
            return (
                "rated data set: every epoch trains the whole set (epochs shrink only from epoch 3, with "
                "max_epochs 3 or more and rated_dataset_target_dropout_percent below 100)"
            )
        return (
            f"rated data set: from epoch 3 an epoch trains a falling share of the {batches.rated_images} images, "
            f"each once, picked by rating; the last, epoch {last + 1}, trains {batches.samples_in_epoch(last)} "
            f"in {batches.batches_in_epoch(last)} batches"
        )


@dataclass
class _Gathered:
    """What the scans of data_root and every validation folder reported, gathered for PreparedData."""

    skipped: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, result: ScanResult) -> list[ImageItem]:
        """result's images; its skipped images and notes are kept."""
        self.skipped += result.skipped
        self.notes += result.warnings
        return result.items


def _scan(root: str, key: str) -> ScanResult:
    try:
        return scan_images(Path(root))
    except DataSettingsError as error:
        raise ConfigError(f"key '{key}' = '{root}': {error}") from None


def _scan_with_images(root: str, key: str) -> ScanResult:
    """The scan of a folder or manifest that must hold usable images."""
    result = _scan(root, key)
    if not result.items:
        reasons = "".join(f"\n  {s.path}: {s.reason}" for s in result.skipped[:10])
        raise ConfigError(
            f"key '{key}' = '{root}': no usable images found ({IMAGE_KINDS}, in the folder "
            f"and its subfolders, or listed in the .json manifest)." + (f" Skipped:{reasons}" if reasons else "")
        )
    return result


def _extra_validation(folders: dict[str, str], gathered: _Gathered) -> dict[str, list[ImageItem]]:
    """The images of each extra validation folder, by name. A folder without any is left out with a note: a loss
    over no images would be logged as a 0.0 that was never measured."""
    extra = {}
    for name, folder in folders.items():
        key = f"{EXTRA_VALIDATION_KEY}.{name}"
        _require_folder(folder, key)
        items = gathered.add(_scan(folder, key))
        if items:
            extra[name] = [as_validation_item(item) for item in items]
        else:
            gathered.notes.append(
                f"key '{key}' = '{folder}': no usable images found ({IMAGE_KINDS}); nothing is logged for '{name}'"
            )
    return extra


def _require_folder(folder: str, key: str) -> None:
    # Checked here, before any model loads, rather than found missing after minutes of loading.
    path = Path(folder)
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "no such folder"
        raise ConfigError(
            f"key '{key}' = '{folder}': {problem}. Give a folder of validation images ({IMAGE_KINDS}, searched "
            f"with its subfolders), or remove the entry."
        )


def as_validation_item(item: ImageItem) -> ImageItem:
    """Validation sees each image once per pass, never flipped, dropped or shuffled, whatever its files say."""
    return replace(item, multiply=1.0, flip_p=0.0, cond_dropout=0.0, shuffle_tags=False)


def ed2_data_notes(
    config: TrainConfig, found: list[ImageItem], train: list[ImageItem], batches: BucketBatches
) -> list[str]:
    """For an ED2 config: where its data is read differently from ED2, on purpose (docs/ed2.md)."""
    notes = []
    if any(fraction(item.multiply) for item in train):
        notes.append(
            f"ED2: fractional multipliers give {batches.samples_per_epoch} samples an epoch, floor of the "
            f"summed multipliers as in ED2; each bucket gets a fixed share of the extra copies (ED2 spread "
            f"them by chance, so its steps per epoch varied)"
        )
    left_out = sum(item.multiply == 0 for item in train)
    if left_out:
        notes.append(f"ED2: {left_out} image(s) with multiply 0 are left out (ED2 read 0 as 1 and trained them once)")
    if batches.smaller_batches:
        notes.append(
            f"ED2: {batches.smaller_batches} batch(es) an epoch are smaller than batch_size, not filled up "
            f"with repeated images as in ED2"
        )
    settings = config.validation
    if settings.enabled and settings.val_split_mode == "automatic":
        ours, ed2s = len(found) - len(train), max(1, math.ceil(settings.auto_split_proportion * len(found)))
        if ours != ed2s and ours == validation_count(len(found), settings.auto_split_proportion):
            notes.append(
                f"ED2: the automatic split holds out {ours} image(s), ceil({settings.auto_split_proportion} x "
                f"{len(found)}) without float noise (ED2 held out {ed2s})"
            )
    if batches.rated and batches.picked_count(batches.planned_epochs - 1) is not None:
        notes.append(
            "ED2: rated data set: each bucket gets a fixed share of an epoch's picks (ED2's fell into the buckets "
            "by chance, so its steps per epoch varied, and its automatic lr_decay_steps counted max_epochs whole "
            "epochs); every epoch's steps are known before training and lr_decay_steps null is 1.5 x the real run"
        )
    if config.grad_accum > 1 and any(item.batch_id for item in train):
        notes.append(
            f"ED2: images with a batch_id share batches; with grad_accum {config.grad_accum} those batches "
            f"are not gathered into the same optimizer step as in ED2"
        )
    return notes


def prepare_data(config: TrainConfig) -> PreparedData:
    settings = config.validation
    gathered = _Gathered()
    found = gathered.add(_scan_with_images(config.data_root, "data_root"))
    manual, extra = None, {}
    if settings.enabled:
        if settings.val_split_mode == "manual":
            manual = gathered.add(_scan_with_images(settings.manual_data_root, "validation_config.manual_data_root"))
        extra = _extra_validation(settings.extra_manual_datasets, gathered)
    mode = settings.val_split_mode if settings.enabled else "none"
    train, val = split_items(found, mode, settings.auto_split_proportion, settings.seed, manual)
    rated = None
    if config.rated_dataset:
        rated = RatedEpochs(config.max_epochs, config.rated_dataset_target_dropout_percent)
    try:
        batches = BucketBatches(train, config.batch_size, config.resolution, rated)
    except ValueError as error:  # e.g. every training image has multiply 0
        raise ConfigError(f"key 'data_root' = '{config.data_root}': {error}") from None
    every_item = [*train, *val, *(item for items in extra.values() for item in items)]
    notes = gathered.notes + (ed2_data_notes(config, found, train, batches) if config.from_ed2 else [])
    return PreparedData(
        train=train,
        val=[as_validation_item(item) for item in val],
        skipped=gathered.skipped,
        found=len(found),
        batches=batches,
        notes=notes,
        empty_captions=[item.path for item in every_item if not item.caption],
        extra_validation=extra,
    )
