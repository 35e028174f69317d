"""Per-image settings from ED2-style files: image sidecars, per-folder files, local.yaml, global.yaml.

Where an image's settings come from, weakest first; a later source overrides an earlier one key
by key (ED2's order: global -> local -> image sidecar):
1. global.yaml / global.yml of data_root and of every folder down to the image's own, outermost
   first: a global.yaml applies to its folder and all subfolders, and a nearer one wins;
2. the image's folder only: multiply.txt, flip_p.txt, cond_dropout.txt, loss_scale.txt, batch_id.txt,
   shuffle_tags.txt (its presence turns shuffling on, whatever it holds), then local.yaml / .yml;
3. the image's own sidecars, every one it has, in ED2's order: <name>.txt, <name>.caption (caption
   text), <name>.yml, <name>.yaml (settings and caption); a later one's main prompt and settings win.
Tags add up instead of overriding: the image's own tags first (its later sidecars' first), then its
folder's, then each global.yaml's, nearest first; a tag already present is not repeated. The file
name up to the first '_' is the main prompt only when no source sets one. Global.yaml files above
data_root are not read.

YAML keys (also the keys of a JSON manifest entry, see data/manifest.py):
  main_prompt (text), tags (a list of texts or {tag, weight > 0}, or one comma-separated text),
  caption (text split like a .txt: first comma chunk main prompt, the rest tags; an explicit
  main_prompt or tags wins over that part of it), multiply (>= 0), flip_p and cond_dropout
  (0..1), shuffle_tags (true/false), keep_tags (whole number >= 0: tags that stay in place when
  shuffling), max_caption_length (whole number >= 1, characters), loss_scale (any finite number;
  negative values unlearn, as in ED2), batch_id (a name: images with the same one share batches),
  rating (a number >= 0, default 1: with rated_dataset, an image's chance to be picked in the epochs
  that train fewer images is in proportion to it, data/rated.py; 0 is read as 1, as ED2 does, with a note).
A missing key means "not set here"; the run's config value (flip_p, cond_dropout, shuffle_tags,
keep_tags) applies when no source sets one.

Bad values are errors, not warnings: a typo such as multiply "abc" or flip_p 2 would otherwise
change the balance of a long run without anyone noticing. Every bad value of the whole data set
is collected and reported at once, each with its file, key and value, before anything trains.
Unknown keys are warnings: the run goes on without them.

Text files are read as UTF-8, with or without a byte-order mark, or UTF-16/UTF-32 with one. A caption file in
none of these is read as if it were missing, with a warning; a settings file in none of these is an error. A
broken link in a sidecar's place is reported as unreadable, never taken for a missing file.
"""

from __future__ import annotations

import codecs
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from data.captions import Tag, split_caption, tags_from_text

CAPTION_EXTENSIONS = (".txt", ".caption")
YAML_EXTENSIONS = (".yaml", ".yml")
# An image's sidecars, each read on top of the ones before it (ED2's data/dataset.py Dataset.__sidecar_cfg folds
# them in this order): the .yaml's main prompt beats the .txt's, and the tags of all of them add up.
SIDECAR_ORDER = (".txt", ".caption", ".yml", ".yaml")
# Folder files: the first one of these that exists is read.
GLOBAL_FILES = ("global.yaml", "global.yml")
LOCAL_FILES = ("local.yaml", "local.yml")
FOLDER_VALUE_FILES = {
    "multiply.txt": "multiply",
    "flip_p.txt": "flip_p",
    "cond_dropout.txt": "cond_dropout",
    "loss_scale.txt": "loss_scale",
    "batch_id.txt": "batch_id",
}
SHUFFLE_TAGS_FILE = "shuffle_tags.txt"
RATING_ZERO_NOTE = (
    "rating 0 is read as 1, the default, as ED2 does (its data/dataset.py reads `rating or 1.0`); give a small"
    " rating such as 0.1 for an image rarely picked"
)
SEVERAL_MAIN_PROMPTS = (
    "several sidecars of the image set a main prompt; the last of .txt, .caption, .yml, .yaml is used, as in ED2"
)
CAPTION_KEY = "caption"
# UTF-16 and UTF-32 are read only with a byte-order mark, which is what Windows editors write; the UTF-32 LE
# mark is checked first because it begins with the UTF-16 LE one. Python's codecs drop the mark.
_WIDE_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


class DataSettingsError(ValueError):
    """Bad values in the data's settings files; the message lists every one of them."""


class UnreadableSidecar(Exception):
    """An image's own sidecar exists but cannot be read: the image is skipped, not trained captionless."""


