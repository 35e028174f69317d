"""LR schedules: checked step by step against torch and diffusers themselves, and against the post's numbers."""

from __future__ import annotations

import io
import math
import pickle
import subprocess
import sys

import pytest
import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR

from optimizer.lr import FunctionLR, ed2_default_warmup_steps
from optimizer.schedule_checks import ScheduleError, ed2_default_decay_steps
from optimizer.schedule_report import (
    cosine_oscillates,
    describe,
    equivalent_cyclic,
    high_points,
    low_points,
    nearest_low_end,
    stepsize_of,
)
from optimizer.schedules import ScheduleSpec, build_momentum, build_schedule, stages_total_steps
from tests.conftest import ROOT
from utils.config import ED2_SCHEDULE_NAMES

PEAK = 1.13e-6  # the post's upper bound for Damon's data set
POST_STAGES = ((3, 1.13e-6), (2, 5.65e-7), (1.5, 2.83e-7))


def cyclic(**overrides) -> ScheduleSpec:
    settings = dict(name="cyclic", lr=PEAK, total_steps=100, steps_per_epoch=4)
    return ScheduleSpec(**{**settings, **overrides})


def curve(spec: ScheduleSpec, steps: int | None = None) -> list[float]:
    lr_at = build_schedule(spec)
    return [lr_at(k) for k in range(spec.total_steps if steps is None else steps)]


