"""The ready configs of the post, previewed on the demo images (20 images of one size at 64 px)."""

import csv
import itertools
import re
import subprocess
import sys

import pytest

from data.prepare import prepare_data
from optimizer.lr import plan_schedule, unet_spec
from optimizer.preview import preview_schedule
from optimizer.schedule_report import describe
from tests.conftest import DEMO_DATA, ROOT
from utils.config import MAX_STEPS, ConfigError, load_config
from utils.plots import PLOTTED_POINTS, plotted_steps


def post_config(name: str, **overrides):
    return load_config(ROOT / "configs" / f"{name}.json", {"data_root": str(DEMO_DATA), "resolution": 64, **overrides})


def planned(config):
    plan, schedules, notes = plan_schedule(config, prepare_data(config).batches.num_batches)
    return plan, schedules.lr, describe(unet_spec(config, plan)), notes


def test_cycling_x10_is_ten_cycles_of_80_steps():
    plan, lr, summary, _ = planned(post_config("post_cyclic_x10"))
    assert (plan.steps_per_epoch, plan.total_steps) == (4, 800)
    assert (summary["stepsize"], summary["cycle_steps"], summary["cycles"]) == (40, 80, 10)
    assert lr["unet"](0) == 0 and lr["unet"](40) == pytest.approx(1.13e-6) and lr["unet"](80) == 0
    assert summary["ends"] == "low"


def test_cycling_x2_is_fifty_cycles_of_16_steps():
    plan, _, summary, _ = planned(post_config("post_cyclic_x2"))
    assert plan.total_steps == 800
    assert (summary["stepsize"], summary["cycle_steps"], summary["cycles"]) == (8, 16, 50)


def test_five_and_a_half_cycles_start_high_and_end_low():
    plan, lr, summary, _ = planned(post_config("post_cyclic_5_5"))
    assert (plan.steps_per_epoch, plan.epochs, plan.total_steps) == (5, 110, 550)
    assert summary["cycles"] == 5.5 and summary["ends"] == "low"
    assert lr["unet"](0) == pytest.approx(1.13e-6)
    assert lr["unet"](549) < lr["unet"](548) < 1.13e-6 / 20


def test_staged_decay_sets_the_run_length_and_peaks_in_order():
    plan, _, summary, _ = planned(post_config("post_staged"))
    assert plan.total_steps == 650 and summary["ends"] == "low"
    peaks = [lr for stage in summary["stages"] for lr in stage["peak_lrs"]]
    assert peaks == pytest.approx([1.13e-6] * 3 + [5.65e-7] * 2 + [2.83e-7] * 2)


def test_constant_baseline_at_the_midpoint():
    plan, lr, _, _ = planned(post_config("post_constant"))
    assert plan.total_steps == 800
    assert {lr["unet"](k) for k in range(800)} == {5.65e-7}


def test_ed2_cosine_of_the_post_oscillates_and_is_named():
    config = post_config("post_constant", lr=1.13e-6, lr_scheduler="cosine", lr_decay_steps=40, lr_warmup_steps=0)
    plan, lr, _, notes = planned(config)
    lows = [k for k in range(1, 800) if lr["unet"](k) == 0]
    assert plan.total_steps == 800 and lows[:3] == [40, 120, 200] and len(lows) == 10
    assert any("'cyclic'" in note and "lr_cycle_shape 'cosine'" in note for note in notes)


def test_not_ending_low_warns_with_nearest_lengths_and_end_at_low_fixes_it():
    plan, _, _, notes = planned(post_config("post_cyclic_x10", max_epochs=190))
    assert plan.total_steps == 760
    assert any("not on a low point" in n and "720 or 800 steps" in n and "180 or 200 epochs" in n for n in notes)
    plan, _, _, notes = planned(post_config("post_cyclic_x10", max_epochs=190, lr_end_at_low=True))
    assert plan.total_steps == 800 and any("changed from 760 to 800" in n for n in notes)


def test_two_stepsize_options_is_a_config_error():
    with pytest.raises(ConfigError, match="exactly one way to set its stepsize"):
        planned(post_config("post_cyclic_x10", lr_cycles=5))


def test_text_encoder_follows_the_same_phase_with_its_own_bounds():
    _, lr, _, _ = planned(post_config("post_cyclic_x10", text_encoder_lr=5e-7, text_encoder_lr_min=1e-7))
    assert lr["text_encoder"](0) == pytest.approx(1e-7) and lr["text_encoder"](40) == pytest.approx(5e-7)
    _, lr, _, _ = planned(post_config("post_cyclic_x10", text_encoder_lr_scale=0.5))
    assert lr["text_encoder"](40) == pytest.approx(1.13e-6 / 2)


def test_preview_csv_matches_the_schedule(tmp_path):
    config = post_config("post_cyclic_5_5")
    result = preview_schedule(config, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "lr_schedule.csv")))
    assert list(rows[0]) == ["step", "lr", "lr_text_encoder"]
    assert len(rows) == result["plan"].total_steps == 550
    assert float(rows[0]["lr"]) == pytest.approx(1.13e-6)  # step 0 is the LR of the first optimizer step
    assert float(rows[50]["lr"]) == 0
    assert (tmp_path / "lr_schedule.png").stat().st_size > 0
    frozen = post_config("post_cyclic_5_5", disable_textenc_training=True)
    preview_schedule(frozen, tmp_path / "frozen")
    assert next(csv.reader(open(tmp_path / "frozen" / "lr_schedule.csv"))) == ["step", "lr"]


