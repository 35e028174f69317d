"""ED2's data rules: caption and settings files, folder inheritance, manifests, multipliers, per-sample captions."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data.captions import Tag, build_caption, split_caption
from data.images import ImageItem, scan_images
from data.loader import BucketBatches, ImageBatchDataset, make_loader
from data.multiply import draw_extra_copies, extra_copies_per_group, inclusion_chances
from data.prepare import as_validation_item, prepare_data
from data.sidecars import DataSettingsError
from data.split import split_items
from tests.conftest import ROOT
from utils.config import ConfigError, load_config

ED2_PROJECT = ROOT / "tests" / "fixtures" / "ed2_project"
ED2_DATA = ED2_PROJECT / "project_data"


# --- helpers ---------------------------------------------------------------------------------


def image(path: Path, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 200)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def by_name(items: list[ImageItem]) -> dict[str, ImageItem]:
    return {item.path.name: item for item in items}


def tagged_item(tags: int, **settings) -> ImageItem:
    return ImageItem(Path("/fake/m.png"), "m", 64, 64, tags=tuple(Tag(f"t{n}") for n in range(1, tags + 1)), **settings)


def dataset_of(items: list[ImageItem], epoch: int = 0, seed: int = 5, **run_settings) -> ImageBatchDataset:
    return ImageBatchDataset(items, BucketBatches(items, 1, 64), seed=seed, epoch=epoch, **run_settings)


@pytest.fixture(scope="module")
def ed2_items() -> dict[str, ImageItem]:
    return by_name(scan_images(ED2_DATA).items)


# --- the ED2 project fixture -----------------------------------------------------------------


def test_fixture_captions_come_from_every_ed2_source(ed2_items):
    captions = {name: item.caption for name, item in ed2_items.items()}
    assert captions["alice_01.png"] == "alice, red hair, smiling, outdoors, full body"  # .txt
    assert captions["bob_01.png"] == "bob, beard, hat"  # .caption
    assert captions["carol_01.png"] == "carol, blue dress, glasses"  # .yaml, weighted tags
    assert ed2_items["carol_01.png"].tags == (Tag("blue dress", 2.0), Tag("glasses"))
    assert captions["dana_01.png"] == "dana, standing, full body"
    # preservation/global.yaml adds a tag, also in nested/, and caps captions at 60 characters.
    assert captions["street_01.png"] == "street, photograph"  # the file name up to "_"
    assert captions["tree_01.png"] == "a tree, oak, autumn, photograph"
    assert captions["landscape_01.png"] == "a landscape, mountains, lake, sunset, clouds, pine trees"
    assert captions["landscape_02.png"] == "a landscape, desert, dunes, noon, photograph"


SETTINGS = ("multiply", "flip_p", "cond_dropout", "shuffle_tags", "loss_scale", "max_caption_length")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # multiply.txt and flip_p.txt beat the root global.yaml; local.yaml sets cond_dropout 0.1.
        ("alice_01.png", (2.0, 0.5, 0.1, None, 1.0, None)),
        ("bob_01.png", (2.0, 0.5, 0.1, None, 1.0, None)),
        # The image's own .yaml beats the folder: multiply 3, cond_dropout 0.
        ("carol_01.png", (3.0, 0.5, 0.0, None, 1.0, None)),
        # Folder files and local.yaml are for their folder only: poses/ gets the root global.yaml alone.
        ("dana_01.png", (1.0, 0.1, 0.05, None, 1.0, None)),
        ("landscape_01.png", (0.5, 0.1, 0.0, True, 0.5, 60)),
        ("street_01.png", (0.5, 0.1, 0.0, True, 0.5, 60)),
        # nested/ inherits both global.yaml files (max_caption_length), not preservation's folder files.
        ("tree_01.png", (1.0, 0.1, 0.05, None, 1.0, 60)),
    ],
)
def test_fixture_settings_follow_global_then_folder_then_sidecar(ed2_items, name, expected):
    assert tuple(getattr(ed2_items[name], setting) for setting in SETTINGS) == expected


def test_fixture_rating_and_batch_id_are_read_not_warned_about(ed2_items):
    warnings = scan_images(ED2_DATA).warnings
    assert not any("'rating'" in line or "'batch_id'" in line for line in warnings)  # both used
    assert ed2_items["carol_01.png"].batch_id == "portraits"  # carol's copies share batches
    assert ed2_items["carol_01.png"].rating == 5.0 and ed2_items["alice_01.png"].rating == 1.0  # unset: 1


def test_fixture_steps_per_epoch_count_multipliers_and_stay_fixed(ed2_items):
    items = list(ed2_items.values())
    plan = BucketBatches(items, batch_size=2, resolution=512)
    # ED2's epoch: floor(2 + 2 + 3 + 1 + 3 x 0.5 + 1) = 10 samples, 1 of them an extra copy of a half image.
    # squares: carol's 3 (batch_id portraits) -> 1 batch, her third copy joins alice 2 + bob 2 -> 3 batches;
    # the tall dana -> 1; wide: tree 1 + the extra copy -> 1 batch.
    assert (plan.samples_per_epoch, plan.num_batches) == (10, 6)
    wide_picks = set()
    for epoch in range(8):
        batches = plan.epoch_batches(epoch, seed=555)
        assert len(batches) == 6 and sum(map(len, batches)) == 10
        names = Counter(items[plan_item(plan, s)].path.name for batch in batches for s in batch)
        assert (names["alice_01.png"], names["carol_01.png"], names["tree_01.png"]) == (2, 3, 1)
        wide_picks.add(frozenset(n for n in names if n.startswith(("landscape", "street"))))
    assert len(wide_picks) > 1  # the half-multiplier images change from epoch to epoch


def plan_item(plan: BucketBatches, sample: int) -> int:
    return sample % plan.num_items


def config_for(data_root: Path, tmp_path: Path, **overrides):
    values = {
        "data_root": str(data_root),
        "logdir": str(tmp_path / "logs"),
        "resolution": 512,
        "batch_size": 2,
        "max_epochs": 3,
        "validation_config": None,
        **overrides,
    }
    return load_config(None, values)


def test_schedule_preview_counts_multiplied_batches(tmp_path):
    from optimizer.lr import plan_schedule

    config = config_for(ED2_DATA, tmp_path)
    data = prepare_data(config)
    plan, _, _ = plan_schedule(config, data.batches.num_batches)
    assert plan.steps_per_epoch == 6 and plan.total_steps == 18
    assert "10 samples (with multipliers) in 6 batches per epoch" in data.summary()
    assert "rating" not in data.summary()


def test_validation_items_are_seen_once_and_plain(tmp_path):
    held_out = as_validation_item(
        ImageItem(Path("x.png"), "x", 64, 64, multiply=3.0, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    )
    assert (held_out.multiply, held_out.flip_p, held_out.cond_dropout, held_out.shuffle_tags) == (1.0, 0.0, 0.0, False)
    config = config_for(ED2_DATA, tmp_path, validation_config={"auto_split_proportion": 0.3})
    data = prepare_data(config)
    assert data.val and all(item.multiply == 1.0 and item.flip_p == 0.0 for item in data.val)


# --- captions --------------------------------------------------------------------------------


def test_caption_text_splits_into_main_prompt_and_tags():
    assert split_caption(" a photo of x , red,, blue ,") == ("a photo of x", (Tag("red"), Tag("blue")))
    assert split_caption("just a prompt") == ("just a prompt", ())
    assert build_caption("a photo of x", [Tag("red"), Tag("blue")]) == "a photo of x, red, blue"
    assert build_caption("", [Tag("red")]) == "red"


def test_keep_tags_keeps_the_first_n_tags_in_place_while_the_rest_shuffle():
    dataset_epochs = [dataset_of([tagged_item(8)], epoch, shuffle_tags=True, keep_tags=2) for epoch in range(30)]
    captions = [dataset.caption(0) for dataset in dataset_epochs]
    for caption in captions:
        main, first, second, *rest = caption.split(", ")
        assert (main, first, second) == ("m", "t1", "t2")
        assert sorted(rest) == [f"t{n}" for n in range(3, 9)]
    assert len(set(captions)) > 20
    unkept = [dataset_of([tagged_item(8)], epoch, shuffle_tags=True).caption(0) for epoch in range(30)]
    assert len({caption.split(", ")[1] for caption in unkept}) > 1  # keep_tags 0: the first tag moves too


def test_own_keep_tags_and_shuffle_settings_beat_the_run_values():
    own = [tagged_item(6, shuffle_tags=False), tagged_item(6, keep_tags=5)]
    for epoch in range(10):
        dataset = dataset_of(own, epoch, shuffle_tags=True, keep_tags=0)
        assert dataset.caption(0) == "m, t1, t2, t3, t4, t5, t6"
        assert dataset.caption(1) == "m, t1, t2, t3, t4, t5, t6"  # 5 of 6 kept: nothing left to move


def test_shuffles_are_reproducible_and_differ_between_copies_of_an_image():
    items = [tagged_item(6, multiply=2.0)]
    dataset = dataset_of(items, epoch=3, shuffle_tags=True)
    assert dataset.caption(0) == dataset_of(items, epoch=3, shuffle_tags=True).caption(0)
    first_copies = [dataset_of(items, epoch, shuffle_tags=True).caption(0) for epoch in range(10)]
    second_copies = [dataset_of(items, epoch, shuffle_tags=True).caption(1) for epoch in range(10)]
    assert first_copies != second_copies  # sample 1 is the second copy of item 0


def test_heavier_tags_are_shuffled_to_the_front_more_often():
    tags = [Tag(f"light{n}") for n in range(4)] + [Tag("heavy", 10.0)]
    firsts = Counter(build_caption("m", tags, rng=random.Random(seed)).split(", ")[1] for seed in range(400))
    assert firsts["heavy"] > 0.55 * 400


def test_max_caption_length_drops_tags_from_the_end_never_the_main_prompt():
    tags = [Tag("red"), Tag("blue"), Tag("green")]
    assert build_caption("a photo", tags, max_length=20) == "a photo, red, blue"
    assert build_caption("a very long main prompt", tags, max_length=5) == "a very long main prompt"
    assert build_caption("", tags, max_length=2) == "red"  # the first part always stays


def test_cond_dropout_empties_captions_per_item_or_with_the_run_value():
    items = [tagged_item(2, cond_dropout=1.0), tagged_item(2, cond_dropout=0.0), tagged_item(2)]
    dropped = Counter()
    for epoch in range(200):
        dataset = dataset_of(items, epoch, cond_dropout=0.5)
        for sample in range(3):
            dropped[sample] += dataset.caption(sample) == ""
    assert (dropped[0], dropped[1]) == (200, 0)
    assert 70 < dropped[2] < 130
    assert dataset_of(items, 7, cond_dropout=0.5).caption(2) == dataset_of(items, 7, cond_dropout=0.5).caption(2)
    assert dataset_of(items[2:], 7).caption(0) == "m, t1, t2"  # the run value defaults to off


def test_own_flip_p_beats_the_run_value():
    items = [tagged_item(0, flip_p=1.0), tagged_item(0, flip_p=0.0), tagged_item(0)]
    dataset = dataset_of(items, flip_p=0.0)
    assert [dataset.should_flip(sample) for sample in range(3)] == [True, False, False]
    assert [dataset_of(items, flip_p=1.0).should_flip(sample) for sample in range(3)] == [True, False, True]


def test_batches_carry_built_captions_and_loss_scales():
    items = list(scan_images(ED2_DATA).items)
    plan = BucketBatches(items, 2, 512)
    dataset = ImageBatchDataset(items, plan, seed=1, epoch=0)
    batches = list(make_loader(dataset, plan.epoch_batches(0, seed=1)))
    for batch in batches:
        assert batch["loss_scales"].shape == (len(batch["captions"]),)
        for path, caption, scale in zip(batch["paths"], batch["captions"], batch["loss_scales"].tolist(), strict=True):
            in_preservation_folder = Path(path).parent.name == "preservation"
            assert scale == (0.5 if in_preservation_folder else 1.0)  # local.yaml: this folder only
            if in_preservation_folder:  # shuffled and capped, the main prompt first
                assert len(caption) <= 60 and caption.startswith(ed2_main_prompt(Path(path)))


def ed2_main_prompt(path: Path) -> str:
    return {"landscape_01.png": "a landscape", "landscape_02.png": "a landscape", "street_01.png": "street"}[path.name]


# --- folder files and sidecars ---------------------------------------------------------------


def test_global_yaml_applies_to_all_subfolders_and_nearer_files_win(tmp_path):
    write(tmp_path / "global.yaml", "multiply: 3\nflip_p: 0.1\n")
    write(tmp_path / "a" / "global.yml", "flip_p: 0.2\n")
    write(tmp_path / "a" / "b" / "local.yaml", "flip_p: 0.3\n")
    write(tmp_path / "a" / "b" / "own.yaml", "flip_p: 0.4\n")
    for path in ("top.png", "a/one.png", "a/b/two.png", "a/b/own.png", "a/b/c/three.png"):
        image(tmp_path / path)
    items = by_name(scan_images(tmp_path).items)
    flips = {name: item.flip_p for name, item in items.items()}
    assert flips == {"top.png": 0.1, "one.png": 0.2, "two.png": 0.3, "own.png": 0.4, "three.png": 0.2}
    assert {item.multiply for item in items.values()} == {3.0}


def test_local_yaml_beats_the_folder_value_files(tmp_path):
    write(tmp_path / "multiply.txt", "2")
    write(tmp_path / "cond_dropout.txt", "0.3")
    write(tmp_path / "local.yaml", "multiply: 4\n")
    image(tmp_path / "x.png")
    (item,) = scan_images(tmp_path).items
    assert (item.multiply, item.cond_dropout) == (4.0, 0.3)


def test_shuffle_tags_txt_turns_shuffling_on_by_its_presence(tmp_path):
    write(tmp_path / "on" / "shuffle_tags.txt", "")
    image(tmp_path / "on" / "x.png")
    image(tmp_path / "off" / "y.png")
    items = by_name(scan_images(tmp_path).items)
    assert (items["x.png"].shuffle_tags, items["y.png"].shuffle_tags) == (True, None)


def test_folder_tags_add_to_the_image_tags_image_first(tmp_path):
    write(tmp_path / "global.yaml", "tags: [style, shared]\n")
    write(tmp_path / "sub" / "local.yaml", "tags:\n  - shared\n  - tag: folder tag\n    weight: 3\n")
    write(tmp_path / "sub" / "x.txt", "a cat, sitting")
    image(tmp_path / "sub" / "x.png")
    (item,) = scan_images(tmp_path).items
    # The heaviest tag first (ED2 orders tags by weight), then the image's, its folder's, the global one's.
    assert item.caption == "a cat, folder tag, sitting, shared, style"
    assert Tag("folder tag", 3.0) in item.tags


def test_folder_main_prompt_beats_the_file_name_but_not_the_sidecar(tmp_path):
    write(tmp_path / "local.yaml", "main_prompt: photo of sks dog\n")
    image(tmp_path / "IMG_0001.png")
    image(tmp_path / "IMG_0002.png")
    write(tmp_path / "IMG_0002.txt", "a dog on grass")
    captions = {item.path.name: item.caption for item in scan_images(tmp_path).items}
    assert captions == {"IMG_0001.png": "photo of sks dog", "IMG_0002.png": "a dog on grass"}


def test_yaml_sidecar_caption_rules(tmp_path):
    write(tmp_path / "a.yaml", "caption: main, one, two\ntags: [three]\n")  # explicit tags replace the caption's
    write(tmp_path / "b.yaml", "multiply: 2\n")  # settings only: the .txt still gives the caption
    write(tmp_path / "b.txt", "from the txt, tag")
    write(tmp_path / "c.yml", "main_prompt: from the yaml\n")
    write(tmp_path / "c.txt", "from the txt")
    write(tmp_path / "d.yaml", "tags: 'x, y'\n")  # tags as one comma-separated text; main prompt from the name
    for name in "abcd":
        image(tmp_path / f"{name}.png")
    items = by_name(scan_images(tmp_path).items)
    assert items["a.png"].caption == "main, three"
    assert (items["b.png"].caption, items["b.png"].multiply) == ("from the txt, tag", 2.0)
    assert items["c.png"].caption == "from the yaml"
    assert items["d.png"].caption == "d, x, y"


def test_unknown_keys_warn_with_a_suggestion(tmp_path):
    write(tmp_path / "x.yaml", "multipy: 2\nbatchid: 3\n")
    image(tmp_path / "x.png")
    result = scan_images(tmp_path)
    assert result.items[0].multiply == 1.0
    assert any("'multipy'" in line and "did you mean 'multiply'" in line for line in result.warnings)
    assert any("'batchid'" in line and "did you mean 'batch_id'" in line for line in result.warnings)


@pytest.mark.parametrize(
    ("file_name", "text", "expected_in_message"),
    [
        ("multiply.txt", "abc", "multiply = 'abc'"),
        ("multiply.txt", "-1", "multiply = '-1'"),
        ("flip_p.txt", "2", "flip_p = '2'"),
        ("cond_dropout.txt", "nan", "cond_dropout = 'nan'"),
        ("local.yaml", "flip_p: 2\n", "flip_p = 2"),
        ("local.yaml", "multiply: -0.5\n", "multiply = -0.5"),
        ("local.yaml", "keep_tags: 1.5\n", "keep_tags = 1.5"),
        ("local.yaml", "max_caption_length: 0\n", "max_caption_length = 0"),
        ("local.yaml", "shuffle_tags: maybe\n", "shuffle_tags = 'maybe'"),
        ("local.yaml", "multiply: yes\n", "multiply = True"),
        ("local.yaml", "tags: 5\n", "tags = 5"),
        ("local.yaml", "tags: [{tag: x, weight: 0}]\n", "weight"),
        ("global.yaml", "flip_p: [0.5\n", "not valid YAML at line"),
        ("global.yaml", "- a list\n", "must hold 'key: value' lines"),
        ("x.yaml", "loss_scale: inf\n", "loss_scale = 'inf'"),
    ],
)
def test_bad_values_are_errors_naming_the_file_and_value(tmp_path, file_name, text, expected_in_message):
    write(tmp_path / file_name, text)
    image(tmp_path / "x.png")
    with pytest.raises(DataSettingsError) as raised:
        scan_images(tmp_path)
    assert str(tmp_path / file_name) in str(raised.value)
    assert expected_in_message in str(raised.value)


def test_every_bad_value_is_reported_at_once_and_becomes_a_config_error(tmp_path):
    write(tmp_path / "a" / "multiply.txt", "abc")
    write(tmp_path / "b" / "y.yaml", "flip_p: 2\ncond_dropout: -1\n")
    image(tmp_path / "a" / "x.png")
    image(tmp_path / "b" / "y.png")
    with pytest.raises(ConfigError) as raised:
        prepare_data(config_for(tmp_path, tmp_path))
    message = str(raised.value)
    assert "3 bad value(s)" in message and "multiply = 'abc'" in message
    assert "flip_p = 2" in message and "cond_dropout = -1" in message


def test_all_images_at_multiply_zero_is_a_config_error(tmp_path):
    write(tmp_path / "multiply.txt", "0")
    image(tmp_path / "x.png")
    with pytest.raises(ConfigError, match="multiply 0"):
        prepare_data(config_for(tmp_path, tmp_path))


# --- JSON manifest ---------------------------------------------------------------------------


def test_manifest_with_caption_text_object_file_and_none():
    result = scan_images(ED2_PROJECT / "manifest.json")
    assert result.skipped == []
    items = by_name(result.items)
    assert [item.path for item in result.items][0] == ED2_DATA / "characters" / "alice_01.png"
    assert items["alice_01.png"].caption == "alice in a manifest, red hair, smiling"  # ED2 lost these paths
    # hat (weight 2) before beard: ED2 orders tags by weight
    assert (items["bob_01.png"].caption, items["bob_01.png"].multiply) == ("bob in a manifest, hat, beard", 2.0)
    assert Tag("hat", 2.0) in items["bob_01.png"].tags
    landscape = items["landscape_01.png"]  # caption read from the named .txt file
    assert (landscape.caption, landscape.flip_p) == ("a landscape, desert, dunes, noon", 0.5)
    tree = items["tree_01.png"]
    assert (tree.caption, tree.multiply, tree.cond_dropout, tree.shuffle_tags) == ("an oak, autumn", 0.5, 0.2, True)
    # No caption in the entry: the image's own sidecar; folder files are not read for manifest images.
    assert (items["dana_01.png"].caption, items["dana_01.png"].flip_p) == ("dana, standing, full body", None)
    assert items["alice_01.png"].multiply == 1.0


def test_manifest_entry_wins_over_the_image_sidecar(tmp_path):
    image(tmp_path / "img" / "x.png")
    write(tmp_path / "img" / "x.yaml", "main_prompt: from sidecar\nmultiply: 3\nflip_p: 0.5\n")
    write(tmp_path / "list.json", '[{"image": "img/x.png", "caption": "from manifest", "multiply": 2}]')
    (item,) = scan_images(tmp_path / "list.json").items
    assert (item.caption, item.multiply, item.flip_p) == ("from manifest", 2.0, 0.5)


def test_manifest_problems_are_reported(tmp_path):
    image(tmp_path / "ok.png")
    write(tmp_path / "list.json", '[{"image": "ok.png"}, {"image": "missing.png"}]')
    result = scan_images(tmp_path / "list.json")
    assert [item.path.name for item in result.items] == ["ok.png"]
    assert [entry.path.name for entry in result.skipped] == ["missing.png"]

    write(tmp_path / "bad.json", '[{"caption": "no image"}, {"image": "ok.png", "multiply": "abc"}]')
    with pytest.raises(DataSettingsError) as raised:
        scan_images(tmp_path / "bad.json")
    assert "bad.json entry 1" in str(raised.value) and "entry 2 (ok.png): multiply = 'abc'" in str(raised.value)

    write(tmp_path / "broken.json", '[{"image": "ok.png",}]')
    with pytest.raises(DataSettingsError, match="not valid JSON.*line 1"):
        scan_images(tmp_path / "broken.json")
    write(tmp_path / "object.json", '{"image": "ok.png"}')
    with pytest.raises(DataSettingsError, match="must hold a list"):
        scan_images(tmp_path / "object.json")


# --- multipliers -----------------------------------------------------------------------------


def square_items(multipliers: list[float]) -> list[ImageItem]:
    return [ImageItem(Path(f"/fake/{n:03d}.png"), f"c{n}", 64, 64, multiply=m) for n, m in enumerate(multipliers)]


def test_whole_multipliers_repeat_each_image_exactly():
    items = square_items([2.0, 3.0, 1.0, 0.0])
    plan = BucketBatches(items, 4, 64)
    assert (plan.samples_per_epoch, plan.num_batches) == (6, 2)
    for epoch in range(5):
        counts = Counter(sample % 4 for batch in plan.epoch_batches(epoch, 1) for sample in batch)
        assert counts == {0: 2, 1: 3, 2: 1}


def test_fractional_multipliers_give_a_fixed_batch_count_with_new_picks_each_epoch():
    items = square_items([0.5] * 10 + [1.0] * 3)
    plan = BucketBatches(items, 2, 64)
    assert (plan.samples_per_epoch, plan.num_batches) == (8, 4)  # 3 + round(10 x 0.5)
    picks, seen = [], Counter()
    for epoch in range(200):
        batches = plan.epoch_batches(epoch, seed=3)
        assert len(batches) == 4 and sum(map(len, batches)) == 8
        assert batches == plan.epoch_batches(epoch, seed=3)  # a pure function of (seed, epoch)
        chosen = frozenset(sample for batch in batches for sample in batch if sample < 10)
        picks.append(chosen)
        seen.update(chosen)
    assert len(set(picks)) > 100
    assert all(70 < seen[index] < 130 for index in range(10))  # each half-image: about every other epoch


def test_whole_and_fractional_parts_combine():
    plan = BucketBatches(square_items([2.5, 2.5]), 1, 64)
    assert plan.samples_per_epoch == 5  # 2 + 2 whole, round(0.5 + 0.5) = 1 extra
    for epoch in range(10):
        counts = sorted(Counter(s % 2 for batch in plan.epoch_batches(epoch, 0) for s in batch).values())
        assert counts == [2, 3]


@pytest.mark.parametrize(
    ("fractions", "count", "chances"),
    [
        ([0.5, 0.5, 0.5], 1, [1 / 3, 1 / 3, 1 / 3]),
        ([0.5, 0.5, 0.5], 2, [2 / 3, 2 / 3, 2 / 3]),
        ([0.9, 0.6], 2, [1.0, 1.0]),
        ([0.9, 0.1, 0.1], 1, [0.9 / 1.1, 0.1 / 1.1, 0.1 / 1.1]),
        ([0.95, 0.3, 0.3], 2, [1.0, 0.5, 0.5]),  # 0.95 x 2 / 1.55 > 1: capped, the rest share one copy
        ([0.2, 0.2], 0, [0.0, 0.0]),
    ],
)
def test_extra_copy_chances_sum_to_the_fixed_count(fractions, count, chances):
    assert inclusion_chances(fractions, count) == pytest.approx(chances)
    drawn = Counter()
    for seed in range(600):
        picks = draw_extra_copies(fractions, count, random.Random(seed))
        assert len(picks) == len(set(picks)) == count
        drawn.update(picks)
    for index, chance in enumerate(chances):
        assert drawn[index] / 600 == pytest.approx(chance, abs=0.07)


# --- ED2's own rules, each number from its code (EveryDream2trainer) -----------------------------------------------

ED2_TRAINING_DATA = ROOT / "tests" / "fixtures" / "ed2_repo" / "training_data"


@pytest.mark.parametrize(
    ("multipliers", "samples"),
    [
        ([0.5, 0.5, 0.5], 1),  # floor(1.5); per-bucket rounding half up trained 2
        ([2.5, 2.5], 5),
        ([0.5] * 10 + [1.0] * 3, 8),
        ([0.3] * 10, 3),
        ([2.3] * 10, 23),  # the exact sum: ED2's float sum, 22.999999999999996, gave 22
    ],
)
def test_an_epoch_trains_ed2s_floor_of_the_summed_multipliers(multipliers, samples):
    """ED2 data/data_loader.py, DataLoaderMultiAspect.__init__: expected_epoch_size = floor(sum of the multipliers);
    __pick_multiplied_set takes every whole copy, then fractional images until that count is reached, every epoch."""
    plan = BucketBatches(square_items(multipliers), 1, 64)
    assert plan.samples_per_epoch == samples
    for epoch in range(5):
        assert sum(map(len, plan.epoch_batches(epoch, seed=1))) == samples


def test_the_extra_copies_are_shared_among_buckets_in_a_fixed_way():
    """ED2 data/data_loader.py, DataLoaderMultiAspect.__init__: floor(0.5 + 0.5 + 0.5 + 0.5) = 2 extra copies an epoch
    for four half images. Here in two buckets of two, each bucket gets one every epoch, so batches stay fixed."""
    assert extra_copies_per_group([[0.5, 0.5], [0.5, 0.5]]) == [1, 1]
    assert extra_copies_per_group([[0.5], [0.5], [0.5]]) == [1, 0, 0]  # floor(1.5) = 1, to the first tie
    # floor(3.2) - 1 whole = 2 extra copies, to the largest remainders 0.7 and 0.6
    assert extra_copies_per_group([[0.2, 0.2], [0.7], [1.6], [0.5]]) == [0, 1, 1, 0]
    tall_and_square = [ImageItem(Path(f"/fake/{n}.png"), "c", 64, 128 if n % 2 else 64, multiply=0.5) for n in range(4)]
    plan = BucketBatches(tall_and_square, 1, 128)
    assert (plan.samples_per_epoch, plan.num_batches) == (2, 2)


def test_a_windows_multiply_txt_and_its_fraction_count_as_in_ed2():
    """ED2 data/dataset.py, Dataset.__local_cfg: multiply.txt read as float("0.5\\r\\n"); data/data_loader.py
    DataLoaderMultiAspect.__init__: floor(3 x 1 + 3 x 0.5) = 4 samples an epoch."""
    items = scan_images(ED2_TRAINING_DATA).items
    assert sorted(item.multiply for item in items) == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert BucketBatches(items, 2, 64).samples_per_epoch == 4


def test_tags_are_ordered_by_weight_even_when_not_shuffled(tmp_path):
    """ED2 data/dataset.py, Dataset.image_train_items: the tags sorted by weight, heaviest first (ties keep their
    order); data/image_train_item.py ImageCaption.get_caption joins them so when shuffle_tags is off."""
    write(
        tmp_path / "x.yaml",
        "main_prompt: a boat\ntags:\n  - light\n  - tag: heavy\n    weight: 3\n"
        "  - tag: middle\n    weight: 1.5\n  - also light\n",
    )
    image(tmp_path / "x.png")
    (item,) = scan_images(tmp_path).items
    assert item.caption == "a boat, heavy, middle, light, also light"
    assert dataset_of([item], shuffle_tags=False).caption(0) == "a boat, heavy, middle, light, also light"


def test_an_image_with_a_txt_and_a_yaml_gets_both_files_tags():
    """ED2 data/dataset.py, Dataset.__sidecar_cfg folds .txt, .caption, .yml, .yaml in that order with
    ImageConfig.merge: the .yaml's main prompt wins, its tags come first, then the .txt's; then sorted by weight."""
    items = by_name(scan_images(ED2_TRAINING_DATA).items)
    white = items["white lighthouse_01.png"]
    assert white.caption == "a white lighthouse, stormy sea, night, waves, seagulls"


def test_every_sidecar_of_an_image_is_read_and_the_later_main_prompt_wins(tmp_path):
    """ED2 data/dataset.py, Dataset.__sidecar_cfg: .txt then .caption then .yml then .yaml; ImageConfig.merge puts
    the later file's main prompt first, and Dataset.image_train_items uses the first (warning of the others)."""
    write(tmp_path / "x.txt", "from the txt, one")
    write(tmp_path / "x.caption", "from the caption, two")
    write(tmp_path / "x.yml", "tags: [three]\nmultiply: 2\n")
    write(tmp_path / "x.yaml", "multiply: 3\n")
    image(tmp_path / "x.png")
    result = scan_images(tmp_path)
    (item,) = result.items
    assert (item.caption, item.multiply) == ("from the caption, three, two, one", 3.0)
    assert any("several sidecars" in line and "x.png" in line for line in result.warnings)


