"""Learning-rate schedules as pure functions of the optimizer step.

A schedule is built from plain numbers (a `ScheduleSpec`) and is a function `lr(k) -> float`: the ABSOLUTE
learning rate used by optimizer step `k`, where `k = 0` is the first step of the run. Nothing here touches a
model, the data or torch (a test pins that down), so every curve can be tested exhaustively and plotted before
any GPU time is spent.

The schedule modules, from the bottom up (each imports only those before it):

* optimizer/schedule_checks.py: what makes a spec valid (`check_spec`, `ScheduleError`) and the numbers a
  check has to work out first (the cyclic stepsize, ED2's lr_decay_steps, the one_cycle phase ends).
* this module: `ScheduleSpec`, which calls `check_spec` on creation, so every spec is valid; the curves
  (`build_schedule`) and the cycled momentum (`build_momentum`).
* optimizer/schedule_report.py: what a curve does, for the preview and the log: low points, where a run
  ends, the nearest run lengths that end low, notes (`describe`).
* optimizer/lr.py: config keys to specs, and `FunctionLR`, which puts the functions on a torch optimizer.

Definitions this module commits to (the tests pin each one down):

* Schedules. `cyclic` is Smith's CLR: between `lr_min` and `lr` (or the stage peaks), half-cycle length
  `stepsize`. With `cycle_start="low"`, triangular ramps and no warmup it equals torch's `CyclicLR`
  (triangular / triangular2 / exp_range) at every step. `cycle_start="high"` is the same wave shifted by one
  stepsize: it begins at the peak and falls, like the post's ED2 runs. `cycle_shape="cosine"` replaces each
  straight ramp with a half-cosine between the same two points. `exp_range` scales the amplitude by
  `gamma ** t`, `t` counted from the start of the cycling (so a run starting high starts exactly at `lr`).
  `one_cycle` equals torch's `OneCycleLR`. The ED2 names (`constant`, `constant_with_warmup`, `linear`,
  `cosine`, `cosine_with_restarts`, `polynomial`) equal diffusers' `get_scheduler(name, optimizer,
  num_warmup_steps=warmup_steps, num_training_steps=decay_steps)`, called the way ED2 calls it (no
  `num_cycles`, no `power`), including its quirks: `constant` ignores warmup, and `cosine` with
  `decay_steps` shorter than the run falls to 0 and rises again (see `schedule_report.cosine_oscillates`).
* ED2 defaults. `decay_steps` None for an ED2 name means ED2's automatic `int(total_steps * 1.5)`; values
  below 1 mean the same, as in ED2. ED2's automatic warmup, `int(decay_steps / 50)`, is the config layer's
  job (`optimizer.lr.ed2_default_warmup_steps`): here `warmup_steps` is taken as given.
* Warmup. For the ED2 names warmup is diffusers' own (the LR is `lr * k / warmup_steps` before
  `warmup_steps`, and the decay is measured from there). For `cyclic` and `one_cycle` the LR ramps linearly
  from 0 at `k = 0` to the value the schedule starts with, reached at `k = warmup_steps`; the schedule then
  runs unchanged, shifted by `warmup_steps`, over the remaining `total_steps - warmup_steps` steps. So the
  cycle starts after warmup, and `cycles` counts the cycles after warmup.
* Stages. `stages=((cycles, peak), ...)` run back to back with ONE stepsize and the one `lr_min`. The wave
  itself runs on uninterrupted; a stage only sets the peak of the steps inside it (a step on a boundary
  belongs to the later stage). With whole cycles per stage the two readings "restart each stage" and
  "continue the wave" agree; with fractional stages the wave continues (no jump back to the start point).
  The stepsize comes from `decay_steps` or `stepsize_epochs`, or else from the run length divided by the
  stages' total cycles. Steps past the last stage keep its peak.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from optimizer.schedule_checks import (
    DIFFUSERS_POLYNOMIAL_LR_END,
    WHOLE_TOLERANCE,
    ScheduleError,
    check_spec,
    cycle_steps,
    cyclic_stepsize,
    ed2_decay_steps,
    one_cycle_phase_ends,
)
from utils.config import ED2_SCHEDULE_NAMES

LrFunction = Callable[[int], float]


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything a schedule needs, as plain numbers. Invalid combinations raise ScheduleError on creation."""

    name: str  # one of utils.config.SCHEDULE_NAMES
    lr: float  # peak / nominal LR (the upper bound of cyclic)
    total_steps: int  # optimizer steps in the run
    steps_per_epoch: int
    lr_min: float = 0.0  # cyclic: the lower bound
    warmup_steps: int = 0
    decay_steps: int | None = None  # ED2 lr_decay_steps: diffusers' num_training_steps; cyclic: the stepsize
    stepsize_epochs: float | None = None  # cyclic: stepsize = stepsize_epochs * steps_per_epoch
    cycles: float | None = None  # cyclic: cycles after warmup (stepsize = steps / (2 * cycles), exactly)
    cycle_shape: str = "triangular"  # "triangular" | "cosine" (half-cosine ramps)
    cycle_start: str = "low"  # "low": start at lr_min and rise (the paper); "high": start at the peak
    cycle_decay: str = "none"  # "none" | "triangular2" | "exp_range" | "stages"
    gamma: float = 1.0  # exp_range: amplitude * gamma ** t
    stages: tuple[tuple[float, float], ...] = ()  # ((cycles, peak_lr), ...)
    pct_start: float = 0.3  # one_cycle: torch OneCycleLR's arguments, same meaning
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False
    anneal: str = "cos"
    momentum_cycle: tuple[float, float] | None = None  # (base, max) beta1 cycled opposite to the LR

    def __post_init__(self) -> None:
        # JSON gives lists; keep the spec hashable and comparable by turning them into tuples.
        object.__setattr__(self, "stages", tuple((float(c), float(p)) for c, p in self.stages))
        if self.momentum_cycle is not None:
            object.__setattr__(self, "momentum_cycle", tuple(float(m) for m in self.momentum_cycle))
        check_spec(self)


