"""Nothing lost in the data: folder links, text encodings, empty captions, extra validation folders."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest
from PIL import Image

from data.images import scan_images
from data.prepare import prepare_data
from data.sidecars import DataSettingsError
from utils.config import ConfigError, load_config

CAPTION = "café au lait, ☕ cup, naïve"  # not ASCII, so a wrong decoding shows


# --- helpers ---------------------------------------------------------------------------------


def image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (90, 120, 200)).save(path)
    return path


def write(path: Path, text: str = "", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def link(path: Path, target: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def relative_names(result, root: Path) -> list[str]:
    return [item.path.relative_to(root).as_posix() for item in result.items]


def config_for(data_root: Path, tmp_path: Path, validation_config: dict | None = None):
    values = {
        "data_root": str(data_root),
        "logdir": str(tmp_path / "logs"),
        "resolution": 64,
        "batch_size": 1,
        "max_epochs": 1,
        "validation_config": validation_config,
    }
    return load_config(None, values)


# --- folder links ----------------------------------------------------------------------------


def test_a_linked_folder_is_scanned_with_its_files_and_the_settings_above_the_link(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere" / "photos"
    image(root / "own.png")
    write(root / "global.yaml", "flip_p: 0.25\n")
    image(elsewhere / "x.png")
    write(elsewhere / "x.txt", "from the linked folder")
    write(elsewhere / "multiply.txt", "3")
    image(elsewhere / "deeper" / "y.png")
    link(root / "linked", elsewhere)
    result = scan_images(root)
    assert relative_names(result, root) == ["linked/deeper/y.png", "linked/x.png", "own.png"]
    linked = result.items[1]
    assert (linked.caption, linked.multiply, linked.flip_p) == ("from the linked folder", 3.0, 0.25)
    assert result.warnings == [] and result.skipped == []


def test_a_link_to_a_folder_above_it_is_not_followed_and_is_named(tmp_path):
    root = tmp_path / "root"
    image(root / "sub" / "x.png")
    image(tmp_path / "beside_root.png")  # reachable only through the link to root's parent
    link(root / "sub" / "loop", root)
    link(root / "up", tmp_path)
    result = scan_images(root)
    assert relative_names(result, root) == ["sub/x.png"]
    assert len(result.warnings) == 2
    assert all("not followed" in line for line in result.warnings)
    assert any(str(root / "sub" / "loop") in line for line in result.warnings)
    assert any(str(root / "up") in line for line in result.warnings)


def test_a_cycle_of_links_outside_data_root_ends(tmp_path):
    root, first, second = tmp_path / "root", tmp_path / "first", tmp_path / "second"
    image(first / "a.png")
    image(second / "b.png")
    link(first / "to_second", second)
    link(second / "to_first", first)
    link(root / "start", first)
    result = scan_images(root)
    assert relative_names(result, root) == ["start/a.png", "start/to_second/b.png"]


def test_a_file_reached_by_several_paths_is_one_image_at_its_own_path(tmp_path):
    root = tmp_path / "root"
    image(root / "real" / "x.png")
    write(root / "real" / "x.txt", "the real caption")
    link(root / "alias", root / "real")  # sorts before "real": still read at its own place
    link(root / "real" / "a_link.png", root / "real" / "x.png")  # sorts before x.png
    result = scan_images(root)
    assert relative_names(result, root) == ["real/x.png"]
    assert result.items[0].caption == "the real caption"


def test_a_broken_folder_link_is_a_warning(tmp_path):
    image(tmp_path / "x.png")
    link(tmp_path / "unmounted", tmp_path / "no" / "such" / "drive")
    result = scan_images(tmp_path)
    assert len(result.items) == 1
    assert len(result.warnings) == 1 and "unmounted" in result.warnings[0] and "broken link" in result.warnings[0]


def test_a_broken_link_in_place_of_a_sidecar_is_reported_not_taken_as_missing(tmp_path):
    image(tmp_path / "captioned" / "x.png")
    link(tmp_path / "captioned" / "x.txt", tmp_path / "gone.txt")
    result = scan_images(tmp_path / "captioned")
    assert result.items == [] and "sidecar unreadable" in result.skipped[0].reason

    image(tmp_path / "folder" / "y.png")
    link(tmp_path / "folder" / "multiply.txt", tmp_path / "gone.txt")
    with pytest.raises(DataSettingsError, match="multiply.txt: unreadable"):
        scan_images(tmp_path / "folder")


def test_a_manifest_lists_each_file_once(tmp_path):
    image(tmp_path / "x.png")
    link(tmp_path / "alias.png", tmp_path / "x.png")
    write(
        tmp_path / "list.json",
        '[{"image": "x.png", "caption": "first"}, {"image": "alias.png"}, {"image": "./x.png", "caption": "again"}]',
    )
    result = scan_images(tmp_path / "list.json")
    assert [(item.path.name, item.caption) for item in result.items] == [("x.png", "first")]
    assert len(result.warnings) == 2 and all("the same file as entry 1" in line for line in result.warnings)


# --- text encodings --------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_caption_files_with_a_byte_order_mark_are_decoded(tmp_path, encoding):
    mark = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(mark + f"{CAPTION}\r\n".encode(encoding))
    result = scan_images(tmp_path)
    assert [item.caption for item in result.items] == [CAPTION]
    assert result.warnings == []


def test_settings_files_in_utf16_are_decoded(tmp_path):
    write(tmp_path / "multiply.txt", "2", "utf-16")
    write(tmp_path / "local.yaml", "flip_p: 0.3\ntags: [naïve]\n", "utf-16")
    write(tmp_path / "x.yaml", "main_prompt: café\n", "utf-16")
    image(tmp_path / "x.png")
    (item,) = scan_images(tmp_path).items
    assert (item.caption, item.multiply, item.flip_p) == ("café, naïve", 2.0, 0.3)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (CAPTION.encode("utf-16-le"), "NUL bytes"),  # UTF-16 without a byte-order mark
        (codecs.BOM_UTF16_LE + b"a\x00b", "not valid UTF-16"),  # an odd number of bytes
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "NUL bytes"),  # not a text file at all
    ],
    ids=["utf-16-without-mark", "utf-16-odd-length", "binary"],
)
def test_an_undecodable_caption_file_is_read_as_missing_with_a_warning(tmp_path, raw, reason):
    write(tmp_path / "local.yaml", "main_prompt: the folder prompt\n")
    image(tmp_path / "with_caption_file.png")
    (tmp_path / "with_caption_file.txt").write_bytes(raw)
    write(tmp_path / "with_caption_file.caption", "the next caption file")
    image(tmp_path / "without.png")
    (tmp_path / "without.txt").write_bytes(raw)
    result = scan_images(tmp_path)
    captions = {item.path.name: item.caption for item in result.items}
    assert captions == {"with_caption_file.png": "the next caption file", "without.png": "the folder prompt"}
    assert len(result.warnings) == 2
    for name in ("with_caption_file.txt", "without.txt"):
        (line,) = [line for line in result.warnings if str(tmp_path / name) in line]
        assert reason in line and "as if it were missing" in line


def test_an_undecodable_caption_file_named_by_a_manifest_falls_back_to_the_image_sidecar(tmp_path):
    image(tmp_path / "x.png")
    write(tmp_path / "x.txt", "the sidecar caption")
    write(tmp_path / "caption.txt", CAPTION, "utf-16-le")
    write(tmp_path / "list.json", '[{"image": "x.png", "caption": "caption.txt", "multiply": 2}]')
    result = scan_images(tmp_path / "list.json")
    assert [(item.caption, item.multiply) for item in result.items] == [("the sidecar caption", 2.0)]
    assert len(result.warnings) == 1 and "caption.txt" in result.warnings[0]


def test_an_undecodable_settings_file_is_an_error_naming_it(tmp_path):
    write(tmp_path / "local.yaml", "multiply: 2\n", "utf-16-le")
    image(tmp_path / "x.png")
    with pytest.raises(DataSettingsError, match="local.yaml: holds NUL bytes"):
        scan_images(tmp_path)


# --- empty captions --------------------------------------------------------------------------


def test_empty_captions_are_counted_in_the_summary_and_each_listed_in_the_warnings(tmp_path):
    image(tmp_path / "empty_file.png")
    write(tmp_path / "empty_file.txt", " , \n")
    image(tmp_path / "_0001.png")  # a file name caption that ends before it begins
    image(tmp_path / "fine.png")
    data = prepare_data(config_for(tmp_path, tmp_path))
    assert data.empty_captions == [tmp_path / "_0001.png", tmp_path / "empty_file.png"]
    assert "warning: 2 image(s) with an empty caption" in data.summary()
    assert "_0001.png" not in data.summary()  # one line for all of them, however many
    listed = [line for line in data.warnings if "empty caption" in line]
    assert len(listed) == 2
    assert all(line.endswith(name) for line, name in zip(listed, ["_0001.png", "empty_file.png"], strict=True))


# --- extra validation folders ----------------------------------------------------------------


def extra_config(tmp_path: Path, folders: dict[str, str], **validation):
    """data_root holds one image, all trained: an automatic split of 0 holds none out."""
    image(tmp_path / "train" / "a.png")
    validation = {"auto_split_proportion": 0.0, **validation, "extra_manual_datasets": folders}
    return config_for(tmp_path / "train", tmp_path, validation)


def test_extra_validation_folders_are_scanned_as_validation_items(tmp_path):
    write(tmp_path / "holdout" / "multiply.txt", "3")
    write(tmp_path / "holdout" / "flip_p.txt", "0.5")
    image(tmp_path / "holdout" / "h.png")
    data = prepare_data(extra_config(tmp_path, {"holdout": str(tmp_path / "holdout")}))
    (item,) = data.extra_validation["holdout"]
    assert (item.path.name, item.multiply, item.flip_p, item.cond_dropout) == ("h.png", 1.0, 0.0, 0.0)
    assert [item.path.name for item in data.train] == ["a.png"]


@pytest.mark.parametrize(
    ("make", "problem"), [(lambda path: None, "no such folder"), (image, "is a file")], ids=["missing", "a-file"]
)
def test_a_missing_extra_validation_folder_is_a_config_error_naming_the_key(tmp_path, make, problem):
    folder = tmp_path / "holdout.png"
    make(folder)
    with pytest.raises(ConfigError) as raised:
        prepare_data(extra_config(tmp_path, {"holdout": str(folder)}))
    message = str(raised.value)
    assert "validation_config.extra_manual_datasets.holdout" in message
    assert str(folder) in message and problem in message


def test_an_empty_extra_validation_folder_is_left_out_with_a_warning(tmp_path):
    (tmp_path / "empty").mkdir()
    image(tmp_path / "full" / "f.png")
    data = prepare_data(extra_config(tmp_path, {"empty": str(tmp_path / "empty"), "full": str(tmp_path / "full")}))
    assert list(data.extra_validation) == ["full"]
    (line,) = data.warnings
    assert "validation_config.extra_manual_datasets.empty" in line and "nothing is logged" in line


def test_extra_validation_folders_are_not_read_with_validation_off(tmp_path):
    data = prepare_data(extra_config(tmp_path, {"gone": str(tmp_path / "gone")}, validate_training=False))
    assert data.extra_validation == {}
