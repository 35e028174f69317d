"""Early-stopping help: the run names its validation minimum, the checkpoint nearest to it and what would keep it
next time; stop_when_val_rises keeps the checkpoint of each new minimum (`-best`) and ends the run after that many
validations in a row above it."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from data.plan import RunPlan
from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import Trainer
from trainer.progress import Progress
from trainer.saving import keep_minimum_advice, minimum_lines, minimum_report
from utils.config import ConfigError


class ScriptedLoss:
    """A validation set whose loss follows a script, one value per pass: the curve a test needs, with the run's
    real validation schedule around it."""

    def __init__(self, losses: list[float]):
        self.losses = list(losses)
        self.passes = 0

    def __call__(self, model, accelerator=None) -> float:
        self.passes += 1
        return self.losses[min(self.passes - 1, len(self.losses) - 1)]


def test_the_minimum_and_the_validations_since_it():
    progress = Progress(val_losses=[(0, 1.0), (4, 0.9), (8, 0.8), (12, 0.85), (16, 0.8)])
    assert progress.val_minimum() == (8, 0.8)  # the first of equal losses
    assert progress.validations_since_minimum() == 2
    assert Progress().val_minimum() is None and Progress().validations_since_minimum() == 0


def test_the_report_names_the_minimum_its_nearest_checkpoint_and_a_save_interval(tmp_path):
    plan = RunPlan(epoch_batches=(4,), grad_accum=1, total_steps=240)  # 60 epochs of 4 steps
    progress = Progress(val_losses=[(0, 1.0), (48, 0.7), (52, 0.75)])  # minimum at the end of epoch 12
    progress.checkpoints = [{"step": 40, "diffusers": "ckpts/a-gs00040"}, {"step": 240, "diffusers": "ckpts/b"}]
    report = minimum_report(progress, plan, tmp_path)
    assert (report["step"], report["epoch"], report["loss"]) == (48, 12.0, 0.7)
    assert report["nearest_checkpoint"]["step"] == 40 and report["nearest_checkpoint"]["steps_from_minimum"] == -8
    # 12's divisors 1, 2, 3, 4, 6: 6 is the first that saves at most 10 times over 60 epochs.
    assert report["advice"].startswith("save_every_n_epochs: 6 saves at epoch 12")
    lines = minimum_lines(report)
    assert lines[0] == "lowest validation loss 0.70000 at step 48 (epoch 12)"
    assert lines[1] == "nearest checkpoint: ckpts/a-gs00040 (8 steps before it)"


def test_the_advice_for_a_minimum_inside_an_epoch_at_a_checkpoint_and_before_training():
    plan = RunPlan(epoch_batches=(4,), grad_accum=1, total_steps=40)
    assert "inside epoch 3" in keep_minimum_advice(10, plan, None)
    assert keep_minimum_advice(8, plan, {"step": 8, "diffusers": "x"}) is None
    assert "never went below the base model" in keep_minimum_advice(0, plan, {"step": 40, "diffusers": "x"})


def test_stop_when_val_rises_needs_validation(model_cache, tmp_path):
    with pytest.raises(ConfigError, match="stop_when_val_rises"):
        tiny_config(model_cache, DEMO_DATA, tmp_path, stop_when_val_rises=2, validation_config=None)


def unet_of(folder: str) -> dict[str, torch.Tensor]:
    return dict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict())


def test_a_rising_curve_ends_the_run_and_keeps_the_checkpoint_of_its_minimum(model_cache, tmp_path):
    """Losses by validation: baseline 1.0, then 0.9, 0.8 (the minimum, after epoch 2), 0.85, 0.86: with
    stop_when_val_rises 2 the run ends after epoch 4 as complete (exit 0), the `-best` checkpoint holds the weights
    of the end of epoch 2 (equal to the scheduled checkpoint of that step) and is the one copied to save_ckpt_dir."""
    config = tiny_config(
        model_cache,
        DEMO_DATA,
        tmp_path / "logs",
        max_epochs=10,
        lr_scheduler="constant",
        stop_when_val_rises=2,
        save_every_n_epochs=2,
        save_ckpt_dir=str(tmp_path / "kept"),
    )
    trainer = Trainer(config)
    scripted = ScriptedLoss([1.0, 0.9, 0.8, 0.85, 0.86, 0.5])
    trainer.validation_sets["val"] = scripted
    per_epoch = trainer.plan.steps_per_epoch
    summary = trainer.run()

    assert scripted.passes == 5
    assert (summary["steps"], summary["stopped"], summary["exit_code"]) == (4 * per_epoch, "validation loss rising", 0)
    ckpts = Path(summary["run_dir"]) / "ckpts"
    best = sorted(path.name for path in ckpts.glob("*-best"))
    assert best == [f"t-ep001-gs{2 * per_epoch:05d}-best"], "one -best: the earlier minimum's was removed"
    scheduled = ckpts / f"t-ep001-gs{2 * per_epoch:05d}"
    kept, at_step = unet_of(str(ckpts / best[0])), unet_of(str(scheduled))
    assert all(torch.equal(kept[name], at_step[name]) for name in at_step)
    final = unet_of(summary["final_checkpoint"]["diffusers"])
    assert any(not torch.equal(final[name], at_step[name]) for name in at_step), "training went on after it"
    assert [path.name for path in (tmp_path / "kept").iterdir()] == [best[0] + ".safetensors"]
    report = json.loads((Path(summary["run_dir"]) / "run_summary.json").read_text())["validation_minimum"]
    assert (report["step"], report["epoch"], report["advice"]) == (2 * per_epoch, 2.0, None)
    assert report["nearest_checkpoint"]["steps_from_minimum"] == 0