def test_jfif_images_are_found():
    """ED2 utils/fs_helpers.py is_image lists .jfif (and doc/DATA.md names it); Pillow reads it as the JPEG it is."""
    items = by_name(scan_images(ED2_TRAINING_DATA).items)
    striped = items["striped lighthouse_01.jfif"]
    assert (striped.caption, striped.width, striped.height) == ("striped lighthouse", 64, 64)
    dataset = ImageBatchDataset([striped], BucketBatches([striped], 1, 64), seed=0, epoch=0)
    assert dataset[[0]]["pixel_values"].shape == (1, 3, 64, 64)


def batch_ids_of(plan: BucketBatches, items: list[ImageItem], batch: list[int]) -> set:
    return {items[sample % plan.num_items].batch_id for sample in batch}


def test_images_with_a_batch_id_share_batches_and_their_runt_joins_the_others():
    """ED2 data/data_loader.py, DataLoaderMultiAspect.get_shuffled_image_buckets: buckets keyed by (batch_id, width,
    height); a named bucket's last len % batch_size images are moved to the default batch id's bucket. Here: 3
    lighthouses (batch_id.txt) at batch size 2 -> 1 batch of two lighthouses; the third joins the default bucket with
    the one extra harbour copy of floor(1.5) -> 1 batch: 2 batches, 4 samples, every epoch."""
    items = scan_images(ED2_TRAINING_DATA).items
    assert {item.batch_id for item in items} == {"lighthouses", None}  # batch_id.txt's CRLF stripped
    plan = BucketBatches(items, 2, 64)
    assert (plan.samples_per_epoch, plan.num_batches) == (4, 2)
    for epoch in range(6):
        batches = plan.epoch_batches(epoch, seed=9)
        assert len(batches) == 2
        groups = Counter(frozenset(batch_ids_of(plan, items, batch)) for batch in batches)
        assert groups == {frozenset({"lighthouses"}): 1, frozenset({"lighthouses", None}): 1}


