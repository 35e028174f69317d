"""The LR range test: the ramp, the suggestion rule on synthetic curves, divergence, and a real sweep of the
tiny model (outputs, early stop, the base model untouched, the written config)."""

import csv
import hashlib
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train as train_cli
from optimizer.lr import FunctionLR
from optimizer.preview import preview_schedule
from tests.conftest import DEMO_DATA, ROOT, tiny_config
from trainer import lr_finder
from trainer.loop import Trainer
from trainer.lr_finder import (
    CSV_COLUMNS,
    FinderResult,
    Suggestion,
    SweepLog,
    config_fragment,
    divergence,
    find_lr,
    last_before_a_jump,
    ramp_functions,
    ramp_lr,
    suggest_range,
    sweep_settings,
    write_suggested_config,
)
from utils.config import PATH_KEYS, ConfigError, load_config, resolve_config_paths

# --- the ramp ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ramp", ["linear", "exponential"])
def test_ramp_starts_and_ends_exactly(ramp):
    lr = ramp_lr(1e-8, 1e-4, 200, ramp)
    values = [lr(k) for k in range(200)]
    assert values[0] == 1e-8 and values[-1] == 1e-4
    assert all(a < b for a, b in itertools.pairwise(values))


def test_linear_ramp_has_equal_steps_and_exponential_equal_ratios():
    linear = [ramp_lr(0.0 + 1e-6, 1e-6 * 101, 101, "linear")(k) for k in range(101)]
    assert np.allclose(np.diff(linear), 1e-6)
    exponential = [ramp_lr(1e-8, 1e-4, 5, "exponential")(k) for k in range(5)]
    assert exponential == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5, 1e-4])


def test_sweep_length_in_steps_or_epochs_and_default_probes(model_cache, tmp_path):
    config = tiny_config(model_cache, DEMO_DATA, tmp_path)
    default = sweep_settings(config, steps_per_epoch=4)
    assert (default.steps, default.probe_every) == (200, 5)  # about 40 probes
    assert (default.start, default.end, default.ramp) == (1e-8, 1e-4, "exponential")
    assert sweep_settings(tiny_config(model_cache, DEMO_DATA, tmp_path, lr_find_epochs=10), 4).steps == 40
    with pytest.raises(ConfigError, match="not both"):
        sweep_settings(tiny_config(model_cache, DEMO_DATA, tmp_path, lr_find_epochs=10, lr_find_steps=50), 4)
    with pytest.raises(ConfigError, match="must be above"):
        sweep_settings(tiny_config(model_cache, DEMO_DATA, tmp_path, lr_find_start=1e-3, lr_find_end=1e-4), 4)


def test_text_encoder_follows_the_ramp_at_its_ratio():
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW(
        [{"name": "unet", "params": [weights[0]]}, {"name": "text_encoder", "params": [weights[1]]}], lr=1.0
    )
    config = SimpleNamespace(text_encoder_lr=None, text_encoder_lr_scale=0.5, lr=1e-6, lr_cycle_momentum=False)
    functions = ramp_functions(config, lr_finder.Sweep(1e-8, 1e-4, "exponential", 5, 1, 3.0), ["unet", "text_encoder"])
    lr_scheduler = FunctionLR(optimizer, [functions[group["name"]] for group in optimizer.param_groups])
    seen = []
    for _ in range(5):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        lr_scheduler.step()
    assert [unet for unet, _ in seen] == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5, 1e-4])
    assert [te / unet for unet, te in seen] == pytest.approx([0.5] * 5)


# --- the suggestion rule on synthetic curves -----------------------------------------------------------

LOG_LRS = np.linspace(-8, -4, 41)  # 10 probes per decade


def u_curve(noise: float = 0.0, seed: int = 0, rise: bool = True) -> np.ndarray:
    """Falls from 0.15 to 0.10 around 10^-6.5 (steepest there), turns up past about 10^-5.5."""
    x = LOG_LRS
    loss = 0.10 + 0.05 / (1 + np.exp((x + 6.5) / 0.2))
    if rise:
        loss = loss + 0.05 * np.exp((x + 4.8) / 0.3)
    return loss + np.random.default_rng(seed).normal(0, noise, len(x))


