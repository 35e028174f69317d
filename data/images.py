"""Find training images, read their captions and settings, and decode them into tensors.

Scanning validates each image cheaply (header, PNG checksums, a reduced-scale
JPEG decode) so that broken files are reported once, up front, instead of
crashing a DataLoader worker hours into a run.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from data.captions import Tag, build_caption
from data.manifest import is_manifest, read_manifest
from data.sidecars import (
    NOT_SET,
    FolderSettings,
    ItemSettings,
    SettingsReport,
    UnreadableSidecar,
    read_image_sidecars,
)

# ED2's list (its doc/DATA.md); .jfif is a JPEG under another name, which Pillow reads by its content.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jfif"})
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
    """One training image; width and height are after EXIF rotation.

    The per-image settings come from its sidecar and folder files (data/sidecars.py) or its
    manifest entry. None means "not set for this image: use the run's config value".
    """

    path: Path
    main_prompt: str
    width: int
    height: int
    tags: tuple[Tag, ...] = ()
    multiply: float = 1.0  # the whole part: copies per epoch; the fraction: the chance of one more
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle_tags: bool | None = None
    keep_tags: int | None = None
    max_caption_length: int | None = None  # characters; None: no limit
    loss_scale: float = 1.0
    batch_id: str | None = None  # images with the same batch_id share batches (ED2); None: any batch of the bucket
    rating: float = 1.0  # a rated data set picks it with a chance in proportion to this (data/rated.py)

    @property
    def caption(self) -> str:
        """The caption in file order, never shuffled or dropped: what validation and samples use."""
        return build_caption(self.main_prompt, self.tags, max_length=self.max_caption_length)


@dataclass(frozen=True)
class SkippedImage:
    path: Path
    reason: str


@dataclass
class ScanResult:
    items: list[ImageItem] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)
    # Problems that did not cost the image: a caption that was not valid UTF-8, an ED2 key
    # that is not used, an unknown key in a settings file, a folder link that loops or is broken.
    warnings: list[str] = field(default_factory=list)


class ImageLoadError(Exception):
    """An image that passed the scan could not be decoded at training time.

    The constructor takes a single message so that torch DataLoader workers can
    re-raise it in the main process with its own type.
    """


class _BadImage(Exception):
    """Internal: carries the skip reason out of the validation helpers."""


@dataclass(frozen=True)
class _Candidate:
    """An image to scan, with the settings that sit beneath and above its own sidecar files."""

    path: Path
    beneath: ItemSettings = NOT_SET  # its folders' files: the sidecar wins over them
    above: ItemSettings = NOT_SET  # a manifest entry: wins over the sidecar


def scan_images(data_root: Path) -> ScanResult:
    """Find the images of data_root (a folder, searched recursively through folder links too, or a .json
    manifest), validate them, and read their captions and settings. A file reached by several paths is one image.

    Raises DataSettingsError listing every bad value in the settings files.
    """
    data_root = Path(data_root)
    report = SettingsReport()
    result = ScanResult()
    for candidate in _candidates(data_root, report):
        try:
            width, height = _validated_oriented_size(candidate.path)
            own = read_image_sidecars(candidate.path, report)
            if candidate.above.sets_caption:  # a manifest caption replaces the sidecar's, tags and all
                own = own.without_caption()
        except (_BadImage, UnreadableSidecar) as bad:
            result.skipped.append(SkippedImage(candidate.path, str(bad)))
            continue
        settings = candidate.above.over(own.over(candidate.beneath))
        result.items.append(_item(candidate.path, width, height, settings))
    report.raise_if_errors()
    result.warnings.extend(report.warning_lines())
    return result


def _candidates(data_root: Path, report: SettingsReport) -> list[_Candidate]:
    if data_root.is_file() and is_manifest(data_root):
        return [_Candidate(path, above=entry) for path, entry in read_manifest(data_root, report)]
    if not data_root.is_dir():
        raise FileNotFoundError(f"data_root is neither a folder nor a .json manifest: {data_root}")
    folders = FolderSettings(data_root, report)
    images = _find_image_files(data_root, report)
    return [_Candidate(path, beneath=folders.for_folder(path.parent)) for path in images]


def _item(path: Path, width: int, height: int, settings: ItemSettings) -> ImageItem:
    main_prompt = settings.main_prompt
    if main_prompt is None:
        main_prompt = path.stem.split(FILENAME_CAPTION_SEPARATOR, 1)[0].strip()
    return ImageItem(
        path,
        main_prompt,
        width,
        height,
        tags=by_weight(settings.tags or ()),
        multiply=1.0 if settings.multiply is None else settings.multiply,
        flip_p=settings.flip_p,
        cond_dropout=settings.cond_dropout,
        shuffle_tags=settings.shuffle_tags,
        keep_tags=settings.keep_tags,
        max_caption_length=settings.max_caption_length,
        loss_scale=1.0 if settings.loss_scale is None else settings.loss_scale,
        batch_id=settings.batch_id,
        rating=settings.rating or 1.0,  # unset or 0: 1, as ED2 (data/dataset.py: `rating or 1.0`)
    )


def by_weight(tags: tuple[Tag, ...]) -> tuple[Tag, ...]:
    """Heaviest first, equal weights in file order: ED2 orders an image's tags so even when they are not shuffled
    (data/dataset.py Dataset.image_train_items sorts them by weight)."""
    return tuple(sorted(tags, key=lambda tag: -tag.weight))


def _find_image_files(data_root: Path, report: SettingsReport) -> list[Path]:
    """The image files under data_root, following folder links; each file once, however many paths reach it.

    data_root's own tree is read first, then each folder link in turn adds the folders not read yet, so a
    folder that is both inside data_root and linked to keeps its own path. Reading each real folder once is
    also what ends a cycle of links.
    """
    read_folders: set[str] = set()
    tops = [data_root]
    found: list[Path] = []
    for top in tops:  # _read_tree appends the folder links it meets, so they are followed in turn
        found += _read_tree(top, read_folders, tops, report)
    return _one_path_per_file(found)


def _read_tree(top: Path, read_folders: set[str], links: list[Path], report: SettingsReport) -> list[Path]:
    """The image files of top and its subfolders that are not read yet; the folder links in it go to links."""
    found = []
    for directory, subdirectories, file_names in os.walk(top):  # os.walk lists folder links but does not enter them
        real_directory = os.path.realpath(directory)
        if real_directory in read_folders:
            subdirectories.clear()
            continue
        read_folders.add(real_directory)
        # Pruning in place stops os.walk from descending into hidden folders (.git, .cache, ...); sorting
        # makes the order links are met in, so which path an image keeps, the same on every run.
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        folder = Path(directory)
        links += [folder / name for name in subdirectories if _is_link_to_follow(folder / name, real_directory, report)]
        visible = [folder / name for name in file_names if not name.startswith(".")]
        found += [path for path in visible if path.suffix.lower() in IMAGE_EXTENSIONS]
        _warn_of_broken_links([path for path in visible if path.suffix.lower() not in IMAGE_EXTENSIONS], report)
    return found


def _is_link_to_follow(subfolder: Path, real_parent: str, report: SettingsReport) -> bool:
    """True for a folder link whose target does not hold the link itself (that one would loop: a warning)."""
    if not subfolder.is_symlink():
        return False
    target = os.path.realpath(subfolder)
    if Path(real_parent).is_relative_to(target):
        report.warnings.append(
            f"{subfolder}: a link to {target}, which holds the link itself; not followed, it would loop"
        )
        return False
    return True


def _warn_of_broken_links(paths: list[Path], report: SettingsReport) -> None:
    # A link to a folder on an unmounted drive would otherwise leave out all of its images without a word.
    # Broken links to images need no warning here: the scan skips them with a reason.
    report.warnings += [
        f"{path}: a broken link (its target does not exist); not followed"
        for path in paths
        if path.is_symlink() and not path.exists()
    ]


def _one_path_per_file(paths: list[Path]) -> list[Path]:
    """Sorted, one path per real file: the file's own path beats a link to it, then the first in name order."""
    chosen: dict[str, Path] = {}
    for path in sorted(paths, key=lambda path: (path.is_symlink(), path)):
        chosen.setdefault(os.path.realpath(path), path)
    return sorted(chosen.values())


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