def test_batch_id_from_yaml_and_from_batch_id_txt_name_the_same_group(tmp_path):
    """ED2 data/dataset.py: batch_id from local.yaml / an image's .yaml (ImageConfig.from_dict) or batch_id.txt
    (Dataset.__local_cfg), for that folder only; a number is the same name as its text."""
    write(tmp_path / "a" / "batch_id.txt", "7\n")
    write(tmp_path / "b" / "local.yaml", "batch_id: 7\n")
    write(tmp_path / "b" / "y2.yaml", "batch_id: other\n")
    for path in ("a/x1.png", "a/x2.png", "b/y1.png", "b/y2.png", "c/z.png", "a/sub/w.png"):
        image(tmp_path / path)
    ids = {item.path.name: item.batch_id for item in scan_images(tmp_path).items}
    assert ids == {"x1.png": "7", "x2.png": "7", "y1.png": "7", "y2.png": "other", "z.png": None, "w.png": None}
    plan = BucketBatches(scan_images(tmp_path).items, 3, 64)
    # group "7": 3 -> 1 batch; "other": 1 -> joins the default group with z and w: 3 -> 1 batch
    assert plan.num_batches == 2


@pytest.mark.parametrize(
    ("num_items", "proportion", "held_out"),
    [(10, 0.12, 2), (20, 0.15, 3), (7, 0.15, 2), (100, 0.29, 29), (30, 0.1, 3), (40, 0.01, 1)],
)
def test_the_automatic_split_holds_out_ed2s_ceiling_and_the_same_images(tmp_path, num_items, proportion, held_out):
    """ED2 data/every_dream_validation.py, get_random_split: max(1, ceil(proportion x count)) items, after sorting by
    path and random.seed(seed); random.shuffle. ceil(1.2) = 2 where rounding half up held out 1; 0.1 x 30 holds out
    3 (ED2's float product 3.0000000000000004 made it 4: the one difference, docs/ed2.md)."""
    items = [
        ImageItem(tmp_path / f"img-{n}" / "x.png" if n % 3 else tmp_path / f"img{n}.png", f"c{n}", 64, 64)
        for n in range(num_items)
    ]
    train, val = split_items(items, "automatic", proportion, seed=555)
    assert len(val) == held_out and len(train) == num_items - held_out
    ed2_order = sorted(items, key=lambda item: str(item.path))
    random.Random(555).shuffle(ed2_order)
    assert {item.path for item in val} == {item.path for item in ed2_order[:held_out]}


def test_an_ed2_config_is_told_where_its_data_is_read_differently(tmp_path):
    """docs/ed2.md, differences on purpose: ED2 data/data_loader.py get_shuffled_image_buckets fills a bucket's last
    batch with repeated images and lets the fractional copies fall into any bucket; here neither, and an ED2 config
    (it holds ED2-only keys such as gpuid) is told so, with the numbers."""
    values = {
        "data_root": str(ED2_TRAINING_DATA),
        "logdir": str(tmp_path / "logs"),
        "resolution": 64,
        "batch_size": 3,
        "grad_accum": 2,
        "validation_config": None,
    }
    ed2 = tmp_path / "train.json"
    ed2.write_text(json.dumps({**values, "gpuid": 0}))
    notes = prepare_data(load_config(ed2)).notes
    assert any("fractional multipliers give 4 samples an epoch" in note for note in notes)
    assert any("1 batch(es) an epoch are smaller than batch_size" in note for note in notes)
    assert any("with grad_accum 2 those batches are not gathered" in note for note in notes)
    assert not any(note.startswith("ED2:") for note in prepare_data(load_config(None, values)).notes)
