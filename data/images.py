"""Find training images, read their captions, and decode them into tensors.

Scanning validates each image cheaply (header, PNG checksums, a reduced-scale
JPEG decode) so that broken files are reported once, up front, instead of
crashing a DataLoader worker hours into a run.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Checked in this order; the first one that exists wins.
CAPTION_EXTENSIONS = (".txt", ".caption")
# A file-name caption stops at the first underscore: "a dog_003.jpg" -> "a dog".
FILENAME_CAPTION_SEPARATOR = "_"

# Orientations 5-8 are the ones with a 90-degree turn, so width and height swap.
_ORIENTATIONS_THAT_SWAP_SIDES = frozenset({5, 6, 7, 8})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
_SIXTEEN_BIT_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class ImageItem:
    """One training image; width and height are after EXIF rotation."""

    path: Path
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    # Problems that did not cost the image, e.g. a caption that was not valid UTF-8.
    warnings: list[str] = field(default_factory=list)


class ImageLoadError(Exception):
    """An image that passed the scan could not be decoded at training time.

    The constructor takes a single message so that torch DataLoader workers can
    re-raise it in the main process with its own type.
    """


class _BadImage(Exception):
    """Internal: carries the skip reason out of the validation helpers."""


def scan_images(data_root: Path) -> ScanResult:
    """Recursively find images under data_root, validate them, and read their captions."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root is not a directory: {data_root}")
    result = ScanResult()
    for path in _find_image_files(data_root):
        try:
            width, height = _validated_oriented_size(path)
            caption, warning = _read_caption(path)
        except _BadImage as bad:
            result.skipped.append(SkippedImage(path, str(bad)))
            continue
        if warning is not None:
            result.warnings.append(warning)
        result.items.append(ImageItem(path, caption, width, height))
    return result


def _find_image_files(data_root: Path) -> list[Path]:
    found = []
    for directory, subdirectories, file_names in os.walk(data_root):
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache, ...).
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        found.extend(
            Path(directory) / name
            for name in file_names
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        )
    return sorted(found)


def _read_caption(image_path: Path) -> tuple[str, str | None]:
    """Return (caption, warning or None) for an image, from a sidecar file or the file name."""
    for extension in CAPTION_EXTENSIONS:
        sidecar = image_path.with_suffix(extension)
        if sidecar.is_file():
            return _read_sidecar(sidecar)
    return image_path.stem.split(FILENAME_CAPTION_SEPARATOR, 1)[0].strip(), None


def _read_sidecar(sidecar: Path) -> tuple[str, str | None]:
    try:
        raw = sidecar.read_bytes()
    except OSError as error:
        # Training on the file-name caption instead would silently teach the wrong text.
        raise _BadImage(f"caption file unreadable: {sidecar.name}: {error}") from error
    try:
        # utf-8-sig also drops the byte-order mark that some Windows editors write.
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as error:
        caption = raw.decode("utf-8-sig", errors="replace").strip()
        warning = (
            f"{sidecar}: caption is not valid UTF-8 ({error.reason} at byte {error.start});"
            " undecodable bytes were replaced with U+FFFD"
        )
        return caption, warning


def _validated_oriented_size(path: Path) -> tuple[int, int]:
    """Check that path is a decodable image and return its (width, height) after EXIF rotation."""
    if _file_size(path) == 0:
        raise _BadImage("zero-byte file")
    with _open_for_validation(path) as image:
        width, height = image.size
        orientation = _orientation_from_header(image)
        _check_pixel_data_decodes(image)
    if orientation in _ORIENTATIONS_THAT_SWAP_SIDES:
        return height, width
    return width, height


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as error:  # e.g. a dangling symlink
        raise _BadImage(f"unreadable: {error}") from error


def _open_for_validation(path: Path) -> Image.Image:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat the warning as fatal too.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except UnidentifiedImageError as error:
            reason = f"not an image: unrecognised contents despite the {path.suffix} extension"
            raise _BadImage(reason) from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _BadImage(f"decompression bomb: {error}") from error
        # Pillow's format plugins raise many exception types on malformed headers.
        except Exception as error:
            raise _BadImage(f"unreadable: {type(error).__name__}: {error}") from error


def _orientation_from_header(image: Image.Image) -> int:
    """EXIF orientation as exif_transpose would see it, without decoding pixels.

    PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after the
    pixel data; the base implementation reads only what the header already parsed.
    """
    return Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)


def _check_pixel_data_decodes(image: Image.Image) -> None:
    try:
        if image.format == "PNG":
            image.verify()  # CRC of every chunk up to IEND: finds truncation without inflating
        elif image.format in _JPEG_FORMATS:
            # A 1/8-scale decode still reads every entropy-coded byte, so it finds truncation
            # at a fraction of the cost of a full decode.
            image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        else:
            image.load()
    except Exception as error:
        reason = f"truncated or corrupt image data: {type(error).__name__}: {error}"
        raise _BadImage(reason) from error


def load_image(item: ImageItem, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """Decode item, cover-resize and center-crop it to size=(w, h); CHW float32 in [-1, 1]."""
    try:
        with Image.open(item.path) as stored:
            _decode_no_larger_than_needed(stored, size)
            rgb = to_rgb(ImageOps.exif_transpose(stored))
    except Exception as error:
        message = f"cannot load {item.path}: {type(error).__name__}: {error}"
        raise ImageLoadError(message) from error
    image = ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_tensor(image)


def _decode_no_larger_than_needed(image: Image.Image, size: tuple[int, int]) -> None:
    """Let libjpeg decode large JPEGs at 1/2..1/8 scale, never below what covers size."""
    if image.format not in _JPEG_FORMATS:
        return
    target_width, target_height = size
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _ORIENTATIONS_THAT_SWAP_SIDES:
        target_width, target_height = target_height, target_width  # draft works on stored pixels
    scale = max(target_width / image.width, target_height / image.height)
    image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        image = _sixteen_bit_gray_to_l(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        white = Image.new("RGBA", image.size, _WHITE)
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_gray_to_l(image: Image.Image) -> Image.Image:
    # Pillow's own conversion clips at 255 instead of scaling, turning most 16-bit images
    # white. 'I' is treated as 16-bit too: that is what 16-bit PNG, TIFF and PGM decode to.
    values = np.asarray(image).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


def write_skipped_report(skipped: list[SkippedImage], path: Path) -> None:
    """Write one 'path: reason' line per skipped image (an empty list writes just the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {len(skipped)} image(s) skipped"]
    lines += [f"{entry.path}: {entry.reason}" for entry in skipped]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
