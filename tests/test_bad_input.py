"""Bad input, each with a clear message and nothing lost: broken and odd images, images that fail at load time,
NaN losses, a full disk, an unwritable output folder."""

import csv
import errno
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.loader
import trainer.step
import utils.state
from data.images import ImageLoadError
from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import Trainer
from trainer.resume import locate_state
from trainer.sampling import read_prompts
from utils.config import ConfigError, load_config
from utils.disk import disk_space_note, estimate_save_sizes
from utils.state import STATE_FOLDER, list_states, verify_state

FAST = dict(validation_config=None, no_save_ckpt=True, lr_scheduler="cyclic", lr_decay_steps=3, lr_min=1e-5)


def noise_image(path: Path, size=(96, 96), mode="RGB", **save_options) -> Path:
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, **save_options)
    return path


def add_bad_and_odd_images(folder: Path) -> None:
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("I am a text file")
    cut = noise_image(folder / "cut.png")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    noise_image(folder / "bomb.png", size=(256, 256))  # over twice MAX_IMAGE_PIXELS, set low below
    noise_image(folder / "cmyk.jpg", mode="CMYK", quality=95)
    noise_image(folder / "rgba.png", mode="RGBA")
    noise_image(folder / "gray.png", mode="L")
    Image.fromarray(np.full((96, 96), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    noise_image(folder / "small.png", size=(32, 32))
    (folder / "scene01.txt").write_bytes(b"a caption \xff\xfe with bad bytes")


def test_bad_and_odd_images_are_listed_in_the_start_summary_and_the_run_folder(
    model_cache, demo_copy, tmp_path, monkeypatch, capsys
):
    add_bad_and_odd_images(demo_copy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    disk = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: disk(10**9, 10**9 - 1000, 1000))
    trainer = Trainer(tiny_config(model_cache, demo_copy, tmp_path / "logs", validation_config=None))
    trainer.logger.close()
    out = capsys.readouterr().out

    assert "images: 25 found, 4 skipped, 25 train" in out  # 20 demo + cmyk, rgba, gray, 16-bit gray, small
    for name, reason in [
        ("zero.png", "zero-byte file"),
        ("text.jpg", "not an image"),
        ("cut.png", "truncated or corrupt"),
        ("bomb.png", "decompression bomb"),
    ]:
        assert f"skipped {demo_copy / name}: {reason}" in out
    assert (
        "warning: 1 image(s) smaller than their bucket will be upscaled (blurrier): "
        f"{demo_copy / 'small.png'} (32x32, bucket 64x64)" in out
    )
    assert "scene01.txt: not valid UTF-8" in out
    assert "warning: the saves of this run need about" in out and "only 0.00 GB are free" in out

    skipped_report = (trainer.run_dir / "skipped_images.txt").read_text()
    assert all(name in skipped_report for name in ("zero.png", "text.jpg", "cut.png", "bomb.png"))
    warnings_report = (trainer.run_dir / "data_warnings.txt").read_text()
    assert "scene01.txt: not valid UTF-8" in warnings_report
    assert f"undersized (upscaled to its bucket): {demo_copy / 'small.png'}" in warnings_report


def test_images_that_fail_at_load_time_are_dropped_and_reported(model_cache, tmp_path, monkeypatch, capsys):
    """Loads 3 and 4 (the whole micro-batch of step 2) and 5 (half of step 3's) fail."""
    calls = {"count": 0}
    real_load = data.loader.load_image

    def flaky_load(item, size, flip, transform=None):
        calls["count"] += 1
        if calls["count"] in (3, 4, 5):
            raise ImageLoadError(f"cannot load {item.path}: OSError: the network drive went away")
        return real_load(item, size, flip, transform)

    monkeypatch.setattr(data.loader, "load_image", flaky_load)
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, batch_size=2, max_steps=4, **FAST)
    summary = Trainer(config).run()
    out = capsys.readouterr().out

    assert summary["steps"] == 4 and summary["exit_code"] == 0
    assert summary["failed_images"] == 2  # one image of step 3, and step 2's whole micro-batch
    assert summary["skipped_updates"] == [(2, "no image of the step could be loaded")]
    assert "step 2: could not load (a whole micro-batch): no image in the batch could be loaded: cannot load" in out
    assert out.count("the network drive went away") == 3
    assert "step 2: no image of the step could be loaded: update skipped" in out
    report = (Path(summary["run_dir"]) / "skipped_images.txt").read_text()
    assert report.count("failed to load at step 2") == 1 and report.count("failed to load at step 3") == 1
    assert report.count("the network drive went away") == 3


def nan_from(monkeypatch, steps: set[int]) -> None:
    """The training loss of the given steps (one micro-batch each) becomes NaN."""
    real_loss = trainer.step.training_loss
    calls = {"count": 0}

    def loss(*args, **kwargs):
        calls["count"] += 1
        value = real_loss(*args, **kwargs)
        return value * float("nan") if calls["count"] in steps else value

    monkeypatch.setattr(trainer.step, "training_loss", loss)


def trained_weights(run: Trainer) -> dict:
    return {
        f"{name}.{key}": value.clone()
        for name, module in run.trained_models().items()
        for key, value in module.state_dict().items()
    }


def test_nan_losses_skip_their_updates_and_stop_the_run_after_max_nan_steps(model_cache, tmp_path, monkeypatch, capsys):
    config = tiny_config(
        model_cache, DEMO_DATA, tmp_path / "nan", max_steps=20, max_nan_steps=3, save_state_every_n_minutes=1e-9, **FAST
    )
    nan_from(monkeypatch, {3, 4, 5, 6})
    run = Trainer(config)
    summary = run.run()
    out = capsys.readouterr().out

    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("diverged", 1, 5)
    assert summary["skipped_updates"] == [(3, "loss is nan"), (4, "loss is nan"), (5, "loss is nan")]
    # The summary says the run was not finite, how many updates were skipped and which loss was the last finite one.
    assert (summary["finite"], summary["skipped_update_count"], summary["final_train_loss_step"]) == (False, 3, 2)
    assert "step 3: loss is nan: update skipped (weights unchanged, gradients zeroed)" in out
    assert "the loss was NaN/inf for 3 steps in a row (steps 3-5; max_nan_steps 3)" in out
    assert (
        'Lower the learning rate (lr is 0.0001; try 1e-05) and resume: run it again with "resume_from": '
        '"latest", "lr": "1e-05"'
    ) in out
    # No state after the last good step, and none of the skipped steps changed a weight.
    states = list_states(Path(summary["run_dir"]) / STATE_FOLDER)
    assert [s.name for s in states] == ["state-gs00001", "state-gs00002"]
    assert f"Last good state: {states[-1]}" in out
    assert all(p.grad is None for module in run.trained_models().values() for p in module.parameters())
    monkeypatch.undo()
    two_steps = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "ref", max_steps=20, **FAST), stop_at_step=2)
    two_steps.run()
    expected, actual = trained_weights(two_steps), trained_weights(run)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def test_one_nan_step_is_skipped_and_the_lr_curve_goes_on(model_cache, tmp_path, monkeypatch):
    nan_from(monkeypatch, {3})
    run = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, max_steps=6, **FAST))
    summary = run.run()
    assert (summary["steps"], summary["exit_code"]) == (6, 0)
    assert summary["skipped_updates"] == [(3, "loss is nan")]
    rows = csv.DictReader(open(Path(summary["run_dir"]) / "metrics.csv"))
    lrs = [float(row["lr_unet"]) for row in rows]
    assert lrs == pytest.approx([run.schedules.lr["unet"](k) for k in range(6)], rel=1e-6)