def stages_total_steps(stages: Sequence[Sequence[float]], stepsize: float, warmup_steps: int = 0) -> int:
    """The run length the stages imply: warmup, then every stage's cycles at 2 * stepsize steps each."""
    steps = warmup_steps + sum(cycles for cycles, _ in stages) * 2 * stepsize
    if abs(steps - round(steps)) > WHOLE_TOLERANCE:
        raise ScheduleError(
            f"lr_cycle_stages at stepsize {stepsize:g} add up to {steps:g} steps, not a whole number. Choose a "
            "stepsize (lr_decay_steps or lr_stepsize_epochs) that makes each stage's cycles whole steps."
        )
    return round(steps)


# ---------------------------------------------------------------------------------------------------------
# Building the curves
# ---------------------------------------------------------------------------------------------------------


def build_schedule(spec: ScheduleSpec) -> LrFunction:
    """The absolute LR used by optimizer step k (k = 0 is the first step); defined for every k >= 0."""
    if spec.name in ED2_SCHEDULE_NAMES:
        multiplier = _ed2_multiplier(spec)
        # LambdaLR multiplies the optimizer's LR by the lambda; do the same so the floats agree.
        return lambda k: spec.lr * multiplier(k)
    body = _cyclic_body(spec) if spec.name == "cyclic" else _one_cycle_body(spec, _lr_ends)
    return _with_warmup(body, spec.warmup_steps)


def _with_warmup(body: Callable[[int], float], warmup_steps: int) -> LrFunction:
    """Ramp from 0 to where `body` starts, then run `body` shifted by the warmup."""
    start = body(0)

    def lr_at(k: int) -> float:
        if k < warmup_steps:
            return start * k / warmup_steps
        return body(k - warmup_steps)

    return lr_at


# --- ED2 / diffusers ---------------------------------------------------------------------------------------