def suggest(losses) -> Suggestion:
    return suggest_range(list(10**LOG_LRS), list(losses), "exponential")


def test_clean_curve_gives_the_range_around_its_descent():
    result = suggest(u_curve())
    assert result.backed, result.reason
    assert -7.1 <= math.log10(result.lr_onset) <= -6.8  # 10% of the fall is reached at 10^-6.94
    assert -6.6 <= math.log10(result.lr_steepest) <= -6.4
    assert -6.1 <= math.log10(result.lr) <= -5.5
    assert result.lr_onset < result.lr_steepest < result.lr
    assert result.lr_min == result.lr_steepest  # the cycle's floor: where the loss falls fastest, not the onset


@pytest.mark.parametrize("seed", range(8))
def test_noisy_curve_gives_about_the_same_range(seed):
    result = suggest(u_curve(noise=0.001, seed=seed))
    assert result.backed, result.reason
    assert -7.2 <= math.log10(result.lr_onset) <= -6.6
    assert -6.8 <= math.log10(result.lr_steepest) <= -6.2
    assert -6.3 <= math.log10(result.lr) <= -5.5
    assert result.lr_onset < result.lr_steepest <= result.lr
    assert result.lr_min == result.lr_steepest


def test_a_jump_above_the_lowest_loss_caps_the_range_below_it():
    """Smith's "becomes ragged": one probe 0.02 (20 x the noise margin) above the curve at 10^-6.2, past the
    steepest fall, while the smoothed loss goes on falling; the range ends at the probe before it."""
    losses = u_curve()
    jump_at = int(np.argmin(np.abs(LOG_LRS + 6.2)))
    losses[jump_at] += 0.02
    result = suggest(losses)
    assert result.backed and "turns ragged after" in result.reason
    assert math.log10(result.lr) == pytest.approx(LOG_LRS[jump_at - 1])
    assert -6.6 <= math.log10(result.lr_steepest) <= -6.4  # the floor stays where it was
    assert last_before_a_jump([0.5, 0.4, 0.3, 0.2], 0, 3, jump=0.01) == 3  # no jump: the stop
    assert last_before_a_jump([0.5, 0.9, 0.3, 0.2], 0, 3, jump=0.01) == 1  # a jump right after: one probe wide


def test_the_noise_level_is_read_from_the_curve():
    estimates = [suggest(u_curve(noise=0.001, seed=seed)).noise for seed in range(16)]
    assert float(np.median(estimates)) == pytest.approx(0.001, rel=0.3)
    assert suggest(u_curve()).noise < 1e-4


@pytest.mark.parametrize("seed", range(10))
def test_pure_noise_never_backs_a_range(seed):
    result = suggest(0.12 + np.random.default_rng(seed).normal(0, 0.003, len(LOG_LRS)))
    assert result.status == "no_descent" and result.lr is None and result.lr_min is None
    assert "higher lr_find_end" in result.reason


def test_a_curve_that_only_rises_says_start_lower():
    result = suggest(0.1 + 0.05 * np.exp((LOG_LRS + 4.8) / 0.3))
    assert result.status == "no_descent" and "start the sweep lower" in result.reason


def test_a_curve_still_falling_at_the_end_backs_only_the_lower_bound():
    result = suggest(u_curve(rise=False, noise=0.0005))
    assert result.status == "no_turn" and result.lr is None and result.lr_steepest is None
    assert -7.2 <= math.log10(result.lr_min) <= -6.6
    assert "higher lr_find_end" in result.reason


def test_divergence_to_nan_counts_as_the_turn():
    losses = u_curve(rise=False)
    losses[34:] = np.nan  # blew up past 10^-4.6
    result = suggest(losses)
    assert result.backed and "NaN" in result.reason
    assert len(result.smoothed) == 34


def test_a_fall_barely_above_the_noise_cannot_place_both_bounds():
    falls = 0.0008 / (1 + np.exp(-(LOG_LRS + 6.5) / 0.2))  # 1.6 x the margin (0.5% of the loss)
    result = suggest(0.1 - falls + 0.05 * np.exp((LOG_LRS + 4.2) / 0.2))
    assert result.status == "weak_descent" and result.lr is None and result.lr_min is None