def torch_curve(make_scheduler, steps: int, lr: float = PEAK) -> tuple[list[float], list[float]]:
    """The LR and beta1 a real AdamW uses at each step: read before optimizer.step(), as a trainer does."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = make_scheduler(optimizer)
    lrs, betas = [], []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        param.grad = torch.ones(1)
        optimizer.step()
        scheduler.step()
    return lrs, betas


def assert_same_curve(ours: list[float], theirs: list[float], scale: float = PEAK) -> None:
    assert len(ours) == len(theirs)
    worst = max(range(len(ours)), key=lambda k: abs(ours[k] - theirs[k]))
    assert abs(ours[worst] - theirs[worst]) <= scale * 1e-12, f"step {worst}: {ours[worst]!r} != {theirs[worst]!r}"


# ---------------------------------------------------------------------------------------------------------
# 1. cyclic, starting low, is torch's CyclicLR
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cycle_decay, mode, gamma",
    [("none", "triangular", 1.0), ("triangular2", "triangular2", 1.0), ("exp_range", "exp_range", 0.99)],
)
@pytest.mark.parametrize("stepsize", [1, 4, 7])
def test_cyclic_start_low_equals_torch_cyclic_lr(cycle_decay, mode, gamma, stepsize):
    spec = cyclic(lr_min=1e-7, decay_steps=stepsize, cycle_decay=cycle_decay, gamma=gamma)
    theirs, _ = torch_curve(
        lambda opt: CyclicLR(
            opt, base_lr=1e-7, max_lr=PEAK, step_size_up=stepsize, mode=mode, gamma=gamma, cycle_momentum=False
        ),
        spec.total_steps,
    )
    assert_same_curve(curve(spec), theirs)


@pytest.mark.parametrize(
    "cycle_decay, gamma, expected",
    [
        (
            "none",
            1.0,
            [0.001, 0.002, 0.003, 0.004, 0.005, 0.004, 0.003, 0.002, 0.001, 0.002, 0.003, 0.004, 0.005, 0.004],
        ),
        (
            "triangular2",
            1.0,
            [0.001, 0.002, 0.003, 0.004, 0.005, 0.004, 0.003, 0.002, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.0025],
        ),
        (
            "exp_range",
            0.9,
            [
                0.001,
                0.0019,
                0.00262,
                0.003187,
                0.003624,
                0.002771,
                0.002063,
                0.001478,
                0.001,
                0.001387,
                0.001697,
                0.001941,
                0.00213,
                0.001763,
            ],
        ),
    ],
)
def test_cyclic_matches_published_reference_values(cycle_decay, gamma, expected):
    spec = ScheduleSpec(
        "cyclic",
        lr=5e-3,
        lr_min=1e-3,
        total_steps=14,
        steps_per_epoch=1,
        decay_steps=4,
        cycle_decay=cycle_decay,
        gamma=gamma,
    )
    assert curve(spec) == pytest.approx(expected, abs=1e-6)


def test_the_three_stepsize_options_give_the_same_curve():
    by_steps = cyclic(total_steps=96, decay_steps=8)
    by_epochs = cyclic(total_steps=96, stepsize_epochs=2)  # 2 epochs of 4 steps
    by_cycles = cyclic(total_steps=96, cycles=6)  # 96 / (2 * 6)
    assert stepsize_of(by_steps) == stepsize_of(by_epochs) == stepsize_of(by_cycles) == 8
    assert curve(by_steps) == curve(by_epochs) == curve(by_cycles)


def test_cyclic_momentum_equals_torch_cycle_momentum():
    spec = cyclic(lr_min=1e-7, decay_steps=5, cycle_decay="triangular2", momentum_cycle=(0.85, 0.95))
    _, theirs = torch_curve(
        lambda opt: CyclicLR(
            opt, base_lr=1e-7, max_lr=PEAK, step_size_up=5, mode="triangular2", base_momentum=0.85, max_momentum=0.95
        ),
        spec.total_steps,
    )
    momentum_at = build_momentum(spec)
    assert_same_curve([momentum_at(k) for k in range(spec.total_steps)], theirs, scale=1e3)


# ---------------------------------------------------------------------------------------------------------
# 2. starting high, and cosine ramps
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cycle_decay", ["none", "triangular2"])
@pytest.mark.parametrize("shape", ["triangular", "cosine"])
def test_start_high_is_start_low_shifted_by_one_stepsize(cycle_decay, shape):
    low = build_schedule(cyclic(lr_min=1e-7, decay_steps=6, cycle_decay=cycle_decay, cycle_shape=shape))
    high = build_schedule(
        cyclic(lr_min=1e-7, decay_steps=6, cycle_decay=cycle_decay, cycle_shape=shape, cycle_start="high")
    )
    assert high(0) == pytest.approx(PEAK)
    assert_same_curve([high(k) for k in range(100)], [low(k + 6) for k in range(100)])


def test_exp_range_starting_high_decays_from_the_peak_itself():
    gamma, stepsize = 0.98, 6
    low = build_schedule(cyclic(lr_min=1e-7, decay_steps=stepsize, cycle_decay="exp_range", gamma=gamma))
    high = build_schedule(
        cyclic(lr_min=1e-7, decay_steps=stepsize, cycle_decay="exp_range", gamma=gamma, cycle_start="high")
    )
    assert high(0) == pytest.approx(PEAK)
    # Same wave shifted, but the decay counts the run's own steps: gamma ** k, not gamma ** (k + stepsize).
    expected = [1e-7 + (low(k + stepsize) - 1e-7) / gamma**stepsize for k in range(100)]
    assert_same_curve([high(k) for k in range(100)], expected)


def test_cosine_shape_is_a_half_cosine_between_the_same_points():
    triangular = build_schedule(cyclic(lr_min=1e-7, decay_steps=7))
    cosine = build_schedule(cyclic(lr_min=1e-7, decay_steps=7, cycle_shape="cosine"))
    height = PEAK - 1e-7
    for k in range(100):
        ramp = (triangular(k) - 1e-7) / height
        assert cosine(k) == pytest.approx(1e-7 + height * 0.5 * (1 - math.cos(math.pi * ramp)), rel=1e-9)
    assert [cosine(k) for k in (0, 7, 14, 21)] == pytest.approx([1e-7, PEAK, 1e-7, PEAK], rel=1e-12)
    assert cosine(3) < triangular(3) and cosine(4) > triangular(4)  # slow start, fast middle


# ---------------------------------------------------------------------------------------------------------
# 3. stages
# ---------------------------------------------------------------------------------------------------------


def test_stages_keep_the_wave_running_across_a_fractional_boundary():
    spec = cyclic(
        total_steps=50,
        steps_per_epoch=5,
        decay_steps=10,
        cycle_start="high",
        cycle_decay="stages",
        stages=((1.5, 1e-6), (1, 5e-7)),
    )
    lr_at = build_schedule(spec)
    assert [lr_at(k) for k in (0, 10, 20, 25, 30, 35, 40, 50)] == pytest.approx(
        [1e-6, 0.0, 1e-6, 5e-7, 0.0, 2.5e-7, 5e-7, 0.0], abs=1e-18
    )
    assert low_points(spec) == [10, 30, 50]


def test_stages_on_a_peak_boundary_switch_to_the_next_stage_there():
    spec = cyclic(
        total_steps=40, decay_steps=5, cycle_start="high", cycle_decay="stages", stages=((2, 1e-6), (2, 4e-7))
    )
    lr_at = build_schedule(spec)
    assert lr_at(10) == pytest.approx(1e-6) and lr_at(20) == pytest.approx(4e-7)


def test_stages_without_a_stepsize_option_spread_over_the_run():
    spec = cyclic(total_steps=650, steps_per_epoch=5, cycle_start="high", cycle_decay="stages", stages=POST_STAGES)
    assert stepsize_of(spec) == 50


def test_stages_total_steps_counts_cycles_and_warmup():
    assert stages_total_steps(POST_STAGES, 50) == 650
    assert stages_total_steps(POST_STAGES, 50, warmup_steps=20) == 670
    with pytest.raises(ScheduleError, match="lr_cycle_stages"):
        stages_total_steps(((1.5, 1e-6),), 8.5)  # 25.5 steps


def test_last_stage_keeps_cycling_after_the_stages_end():
    spec = cyclic(
        total_steps=60, decay_steps=5, cycle_start="high", cycle_decay="stages", stages=((1, 1e-6), (2, 4e-7))
    )
    assert build_schedule(spec)(50) == pytest.approx(4e-7)
    assert any("keeps cycling" in note for note in describe(spec)["notes"])


# ---------------------------------------------------------------------------------------------------------
# 4. warmup with every schedule
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(name="cyclic", lr_min=2e-7, decay_steps=7),
        dict(name="cyclic", decay_steps=7, cycle_start="high", cycle_shape="cosine"),
        dict(name="cyclic", decay_steps=5, cycle_start="high", cycle_decay="stages", stages=((2, PEAK), (3, 5e-7))),
        dict(name="one_cycle"),
        dict(name="one_cycle", three_phase=True, anneal="linear"),
    ],
)
def test_warmup_ramps_from_zero_then_runs_the_schedule_shifted(settings):
    warmup = 10
    plain = build_schedule(ScheduleSpec(lr=PEAK, total_steps=100, steps_per_epoch=4, **settings))
    warmed = build_schedule(ScheduleSpec(lr=PEAK, total_steps=110, steps_per_epoch=4, warmup_steps=warmup, **settings))
    assert warmed(0) == 0.0
    assert [warmed(k) for k in range(warmup)] == pytest.approx([plain(0) * k / warmup for k in range(warmup)])
    assert_same_curve([warmed(warmup + t) for t in range(101)], [plain(t) for t in range(101)])


def test_one_cycle_momentum_stays_at_max_through_warmup_then_follows_torch_shifted():
    settings = dict(name="one_cycle", lr=PEAK, steps_per_epoch=4, momentum_cycle=(0.85, 0.95))
    plain = build_momentum(ScheduleSpec(total_steps=100, **settings))
    warmed = build_momentum(ScheduleSpec(total_steps=110, warmup_steps=10, **settings))
    assert [warmed(k) for k in range(10)] == [0.95] * 10
    assert [warmed(10 + t) for t in range(100)] == [plain(t) for t in range(100)]


def test_momentum_stays_within_its_range_while_warmup_is_below_lr_min():
    momentum_at = build_momentum(cyclic(lr_min=2e-7, decay_steps=5, warmup_steps=10, momentum_cycle=(0.85, 0.95)))
    assert [momentum_at(k) for k in range(11)] == [0.95] * 11  # warmup, then the cycle's low
    assert momentum_at(15) == pytest.approx(0.85)


def test_cycles_are_counted_after_warmup():
    spec = cyclic(total_steps=570, steps_per_epoch=5, warmup_steps=20, cycles=5.5, cycle_start="high")
    assert stepsize_of(spec) == 50
    assert describe(spec)["ends"] == "low"
    assert low_points(spec)[0] == 70 and high_points(spec)[0] == 20


def test_constant_ignores_warmup_and_constant_with_warmup_does_not():
    constant = ScheduleSpec("constant", lr=PEAK, total_steps=50, steps_per_epoch=5, warmup_steps=10)
    assert curve(constant) == [PEAK] * 50
    assert any("constant_with_warmup" in note for note in describe(constant)["notes"])
    warmed = ScheduleSpec("constant_with_warmup", lr=PEAK, total_steps=50, steps_per_epoch=5, warmup_steps=10)
    assert curve(warmed)[:2] == pytest.approx([0.0, PEAK / 10]) and curve(warmed)[10:] == [PEAK] * 40


# ---------------------------------------------------------------------------------------------------------
# 5. one_cycle is torch's OneCycleLR
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(three_phase=True, anneal="linear"),
        dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0),
        dict(three_phase=True, anneal="cos", pct_start=0.4),
    ],
)
def test_one_cycle_equals_torch_one_cycle_lr(settings):
    spec = ScheduleSpec(
        "one_cycle", lr=PEAK, total_steps=97, steps_per_epoch=4, momentum_cycle=(0.85, 0.95), **settings
    )
    torch_settings = dict(
        pct_start=spec.pct_start,
        div_factor=spec.div_factor,
        final_div_factor=spec.final_div_factor,
        three_phase=spec.three_phase,
        anneal_strategy=spec.anneal,
        base_momentum=0.85,
        max_momentum=0.95,
    )
    lrs, betas = torch_curve(lambda opt: OneCycleLR(opt, max_lr=PEAK, total_steps=97, **torch_settings), 97)
    momentum_at = build_momentum(spec)
    assert_same_curve(curve(spec), lrs)
    assert_same_curve([momentum_at(k) for k in range(97)], betas, scale=1e3)


def test_one_cycle_matches_published_reference_values_and_holds_its_end():
    two_phase = build_schedule(ScheduleSpec("one_cycle", lr=1.0, total_steps=10, steps_per_epoch=1))
    three_phase = build_schedule(
        ScheduleSpec("one_cycle", lr=1.0, total_steps=10, steps_per_epoch=1, three_phase=True, anneal="linear")
    )
    assert [two_phase(k) for k in range(10)] == pytest.approx(
        [0.04, 0.52, 1.0, 0.95048, 0.81175, 0.61126, 0.38874, 0.18826, 0.049519, 4e-06], abs=1e-5
    )
    assert [three_phase(k) for k in range(10)] == pytest.approx(
        [0.04, 0.52, 1, 0.52, 0.04, 0.032, 0.024, 0.016, 0.008, 4e-06],
        abs=1e-5,  # published to 2-3 digits
    )
    assert two_phase(10) == two_phase(11) == two_phase(9)  # torch bounces up here; a trainer must not


# ---------------------------------------------------------------------------------------------------------
# 6. ED2 names are diffusers' get_scheduler, as ED2 calls it
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ED2_SCHEDULE_NAMES)
@pytest.mark.parametrize("warmup, decay", [(0, None), (5, 40), (12, 200), (3, 4)])
def test_ed2_names_equal_diffusers_get_scheduler(name, warmup, decay):
    spec = ScheduleSpec(name, lr=PEAK, total_steps=120, steps_per_epoch=4, warmup_steps=warmup, decay_steps=decay)
    training_steps = ed2_default_decay_steps(120) if decay is None else decay
    theirs, _ = torch_curve(
        lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=training_steps), 120
    )
    assert_same_curve(curve(spec), theirs)


def test_post_first_run_ed2_cosine_gives_ten_cycles_of_80_steps():
    spec = ScheduleSpec("cosine", lr=PEAK, total_steps=800, steps_per_epoch=4, decay_steps=40)
    lrs = curve(spec)
    assert cosine_oscillates(spec)
    assert [k for k in range(800) if lrs[k] == pytest.approx(PEAK, rel=1e-12)] == list(range(0, 800, 80))
    assert [k for k in range(800) if lrs[k] < PEAK * 1e-12] == list(range(40, 800, 80))
    summary = describe(spec)
    assert (summary["stepsize"], summary["cycle_steps"], summary["cycles"]) == (40, 80, 10)
    assert summary["ends"] == "high" and any("cyclic" in note for note in summary["notes"])


@pytest.mark.parametrize("warmup", [0, 6])
def test_equivalent_cyclic_reproduces_an_oscillating_ed2_cosine(warmup):
    spec = ScheduleSpec("cosine", lr=PEAK, total_steps=500, steps_per_epoch=4, warmup_steps=warmup, decay_steps=40)
    twin = equivalent_cyclic(spec)
    assert (twin.name, twin.cycle_shape, twin.cycle_start, twin.lr_min) == ("cyclic", "cosine", "high", 0.0)
    assert twin.decay_steps == 40 - warmup
    assert_same_curve(curve(twin, 501), curve(spec, 501))
    assert low_points(spec) == low_points(twin)


def test_cosine_oscillates_only_when_it_climbs_back_inside_the_run():
    def spec(total, decay=None):
        return ScheduleSpec("cosine", lr=PEAK, total_steps=total, steps_per_epoch=4, decay_steps=decay)

    assert not cosine_oscillates(spec(800))  # ED2's automatic 1.5 runs
    assert not cosine_oscillates(spec(41, 40))  # the last step is at 0, none after it
    assert cosine_oscillates(spec(42, 40))
    assert not cosine_oscillates(ScheduleSpec("linear", lr=PEAK, total_steps=800, steps_per_epoch=4, decay_steps=40))


def test_ed2_automatic_defaults():
    assert ed2_default_decay_steps(800) == 1200
    assert ed2_default_warmup_steps(1200) == 24
    zero_means_automatic = ScheduleSpec("linear", lr=PEAK, total_steps=80, steps_per_epoch=4, decay_steps=0)
    assert curve(zero_means_automatic) == curve(ScheduleSpec("linear", lr=PEAK, total_steps=80, steps_per_epoch=4))


# ---------------------------------------------------------------------------------------------------------
# 7. the post's other runs
# ---------------------------------------------------------------------------------------------------------


def test_post_stepsize_two_epochs_gives_50_cycles_of_16_steps():
    spec = cyclic(total_steps=800, steps_per_epoch=4, stepsize_epochs=2)
    summary = describe(spec)
    assert (summary["stepsize"], summary["cycle_steps"], summary["cycles"]) == (8, 16, 50)
    assert len([k for k in high_points(spec) if k < 800]) == 50


def test_post_final_run_five_and_a_half_cycles_starts_high_and_ends_low():
    spec = cyclic(total_steps=550, steps_per_epoch=5, cycles=5.5, cycle_start="high")  # 110 epochs
    summary = describe(spec)
    assert stepsize_of(spec) == 50 and summary["stepsize_epochs"] == 10
    assert summary["lr_first_step"] == pytest.approx(PEAK)
    assert summary["ends"] == "low" and summary["end_lr"] == 0.0
    assert "nearest_low_end" not in summary


def test_post_staged_decay_runs_650_steps_with_falling_peaks_and_ends_low():
    stepsize = 50
    spec = cyclic(
        total_steps=stages_total_steps(POST_STAGES, stepsize),
        steps_per_epoch=5,
        decay_steps=stepsize,
        cycle_start="high",
        cycle_decay="stages",
        stages=POST_STAGES,
    )
    assert spec.total_steps == 650
    lr_at = build_schedule(spec)
    assert [lr_at(k) for k in high_points(spec) if k < 650] == pytest.approx(
        [1.13e-6] * 3 + [5.65e-7] * 2 + [2.83e-7] * 2, rel=1e-12
    )
    summary = describe(spec)
    assert [(s["peaks"], s["peak_lr"]) for s in summary["stages"]] == [(3, 1.13e-6), (2, 5.65e-7), (2, 2.83e-7)]
    assert summary["ends"] == "low" and summary["notes"] == []


# ---------------------------------------------------------------------------------------------------------
# 8. ending on a low point
# ---------------------------------------------------------------------------------------------------------


def test_ending_low_means_the_curve_is_at_the_low_when_the_run_stops():
    spec = cyclic(total_steps=550, steps_per_epoch=5, decay_steps=50, cycle_start="high")
    lr_at = build_schedule(spec)
    assert lr_at(549) == pytest.approx(PEAK / 50)  # the final update: the last step of the falling ramp
    assert lr_at(550) == 0.0  # where the curve stands when the run stops
    assert low_points(spec) == [50, 150, 250, 350, 450, 550]
    assert nearest_low_end(spec).ends_low


@pytest.mark.parametrize(
    "start, cycles, ends", [("low", 5, "low"), ("low", 5.5, "high"), ("high", 5, "high"), ("low", 5.25, "mid-cycle")]
)
def test_where_a_run_ends(start, cycles, ends):
    assert describe(cyclic(total_steps=400, cycles=cycles, cycle_start=start))["ends"] == ends


def test_nearest_low_end_names_shorter_and_longer_runs_in_steps_epochs_and_cycles():
    spec = cyclic(total_steps=560, steps_per_epoch=5, decay_steps=50, cycle_start="high")
    found = nearest_low_end(spec)
    assert not found.ends_low
    assert (found.shorter_steps, found.longer_steps) == (550, 650)
    assert (found.shorter_epochs, found.longer_epochs) == (110, 130)
    assert (found.shorter_cycles, found.longer_cycles) == (5.5, 6.5)
    assert describe(spec)["nearest_low_end"]["longer_steps"] == 650


def test_nearest_low_end_starting_low_rounds_to_whole_cycles():
    found = nearest_low_end(cyclic(total_steps=560, steps_per_epoch=5, decay_steps=50))  # 5.6 cycles from low
    assert (found.shorter_steps, found.longer_steps, found.nearest_steps) == (500, 600, 600)
    assert (found.shorter_cycles, found.longer_cycles) == (5, 6)
    assert nearest_low_end(cyclic(total_steps=550, decay_steps=50)).nearest_steps == 600  # a tie: the longer
    assert found.message == (
        "The nearest runs that end on a low point: 500 or 600 steps (in whole epochs: 100 or 120 epochs), "
        "that is 5 or 6 cycles."
    )


def test_nearest_low_end_with_lr_cycles_points_at_the_cycle_count():
    found = nearest_low_end(cyclic(total_steps=530, steps_per_epoch=5, cycles=5.3, cycle_start="high"))
    assert found.stepsize_follows_run and not found.ends_low
    assert (found.shorter_steps, found.longer_steps, found.nearest_steps) == (None, None, None)
    assert (found.shorter_cycles, found.longer_cycles) == (4.5, 5.5)
    assert "4.5 or 5.5 cycles" in found.message


def test_nearest_low_end_in_epochs_skips_lows_that_split_an_epoch():
    found = nearest_low_end(cyclic(total_steps=25, steps_per_epoch=4, decay_steps=5))  # lows every 10 steps
    assert (found.shorter_steps, found.longer_steps) == (20, 30)
    assert (found.shorter_epochs, found.longer_epochs) == (5, 10)  # 30 steps is 7.5 epochs: next whole is 40


def test_nearest_low_end_when_the_run_already_ends_low_or_only_warmup_is_shorter():
    ends_low = nearest_low_end(cyclic(total_steps=80, decay_steps=20))
    assert ends_low.ends_low and ends_low.shorter_steps == ends_low.longer_steps == 80
    early = nearest_low_end(cyclic(total_steps=15, warmup_steps=10, decay_steps=20))
    assert (early.shorter_steps, early.longer_steps, early.shorter_cycles) == (None, 50, None)


def test_a_fractional_stepsize_from_cycles_still_ends_exactly_low():
    spec = cyclic(total_steps=560, steps_per_epoch=5, cycles=5.5, cycle_start="high")
    assert stepsize_of(spec) == pytest.approx(560 / 11)
    assert describe(spec)["ends"] == "low" and low_points(spec)[-1] == 560
    assert build_schedule(spec)(560) == pytest.approx(0.0, abs=1e-18)


# ---------------------------------------------------------------------------------------------------------
# 9. FunctionLR on a real optimizer
# ---------------------------------------------------------------------------------------------------------

UNET = cyclic(lr_min=1e-7, decay_steps=6, cycle_start="high", momentum_cycle=(0.85, 0.95))
TEXT_ENCODER = cyclic(lr=5e-7, lr_min=5e-8, decay_steps=6, cycle_start="high")


def make_training(seed_value: float = 0.0):
    unet = torch.nn.Parameter(torch.full((3,), seed_value))
    text_encoder = torch.nn.Parameter(torch.full((2,), seed_value))
    optimizer = torch.optim.AdamW([{"params": [unet]}, {"params": [text_encoder]}], lr=0.0)
    scheduler = FunctionLR(optimizer, [build_schedule(UNET), build_schedule(TEXT_ENCODER)], build_momentum(UNET))
    return (unet, text_encoder), optimizer, scheduler


def train(params, optimizer, scheduler, steps: int) -> list[tuple[float, float, float]]:
    seen = []
    for _ in range(steps):
        seen.append(
            (optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"], optimizer.param_groups[0]["betas"][0])
        )
        loss = sum(((p - 1.0) ** 2).sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return seen


def test_function_lr_sets_each_groups_absolute_lr_and_beta1():
    params, optimizer, scheduler = make_training()
    seen = train(params, optimizer, scheduler, 30)
    unet_lr, text_lr, beta1 = build_schedule(UNET), build_schedule(TEXT_ENCODER), build_momentum(UNET)
    assert seen == [(unet_lr(k), text_lr(k), beta1(k)) for k in range(30)]
    assert [group["betas"] for group in optimizer.param_groups] == [(beta1(30), 0.999)] * 2  # one shared phase


def test_beta1_moves_opposite_to_the_lr():
    params, optimizer, scheduler = make_training()
    seen = train(params, optimizer, scheduler, 13)
    assert seen[0][0] == pytest.approx(PEAK) and seen[0][2] == pytest.approx(0.85)  # peak LR, low beta1
    assert seen[6][0] == pytest.approx(1e-7) and seen[6][2] == pytest.approx(0.95)  # low LR, high beta1
    assert seen[3][2] == pytest.approx(0.90)
    assert optimizer.param_groups[0]["betas"][1] == 0.999


def test_resuming_from_state_dict_continues_the_same_curve():
    params, optimizer, scheduler = make_training()
    uninterrupted = train(params, optimizer, scheduler, 100)

    params, optimizer, scheduler = make_training()
    first_part = train(params, optimizer, scheduler, 37)
    saved = io.BytesIO()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "params": [p.detach().clone() for p in params],
        },
        saved,
    )
    saved.seek(0)
    state = torch.load(saved)

    params, optimizer, scheduler = make_training(seed_value=5.0)  # fresh objects, different weights
    with torch.no_grad():
        for param, value in zip(params, state["params"], strict=True):
            param.copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    assert first_part + train(params, optimizer, scheduler, 63) == uninterrupted


def test_state_dict_is_only_the_step_count_and_applies_at_once():
    _, optimizer, scheduler = make_training()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert scheduler.state_dict() == {"step": 5}
    pickle.dumps(scheduler.state_dict())

    _, fresh_optimizer, fresh = make_training()
    fresh.load_state_dict({"step": 9})
    assert fresh_optimizer.param_groups[0]["lr"] == build_schedule(UNET)(9)
    assert fresh_optimizer.param_groups[0]["betas"][0] == build_momentum(UNET)(9)
    assert fresh.get_last_lr() == [build_schedule(UNET)(9), build_schedule(TEXT_ENCODER)(9)]


def test_function_lr_cycles_sgd_momentum_and_refuses_optimizers_without_any():
    param = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    FunctionLR(sgd, build_schedule(UNET), build_momentum(UNET))
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.85)
    adagrad = torch.optim.Adagrad([param], lr=0.1)
    with pytest.raises(ScheduleError, match="lr_cycle_momentum"):
        FunctionLR(adagrad, build_schedule(UNET), build_momentum(UNET))
    with pytest.raises(ValueError, match="2 lr_fns for an optimizer with 1 param groups"):
        FunctionLR(adagrad, [build_schedule(UNET)] * 2)


# ---------------------------------------------------------------------------------------------------------
# 10. every config error names its key
# ---------------------------------------------------------------------------------------------------------

BASE = dict(name="cyclic", lr=1e-6, total_steps=100, steps_per_epoch=4)


@pytest.mark.parametrize(
    "settings, keys",
    [
        (dict(), ["lr_decay_steps", "lr_stepsize_epochs", "lr_cycles", "none of them"]),
        (dict(decay_steps=8, cycles=3), ["lr_decay_steps=8", "lr_cycles=3", "exactly one"]),
        (dict(decay_steps=0), ["lr_decay_steps"]),
        (dict(cycles=100), ["stepsize", "lr_cycles"]),
        (dict(decay_steps=8, lr_min=2e-6), ["lr_min", "lr"]),
        (dict(decay_steps=8, lr_min=1e-6), ["lr_min", "constant"]),
        (dict(decay_steps=8, cycle_shape="sine"), ["lr_cycle_shape", "'triangular'", "'cosine'"]),
        (dict(decay_steps=8, cycle_start="middle"), ["lr_cycle_start", "'low'", "'high'"]),
        (dict(decay_steps=8, cycle_decay="halve"), ["lr_cycle_decay", "'triangular2'", "'exp_range'"]),
        (dict(decay_steps=8, cycle_decay="exp_range", gamma=0.0), ["lr_gamma", "0 < lr_gamma <= 1"]),
        (dict(decay_steps=8, cycle_decay="exp_range", gamma=1.5), ["lr_gamma"]),
        (dict(decay_steps=8, gamma=0.9), ["lr_gamma", "exp_range"]),
        (dict(decay_steps=8, cycle_decay="stages", stages=((0, 1e-6),)), ["lr_cycle_stages", "stage 1"]),
        (dict(decay_steps=8, cycle_decay="stages", stages=((2, 1e-6), (-1, 5e-7))), ["lr_cycle_stages", "stage 2"]),
        (dict(decay_steps=8, lr_min=1e-7, cycle_decay="stages", stages=((2, 5e-8),)), ["lr_cycle_stages", "lr_min"]),
        (dict(decay_steps=8, stages=((2, 1e-6),)), ["lr_cycle_stages", "lr_cycle_decay"]),
        (dict(decay_steps=8, cycle_decay="stages"), ["lr_cycle_stages", "lr_cycle_decay"]),
        (dict(cycles=3, cycle_decay="stages", stages=((2, 1e-6),)), ["lr_cycles", "lr_cycle_stages"]),
        (dict(decay_steps=8, warmup_steps=100), ["lr_warmup_steps"]),
        (dict(decay_steps=8, warmup_steps=-1), ["lr_warmup_steps"]),
        (dict(decay_steps=8, pct_start=0.4), ["lr_pct_start", "one_cycle"]),
        (dict(decay_steps=8, momentum_cycle=(0.95, 0.85)), ["lr_cycle_momentum", "base < max"]),
        (dict(name="cyclical"), ["lr_scheduler", "cyclic", "one_cycle", "cosine"]),
        (dict(name="cosine", lr_min=1e-7), ["lr_min", "'cyclic'"]),
        (dict(name="cosine", stepsize_epochs=2), ["lr_stepsize_epochs", "'cyclic'"]),
        (dict(name="cosine", decay_steps=40, warmup_steps=40), ["lr_warmup_steps", "lr_decay_steps"]),
        (dict(name="polynomial", lr=1e-7), ["lr", "1e-07"]),
        (dict(name="constant", momentum_cycle=(0.85, 0.95)), ["lr_cycle_momentum", "constant"]),
        (dict(name="one_cycle", pct_start=1.2), ["lr_pct_start"]),
        (dict(name="one_cycle", pct_start=0.005), ["lr_pct_start", "phase"]),
        (dict(name="one_cycle", anneal="exp"), ["lr_anneal_strategy", "'cos'", "'linear'"]),
        (dict(name="one_cycle", div_factor=0.0), ["lr_div_factor"]),
        (dict(name="one_cycle", decay_steps=50), ["lr_decay_steps", "one_cycle"]),
        (dict(name="constant", total_steps=0), ["total_steps", "max_epochs"]),
        (dict(name="constant", steps_per_epoch=0), ["steps per epoch"]),
        (dict(name="constant", lr=0.0), ["lr", "positive"]),
    ],
)
def test_config_errors_name_their_keys_in_one_paragraph(settings, keys):
    with pytest.raises(ScheduleError) as error:
        ScheduleSpec(**{**BASE, **settings})
    message = str(error.value)
    assert "\n" not in message
    for key in keys:
        assert key in message


def test_schedules_that_do_not_cycle_have_no_stepsize_or_low_points():
    linear = ScheduleSpec("linear", lr=PEAK, total_steps=100, steps_per_epoch=4)
    for query in (stepsize_of, low_points, nearest_low_end, equivalent_cyclic):
        with pytest.raises(ScheduleError, match="'linear'"):
            query(linear)
    assert "stepsize" not in describe(linear)


def test_specs_accept_json_lists_and_stay_hashable():
    spec = cyclic(decay_steps=8, cycle_decay="stages", stages=[[2, 1e-6], [1, 5e-7]], momentum_cycle=[0.85, 0.95])
    assert spec.stages == ((2.0, 1e-6), (1.0, 5e-7)) and spec.momentum_cycle == (0.85, 0.95)
    assert hash(spec) == hash(
        cyclic(decay_steps=8, cycle_decay="stages", stages=((2, 1e-6), (1, 5e-7)), momentum_cycle=(0.85, 0.95))
    )


def test_the_schedule_modules_import_no_torch():
    """The curves, their checks and their reports are plain Python: the preview and the tests of the curves
    need no torch."""
    code = (
        "import sys, optimizer.schedules, optimizer.schedule_checks, optimizer.schedule_report; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