def _ed2_multiplier(spec: ScheduleSpec) -> Callable[[int], float]:
    """diffusers' lr_lambda for the name, with ED2's arguments (num_cycles=1, power=1, lr_end=1e-7)."""
    warmup, decay = spec.warmup_steps, ed2_decay_steps(spec)

    def warming(k: int) -> float:
        return float(k) / float(max(1, warmup))

    def progress(k: int) -> float:
        return float(k - warmup) / float(max(1, decay - warmup))

    def constant(k: int) -> float:
        return 1.0  # diffusers' get_constant_schedule never reads the warmup

    def constant_with_warmup(k: int) -> float:
        return warming(k) if k < warmup else 1.0

    def linear(k: int) -> float:
        return warming(k) if k < warmup else max(0.0, float(decay - k) / float(max(1, decay - warmup)))

    def cosine(k: int) -> float:
        # Not clamped after `decay`: the cosine climbs again, ED2's accidental cyclic LR.
        return warming(k) if k < warmup else max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress(k))))

    def cosine_with_restarts(k: int) -> float:
        if k < warmup:
            return warming(k)
        if progress(k) >= 1.0:
            return 0.0
        # diffusers takes (num_cycles * progress) % 1; with ED2's num_cycles=1 that is progress: no restarts.
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress(k))))

    def polynomial(k: int) -> float:
        lr_end = DIFFUSERS_POLYNOMIAL_LR_END
        if k < warmup:
            return warming(k)
        if k > decay:
            return lr_end / spec.lr
        remaining = 1 - (k - warmup) / (decay - warmup)
        return ((spec.lr - lr_end) * remaining**1.0 + lr_end) / spec.lr

    by_name = {
        "constant": constant,
        "constant_with_warmup": constant_with_warmup,
        "linear": linear,
        "cosine": cosine,
        "cosine_with_restarts": cosine_with_restarts,
        "polynomial": polynomial,
    }
    return by_name[spec.name]


# --- cyclic ----------------------------------------------------------------------------------------------


def _cyclic_body(spec: ScheduleSpec) -> Callable[[int], float]:
    """The cycling after warmup, as a function of t = steps since the cycling began."""
    stepsize = cyclic_stepsize(spec)
    offset = stepsize if spec.cycle_start == "high" else 0
    shape = _cosine_ramp if spec.cycle_shape == "cosine" else _linear_ramp
    peak_at = _stage_peaks(spec, stepsize)

    def lr_at(t: int) -> float:
        cycle, ramp = _triangle(t + offset, stepsize)
        # Same operation order as torch's CyclicLR, so the two agree to the last bit where they can.
        return spec.lr_min + (peak_at(t) - spec.lr_min) * shape(ramp) * _amplitude_scale(spec, cycle, t)

    return lr_at


def _triangle(position: float, stepsize: float) -> tuple[int, float]:
    """Smith's (and torch's) triangle wave: the 1-based cycle, and 0 at the cycle's ends rising to 1 mid-way."""
    period = 2 * stepsize
    cycle = math.floor(1 + position / period)
    x = 1.0 + position / period - cycle
    ramp = x / 0.5 if x <= 0.5 else (x - 1) / (0.5 - 1)
    return cycle, ramp


def _linear_ramp(ramp: float) -> float:
    return ramp


def _cosine_ramp(ramp: float) -> float:
    """A half cosine through the same end points as the straight ramp (Smith's Hann window)."""
    return 0.5 * (1.0 - math.cos(math.pi * ramp))


def _amplitude_scale(spec: ScheduleSpec, cycle: int, t: int) -> float:
    if spec.cycle_decay == "triangular2":
        return 1 / (2.0 ** (cycle - 1))
    if spec.cycle_decay == "exp_range":
        return spec.gamma**t
    return 1.0  # none, and stages (whose peaks change instead)


def _stage_peaks(spec: ScheduleSpec, stepsize: float) -> Callable[[int], float]:
    """The peak in force at step t of the cycling: `lr`, or the peak of the stage that t falls in."""
    if not spec.stages:
        return lambda t: spec.lr
    ends = stage_ends(spec.stages, stepsize)
    peaks = [peak for _, peak in spec.stages]
    return lambda t: peaks[min(bisect_right(ends, t), len(peaks) - 1)]