def test_too_few_points():
    result = suggest_range([1e-6, 2e-6, 3e-6], [0.2, 0.1, float("inf")], "linear")
    assert result.status == "too_few_points" and "lower lr_find_start" in result.reason


# --- early stop -----------------------------------------------------------------------------------------


def test_divergence_ignores_one_spike_but_stops_on_a_sustained_rise_or_nan():
    assert divergence([0.5, 0.3, 0.2, 5.0], 3.0) is None  # one spike: the median of 3 does not move
    assert "reached" in divergence([0.5, 0.3, 0.2, 1.0, 1.2], 3.0)
    assert "nan" in divergence([0.5, 0.3, float("nan")], 3.0)


# --- a real sweep of the tiny model ---------------------------------------------------------------------


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sweep(model_cache, tiny_model_dir, tmp_path_factory):
    """A short sweep that runs into divergence (the tiny model blows up near LR 0.1)."""
    before = folder_hash(tiny_model_dir)
    config = tiny_config(
        model_cache,
        DEMO_DATA,
        tmp_path_factory.mktemp("lrfind"),
        lr_find_start=1e-4,
        lr_find_end=30.0,
        lr_find_steps=48,
        lr_find_probe_every=2,
    )
    result = find_lr(config)
    return result, before, folder_hash(tiny_model_dir)


def test_sweep_stops_early_on_divergence(sweep):
    result, _, _ = sweep
    assert result.log.stopped_early
    assert result.log.rows[-1]["step"] < 48


def test_sweep_writes_its_outputs_in_its_own_folder(sweep):
    result, _, _ = sweep
    assert result.run_dir.name.startswith("t-lrfind-")
    rows = list(csv.reader(open(result.run_dir / "lr_find.csv")))
    assert tuple(rows[0]) == CSV_COLUMNS
    steps = [int(row[0]) for row in rows[1:]]
    assert steps == list(range(len(steps)))  # a row per step, from the step-0 baseline on
    probe_rows = [row for row in rows[1:] if row[2]]
    assert len(probe_rows) == result.log.probe_count
    assert float(rows[2][1]) == pytest.approx(1e-4)  # step 1 ran at lr_find_start
    summary = json.loads((result.run_dir / "lr_find.json").read_text())
    assert {"lr_min", "lr", "lr_steepest", "status", "reason", "probe"} <= set(summary)
    assert summary["probe"]["count"] == result.log.probe_count and summary["probe"]["seconds"] > 0
    assert (result.run_dir / "lr_find.png").stat().st_size > 0
    assert not list(result.run_dir.rglob("*.safetensors"))  # nothing saved: the sweep's weights are thrown away


def test_sweep_leaves_the_base_model_unchanged(sweep):
    _, before, after = sweep
    assert before == after


def test_probe_uses_a_seeded_training_subset_when_validation_is_off(model_cache, tmp_path):
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, validation_config=None, lr_find_probe_images=3)
    trainer = Trainer(config, tmp_path / "run")
    first = lr_finder.training_subset_probe(trainer)
    second = lr_finder.training_subset_probe(trainer)
    assert first.num_images == 3 and "val" not in trainer.validation_sets
    assert first(trainer.unwrapped_model()) == second(trainer.unwrapped_model())


# --- the written config -----------------------------------------------------------------------------------

FRAGMENT = {"lr_scheduler": "cyclic", "lr_min": 2e-4, "lr": 3e-3}


def test_fragment_adds_a_stepsize_only_when_the_config_has_none(model_cache, tmp_path):
    without = tiny_config(model_cache, DEMO_DATA, tmp_path)
    ok = Suggestion("ok", "", lr_min=2.0004e-4, lr=3.0001e-3, lr_steepest=1e-3)
    assert config_fragment(without, ok) == {**FRAGMENT, "lr_stepsize_epochs": 4}
    with_steps = tiny_config(model_cache, DEMO_DATA, tmp_path, lr_scheduler="cosine", lr_decay_steps=40)
    assert config_fragment(with_steps, ok) == FRAGMENT