def test_a_full_disk_stops_the_run_with_its_last_good_state(model_cache, tmp_path, monkeypatch, capsys):
    real_write = utils.state.write_tensors

    def full_at_step_3(path, tensors):
        if "state-gs00003" in path.parent.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, tensors)

    monkeypatch.setattr(utils.state, "write_tensors", full_at_step_3)
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, max_steps=10, save_state_every_n_minutes=1e-9, **FAST)
    summary = Trainer(config).run()
    out = capsys.readouterr().out
    state_root = Path(summary["run_dir"]) / STATE_FOLDER

    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("save failed", 1, 3)
    assert (
        "saving the state at step 3 failed (the disk is full): [Errno 28] No space left on device. No "
        "half-written file was left and the previous saves are intact: last state "
        f"{state_root / 'state-gs00002'}"
    ) in out
    assert sorted(p.name for p in state_root.iterdir()) == ["state-gs00001", "state-gs00002"]
    assert all(verify_state(state) for state in list_states(state_root))
    assert not (Path(summary["run_dir"]) / "ckpts").exists(), "no checkpoint is attempted after the failed state"

    monkeypatch.undo()  # space freed: the run continues from its last good state
    resumed = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, max_steps=4, resume_from="latest", **FAST)).run()
    assert resumed["resumed_from"] == str(state_root / "state-gs00002") and resumed["exit_code"] == 0


