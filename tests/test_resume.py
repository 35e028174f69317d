"""Exact resume: a run stopped and resumed ends with the very weights of the run left alone (CPU, fp32, bit for
bit), follows the same LR curve and logs every step once; a state the new config cannot continue is refused."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import Trainer
from trainer.resume import locate_state
from utils.config import ConfigError
from utils.state import STATE_FOLDER, list_states, verify_state

# Cyclic LR, two micro-batches per step, flips, caption dropout, validation every epoch and a save (state and
# checkpoint) at every epoch end: 16 training images in batches of 2 make 4 steps per epoch, 8 steps in all.
RUN = dict(
    lr_scheduler="cyclic",
    lr_decay_steps=3,
    lr_min=1e-5,
    batch_size=2,
    grad_accum=2,
    max_epochs=2,
    flip_p=0.5,
    cond_dropout=0.2,
    save_every_n_epochs=1,
    no_save_ckpt=True,
)
STEPS = 8


def config_for(model_cache, logdir, **overrides):
    return tiny_config(model_cache, DEMO_DATA, logdir, **{**RUN, **overrides})


def trained_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": tensor.detach().clone()
        for name, module in trainer.trained_models().items()
        for key, tensor in module.state_dict().items()
    }


def logged_rows(run_dir: Path) -> list[tuple]:
    """metrics.csv without the timing column, which differs between runs."""
    with open(Path(run_dir) / "metrics.csv", newline="") as handle:
        return [
            tuple(value for key, value in row.items() if key != "images_per_second") for row in csv.DictReader(handle)
        ]


def assert_same_weights(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(model_cache, tmp_path_factory):
    """The run left alone. It also saves a state after every step (a cadence setting the interrupted runs do not
    share: such settings may differ without changing the training) and keeps only the newest two."""
    logdir = tmp_path_factory.mktemp("reference")
    trainer = Trainer(config_for(model_cache, logdir, save_state_every_n_minutes=1e-9))
    summary = trainer.run()
    return {
        "weights": trained_weights(trainer),
        "rows": logged_rows(summary["run_dir"]),
        "summary": summary,
        "logdir": logdir,
    }


def test_reference_keeps_the_newest_states_and_each_verifies(reference):
    states = list_states(Path(reference["summary"]["run_dir"]) / STATE_FOLDER)
    assert [state.name for state in states] == ["state-gs00007", "state-gs00008"]
    for state in states:
        assert verify_state(state)["step"] in (7, 8)
    assert reference["summary"]["steps"] == STEPS and reference["summary"]["exit_code"] == 0


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_stopped_and_resumed_run_equals_the_run_left_alone(model_cache, tmp_path, reference, stop_at, capsys):
    stopped = Trainer(config_for(model_cache, tmp_path), stop_at_step=stop_at).run()
    assert (stopped["stopped"], stopped["steps"]) == ("stop_at_step", stop_at)
    assert stopped["last_state"].endswith(f"state-gs{stop_at:05d}")
    # Mid-epoch: resume_from 'latest'. At the boundary: the state folder itself.
    resume_from = "latest" if stop_at == 3 else stopped["last_state"]
    resumed = Trainer(config_for(model_cache, tmp_path, resume_from=resume_from))
    summary = resumed.run()
    assert summary["run_dir"] == stopped["run_dir"], "a resumed run keeps writing into its run folder"
    assert summary["steps"] == STEPS and summary["resumed_from"] == stopped["last_state"]
    assert f"resumed from {stopped['last_state']}: step {stop_at} of {STEPS}" in capsys.readouterr().out
    assert_same_weights(reference["weights"], trained_weights(resumed))
    # Same LR at every step, same losses, same validation points, each step logged once.
    assert logged_rows(summary["run_dir"]) == reference["rows"]
    assert summary["val_loss"]["history"] == reference["summary"]["val_loss"]["history"]
    assert [c["step"] for c in summary["checkpoints"]] == sorted({stop_at, 4, 8})


def test_damaged_newest_state_is_skipped_and_the_previous_one_resumes_exactly(model_cache, tmp_path, reference, capsys):
    stopped = Trainer(config_for(model_cache, tmp_path), stop_at_step=6).run()
    newest = Path(stopped["last_state"])
    weights = newest / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, wrong checksum
    weights.write_bytes(bytes(data))
    capsys.readouterr()

    resumed = Trainer(config_for(model_cache, tmp_path, resume_from="latest"))
    summary = resumed.run()
    out = capsys.readouterr().out
    assert f"state {newest} is damaged (unet.safetensors does not match its checksum" in out
    assert f"resuming from the previous complete state, {newest.with_name('state-gs00004')}" in out
    assert summary["resumed_from"].endswith("state-gs00004")
    assert "dropped 2 row(s) that the interrupted run logged after step 4" in out  # those of steps 5 and 6
    assert_same_weights(reference["weights"], trained_weights(resumed))
    assert logged_rows(summary["run_dir"]) == reference["rows"]
    assert list(newest.parent.glob(".damaged-state-gs00006-*")), "the damaged state is set aside, not deleted"


def run_folder_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"batch_size": 4}, "batch_size"),
        ({"grad_accum": 1}, "grad_accum"),
        ({"seed": 7}, "seed"),
        ({"resolution": 128}, "resolution"),
        ({"weight_dtype": "bf16"}, "weight_dtype"),
    ],
)
def test_a_change_that_would_break_the_run_is_refused_naming_the_key(model_cache, reference, change, key):
    run_dir = Path(reference["summary"]["run_dir"])
    before = run_folder_files(run_dir)
    with pytest.raises(ConfigError, match=f"key '{key}': .* changed"):
        Trainer(config_for(model_cache, reference["logdir"], resume_from="latest", max_epochs=3, **change)).run()
    assert run_folder_files(run_dir) == before, "a refused resume must not touch the run folder"


def test_a_state_of_other_images_is_refused(model_cache, reference, demo_copy):
    (demo_copy / "scene20.png").unlink()
    config = tiny_config(
        model_cache, demo_copy, reference["logdir"], **{**RUN, "resume_from": "latest", "max_epochs": 3}
    )
    with pytest.raises(ConfigError, match=r"key 'data_root': the training images changed \(16 images"):
        Trainer(config).run()


def test_a_state_of_another_model_is_refused(model_cache, tiny_model_dir, reference, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    scheduler = other / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    config = config_for(model_cache, reference["logdir"], resume_ckpt=str(other), resume_from="latest", max_epochs=3)
    with pytest.raises(ConfigError, match="key 'resume_ckpt': the model"):
        Trainer(config).run()


def test_not_a_state_is_refused_before_anything_loads(model_cache, tmp_path):
    with pytest.raises(ConfigError, match="not a complete training state .*no manifest.json"):
        Trainer(config_for(model_cache, tmp_path, resume_from=str(tmp_path))).run()


def test_settings_that_may_change_are_taken_from_the_new_config_and_logged(model_cache, reference, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(reference["logdir"], logs)  # leave the shared reference run as it is
    summary = Trainer(
        config_for(model_cache, logs, resume_from="latest", lr=2e-4, max_steps=STEPS + 2, log_step=2)
    ).run()
    out = capsys.readouterr().out
    assert summary["steps"] == STEPS + 2 and summary["exit_code"] == 0
    assert "changed since the state was saved (the new values apply):" in out
    assert "lr 0.0001 -> 0.0002" in out and "max_steps null -> 10" in out and "log_step 1 -> 2" in out
    assert "the LR schedule changed: from step 9 on the run follows the new curve" in out
    rows = list(csv.DictReader(open(Path(summary["run_dir"]) / "metrics.csv")))
    lrs = {int(row["step"]): float(row["lr_unet"]) for row in rows if row["lr_unet"]}
    # Stepsize 3 from lr_min: step 8 used the second step of a rising ramp, step 9 the third.
    assert lrs[8] == pytest.approx(1e-5 + (1e-4 - 1e-5) / 3), "before the resume: the old peak"
    assert lrs[9] == pytest.approx(1e-5 + (2e-4 - 1e-5) * 2 / 3), "from the resume on: the new peak"


def test_resuming_a_finished_run_with_nothing_left_is_refused(model_cache, reference):
    with pytest.raises(ConfigError, match="is at step 8 and this config trains 8 steps: nothing is left"):
        Trainer(config_for(model_cache, reference["logdir"], resume_from="latest")).run()


def test_latest_without_any_state_starts_a_new_run(model_cache, tmp_path):
    found, notes = locate_state(config_for(model_cache, tmp_path, resume_from="latest"))
    assert found is None
    assert notes == [
        f"resume_from 'latest': no saved state of project 't' under logdir '{tmp_path}' yet: starting a new run"
    ]


# --- the state format, without training ----------------------------------------------------------------


def test_nested_structures_with_tensors_survive_json_and_safetensors():
    from utils.state import join_tensors, split_tensors

    optimizer_like = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
        "param_groups": [{"name": "unet", "betas": (0.9, 0.999), "eps": 1e-8, "params": [0], "foreach": None}],
    }
    tensors: dict = {}
    stored = json.loads(json.dumps(split_tensors(optimizer_like, tensors, "optimizer")))
    back = join_tensors(stored, tensors)
    assert back["param_groups"] == optimizer_like["param_groups"]  # tuples stay tuples, int keys stay ints
    assert list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], optimizer_like["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store a set"):
        split_tensors({"odd": {1, 2}}, {})


def test_random_generators_continue_where_they_were_captured():
    import random

    import numpy as np

    from utils.state import capture_rng, join_tensors, restore_rng, split_tensors

    tensors: dict = {}
    captured = json.loads(json.dumps(split_tensors(capture_rng(), tensors, "rng")))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    assert restore_rng(join_tensors(captured, tensors)) == []
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert again[:2] == expected[:2] and torch.equal(again[2], expected[2])


def test_metrics_rows_after_the_state_and_a_row_cut_short_are_dropped(tmp_path):
    from utils.state import trim_metrics

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,epoch,loss_train\n1,0.25,0.5\n2,0.5,0.4\n2,0.5,\n3,0.75,0.3\n4,1.0,0.")
    assert trim_metrics(csv_path, 2) == 2
    assert csv_path.read_text() == "step,epoch,loss_train\n1,0.25,0.5\n2,0.5,0.4\n2,0.5,\n"
    assert trim_metrics(csv_path, 2) == 0


def test_a_manifest_of_another_format_is_damaged(tmp_path):
    from utils.state import DamagedStateError, verify_state

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "accelerate", "files": {}}))
    with pytest.raises(DamagedStateError, match="not an EveryCycle state manifest"):
        verify_state(tmp_path)


def test_an_8bit_optimizer_state_with_shared_tensors_round_trips(tmp_path):
    """bitsandbytes' AdamW8bit shares one quantization map among parameters: stored apart, reloaded exactly."""
    bnb = pytest.importorskip("bitsandbytes")
    from utils.state import TrainingState, capture_rng, read_state, write_state

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 128))
        return model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)

    def step(model, optimizer, seed):
        torch.manual_seed(seed)
        model(torch.randn(8, 128)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = model_and_optimizer()
    step(model, optimizer, 1)
    saved = write_state(
        TrainingState(1, {}, {"model": model.state_dict()}, optimizer.state_dict(), capture_rng()), tmp_path
    )
    state = read_state(saved.path)
    resumed_model, resumed_optimizer = model_and_optimizer()
    resumed_model.load_state_dict(state.weights["model"])
    resumed_optimizer.load_state_dict(state.optimizer)
    step(model, optimizer, 2)
    step(resumed_model, resumed_optimizer, 2)
    for expected, actual in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(expected, actual)
