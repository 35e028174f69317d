"""Data pipeline: scanning, captions, decoding, buckets, split, batches and the loader."""

from __future__ import annotations

import math
import random
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.buckets import assign_bucket, bucket_sizes
from data.images import (
    ImageItem,
    ImageLoadError,
    SkippedImage,
    load_image,
    scan_images,
    to_rgb,
    write_skipped_report,
)
from data.loader import BucketBatches, ImageBatchDataset, make_loader
from data.split import split_items, validation_count
from tests.conftest import DEMO_DATA, ROOT

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- helpers ---------------------------------------------------------------------------------


def solid(path: Path, size=(64, 64), color=RED, mode="RGB", **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_options)
    return path


def noise(path: Path, size=(64, 64), **save_options) -> Path:
    """Incompressible pixels, so that cutting the file short really cuts into the image data."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save_options)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def rgb_at(pixels: torch.Tensor, x: int, y: int) -> tuple[int, ...]:
    """Back from [-1, 1] CHW to 0..255 RGB at one pixel."""
    return tuple(int(round((value + 1) * 127.5)) for value in pixels[:, y, x].tolist())


def assert_color(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def only_item(root: Path) -> ImageItem:
    result = scan_images(root)
    assert not result.skipped, result.skipped
    (item,) = result.items
    return item


def fake_items(sizes: list[tuple[int, int]]) -> list[ImageItem]:
    """Items that are never decoded: enough for buckets, split and batch planning."""
    return [
        ImageItem(Path(f"/fake/{index:03d}.png"), f"caption {index}", width, height)
        for index, (width, height) in enumerate(sizes)
    ]


def split_paths(items, seed: int, proportion: float = 0.2) -> tuple[list[Path], list[Path]]:
    train, val = split_items(items, "automatic", proportion, seed, None)
    return [item.path for item in train], [item.path for item in val]


# --- captions --------------------------------------------------------------------------------


def test_with_a_txt_and_a_caption_sidecar_the_later_caption_file_wins_as_in_ed2(tmp_path):
    """ED2 reads an image's sidecars in the order .txt, .caption, .yml, .yaml and the later main prompt wins
    (EveryDream2trainer data/dataset.py, Dataset.__sidecar_cfg)."""
    solid(tmp_path / "dog_1.png")
    (tmp_path / "dog_1.txt").write_text("  a photo of a dog\n", encoding="utf-8")
    (tmp_path / "dog_1.caption").write_text("a dog from the caption file", encoding="utf-8")
    assert only_item(tmp_path).caption == "a dog from the caption file"


def test_caption_from_caption_sidecar(tmp_path):
    solid(tmp_path / "cat.jpg")
    (tmp_path / "cat.caption").write_text("\ufeffa cat on a mat \n", encoding="utf-8")  # with a BOM
    assert only_item(tmp_path).caption == "a cat on a mat"


def test_caption_from_file_name_up_to_first_underscore(tmp_path):
    solid(tmp_path / "a green square_001_extra.png")
    solid(tmp_path / "no underscore here.png")
    captions = [item.caption for item in scan_images(tmp_path).items]
    assert captions == ["a green square", "no underscore here"]


def test_undecodable_caption_bytes_are_replaced_with_a_warning(tmp_path):
    solid(tmp_path / "img.png")
    (tmp_path / "img.txt").write_bytes(b"caf\xe9 au lait")  # latin-1, not UTF-8
    result = scan_images(tmp_path)
    assert [item.caption for item in result.items] == ["caf\ufffd au lait"]
    assert len(result.warnings) == 1 and "img.txt" in result.warnings[0]


# --- scanning --------------------------------------------------------------------------------


def test_scan_is_recursive_sorted_and_ignores_hidden_and_other_files(tmp_path):
    solid(tmp_path / "b" / "deep" / "two.PNG")
    solid(tmp_path / "a.JPG", format="JPEG")
    solid(tmp_path / "c.webp")
    solid(tmp_path / "d.bmp")
    solid(tmp_path / "e.jpeg")
    solid(tmp_path / ".hidden.png")
    solid(tmp_path / ".cache" / "inside_hidden_dir.png")
    solid(tmp_path / "animation.gif")
    (tmp_path / "notes.txt").write_text("not an image")
    result = scan_images(tmp_path)
    names = [item.path.relative_to(tmp_path).as_posix() for item in result.items]
    assert names == ["a.JPG", "b/deep/two.PNG", "c.webp", "d.bmp", "e.jpeg"]
    assert result.skipped == [] and result.warnings == []


def test_scan_of_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_images(tmp_path / "missing")


def test_exif_orientation_6_swaps_size_and_rotates_pixels(tmp_path):
    stored = Image.new("RGB", (64, 32), RED)
    stored.paste(BLUE, (32, 0, 64, 32))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    item = only_item(tmp_path)
    assert (item.width, item.height) == (32, 64)
    pixels = load_image(item, (32, 64), flip=False)
    assert pixels.shape == (3, 64, 32)
    assert_color(rgb_at(pixels, 16, 8), RED, tolerance=12)  # the stored left edge is now the top
    assert_color(rgb_at(pixels, 16, 56), BLUE, tolerance=12)


@pytest.mark.parametrize(
    ("make_bad_file", "expected_reason"),
    [
        (lambda root: (root / "empty.png").write_bytes(b""), "zero-byte"),
        (lambda root: truncate(noise(root / "cut.png")), "truncated"),
        (lambda root: truncate(noise(root / "cut.jpg", quality=95), keep=0.6), "truncated"),
        (lambda root: (root / "text.jpg").write_text("I am a text file"), "not an image"),
    ],
    ids=["zero-byte", "truncated-png", "truncated-jpeg", "text-named-jpg"],
)
def test_bad_images_are_skipped_with_a_reason(tmp_path, make_bad_file, expected_reason):
    solid(tmp_path / "good.png")
    make_bad_file(tmp_path)
    result = scan_images(tmp_path)
    assert [item.path.name for item in result.items] == ["good.png"]
    (skipped,) = result.skipped
    assert expected_reason in skipped.reason


@pytest.mark.parametrize("pixels", [1600, 4096], ids=["bomb-warning", "bomb-error"])
def test_decompression_bomb_is_skipped(tmp_path, monkeypatch, pixels):
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both must skip.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    side = int(math.sqrt(pixels))
    solid(tmp_path / "bomb.png", size=(side, side))
    solid(tmp_path / "small.png", size=(16, 16))
    result = scan_images(tmp_path)
    assert [item.path.name for item in result.items] == ["small.png"]
    assert "decompression bomb" in result.skipped[0].reason


def test_skipped_report_lists_path_and_reason(tmp_path):
    report = tmp_path / "logs" / "skipped.txt"
    write_skipped_report([SkippedImage(Path("x/bad.jpg"), "zero-byte file")], report)
    assert "x/bad.jpg: zero-byte file" in report.read_text(encoding="utf-8")


# --- decoding --------------------------------------------------------------------------------


def sixteen_bit_gray(path: Path) -> Path:
    gray = np.full((32, 32), 257 * 100, dtype=np.uint16)
    gray[:, 16:] = 65535
    Image.fromarray(gray).save(path)  # a 16-bit grayscale PNG, opened as mode I;16
    return path


def palette_with_transparent_index(path: Path) -> Path:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.paste(1, (16, 0, 32, 32))  # right half: palette index 1, red
    image.save(path, transparency=0)  # index 0 (left half) is fully transparent
    return path


@pytest.mark.parametrize(
    ("make_file", "left", "right"),
    [
        (lambda p: solid(p / "cmyk.jpg", (32, 32), (0, 255, 255, 0), "CMYK", quality=95), RED, RED),
        (lambda p: sixteen_bit_gray(p / "gray16.png"), (100, 100, 100), WHITE),
        (lambda p: solid(p / "rgba.png", (32, 32), (0, 0, 255, 0), "RGBA"), WHITE, WHITE),
        (lambda p: solid(p / "opaque.png", (32, 32), (0, 0, 255, 255), "RGBA"), BLUE, BLUE),
        (lambda p: solid(p / "la.png", (32, 32), (0, 128), "LA"), (127, 127, 127), (127, 127, 127)),
        (lambda p: palette_with_transparent_index(p / "p.png"), WHITE, RED),
        (lambda p: solid(p / "gray.png", (32, 32), 50, "L"), (50, 50, 50), (50, 50, 50)),
    ],
    ids=["cmyk", "16-bit", "rgba-transparent", "rgba-opaque", "la-half-alpha", "palette", "gray"],
)
def test_every_mode_becomes_correct_rgb(tmp_path, make_file, left, right):
    make_file(tmp_path)
    pixels = load_image(only_item(tmp_path), (32, 32), flip=False)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 32, 32)
    assert_color(rgb_at(pixels, 4, 16), left, tolerance=8)
    assert_color(rgb_at(pixels, 28, 16), right, tolerance=8)


def test_32_bit_integer_gray_is_scaled_like_16_bit():
    gray = Image.fromarray(np.full((4, 4), 257 * 200, dtype=np.int32))
    assert gray.mode == "I"
    assert to_rgb(gray).getpixel((0, 0)) == (200, 200, 200)


def test_load_covers_the_bucket_center_crops_and_flips(tmp_path):
    wide = Image.new("RGB", (128, 64), GREEN)
    wide.paste(RED, (32, 0, 64, 64))
    wide.paste(BLUE, (64, 0, 96, 64))  # green | red | blue | green, 32 px each
    wide.save(tmp_path / "wide.png")
    item = only_item(tmp_path)
    pixels = load_image(item, (64, 64), flip=False)
    assert pixels.shape == (3, 64, 64)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert_color(rgb_at(pixels, 8, 32), RED)  # the green margins were cropped away
    assert_color(rgb_at(pixels, 56, 32), BLUE)
    assert torch.equal(load_image(item, (64, 64), flip=True), pixels.flip(-1))


def test_upscales_an_image_smaller_than_the_bucket(tmp_path):
    solid(tmp_path / "tiny.png", size=(8, 4), color=GREEN)
    pixels = load_image(only_item(tmp_path), (64, 128), flip=False)
    assert pixels.shape == (3, 128, 64)
    assert_color(rgb_at(pixels, 32, 64), GREEN)


def test_file_broken_after_the_scan_raises_image_load_error(tmp_path):
    noise(tmp_path / "later.png")
    item = only_item(tmp_path)
    truncate(item.path)
    with pytest.raises(ImageLoadError, match="later.png"):
        load_image(item, (64, 64), flip=False)


# --- buckets ---------------------------------------------------------------------------------


def test_resolution_64_has_only_the_square():
    assert bucket_sizes(64) == [(64, 64)]


def test_512_buckets():
    buckets = bucket_sizes(512)
    assert {(512, 512), (768, 320), (320, 768), (1024, 256), (256, 1024)} <= set(buckets)
    assert buckets == sorted(set(buckets))


@pytest.mark.parametrize("resolution", range(64, 2049, 64))
def test_bucket_rule_holds_at_every_resolution(resolution):
    buckets = bucket_sizes(resolution)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    assert buckets == sorted(set(buckets))
    assert set(buckets) == {(h, w) for w, h in buckets}  # every shape in both orientations
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert max(width, height) / min(width, height) <= 4
        assert 0.75 * area <= width * height <= area


@pytest.mark.parametrize("resolution", [0, 32, 100, 513, -64, 512.0, True])
def test_bad_resolution_raises_a_clear_error(resolution):
    with pytest.raises(ValueError, match="resolution"):
        bucket_sizes(resolution)


def test_assign_bucket_picks_the_nearest_aspect():
    buckets = bucket_sizes(512)
    assert assign_bucket(3000, 3000, buckets) == (512, 512)
    assert assign_bucket(1000, 400, buckets) == (768, 320)
    assert assign_bucket(400, 1000, buckets) == (320, 768)
    assert assign_bucket(5000, 100, buckets) == (1024, 256)  # beyond 4:1 goes to the extreme
    assert assign_bucket(100, 5000, bucket_sizes(64)) == (64, 64)


# --- validation split ------------------------------------------------------------------------


def test_automatic_split_of_20_at_20_percent_is_16_and_4():
    items = fake_items([(512, 512)] * 20)
    train, val = split_paths(items, seed=555)
    assert (len(train), len(val)) == (16, 4)
    assert sorted(train + val) == [item.path for item in items]
    assert train == sorted(train) and val == sorted(val)


def test_split_depends_only_on_seed_and_leaves_global_rng_alone():
    items = fake_items([(512, 512)] * 20)
    state = random.getstate()
    first = split_paths(items, seed=1)
    assert random.getstate() == state
    assert split_paths(list(reversed(items)), seed=1) == first  # input order does not matter
    assert split_paths(items, seed=2) != first


@pytest.mark.parametrize(
    ("num_items", "proportion", "expected"),
    [
        (20, 0.2, 4),
        (100, 0.29, 29),  # 100 * 0.29 is 28.999... in floating point
        (10, 0.15, 2),  # the ceiling of 1.5
        (2, 0.01, 1),  # at least one held out
        (1, 0.5, 0),  # a single item is never held out
        (3, 0.9, 2),  # never all of them
        (20, 0.0, 0),
    ],
)
def test_validation_count_is_the_ceiling_and_keeps_both_sides(num_items, proportion, expected):
    assert validation_count(num_items, proportion) == expected


def test_manual_and_none_modes_keep_every_training_item():
    items, held = fake_items([(64, 64)] * 5), fake_items([(64, 64)] * 2)
    assert split_items(items, "manual", 0.5, 0, held) == (items, held)
    assert split_items(items, "none", 0.5, 0, None) == (items, [])


@pytest.mark.parametrize(
    ("mode", "proportion", "manual"),
    [
        ("bogus", 0.2, None),
        ("manual", 0.2, None),  # manual without a manual folder
        ("automatic", 1.0, None),
        ("automatic", -0.1, None),
    ],
)
def test_bad_split_settings_raise(mode, proportion, manual):
    with pytest.raises(ValueError):
        split_items(fake_items([(64, 64)] * 5), mode, proportion, 0, manual)


# --- batches and epoch order -----------------------------------------------------------------


@pytest.mark.parametrize(("num_items", "expected"), [(16, 4), (20, 5), (3, 1), (1, 1)])
def test_batches_per_epoch_of_square_images(num_items, expected):
    assert BucketBatches(fake_items([(96, 96)] * num_items), 4, 64).num_batches == expected


def test_mixed_buckets_each_end_in_an_unpadded_runt():
    sizes = [(512, 512)] * 5 + [(1200, 500)] * 3 + [(300, 1200)]
    plan = BucketBatches(fake_items(sizes), batch_size=2, resolution=512)
    assert plan.num_batches == 3 + 2 + 1
    batches = plan.epoch_batches(epoch=0, seed=7)
    assert len(batches) == plan.num_batches
    assert sorted(index for batch in batches for index in batch) == list(range(len(sizes)))
    assert all(len({plan.item_buckets[index] for index in batch}) == 1 for batch in batches)
    assert sorted(len(batch) for batch in batches) == [1, 1, 1, 2, 2, 2]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    items = fake_items([(512, 512)] * 13 + [(1024, 256)] * 7)
    plan = BucketBatches(items, 3, 512)
    state, torch_state = random.getstate(), torch.get_rng_state()
    order = plan.epoch_batches(epoch=4, seed=555)
    assert random.getstate() == state and torch.equal(torch.get_rng_state(), torch_state)
    assert BucketBatches(items, 3, 512).epoch_batches(epoch=4, seed=555) == order
    assert plan.epoch_batches(epoch=5, seed=555) != order
    assert plan.epoch_batches(epoch=4, seed=556) != order


@pytest.mark.parametrize(("num_items", "world_size"), [(20, 2), (20, 3), (40, 4)])
def test_ranks_get_disjoint_whole_batches_of_equal_count(num_items, world_size):
    plan = BucketBatches(fake_items([(64, 64)] * num_items), 2, 64)
    everything = plan.epoch_batches(3, 9)
    shares = [plan.epoch_batches(3, 9, rank, world_size) for rank in range(world_size)]
    assert {len(share) for share in shares} == {plan.num_batches // world_size}
    assert plan.batches_per_rank(world_size) == plan.num_batches // world_size
    taken = [tuple(batch) for share in shares for batch in share]
    assert len(taken) == len(set(taken))
    assert set(taken) <= {tuple(batch) for batch in everything}


def test_bad_batch_plan_arguments_raise():
    with pytest.raises(ValueError):
        BucketBatches([], 4, 64)
    with pytest.raises(ValueError):
        BucketBatches(fake_items([(64, 64)]), 0, 64)
    plan = BucketBatches(fake_items([(64, 64)] * 4), 2, 64)
    with pytest.raises(ValueError):
        plan.epoch_batches(0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError):
        plan.epoch_batches(0, 0, rank=0, world_size=3)  # 2 batches cannot feed 3 ranks


# --- dataset and loader ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_items() -> list[ImageItem]:
    return scan_images(DEMO_DATA).items


def test_demo_data_scans_cleanly_with_all_three_caption_rules(demo_items):
    result = scan_images(DEMO_DATA)
    assert (len(result.items), result.skipped, result.warnings) == (20, [], [])
    captions = {item.path.name: item.caption for item in result.items}
    assert captions["scene01.png"] == "a zorb on a gray background"
    assert captions["scene15.png"] == "a zorb on the left on a black background"  # .caption sidecar
    assert captions["a zorb_001.png"] == "a zorb"  # file name
    assert {(item.width, item.height) for item in result.items} == {(96, 96), (128, 96), (96, 128)}


def test_demo_data_matches_the_generator(tmp_path):
    script = ROOT / "scripts" / "make_demo_data.py"
    generator = runpy.run_path(str(script), run_name="make_demo_data")
    generator["write_demo_data"](tmp_path)
    fresh = sorted(path.name for path in tmp_path.iterdir())
    assert fresh == sorted(path.name for path in DEMO_DATA.iterdir())
    for name in fresh:
        if name.endswith(".png"):  # compare pixels: PNG bytes depend on the zlib build
            fresh_pixels = np.asarray(Image.open(tmp_path / name))
            assert np.array_equal(fresh_pixels, np.asarray(Image.open(DEMO_DATA / name))), name
        else:
            assert (tmp_path / name).read_text() == (DEMO_DATA / name).read_text()


def test_demo_data_drawn_twice_repeats_each_caption_with_other_pixels(tmp_path):
    """bench/lr_finder_check.py --draws 2: 40 images, each scene's copy under <stem>_2 with the same caption (the
    file-name caption too) and its own jitter."""
    generator = runpy.run_path(str(ROOT / "scripts" / "make_demo_data.py"), run_name="make_demo_data")
    generator["write_demo_data"](tmp_path, "quib", 2)
    items = {item.path.stem: item for item in scan_images(tmp_path).items}
    copies = [stem for stem in items if stem.endswith("_2")]
    assert len(items) == 40 and len(copies) == 20
    for copy in copies:
        first = items[copy.removesuffix("_2")]
        assert items[copy].main_prompt == first.main_prompt
        assert (items[copy].width, items[copy].height) == (first.width, first.height)
        assert not np.array_equal(np.asarray(Image.open(items[copy].path)), np.asarray(Image.open(first.path)))
    assert items["a quib_001_2"].main_prompt == "a quib"


def load_epoch(items, plan, epoch, num_workers=0, **run_settings):
    dataset = ImageBatchDataset(items, plan, seed=5, epoch=epoch, **run_settings)
    return list(make_loader(dataset, plan.epoch_batches(epoch, seed=5), num_workers=num_workers))


def test_loader_yields_whole_batches_in_range(demo_items):
    plan = BucketBatches(demo_items, 4, 64)
    torch_state = torch.get_rng_state()
    batches = load_epoch(demo_items, plan, epoch=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert len(batches) == plan.num_batches == 5
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 64, 64)
        assert batch["pixel_values"].dtype == torch.float32
        assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
        assert len(batch["captions"]) == len(batch["paths"]) == 4 and batch["failed"] == []
        assert batch["loss_scales"].tolist() == [1.0] * 4
    loaded_paths = sorted(path for batch in batches for path in batch["paths"])
    assert loaded_paths == [str(item.path) for item in demo_items]


def test_worker_processes_give_the_same_batches(demo_items):
    plan = BucketBatches(demo_items, 4, 256)
    in_process = load_epoch(demo_items, plan, epoch=1, flip_p=0.5, cond_dropout=0.5)
    with_workers = load_epoch(demo_items, plan, epoch=1, num_workers=2, flip_p=0.5, cond_dropout=0.5)
    assert [b["paths"] for b in in_process] == [b["paths"] for b in with_workers]
    assert [b["captions"] for b in in_process] == [b["captions"] for b in with_workers]
    assert "" in {caption for b in in_process for caption in b["captions"]}
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    heights_and_widths = {tuple(batch["pixel_values"].shape[2:]) for batch in in_process}
    assert heights_and_widths == {(256, 256), (192, 320), (320, 192)}


def test_flips_are_reproducible_per_seed_epoch_and_item(demo_items):
    plan = BucketBatches(demo_items, 4, 64)

    def flips(epoch: int, seed: int = 5, flip_p: float = 0.5) -> list[bool]:
        dataset = ImageBatchDataset(demo_items, plan, seed=seed, epoch=epoch, flip_p=flip_p)
        return [dataset.should_flip(index) for index in range(200)]

    state = random.getstate()
    assert flips(0) == flips(0)
    assert random.getstate() == state
    assert flips(0) != flips(1) and flips(0) != flips(0, seed=6)
    assert 70 < sum(flips(0)) < 130
    assert not any(flips(0, flip_p=0.0)) and all(flips(0, flip_p=1.0))

    mirrored = load_epoch(demo_items, plan, epoch=0, flip_p=1.0)
    plain = load_epoch(demo_items, plan, epoch=0)
    for flipped, unflipped in zip(mirrored, plain, strict=True):
        assert torch.equal(flipped["pixel_values"], unflipped["pixel_values"].flip(-1))


def test_image_broken_after_scan_is_dropped_from_its_batch(tmp_path):
    for name in ("a", "b", "c"):
        noise(tmp_path / f"{name}.png")
    items = scan_images(tmp_path).items
    truncate(tmp_path / "b.png")
    plan = BucketBatches(items, 3, 64)
    dataset = ImageBatchDataset(items, plan, seed=0, epoch=0)
    (batch,) = list(make_loader(dataset, plan.epoch_batches(0, 0)))
    assert batch["pixel_values"].shape[0] == 2 and len(batch["captions"]) == 2
    assert [entry.path.name for entry in batch["failed"]] == ["b.png"]
    assert "b.png" in batch["failed"][0].reason


@pytest.mark.parametrize("num_workers", [0, 1])
def test_batch_with_no_loadable_image_raises_image_load_error(tmp_path, num_workers):
    items = scan_images(noise(tmp_path / "only.png").parent).items
    truncate(tmp_path / "only.png")
    plan = BucketBatches(items, 1, 64)
    dataset = ImageBatchDataset(items, plan, seed=0, epoch=0)
    loader = make_loader(dataset, [[0]], num_workers=num_workers)
    with pytest.raises(ImageLoadError, match="only.png"):
        list(loader)


def test_dataset_rejects_a_batch_that_mixes_buckets(tmp_path):
    items = [
        ImageItem(solid(tmp_path / "square.png"), "s", 64, 64),
        ImageItem(solid(tmp_path / "wide.png", size=(256, 64)), "w", 256, 64),
    ]
    plan = BucketBatches(items, 2, 128)
    with pytest.raises(ValueError, match="one bucket"):
        ImageBatchDataset(items, plan, seed=0, epoch=0)[[0, 1]]