@pytest.mark.parametrize("key", ["logdir", "save_ckpt_dir"])
def test_an_output_folder_that_cannot_be_written_is_named_before_anything_loads(model_cache, tmp_path, key):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if key == "logdir":
        config = tiny_config(model_cache, DEMO_DATA, blocker / "out")
    else:
        config = tiny_config(model_cache, DEMO_DATA, tmp_path, save_ckpt_dir=str(blocker / "out"))
    with pytest.raises(ConfigError, match=f"key '{key}': cannot write to the folder '{blocker / 'out'}"):
        Trainer(config).run()


def test_save_size_estimate_for_sd15_numbers(tmp_path, monkeypatch):
    unet, text_encoder, vae = 859_520_964, 123_060_480, 83_653_863
    sizes = estimate_save_sizes(
        unet + text_encoder,
        unet + text_encoder + vae,
        "adamw",
        states_kept=2,
        checkpoints=3,
        single_file=True,
        half=True,
    )
    assert sizes.state_bytes == (unet + text_encoder) * 12  # fp32 weights + two fp32 Adam moments
    assert sizes.checkpoint_bytes == (unet + text_encoder + vae) * 6  # fp32 folder + fp16 single file
    assert sizes.total == 3 * sizes.state_bytes + 3 * sizes.checkpoint_bytes
    disk = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: disk(0, 0, 100 * 1024**3))
    gigabytes = (3 * 11_790_977_328 + 3 * 6_397_411_842) / 1024**3
    assert disk_space_note(sizes, tmp_path).startswith(f"disk: the saves need about {gigabytes:.2f} GB (3 checkpoint")


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_launch_set_up_for_sharded_training_is_refused_with_the_ddp_command(
    model_cache, tmp_path, monkeypatch, variable, name
):
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=f"set up for {name} .*accelerate launch --multi_gpu --num_processes N"):
        Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, **FAST))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_sample_prompts_with_a_byte_order_mark_are_read(tmp_path, encoding):
    path = tmp_path / "prompts.txt"
    path.write_text("a café at night\nune crêpe\n", encoding=encoding)
    assert [request.prompt for request in read_prompts(str(path), []).requests] == ["a café at night", "une crêpe"]


def test_sample_prompts_that_are_not_text_are_named_not_a_traceback(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\na café\n".encode("cp1252"))
    with pytest.raises(
        ConfigError,
        match=rf"sample_prompts file '{path}' is not readable text: the byte 0xe9 at line "
        r"2, column 6 is not UTF-8",
    ):
        read_prompts(str(path), [])


def test_a_file_given_as_resume_from_is_named_with_what_to_give_instead(tmp_path):
    state = tmp_path / "run" / STATE_FOLDER / "state-gs00010"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")

    def located(resume_from: Path):
        return locate_state(load_config(None, {"data_root": str(DEMO_DATA), "resume_from": str(resume_from)}))

    with pytest.raises(
        ConfigError,
        match=rf"'{state / 'trainer_state.json'}' is a file, not a folder: give the "
        rf"state folder that holds it, '{state}'",
    ):
        located(state / "trainer_state.json")
    with pytest.raises(
        ConfigError,
        match=r"'.*model.safetensors' is a file, not a folder: give 'latest', a state "
        r"folder .*give it as resume_ckpt instead",
    ):
        located(tmp_path / "model.safetensors")