def test_written_config_keeps_the_users_keys_loads_and_previews(tmp_path):
    source = ROOT / "configs" / "demo.json"  # its validation_config is a file beside it
    overrides = {"data_root": str(DEMO_DATA), "max_epochs": 12}
    config = load_config(source, overrides)
    target = tmp_path / "elsewhere" / "new.json"
    write_suggested_config(target, source, overrides, config, FRAGMENT)
    written = json.loads(target.read_text())
    original = json.loads(source.read_text())
    assert set(written) == set(original)
    assert written["max_epochs"] == 12 and written["lr"] == 3e-3 and written["lr_min"] == 2e-4
    loaded = load_config(target)
    assert (loaded.lr_scheduler, loaded.lr, loaded.lr_min, loaded.lr_stepsize_epochs) == ("cyclic", 3e-3, 2e-4, 10)
    assert loaded.validation.enabled
    previewed = preview_schedule(loaded, tmp_path / "preview")
    assert previewed["describe"]["stepsize"] == 40


def finder_result(run_dir: Path, suggestion: Suggestion, fragment) -> FinderResult:
    log = SweepLog(rows=[{"step": 0, "lr": 0.0, "probe_loss": 0.1, "train_loss": None}])
    return FinderResult(run_dir, lr_finder.Sweep(1e-8, 1e-4, "exponential", 10, 1, 3.0), log, suggestion, "", fragment)


@pytest.fixture
def user_config(tmp_path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"data_root": str(DEMO_DATA), "max_epochs": 8, "lr_scheduler": "constant"}))
    return path


def test_cli_writes_the_suggested_config(monkeypatch, tmp_path, user_config):
    ok = Suggestion("ok", "", lr_min=2e-4, lr=3e-3, lr_steepest=1e-3)
    monkeypatch.setattr(lr_finder, "find_lr", lambda config: finder_result(tmp_path, ok, config_fragment(config, ok)))
    target = tmp_path / "new.json"
    assert train_cli.main(["--config", str(user_config), "--find_lr_write", str(target), "--batch_size", "4"]) == 0
    written = json.loads(target.read_text())
    assert written == {
        "data_root": str(DEMO_DATA),
        "max_epochs": 8,
        "batch_size": 4,
        **FRAGMENT,
        "lr_stepsize_epochs": 4,
    }
    assert load_config(target).lr_scheduler == "cyclic"


def test_cli_refuses_to_write_an_unbacked_suggestion(monkeypatch, tmp_path, capsys, user_config):
    unbacked = Suggestion("no_descent", "the smoothed probe loss never fell clearly")
    monkeypatch.setattr(lr_finder, "find_lr", lambda config: finder_result(tmp_path, unbacked, None))
    target = tmp_path / "new.json"
    status = train_cli.main(["--config", str(user_config), "--find_lr", "--find_lr_write", str(target)])
    assert status == 1 and not target.exists()
    assert "backs no range" in capsys.readouterr().err
    assert train_cli.main(["--config", str(user_config), "--find_lr_write", str(user_config)]) == 2


def test_a_written_config_finds_every_path_the_original_found(tmp_path, monkeypatch):
    """--find_lr_write puts NEW.json in another folder: every path key (latent_cache_dir and resume_from included)
    must lead to the same place from there as from the original config, found as load_config finds paths."""
    project, written, elsewhere = tmp_path / "project", tmp_path / "out" / "deeper", tmp_path / "elsewhere"
    paths = {key: f"{key}_here" for key in PATH_KEYS}
    for folder in paths.values():
        (project / folder).mkdir(parents=True)
    written.mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the user runs from a third folder: nothing is found from the working directory
    rebased = lr_finder.rebase_paths(paths, project, written)
    assert all(rebased[key] != paths[key] for key in PATH_KEYS)

    def places(found: dict) -> dict:
        return {key: Path(value).resolve() for key, value in found.items()}

    assert places(resolve_config_paths(rebased, written)) == places(resolve_config_paths(paths, project))
    assert all(place.is_dir() for place in places(resolve_config_paths(rebased, written)).values())