def stage_ends(stages: tuple[tuple[float, float], ...], stepsize: float) -> list[float]:
    """Where each stage ends, in steps since the cycling began."""
    ends, elapsed = [], 0.0
    for cycles, _ in stages:
        elapsed += cycles * 2 * stepsize
        ends.append(elapsed)
    return ends


# --- one_cycle (torch OneCycleLR) --------------------------------------------------------------------------


class _Phase(NamedTuple):
    end_step: float
    lr_from: float
    lr_to: float
    momentum_from: str  # "max" | "base": which end of the momentum range
    momentum_to: str


def _one_cycle_phases(spec: ScheduleSpec) -> list[_Phase]:
    """torch's phase table: where each phase ends and what it anneals between."""
    initial = spec.lr / spec.div_factor
    final = initial / spec.final_div_factor
    ends = one_cycle_phase_ends(spec)
    if not spec.three_phase:
        return [_Phase(ends[0], initial, spec.lr, "max", "base"), _Phase(ends[1], spec.lr, final, "base", "max")]
    return [
        _Phase(ends[0], initial, spec.lr, "max", "base"),
        _Phase(ends[1], spec.lr, initial, "base", "max"),
        _Phase(ends[2], initial, final, "max", "max"),
    ]


def _lr_ends(phase: _Phase) -> tuple[float, float]:
    return phase.lr_from, phase.lr_to


def _one_cycle_body(spec: ScheduleSpec, ends_of: Callable[[_Phase], tuple[float, float]]) -> Callable[[int], float]:
    """torch's OneCycleLR interpolation of `ends_of(phase)` (LR or momentum) over t = steps since warmup."""
    phases = _one_cycle_phases(spec)
    last_step = cycle_steps(spec) - 1
    anneal = _anneal_cos if spec.anneal == "cos" else _anneal_linear

    def value_at(t: int) -> float:
        # torch bounces back up after the last step (and raises one step later); hold the final value.
        t = min(t, last_step)
        start = 0.0
        for phase in phases[:-1]:
            if t <= phase.end_step:
                break
            start = phase.end_step
        else:
            phase = phases[-1]
        return anneal(*ends_of(phase), (t - start) / (phase.end_step - start))

    return value_at


def _anneal_cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


# ---------------------------------------------------------------------------------------------------------
# Momentum (beta1) cycling
# ---------------------------------------------------------------------------------------------------------


def build_momentum(spec: ScheduleSpec) -> LrFunction | None:
    """beta1 (or SGD momentum) for step k, opposite to the LR; None when momentum cycling is off.

    one_cycle follows torch's OneCycleLR momentum phases (max during warmup). Every other schedule maps the
    LR linearly onto the momentum range: the schedule's low (lr_min, or 0) gives `max`, its peak gives `base`.
    For cyclic this is exactly torch CyclicLR's cycle_momentum, amplitude decay included.
    """
    if spec.momentum_cycle is None:
        return None
    base, top = spec.momentum_cycle
    if spec.name == "one_cycle":
        levels = {"base": base, "max": top}
        body = _one_cycle_body(spec, lambda phase: (levels[phase.momentum_from], levels[phase.momentum_to]))
        return lambda k: top if k < spec.warmup_steps else body(k - spec.warmup_steps)
    lr_at = build_schedule(spec)
    low, peak = _lr_range(spec)

    def momentum_at(k: int) -> float:
        height = min(1.0, max(0.0, (lr_at(k) - low) / (peak - low)))  # warmup dips below the low: clamp
        return top - (top - base) * height

    return momentum_at


def _lr_range(spec: ScheduleSpec) -> tuple[float, float]:
    if spec.name == "cyclic":
        return spec.lr_min, max([spec.lr] + [peak for _, peak in spec.stages])
    return 0.0, spec.lr
