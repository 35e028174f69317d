"""A JSON manifest as data_root: an explicit list of images with their captions and settings.

    [{"image": "photos/alice.png", "caption": "alice, red hair", "multiply": 2},
     {"image": "photos/bob.png", "caption": {"main_prompt": "bob", "tags": ["beard"]}},
     {"image": "/abs/carol.png", "caption": "captions/carol.yaml"},
     {"image": "photos/dana.png", "main_prompt": "dana", "tags": [{"tag": "hat", "weight": 2}]}]

Relative paths are taken from the manifest's folder. An entry takes the keys of a YAML sidecar
(see data/sidecars.py) beside "image". "caption" is a caption text, an object of sidecar keys,
or the path of a .txt/.caption/.yaml/.yml file (used when such a file exists). ED2 lost the image
path of every entry with a "caption" key; here it is kept.

An entry is applied like an image sidecar that wins over the image's own sidecar files, so an
entry without a caption still gets the one beside its image (or its file name). Folder files
(multiply.txt, local.yaml, global.yaml) are not read for manifest images: the manifest is the list.
A listed image that is missing is skipped and reported like a broken one. An image listed again (by the
same path or another path to the same file, such as a link) is counted once: the later entries are left out
with a warning, so it cannot land in both the training and the validation split.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.sidecars import (
    CAPTION_EXTENSIONS,
    CAPTION_KEY,
    YAML_EXTENSIONS,
    DataSettingsError,
    ItemSettings,
    SettingsReport,
    beside_caption,
    is_present,
    read_caption_or_settings_file,
    settings_from_mapping,
)

IMAGE_KEY = "image"
_CAPTION_FILE_EXTENSIONS = frozenset(CAPTION_EXTENSIONS + YAML_EXTENSIONS)


def is_manifest(data_root: Path) -> bool:
    return Path(data_root).suffix.lower() == ".json"


def read_manifest(manifest: Path, report: SettingsReport) -> list[tuple[Path, ItemSettings]]:
    """(image path, the entry's settings) for each well-formed entry of a file not listed before; the others go
    to report."""
    listed = []
    entry_of_file: dict[str, int] = {}  # real path -> the number of the entry that listed it first
    for number, entry in enumerate(_load_entries(manifest), start=1):
        source = f"{manifest} entry {number}"
        if not isinstance(entry, dict) or not isinstance(entry.get(IMAGE_KEY), str):
            report.errors.append(f'{source}: expected an object with an "image" path, got {json.dumps(entry)}')
            continue
        source = f"{source} ({entry[IMAGE_KEY]})"
        image = manifest.parent / entry[IMAGE_KEY]  # an absolute "image" path stays as it is
        first = entry_of_file.setdefault(os.path.realpath(image), number)
        if first != number:
            report.warnings.append(
                f"{source}: the same file as entry {first}; left out, so the image is counted"
                ' once ("multiply" trains an image more often)'
            )
            continue
        listed.append((image, _entry_settings(entry, manifest.parent, source, report)))
    return listed


def _load_entries(manifest: Path) -> list[Any]:
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except OSError as error:
        raise DataSettingsError(f"data_root manifest '{manifest}' cannot be read: {error}") from error
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataSettingsError(
            f"data_root manifest '{manifest}' is not valid JSON: {error.msg} at line {error.lineno}, "
            f"column {error.colno}"
        ) from None
    if not isinstance(entries, list):
        raise DataSettingsError(
            f'data_root manifest \'{manifest}\' must hold a list of {{"image": ..., "caption": ...}} '
            f"objects, not a {type(entries).__name__}"
        )
    return entries


def _entry_settings(entry: dict, base: Path, source: str, report: SettingsReport) -> ItemSettings:
    keys = {key: value for key, value in entry.items() if key != IMAGE_KEY}
    caption_file = _caption_file(keys.get(CAPTION_KEY), base)
    if caption_file is None:
        return settings_from_mapping(keys, source, report)
    del keys[CAPTION_KEY]
    try:
        from_file = read_caption_or_settings_file(caption_file, report)
    except OSError as error:
        report.errors.append(f"{source}: caption file unreadable: {error}")
        from_file = None
    entry_settings = settings_from_mapping(keys, source, report)
    # None: an undecodable caption file, read as if missing (the image's own sidecar or its file name then).
    return entry_settings if from_file is None else beside_caption(entry_settings, from_file)


def _caption_file(caption: Any, base: Path) -> Path | None:
    """The file a "caption" value names, or None when it is caption text (or not a text)."""
    if not isinstance(caption, str) or Path(caption).suffix.lower() not in _CAPTION_FILE_EXTENSIONS:
        return None
    path = base / caption
    return path if is_present(path) else None