def test_plot_schedule_command_loads_no_model(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            # Loading weights (diffusers' or transformers' from_pretrained) ends the process with code 3.
            "import sys, diffusers, transformers, train; "
            "refuse = classmethod(lambda cls, *a, **k: sys.exit(3)); "
            "diffusers.ModelMixin.from_pretrained = refuse; transformers.PreTrainedModel.from_pretrained = refuse; "
            "r = train.main(sys.argv[1:]); print('no weights loaded'); sys.exit(r)",
            "--config",
            "configs/post_cyclic_x10.json",
            "--data_root",
            str(DEMO_DATA),
            "--resolution",
            "64",
            "--plot_schedule",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "stepsize: 40 steps (10 epochs), cycle 80 steps, 10 cycles" in result.stdout
    assert "the run ends on a low point" in result.stdout
    assert result.stdout.strip().endswith("no weights loaded")  # the memory forecast builds on the meta device


def test_the_preview_counts_the_steps_of_a_group_of_processes(tmp_path, capsys):
    """20 images, 4 held out, 4 batches of 4: one process takes 4 steps per epoch, two take 2, and the run's
    epochs, not its steps, stay as configured."""
    config = post_config("post_constant", max_epochs=10)
    alone = preview_schedule(config, tmp_path / "one")["plan"]
    pair = preview_schedule(config, tmp_path / "two", num_processes=2)["plan"]
    assert (alone.steps_per_epoch, alone.total_steps) == (4, 40)
    assert (pair.steps_per_epoch, pair.total_steps) == (2, 20)
    assert (
        "2 processes: a step trains 2 x batch_size 4 x grad_accum 1 = 8 images (global batch)"
        in capsys.readouterr().out
    )
    with pytest.raises(ConfigError, match="key 'batch_size' = 4: 4 batch\\(es\\) per epoch cannot feed 5 processes"):
        preview_schedule(config, tmp_path / "five", num_processes=5)


def test_num_processes_is_only_for_the_preview(capsys):
    import train as train_cli

    assert train_cli.main(["--config", str(ROOT / "configs" / "demo.json"), "--num_processes", "2"]) == 2
    assert "accelerate launch --multi_gpu --num_processes 2 train.py" in capsys.readouterr().err


@pytest.mark.parametrize("total", [1, 550, PLOTTED_POINTS, PLOTTED_POINTS + 1, 3 * PLOTTED_POINTS - 7, MAX_STEPS])
def test_plotted_steps_are_every_step_or_an_even_sample_with_both_ends(total):
    steps = plotted_steps(total)
    assert steps[0] == 0 and steps[-1] == total - 1 and len(steps) <= PLOTTED_POINTS
    assert steps == sorted(set(steps))
    if total <= PLOTTED_POINTS:
        assert steps == list(range(total))
    else:
        assert len({b - a for a, b in itertools.pairwise(steps[:-1])}) == 1  # evenly spaced, but for the last step


def test_the_longest_run_accepted_previews_in_seconds_with_a_sampled_curve(tmp_path, capsys):
    """max_steps 100000000000 hung the preview, which wrote and plotted every step; the longest run accepted now
    writes at most PLOTTED_POINTS rows."""
    config = post_config("post_constant", lr_scheduler="cosine", max_steps=MAX_STEPS)
    result = preview_schedule(config, tmp_path)
    _, lr, _, _ = planned(config)
    rows = list(csv.DictReader(open(tmp_path / "lr_schedule.csv")))
    assert result["plan"].total_steps == MAX_STEPS and len(rows) <= PLOTTED_POINTS
    assert (rows[0]["step"], rows[-1]["step"]) == ("0", str(MAX_STEPS - 1))
    assert float(rows[len(rows) // 2]["lr"]) == pytest.approx(lr["unet"](int(rows[len(rows) // 2]["step"])))
    assert f"lr_schedule.csv (one step in {int(rows[1]['step'])} of {MAX_STEPS})" in capsys.readouterr().out


def test_epochs_times_their_steps_beyond_max_steps_are_refused_before_any_cycle_is_worked_out():
    """max_epochs is within its own bound, but 5 steps an epoch make 5 x MAX_STEPS steps."""
    config = load_config(
        None, {"data_root": str(DEMO_DATA), "max_epochs": MAX_STEPS, "lr_scheduler": "cyclic", "lr_decay_steps": 1}
    )
    with pytest.raises(ConfigError, match=r"key 'max_epochs': 10,000,000 epochs of 5 steps make 50,000,000 steps"):
        plan_schedule(config, batches_per_epoch=5)


@pytest.mark.parametrize(
    ("name", "fits"), [("sdxl_24gb", "fits cards of 12, 16, 24,"), ("sdxl_80gb", "fits cards of 80,")]
)
def test_the_sdxl_recipes_preview_with_their_memory_forecast(tmp_path, capsys, name, fits):
    """configs/sdxl_*.json preview offline (the SDXL forecast comes from the bundled configs, no download), and each
    fits the card its name promises."""
    import train

    code = train.main(
        ["--config", f"configs/{name}.json", "--data_root", str(DEMO_DATA), "--plot_schedule", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "memory forecast: stabilityai/stable-diffusion-xl-base-1.0 (1024x1024" in out
    total = float(re.search(r"^  total\s+([\d.]+) GiB", out, flags=re.M).group(1))
    assert fits in out and (total < 22 if name == "sdxl_24gb" else total < 80), out