class UndecodableText(ValueError):
    """A text file in no encoding EveryCycle reads; the message says what is wrong with it."""


class _BadValue(ValueError):
    """Internal: what a valid value would have been."""


@dataclass(frozen=True)
class ItemSettings:
    """What one source (a file, a folder, a manifest entry) says about an image; None: not set there."""

    main_prompt: str | None = None
    tags: tuple[Tag, ...] | None = None
    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tags: int | None = None
    max_caption_length: int | None = None
    loss_scale: float | None = None
    batch_id: str | None = None
    rating: float | None = None

    @property
    def sets_caption(self) -> bool:
        return self.main_prompt is not None or self.tags is not None

    def without_caption(self) -> ItemSettings:
        return replace(self, main_prompt=None, tags=None)

    def over(self, weaker: ItemSettings) -> ItemSettings:
        """These settings on top of weaker ones: set keys win, tags add up (these first)."""
        merged = {
            setting.name: _first_set(getattr(self, setting.name), getattr(weaker, setting.name))
            for setting in fields(self)
        }
        merged["tags"] = _combined_tags(self.tags, weaker.tags)
        return ItemSettings(**merged)


NOT_SET = ItemSettings()


def _first_set(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _combined_tags(first: tuple[Tag, ...] | None, then: tuple[Tag, ...] | None) -> tuple[Tag, ...] | None:
    if first is None or then is None:
        return first if then is None else then
    present = {tag.text for tag in first}
    return first + tuple(tag for tag in then if tag.text not in present)


@dataclass
class SettingsReport:
    """Collects bad values (errors) and notes while a whole data set is read."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # One line per kind of note, however many files share it: 5000 sidecars with a rating 0 are one line.
    _grouped: dict[str, list[str]] = field(default_factory=dict)

    def bad_value(self, source: str, key: str, value: Any, expected: str) -> None:
        self.errors.append(f"{source}: {key} = {value!r} is not valid; expected {expected}")

    def note(self, message: str, source: str) -> None:
        self._grouped.setdefault(message, []).append(source)

    def warning_lines(self) -> list[str]:
        grouped = [
            f"{message}: {sources[0]}" + (f" and {len(sources) - 1} more" if len(sources) > 1 else "")
            for message, sources in self._grouped.items()
        ]
        return self.warnings + grouped

    def raise_if_errors(self) -> None:
        if self.errors:
            listed = "\n  ".join(self.errors)
            raise DataSettingsError(
                f"{len(self.errors)} bad value(s) in the data's settings files; fix them and run again:\n  {listed}"
            )


# --- values ----------------------------------------------------------------------------------


def _number(value: Any) -> float:
    # bool is an int in Python; "multiply: yes" is a mistake, not 1.
    if isinstance(value, bool):
        raise _BadValue("a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise _BadValue("a number") from None
    if not math.isfinite(number):
        raise _BadValue("a finite number")
    return number


def _multiplier(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise _BadValue("a number >= 0 (the whole part: copies per epoch; the fraction: chance of one more)")
    return number


def _rating(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise _BadValue("a number >= 0 (relative: an image rated 2 is picked twice as often as one rated 1)")
    return number


def _probability(value: Any) -> float:
    number = _number(value)
    if not 0.0 <= number <= 1.0:
        raise _BadValue("a probability from 0 to 1")
    return number


def _whole_number(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        number = _number(value)
        if not number.is_integer() or number < minimum:
            raise _BadValue(f"a whole number >= {minimum}")
        return int(number)

    return parse


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _BadValue("true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _BadValue("a text")
    return value.strip()


def _batch_id(value: Any) -> str | None:
    """A name; a number is its text (`batch_id: 1` in YAML and 1 in batch_id.txt are one group). Empty: no group."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _BadValue("a name (text)")
    return str(value).strip() or None


def _tags(value: Any) -> tuple[Tag, ...]:
    if isinstance(value, str):
        return tags_from_text(value)
    if not isinstance(value, list):
        raise _BadValue("a list of tags (texts or {tag, weight}), or one comma-separated text")
    return tuple(tag for entry in value if (tag := _tag(entry)).text)


def _tag(entry: Any) -> Tag:
    if isinstance(entry, str):
        return Tag(entry.strip())
    if isinstance(entry, Mapping) and isinstance(entry.get("tag"), str):
        weight = _number(entry.get("weight", 1.0))
        if weight <= 0:
            raise _BadValue("tag weights > 0")
        return Tag(entry["tag"].strip(), weight)
    raise _BadValue("tags that are texts or {tag: text, weight: number > 0}")


PARSERS: dict[str, Callable[[Any], Any]] = {
    "main_prompt": _text,
    "tags": _tags,
    "multiply": _multiplier,
    "flip_p": _probability,
    "cond_dropout": _probability,
    "shuffle_tags": _flag,
    "keep_tags": _whole_number(0),
    "max_caption_length": _whole_number(1),
    "loss_scale": _number,
    "batch_id": _batch_id,
    "rating": _rating,
}
KNOWN_KEYS = (*PARSERS, CAPTION_KEY)


def settings_from_mapping(mapping: Mapping, source: str, report: SettingsReport) -> ItemSettings:
    """The settings of one YAML file or manifest entry; bad values and odd keys go to report."""
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        if key in PARSERS:
            _parse_into(values, key, value, source, report)
        elif key != CAPTION_KEY:
            report.note(f"unknown key '{key}' ignored{_did_you_mean(str(key))}", source)
    if values.get("rating") == 0:
        report.note(RATING_ZERO_NOTE, source)
    settings = ItemSettings(**values)
    if CAPTION_KEY in mapping:
        settings = beside_caption(settings, _caption_settings(mapping[CAPTION_KEY], source, report))
    return settings


def beside_caption(settings: ItemSettings, caption: ItemSettings) -> ItemSettings:
    """Keys given beside a caption win over the caption's; explicit tags replace its tags, not add to them."""
    merged = settings.over(caption)
    return merged if settings.tags is None else replace(merged, tags=settings.tags)


def _caption_settings(value: Any, source: str, report: SettingsReport) -> ItemSettings:
    if isinstance(value, str):
        main_prompt, tags = split_caption(value)
        return ItemSettings(main_prompt=main_prompt, tags=tags)
    if isinstance(value, Mapping):
        return settings_from_mapping(value, f"{source} caption", report)
    report.bad_value(source, CAPTION_KEY, value, "a text, or an object with main_prompt and tags")
    return NOT_SET


def _parse_into(values: dict, key: str, value: Any, source: str, report: SettingsReport) -> None:
    try:
        values[key] = PARSERS[key](value)
    except _BadValue as bad:
        report.bad_value(source, key, value, str(bad))


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --- files -----------------------------------------------------------------------------------


def read_text_file(path: Path, report: SettingsReport) -> str:
    """The text of a small settings or caption file: UTF-8 (with or without a byte-order mark), or UTF-16 or
    UTF-32 with one. A few bytes that are not UTF-8 become U+FFFD, with a warning.

    Raises UndecodableText for a file in none of these encodings, OSError when it cannot be read at all.
    """
    raw = path.read_bytes()
    for mark, encoding in _WIDE_BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return _decoded_wide_text(raw, encoding)
    raw = raw.removeprefix(codecs.BOM_UTF8)
    if b"\x00" in raw:
        # NUL is valid UTF-8, so such a file would decode without an error, as garbage. No caption holds one;
        # UTF-16 without a byte-order mark and binary files do.
        raise UndecodableText(
            "holds NUL bytes: UTF-16 or UTF-32 without a byte-order mark, or not a text file; save it as UTF-8"
        )
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        report.warnings.append(
            f"{path}: not valid UTF-8 ({error.reason} at byte {error.start});"
            " undecodable bytes were replaced with U+FFFD"
        )
        return raw.decode("utf-8", errors="replace").strip()


def _decoded_wide_text(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding).strip()
    except UnicodeDecodeError as error:
        raise UndecodableText(
            f"starts with a {encoding} byte-order mark but is not valid {encoding} ({error.reason} at byte"
            f" {error.start}); save it as UTF-8"
        ) from None


def read_yaml_settings(path: Path, report: SettingsReport) -> ItemSettings:
    """The settings of a YAML file; a file that is not YAML key: value pairs is a bad value."""
    try:
        loaded = yaml.safe_load(read_text_file(path, report))
    except UndecodableText as error:  # its settings would be lost: an error, like a bad value
        report.errors.append(f"{path}: {error}")
        return NOT_SET
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        report.errors.append(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}")
        return NOT_SET
    if loaded is None:  # an empty file sets nothing
        return NOT_SET
    if not isinstance(loaded, Mapping):
        report.errors.append(f"{path}: must hold 'key: value' lines, not a {type(loaded).__name__}")
        return NOT_SET
    return settings_from_mapping(loaded, str(path), report)


def read_image_sidecars(image_path: Path, report: SettingsReport) -> ItemSettings:
    """What the image's own sidecars (SIDECAR_ORDER) say, each on top of the ones before it.

    Raises UnreadableSidecar when one of them exists but cannot be read: training on the
    file-name caption instead would silently teach the wrong text.
    """
    settings, main_prompts = NOT_SET, set()
    try:
        for extension in SIDECAR_ORDER:
            sidecar = image_path.with_suffix(extension)
            # None: a caption file in no readable encoding, read as if it were missing
            if is_present(sidecar) and (own := read_caption_or_settings_file(sidecar, report)) is not None:
                settings = own.over(settings)
                if own.main_prompt:
                    main_prompts.add(own.main_prompt)
    except OSError as error:
        raise UnreadableSidecar(f"sidecar unreadable: {error}") from error
    if len(main_prompts) > 1:
        report.note(SEVERAL_MAIN_PROMPTS, str(image_path))
    return settings


def read_caption_or_settings_file(path: Path, report: SettingsReport) -> ItemSettings | None:
    """A caption file named explicitly (by a manifest): YAML settings or caption text, by extension.

    None: an undecodable caption text, to be treated as if it were missing (with a warning).
    """
    if path.suffix.lower() in YAML_EXTENSIONS:
        return read_yaml_settings(path, report)
    return _caption_file(path, report)


def is_present(path: Path) -> bool:
    """True for a file and for a broken link in a file's place: reading the link then fails and is reported,
    where is_file() would say there is no file and the image would quietly fall back to another caption."""
    return path.is_file() or path.is_symlink()


def _caption_file(path: Path, report: SettingsReport) -> ItemSettings | None:
    """The caption of a .txt/.caption file; None when it is in no readable encoding (treated as missing)."""
    try:
        text = read_text_file(path, report)
    except UndecodableText as error:
        report.warnings.append(
            f"{path}: {error}. Read as if it were missing: the caption comes from the next source, as for a"
            " missing file (for <name>.txt: <name>.caption, a local.yaml or global.yaml main_prompt, the file name)"
        )
        return None
    main_prompt, tags = split_caption(text)
    return ItemSettings(main_prompt=main_prompt, tags=tags)


class FolderSettings:
    """What the folders under data_root say about their images (global.yaml chain, folder files, local.yaml).

    Each folder's files are read once, however many images it holds.
    """

    def __init__(self, data_root: Path, report: SettingsReport) -> None:
        self._data_root = Path(data_root)
        self._report = report
        self._inherited: dict[Path, ItemSettings] = {}
        self._for_folder: dict[Path, ItemSettings] = {}

    def for_folder(self, folder: Path) -> ItemSettings:
        """The settings every image directly in folder starts from."""
        if folder not in self._for_folder:
            own = self._yaml_in(folder, LOCAL_FILES).over(self._folder_value_files(folder))
            self._for_folder[folder] = own.over(self._inherited_by(folder))
        return self._for_folder[folder]

    def _inherited_by(self, folder: Path) -> ItemSettings:
        """The global.yaml chain from data_root down to folder, nearer files winning."""
        if folder not in self._inherited:
            own = self._yaml_in(folder, GLOBAL_FILES)
            parent = NOT_SET if folder == self._data_root else self._inherited_by(folder.parent)
            self._inherited[folder] = own.over(parent)
        return self._inherited[folder]

    def _yaml_in(self, folder: Path, names: tuple[str, ...]) -> ItemSettings:
        for name in names:
            path = folder / name
            if is_present(path):
                settings = self._read(path, read_yaml_settings)
                return NOT_SET if settings is None else settings
        return NOT_SET

    def _folder_value_files(self, folder: Path) -> ItemSettings:
        values: dict[str, Any] = {}
        for name, key in FOLDER_VALUE_FILES.items():
            path = folder / name
            if is_present(path) and (text := self._read(path, read_text_file)) is not None:
                _parse_into(values, key, text, str(path), self._report)
        if is_present(folder / SHUFFLE_TAGS_FILE):
            values["shuffle_tags"] = True
        return ItemSettings(**values)

    def _read(self, path: Path, read: Callable[[Path, SettingsReport], Any]) -> Any | None:
        """What read returns, or None (with an error) when the file cannot be read."""
        try:
            return read(path, self._report)
        except (OSError, UndecodableText) as error:
            # A folder file applies to many images: an error names the one cause, where
            # skipping every image of the folder would not.
            self._report.errors.append(f"{path}: unreadable: {error}")
            return None