def load_image(
    item: ImageItem,
    size: tuple[int, int],
    flip: bool,
    transform: Callable[[Image.Image], Image.Image] | None = None,
) -> torch.Tensor:
    """Decode item, cover-resize and center-crop it to size=(w, h); CHW float32 in [-1, 1]. `transform`: a
    plugin's transform_pil_image, given the cropped (and flipped) image, as ED2 gives it (its PIL image of the
    item, before the tensor)."""
    try:
        with Image.open(item.path) as stored:
            _decode_no_larger_than_needed(stored, size)
            rgb = to_rgb(ImageOps.exif_transpose(stored))
    except Exception as error:
        message = f"cannot load {item.path}: {type(error).__name__}: {error}"
        raise ImageLoadError(message) from error
    image = rgb.resize(size, Image.Resampling.LANCZOS, box=cover_crop_box(rgb.width, rgb.height, size))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if transform is not None:
        image = to_rgb(transform(image))  # a plugin may hand back another mode, or another size:
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
    return _to_tensor(image)


def cover_crop_box(width: float, height: float, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred (left, top, right, bottom) box of a width x height image with the aspect ratio of size=(w, h):
    the part load_image scales to size (Pillow's ImageOps.fit box, centred, no bleed, computed the same way)."""
    image_ratio, target_ratio = width / height, size[0] / size[1]
    if image_ratio == target_ratio:
        crop_width, crop_height = width, height
    elif image_ratio >= target_ratio:  # wider than the target: the sides are cut
        crop_width, crop_height = target_ratio * height, height
    else:  # taller: the top and bottom are cut
        crop_width, crop_height = width, width / target_ratio
    left, top = (width - crop_width) * 0.5, (height - crop_height) * 0.5
    return left, top, left + crop_width, top + crop_height


def size_and_crop(item: ImageItem, size: tuple[int, int]) -> tuple[int, int, int, int, int, int]:
    """(original height, original width, crop top, crop left, target height, target width) of item trained at
    size=(w, h): SDXL's size and crop conditioning (its `add_time_ids`). The crop is the one load_image cuts, in
    pixels of the image scaled to cover size (SDXL's convention: the crop of the resized image); a horizontal flip
    leaves it as it is."""
    left, top, right, _ = cover_crop_box(item.width, item.height, size)
    scale = size[0] / (right - left)  # the resize factor (the same for both sides)
    return item.height, item.width, round(top * scale), round(left * scale), size[1], size[0]


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
