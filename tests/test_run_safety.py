"""What a run does when things go wrong around it: a full disk (a real size-limited tmpfs), a second run on the
same folder, signals during set-up, before the first step and during validation, config errors found late."""

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trainer.setup
from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import Trainer, train
from trainer.stops import SetUpStopped, Stop, StopRequest
from trainer.validation import StabilizedLoss
from utils.checkpoint import atomic_path
from utils.config import ConfigError
from utils.state import STATE_FOLDER, list_states

FAST = {"max_steps": 8, "validation_config": {"auto_split_proportion": 0.2, "every_n_epochs": 1, "timesteps": 2}}


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 256 KiB (tmpfs; CI runs as root)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_during_a_safetensors_write_is_an_oserror_and_leaves_nothing(small_disk):
    """safetensors reports a full disk as its own SafetensorError; the atomic writer hands it on as the OSError it
    is (errno ENOSPC), so every save path treats it as a failed save, and the temporary file is gone."""
    with pytest.raises(OSError) as raised:
        with atomic_path(small_disk / "weights.safetensors") as temporary:
            save_file({"weights": torch.zeros(1_000_000)}, str(temporary))
    assert raised.value.errno == errno.ENOSPC
    assert type(raised.value.__cause__).__name__ == "SafetensorError"
    assert list(small_disk.iterdir()) == []


def test_a_full_save_ckpt_dir_keeps_the_run_and_still_writes_its_summary(model_cache, tmp_path, small_disk, capsys):
    config = tiny_config(model_cache, DEMO_DATA, tmp_path / "logs", save_ckpt_dir=str(small_disk), **FAST)
    (small_disk / "filler").write_bytes(b"\0" * 200_000)  # room for the write probe, not for a checkpoint
    summary = train(config)
    out = capsys.readouterr().out
    run_dir = Path(summary["run_dir"])
    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("copy failed", 1, 8)
    assert "copying its final checkpoint to save_ckpt_dir failed" in out and "Traceback" not in out
    assert Path(summary["final_checkpoint"]["single_file"]).is_file()
    assert json.loads((run_dir / "run_summary.json").read_text())["exit_code"] == 1
    assert (run_dir / "plots" / "loss.png").is_file()
    assert sorted(path.name for path in small_disk.iterdir()) == ["filler"]  # no temporary file left


def test_a_second_run_on_the_same_folder_is_refused_naming_the_folder_and_the_process(model_cache, tmp_path):
    first = Trainer(
        tiny_config(model_cache, DEMO_DATA, tmp_path, save_state_every_n_minutes=1e-9, **FAST), stop_at_step=2
    )
    first.train()
    first.save_state()
    in_use = rf"run folder '{first.run_dir}' is in use by another run \(pid {os.getpid()}"
    with pytest.raises(ConfigError, match=in_use):
        Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, resume_from="latest", **FAST))
    first.close()  # the lock goes with the run (and with its process, however it ends)
    resumed = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, resume_from="latest", **FAST))
    assert resumed.run_dir == first.run_dir
    resumed.close()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.setup.time, "strftime", lambda pattern: "20261202-120000")
    folders = [trainer.setup.create_new_run_dir(tmp_path, "same") for _ in range(3)]
    assert [folder.name for folder in folders] == [
        "same-20261202-120000",
        "same-20261202-120000-1",
        "same-20261202-120000-2",
    ]


def test_a_stop_during_set_up_leaves_no_run_folder(model_cache, tmp_path):
    request = StopRequest()
    request(Stop.by_signal("SIGTERM"))
    with pytest.raises(SetUpStopped):
        Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, **FAST), stop_request=request)
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_set_up_exits_143_with_a_message(model_cache, tmp_path, monkeypatch, capsys):
    """A real SIGTERM while the model loads: the handlers are in place from the first moment."""
    load_model = trainer.setup.load_model

    def load_then_signal(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return load_model(*args)

    monkeypatch.setattr(trainer.setup, "load_model", load_then_signal)
    summary = train(tiny_config(model_cache, DEMO_DATA, tmp_path, **FAST))
    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("SIGTERM", 143, 0)
    assert "nothing was trained and no run folder was written" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def signal_on_validation(monkeypatch, call: int) -> None:
    """SIGTERM during the `call`-th validation pass (1: the baseline before step 1)."""
    score, calls = StabilizedLoss.__call__, []

    def scored_then_signal(self, *args):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return score(self, *args)

    monkeypatch.setattr(StabilizedLoss, "__call__", scored_then_signal)


def test_sigterm_before_the_first_step_removes_the_new_run_folder(model_cache, tmp_path, monkeypatch, capsys):
    signal_on_validation(monkeypatch, call=1)
    summary = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, **FAST)).run()
    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("SIGTERM", 143, 0)
    assert "nothing was trained or saved, and the new run folder" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_validation_stops_after_it_and_saves_once(model_cache, tmp_path, monkeypatch, capsys):
    """The validation at the end of epoch 1 (step 4) is where the signal lands: no step 5, one state and one
    checkpoint at step 4 (not an epoch save and then a second one)."""
    signal_on_validation(monkeypatch, call=2)
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, save_every_n_epochs=1, **FAST)
    summary = Trainer(config).run()
    run_dir = Path(summary["run_dir"])
    assert (summary["stopped"], summary["exit_code"], summary["steps"]) == ("SIGTERM", 143, 4)
    assert [path.name for path in list_states(run_dir / STATE_FOLDER)] == ["state-gs00004"]
    assert [entry["step"] for entry in summary["checkpoints"]] == [4]
    assert capsys.readouterr().out.count("saved state") == 1


def test_a_config_error_found_during_set_up_leaves_no_run_folder(model_cache, tmp_path, demo_copy):
    (demo_copy / "scene05.yaml").write_text("caption: a scene, red, round, small\nshuffle_tags: true\n")
    config = tiny_config(
        model_cache, demo_copy, tmp_path / "logs", cache_text_embeddings=True, disable_textenc_training=True, **FAST
    )
    with pytest.raises(ConfigError, match="key 'cache_text_embeddings'"):
        Trainer(config)
    assert list((tmp_path / "logs").iterdir()) == []


def test_an_empty_extra_validation_set_is_not_measured(model_cache, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    validation = {**FAST["validation_config"], "extra_manual_datasets": {"faces": str(empty)}}
    run = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "logs", max_steps=8, validation_config=validation))
    assert "faces" not in run.validation_sets
    assert "faces" in capsys.readouterr().out  # the warning names it
    run.close()
