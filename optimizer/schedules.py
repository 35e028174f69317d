"""Learning-rate schedules as pure functions of the optimizer step.

A schedule is built from plain numbers (a `ScheduleSpec`) and is a function `lr(k) -> float`: the ABSOLUTE
learning rate used by optimizer step `k`, where `k = 0` is the first step of the run. Nothing here touches a
model or the data, so every curve can be tested exhaustively and plotted before any GPU time is spent.
`FunctionLR` at the bottom puts such functions on a torch optimizer.

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
  `decay_steps` shorter than the run falls to 0 and rises again (see `cosine_oscillates`).
* ED2 defaults. `decay_steps` None for an ED2 name means ED2's automatic `int(total_steps * 1.5)`; values
  below 1 mean the same, as in ED2. ED2's automatic warmup, `int(decay_steps / 50)`, is the config layer's
  job (`ed2_default_warmup_steps`): here `warmup_steps` is taken as given.
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
* Ending on a low point. A run of N steps covers the half-open span [0, N) of the curve, the way torch's
  schedulers count: step k uses `lr(k)`, and `lr(N)` is where the curve stands when the run stops. The run
  ENDS LOW when `lr(N)` is a low point, i.e. N is in `low_points`. The final update (k = N-1) is then the
  last step of a falling ramp, one ramp step above the low. This is what makes the post's run of 5.5
  cycles (550 steps, stepsize 50, starting high) both start at the peak (k = 0) and end at the low
  (k = 550); with start low, a run of whole cycles ends low.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Sequence

import torch

LrFunction = Callable[[int], float]

ED2_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SCHEDULE_NAMES = ED2_NAMES + ("cyclic", "one_cycle")
CYCLE_SHAPES = ("triangular", "cosine")
CYCLE_STARTS = ("low", "high")
CYCLE_DECAYS = ("none", "triangular2", "exp_range", "stages")
ANNEAL_STRATEGIES = ("cos", "linear")

# diffusers' polynomial decays to this floor; ED2 never passes another one.
DIFFUSERS_POLYNOMIAL_LR_END = 1e-7

# The config key behind each ScheduleSpec field, so that error messages speak the user's language.
CONFIG_KEYS = {
    "name": "lr_scheduler",
    "lr": "lr",
    "total_steps": "max_epochs / max_steps",
    "steps_per_epoch": "steps per epoch",
    "lr_min": "lr_min",
    "warmup_steps": "lr_warmup_steps",
    "decay_steps": "lr_decay_steps",
    "stepsize_epochs": "lr_stepsize_epochs",
    "cycles": "lr_cycles",
    "cycle_shape": "lr_cycle_shape",
    "cycle_start": "lr_cycle_start",
    "cycle_decay": "lr_cycle_decay",
    "gamma": "lr_gamma",
    "stages": "lr_cycle_stages",
    "pct_start": "lr_pct_start",
    "div_factor": "lr_div_factor",
    "final_div_factor": "lr_final_div_factor",
    "three_phase": "lr_three_phase",
    "anneal": "lr_anneal_strategy",
    "momentum_cycle": "lr_cycle_momentum",
}

# Fields that only some schedules read. Setting one for another schedule is an error, because it would be
# silently ignored. (lr_decay_steps is missing on purpose: ED2 ignores it for constant, and ED2 configs
# must keep loading; see `describe` for the note it gets.)
_FIELDS_ONLY_FOR = {
    "lr_min": ("cyclic",),
    "stepsize_epochs": ("cyclic",),
    "cycles": ("cyclic",),
    "cycle_shape": ("cyclic",),
    "cycle_start": ("cyclic",),
    "cycle_decay": ("cyclic",),
    "gamma": ("cyclic",),
    "stages": ("cyclic",),
    "pct_start": ("one_cycle",),
    "div_factor": ("one_cycle",),
    "final_div_factor": ("one_cycle",),
    "three_phase": ("one_cycle",),
    "anneal": ("one_cycle",),
}

# Integer-valued float positions (a stepsize, a step) closer than this to a whole number are whole: cycle
# counts like 5.5 give stepsizes such as 550 / 11 that are whole only up to float rounding.
_WHOLE_TOLERANCE = 1e-6


class ScheduleError(ValueError):
    """A schedule setting that cannot work; the message names the config key and what would be valid."""


# ---------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleSpec:
    """Everything a schedule needs, as plain numbers. Invalid combinations raise ScheduleError on creation."""

    name: str  # one of SCHEDULE_NAMES
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
        _validate(self)


def ed2_default_decay_steps(total_steps: int) -> int:
    """ED2's automatic lr_decay_steps: 1.5 runs, so a cosine ends at about a quarter of the peak."""
    return int(total_steps * 1.5)


def ed2_default_warmup_steps(decay_steps: int) -> int:
    """ED2's automatic lr_warmup_steps (used when it is null): 2% of lr_decay_steps."""
    return int(decay_steps / 50)


# ---------------------------------------------------------------------------------------------------------
# Validation: every message names the config key, the value and what would be valid
# ---------------------------------------------------------------------------------------------------------

def _validate(spec: ScheduleSpec) -> None:
    if spec.name not in SCHEDULE_NAMES:
        raise ScheduleError(
            f"lr_scheduler is '{spec.name}', which is not a schedule EveryCycle knows. Valid names: "
            f"{', '.join(SCHEDULE_NAMES)}. The first six behave exactly as in ED2 (diffusers' get_scheduler); "
            "'cyclic' is Smith's cyclical LR and 'one_cycle' is torch's OneCycleLR."
        )
    _check_run_numbers(spec)
    _check_fields_apply(spec)
    if spec.name == "cyclic":
        _check_cyclic(spec)
    elif spec.name == "one_cycle":
        _check_one_cycle(spec)
    else:
        _check_ed2(spec)
    _check_momentum(spec)


def _check_int(value: object, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"{key} is {value!r}, but must be a whole number of at least {minimum}.")


def _check_run_numbers(spec: ScheduleSpec) -> None:
    _check_int(spec.total_steps, "total_steps (max_epochs x steps per epoch, or max_steps)", 1)
    _check_int(spec.steps_per_epoch, "steps per epoch", 1)
    _check_int(spec.warmup_steps, "lr_warmup_steps", 0)
    if not (math.isfinite(spec.lr) and spec.lr > 0):
        raise ScheduleError(f"lr is {spec.lr!r}, but must be a positive number such as 1e-6.")


def _check_fields_apply(spec: ScheduleSpec) -> None:
    defaults = ScheduleSpec.__dataclass_fields__
    for field, schedules in _FIELDS_ONLY_FOR.items():
        if spec.name not in schedules and getattr(spec, field) != defaults[field].default:
            users = " or ".join(f"'{name}'" for name in schedules)
            raise ScheduleError(
                f"{CONFIG_KEYS[field]} is set to {getattr(spec, field)!r}, but lr_scheduler '{spec.name}' does "
                f"not use it: it applies only to lr_scheduler {users}. Remove {CONFIG_KEYS[field]}, or set "
                f"lr_scheduler to {users}."
            )
    if spec.name == "one_cycle" and spec.decay_steps is not None:
        raise ScheduleError(
            f"lr_decay_steps is {spec.decay_steps}, but one_cycle does not use it: its length is the run and "
            "its shape is set by lr_pct_start, lr_div_factor and lr_final_div_factor. Remove lr_decay_steps."
        )


def _check_ed2(spec: ScheduleSpec) -> None:
    decay_steps = _ed2_decay_steps(spec)
    warmup_reads_decay = spec.name not in ("constant", "constant_with_warmup")
    if warmup_reads_decay and spec.warmup_steps >= decay_steps:
        raise ScheduleError(
            f"lr_warmup_steps ({spec.warmup_steps}) must be smaller than lr_decay_steps ({decay_steps}) for "
            f"lr_scheduler '{spec.name}': the decay is measured from the end of warmup to lr_decay_steps."
        )
    if spec.name == "polynomial" and spec.lr <= DIFFUSERS_POLYNOMIAL_LR_END:
        raise ScheduleError(
            f"lr is {spec.lr:g}, but lr_scheduler 'polynomial' decays to {DIFFUSERS_POLYNOMIAL_LR_END:g} "
            "(diffusers' fixed floor), so lr must be above that."
        )


def _check_cyclic(spec: ScheduleSpec) -> None:
    _check_choice(spec.cycle_shape, "lr_cycle_shape", CYCLE_SHAPES)
    _check_choice(spec.cycle_start, "lr_cycle_start", CYCLE_STARTS)
    _check_choice(spec.cycle_decay, "lr_cycle_decay", CYCLE_DECAYS)
    if not (0 <= spec.lr_min < spec.lr):
        raise ScheduleError(
            f"lr_min is {spec.lr_min:g} and lr is {spec.lr:g}: a cycle needs 0 <= lr_min < lr (lr_min is the "
            "low point, lr the peak). For a flat LR use lr_scheduler 'constant'."
        )
    if spec.warmup_steps >= spec.total_steps:
        raise ScheduleError(
            f"lr_warmup_steps ({spec.warmup_steps}) leaves no steps to cycle in a run of {spec.total_steps} "
            "steps: it must be smaller than the run."
        )
    _check_gamma(spec)
    _check_stages(spec)
    _cyclic_stepsize(spec)  # raises on a missing, doubled or too small stepsize


def _check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ScheduleError(f"{key} is {value!r}, but must be one of: {', '.join(repr(c) for c in choices)}.")


def _check_gamma(spec: ScheduleSpec) -> None:
    if spec.cycle_decay == "exp_range" and not (0 < spec.gamma <= 1):
        raise ScheduleError(
            f"lr_gamma is {spec.gamma!r}, but lr_cycle_decay 'exp_range' needs 0 < lr_gamma <= 1: the "
            "amplitude is multiplied by lr_gamma ** step (the paper used 0.99994 over 70,000 steps)."
        )
    if spec.cycle_decay != "exp_range" and spec.gamma != 1.0:
        raise ScheduleError(
            f"lr_gamma is {spec.gamma!r}, but only lr_cycle_decay 'exp_range' uses it and lr_cycle_decay is "
            f"'{spec.cycle_decay}'. Set lr_cycle_decay to 'exp_range', or remove lr_gamma."
        )


def _check_stages(spec: ScheduleSpec) -> None:
    if bool(spec.stages) != (spec.cycle_decay == "stages"):
        raise ScheduleError(
            "lr_cycle_stages and lr_cycle_decay 'stages' go together: give lr_cycle_stages as a list of "
            '{"cycles": n, "lr": peak} with lr_cycle_decay "stages", or neither '
            f"(lr_cycle_decay is '{spec.cycle_decay}', lr_cycle_stages has {len(spec.stages)} stages)."
        )
    for number, (cycles, peak) in enumerate(spec.stages, start=1):
        if not (math.isfinite(cycles) and cycles > 0):
            raise ScheduleError(
                f"lr_cycle_stages stage {number} has {cycles!r} cycles; every stage needs a positive number "
                "of cycles (fractions are fine: 1.5 cycles end on the opposite point from where they start)."
            )
        if not (math.isfinite(peak) and peak > spec.lr_min):
            raise ScheduleError(
                f"lr_cycle_stages stage {number} peaks at {peak!r}, which must be above lr_min "
                f"({spec.lr_min:g}): each stage cycles between lr_min and its own peak."
            )


def _check_one_cycle(spec: ScheduleSpec) -> None:
    _check_choice(spec.anneal, "lr_anneal_strategy", ANNEAL_STRATEGIES)
    if not (0 < spec.pct_start < 1):
        raise ScheduleError(f"lr_pct_start is {spec.pct_start!r}, but must be between 0 and 1 (torch's default 0.3).")
    for key, value in (("lr_div_factor", spec.div_factor), ("lr_final_div_factor", spec.final_div_factor)):
        if not (math.isfinite(value) and value > 0):
            raise ScheduleError(f"{key} is {value!r}, but must be a positive number.")
    if spec.warmup_steps >= spec.total_steps:
        raise ScheduleError(
            f"lr_warmup_steps ({spec.warmup_steps}) leaves no steps for one_cycle in a run of "
            f"{spec.total_steps} steps: it must be smaller than the run."
        )
    start = 0.0
    for phase in _one_cycle_phases(spec):
        if phase.end_step <= start:
            raise ScheduleError(
                f"lr_pct_start {spec.pct_start:g} over a one_cycle of {_cycle_steps(spec)} steps leaves a "
                "phase with no steps in it. Use a longer run or an lr_pct_start nearer 0.3."
            )
        start = phase.end_step


def _check_momentum(spec: ScheduleSpec) -> None:
    if spec.momentum_cycle is None:
        return
    if len(spec.momentum_cycle) != 2 or not (0 <= spec.momentum_cycle[0] < spec.momentum_cycle[1] < 1):
        raise ScheduleError(
            f"lr_cycle_momentum is {spec.momentum_cycle!r}, but must be (base, max) with 0 <= base < max < 1, "
            "e.g. (0.85, 0.95): beta1 is max where the LR is lowest and base at the peak."
        )
    lr_never_moves = spec.name == "constant" or (spec.name == "constant_with_warmup" and spec.warmup_steps == 0)
    if lr_never_moves:
        raise ScheduleError(
            f"lr_cycle_momentum needs an LR that moves, but lr_scheduler '{spec.name}' keeps it constant here. "
            "Turn lr_cycle_momentum off or choose a cyclic schedule."
        )


# ---------------------------------------------------------------------------------------------------------
# Stepsize and run length
# ---------------------------------------------------------------------------------------------------------

def stepsize_of(spec: ScheduleSpec) -> int | float:
    """Half-cycle length in steps: of a cyclic spec, or of the cyclic twin of an ED2 cosine.

    A cyclic spec needs exactly one of lr_decay_steps (the stepsize itself), lr_stepsize_epochs (times the
    epoch size: Smith's 2-10 rule) and lr_cycles (cycles after warmup; exact, so 5.5 cycles of 550 steps is
    stepsize 50). With lr_cycle_stages, lr_cycles is implied by the stages and the other two are optional.
    The result is an int when whole, else the exact float (the curve does not need whole stepsizes).
    """
    return _cyclic_stepsize(_cyclic_view(spec))


def _cyclic_stepsize(spec: ScheduleSpec) -> int | float:
    options = {"lr_decay_steps": spec.decay_steps, "lr_stepsize_epochs": spec.stepsize_epochs, "lr_cycles": spec.cycles}
    given = {key: value for key, value in options.items() if value is not None}
    if spec.stages and "lr_cycles" in given:
        raise ScheduleError(
            f"lr_cycles ({spec.cycles:g}) and lr_cycle_stages both set the number of cycles; the stages already "
            f"add up to {sum(c for c, _ in spec.stages):g}. Remove lr_cycles."
        )
    if len(given) > 1 or (len(given) == 0 and not spec.stages):
        found = ", ".join(f"{key}={value!r}" for key, value in given.items()) or "none of them"
        raise ScheduleError(
            "lr_scheduler 'cyclic' needs exactly one way to set its stepsize (half a cycle, in steps): "
            "lr_decay_steps (the stepsize in steps), lr_stepsize_epochs (a multiple of the epoch size; the "
            "paper advises 2-10) or lr_cycles (the number of cycles over the run; 5.5 ends on a low point "
            f"when starting high). Found {found}."
        )
    if not given:
        stepsize = _cycle_steps(spec) / (2 * sum(c for c, _ in spec.stages))
    else:
        key, value = next(iter(given.items()))
        stepsize = _stepsize_from_option(spec, key, value)
    if stepsize < 1:
        raise ScheduleError(
            f"the cyclic stepsize comes out at {stepsize:g} steps, less than one step per half cycle. Use fewer "
            "lr_cycles, a larger lr_stepsize_epochs or lr_decay_steps, or a longer run."
        )
    return _whole_or_float(stepsize)


def _stepsize_from_option(spec: ScheduleSpec, key: str, value: float) -> float:
    if key == "lr_decay_steps":
        _check_int(value, "lr_decay_steps (the cyclic stepsize)", 1)
        return value
    if not (math.isfinite(value) and value > 0):
        raise ScheduleError(f"{key} is {value!r}, but must be a positive number.")
    if key == "lr_stepsize_epochs":
        return value * spec.steps_per_epoch
    return _cycle_steps(spec) / (2 * value)


def stages_total_steps(stages: Sequence[Sequence[float]], stepsize: float, warmup_steps: int = 0) -> int:
    """The run length the stages imply: warmup, then every stage's cycles at 2 * stepsize steps each."""
    steps = warmup_steps + sum(cycles for cycles, _ in stages) * 2 * stepsize
    if abs(steps - round(steps)) > _WHOLE_TOLERANCE:
        raise ScheduleError(
            f"lr_cycle_stages at stepsize {stepsize:g} add up to {steps:g} steps, not a whole number. Choose a "
            "stepsize (lr_decay_steps or lr_stepsize_epochs) that makes each stage's cycles whole steps."
        )
    return round(steps)


def _cycle_steps(spec: ScheduleSpec) -> int:
    """Steps after warmup: where cyclic and one_cycle schedules run."""
    return spec.total_steps - spec.warmup_steps


def _whole_or_float(value: float) -> int | float:
    return round(value) if abs(value - round(value)) <= _WHOLE_TOLERANCE else value


# ---------------------------------------------------------------------------------------------------------
# Building the curves
# ---------------------------------------------------------------------------------------------------------

def build_schedule(spec: ScheduleSpec) -> LrFunction:
    """The absolute LR used by optimizer step k (k = 0 is the first step); defined for every k >= 0."""
    if spec.name in ED2_NAMES:
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

def _ed2_decay_steps(spec: ScheduleSpec) -> int:
    """lr_decay_steps as ED2 resolves it: null or below 1 means 1.5 runs."""
    if spec.decay_steps is None or spec.decay_steps < 1:
        return ed2_default_decay_steps(spec.total_steps)
    _check_int(spec.decay_steps, "lr_decay_steps", 1)
    return spec.decay_steps


def _ed2_multiplier(spec: ScheduleSpec) -> Callable[[int], float]:
    """diffusers' lr_lambda for the name, with ED2's arguments (num_cycles=1, power=1, lr_end=1e-7)."""
    warmup, decay = spec.warmup_steps, _ed2_decay_steps(spec)

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
    stepsize = _cyclic_stepsize(spec)
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
    ends = _stage_ends(spec.stages, stepsize)
    peaks = [peak for _, peak in spec.stages]
    return lambda t: peaks[min(bisect_right(ends, t), len(peaks) - 1)]


def _stage_ends(stages: tuple[tuple[float, float], ...], stepsize: float) -> list[float]:
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
    length = _cycle_steps(spec)
    initial = spec.lr / spec.div_factor
    final = initial / spec.final_div_factor
    rise = _Phase(float(spec.pct_start * length) - 1, initial, spec.lr, "max", "base")
    if not spec.three_phase:
        return [rise, _Phase(length - 1, spec.lr, final, "base", "max")]
    return [
        rise,
        _Phase(float(2 * spec.pct_start * length) - 2, spec.lr, initial, "base", "max"),
        _Phase(length - 1, initial, final, "max", "max"),
    ]


def _lr_ends(phase: _Phase) -> tuple[float, float]:
    return phase.lr_from, phase.lr_to


def _one_cycle_body(spec: ScheduleSpec, ends_of: Callable[[_Phase], tuple[float, float]]) -> Callable[[int], float]:
    """torch's OneCycleLR interpolation of `ends_of(phase)` (LR or momentum) over t = steps since warmup."""
    phases = _one_cycle_phases(spec)
    last_step = _cycle_steps(spec) - 1
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


# ---------------------------------------------------------------------------------------------------------
# ED2's cosine seen as a cycle
# ---------------------------------------------------------------------------------------------------------

def cosine_oscillates(spec: ScheduleSpec) -> bool:
    """True when an ED2 `cosine` reaches 0 inside the run and climbs again (lr_decay_steps < run - 1)."""
    return spec.name == "cosine" and spec.total_steps - 1 > _ed2_decay_steps(spec)


def equivalent_cyclic(spec: ScheduleSpec) -> ScheduleSpec:
    """The cyclic settings that give the same curve as an ED2 cosine: half-cosine ramps starting high.

    diffusers' cosine is 0.5 * (1 + cos(pi * (k - warmup) / (decay - warmup))) after warmup, unclamped: a
    cosine wave between lr and 0 whose half period is decay - warmup steps. That is a cyclic schedule with
    lr_min 0, stepsize decay - warmup, cosine ramps and a high start, after the same warmup.
    """
    if spec.name != "cosine":
        raise ScheduleError(f"only lr_scheduler 'cosine' has a cyclic twin; this schedule is '{spec.name}'.")
    return ScheduleSpec(
        name="cyclic",
        lr=spec.lr,
        total_steps=spec.total_steps,
        steps_per_epoch=spec.steps_per_epoch,
        warmup_steps=spec.warmup_steps,
        decay_steps=_ed2_decay_steps(spec) - spec.warmup_steps,
        cycle_shape="cosine",
        cycle_start="high",
        momentum_cycle=spec.momentum_cycle,
    )


def _cyclic_view(spec: ScheduleSpec) -> ScheduleSpec:
    if spec.name == "cyclic":
        return spec
    if spec.name == "cosine":
        return equivalent_cyclic(spec)
    raise ScheduleError(
        f"lr_scheduler '{spec.name}' does not cycle, so it has no stepsize or low points; only 'cyclic' "
        "(and ED2's 'cosine', through its cyclic twin) do."
    )


# ---------------------------------------------------------------------------------------------------------
# Low points, high points and where a run ends
# ---------------------------------------------------------------------------------------------------------

def low_points(spec: ScheduleSpec) -> list[int]:
    """Steps k in [warmup, total_steps] where the cycle is at its low (lr_min). k = total_steps is included:
    a run ends low exactly when total_steps is in this list (see the module docstring)."""
    return _turning_points(_cyclic_view(spec), low=True, up_to=spec.total_steps)


def high_points(spec: ScheduleSpec) -> list[int]:
    """Steps k in [warmup, total_steps] where the cycle is at a peak."""
    return _turning_points(_cyclic_view(spec), low=False, up_to=spec.total_steps)


def _turning_points(spec: ScheduleSpec, low: bool, up_to: float) -> list[int]:
    """Whole steps warmup + n * stepsize <= up_to where the wave is at a low (or a high).

    The wave position is n half-cycles from the start, plus one when starting high; even positions are lows.
    """
    stepsize = _cyclic_stepsize(spec)
    parity = (0 if low else 1) + (1 if spec.cycle_start == "high" else 0)
    points, n = [], parity % 2
    while spec.warmup_steps + n * stepsize <= up_to + _WHOLE_TOLERANCE:
        step = spec.warmup_steps + n * stepsize
        if abs(step - round(step)) <= _WHOLE_TOLERANCE:
            points.append(round(step))
        n += 2
    return points


def _end_position(spec: ScheduleSpec) -> str:
    cyclic = _cyclic_view(spec)
    half_cycles = _cycle_steps(cyclic) / _cyclic_stepsize(cyclic) + (1 if cyclic.cycle_start == "high" else 0)
    if abs(half_cycles - round(half_cycles)) > _WHOLE_TOLERANCE:
        return "mid-cycle"
    return "low" if round(half_cycles) % 2 == 0 else "high"


@dataclass(frozen=True)
class LowEnd:
    """The run lengths nearest to `total_steps` that end on a low point.

    Each "shorter" is the longest such run <= total_steps and each "longer" the shortest >= total_steps
    (both are total_steps when the run already ends low); None where there is none (nothing after the
    warmup, or no whole epoch within reach). When the stepsize follows the run length (lr_cycles, or stages
    without lr_decay_steps / lr_stepsize_epochs), a longer or shorter run moves every low point with it: the
    step and epoch fields are then None and the cycle counts are what to change.
    """

    total_steps: int
    ends_low: bool
    stepsize_follows_run: bool
    shorter_steps: int | None
    longer_steps: int | None
    shorter_epochs: int | None
    longer_epochs: int | None
    shorter_cycles: float | None
    longer_cycles: float | None

    @property
    def nearest_steps(self) -> int | None:
        """The closer of the two run lengths; a tie goes to the longer run, so no planned training is cut."""
        if self.shorter_steps is None or self.longer_steps is None:
            return self.longer_steps if self.shorter_steps is None else self.shorter_steps
        if self.total_steps - self.shorter_steps < self.longer_steps - self.total_steps:
            return self.shorter_steps
        return self.longer_steps

    @property
    def message(self) -> str:
        if self.ends_low:
            return f"The run of {self.total_steps} steps ends on a low point."
        cycles = _either(self.shorter_cycles, self.longer_cycles, "cycles")
        if self.stepsize_follows_run:
            return (f"The stepsize follows the run length, so change the number of cycles: {cycles} end on a "
                    "low point.")
        epochs = _either(self.shorter_epochs, self.longer_epochs, "epochs")
        in_epochs = f" (in whole epochs: {epochs})" if epochs else ""
        steps = _either(self.shorter_steps, self.longer_steps, "steps")
        return f"The nearest runs that end on a low point: {steps}{in_epochs}, that is {cycles}."


def _either(shorter: float | None, longer: float | None, unit: str) -> str:
    values = [f"{value:g}" for value in dict.fromkeys((shorter, longer)) if value is not None]
    return f"{' or '.join(values)} {unit}" if values else ""


def nearest_low_end(spec: ScheduleSpec) -> LowEnd:
    """The nearest run lengths (in steps, in whole epochs, and in cycles) that end on a low point."""
    cyclic = _cyclic_view(spec)
    follows_run = _stepsize_follows_run(cyclic)
    shorter_cycles, longer_cycles = _cycle_counts_ending_low(cyclic)
    steps = {} if follows_run else _low_end_steps(cyclic)
    return LowEnd(
        total_steps=spec.total_steps,
        ends_low=_end_position(cyclic) == "low",
        stepsize_follows_run=follows_run,
        shorter_steps=steps.get("shorter_steps"),
        longer_steps=steps.get("longer_steps"),
        shorter_epochs=steps.get("shorter_epochs"),
        longer_epochs=steps.get("longer_epochs"),
        shorter_cycles=shorter_cycles,
        longer_cycles=longer_cycles,
    )


def _stepsize_follows_run(spec: ScheduleSpec) -> bool:
    return spec.decay_steps is None and spec.stepsize_epochs is None


def _low_end_steps(spec: ScheduleSpec) -> dict[str, int | None]:
    """With the stepsize held, the nearest low ends around the run, in steps and in whole epochs."""
    total, per_epoch = spec.total_steps, spec.steps_per_epoch
    # Low ends repeat every cycle; whole epochs among them repeat within per_epoch cycles (for whole
    # stepsizes), so that many cycles past the run is far enough to look for the next whole epoch.
    reach = total + 2 * _cyclic_stepsize(spec) * (per_epoch + 1)
    ends = [step for step in _turning_points(spec, low=True, up_to=reach) if step > spec.warmup_steps]
    shorter, longer = _around(ends, total)
    shorter_epoch, longer_epoch = _around([step for step in ends if step % per_epoch == 0], total)
    return {
        "shorter_steps": shorter,
        "longer_steps": longer,
        "shorter_epochs": None if shorter_epoch is None else shorter_epoch // per_epoch,
        "longer_epochs": None if longer_epoch is None else longer_epoch // per_epoch,
    }


def _around(sorted_values: list[int], target: int) -> tuple[int | None, int | None]:
    below = [value for value in sorted_values if value <= target]
    above = [value for value in sorted_values if value >= target]
    return (below[-1] if below else None), (above[0] if above else None)


def _cycle_counts_ending_low(spec: ScheduleSpec) -> tuple[float | None, float | None]:
    """Starting low, whole cycles end low; starting high, whole cycles plus a half (5.5) do."""
    half_cycles = _cycle_steps(spec) / _cyclic_stepsize(spec)
    parity = 1 if spec.cycle_start == "high" else 0
    shorter = math.floor(half_cycles + _WHOLE_TOLERANCE)
    longer = math.ceil(half_cycles - _WHOLE_TOLERANCE)
    shorter -= (shorter - parity) % 2
    longer += (longer - parity) % 2
    return (shorter / 2 if shorter >= 1 else None), longer / 2


# ---------------------------------------------------------------------------------------------------------
# The preview summary
# ---------------------------------------------------------------------------------------------------------

def describe(spec: ScheduleSpec) -> dict:
    """A JSON-ready summary for the schedule preview: the LRs at the ends, and for cycling schedules the
    stepsize, the cycles, the peaks of each stage and where the run ends ("low" | "high" | "mid-cycle")."""
    lr_at = build_schedule(spec)
    summary: dict = {
        "schedule": spec.name,
        "total_steps": spec.total_steps,
        "warmup_steps": spec.warmup_steps,
        "lr_first_step": lr_at(0),
        "lr_last_step": lr_at(spec.total_steps - 1),
        "end_lr": lr_at(spec.total_steps),  # where the curve stands when the run stops
        "notes": _notes(spec),
    }
    if spec.name == "cyclic" or cosine_oscillates(spec):
        summary.update(_describe_cycles(spec, lr_at))
    return summary


def _describe_cycles(spec: ScheduleSpec, lr_at: LrFunction) -> dict:
    cyclic = _cyclic_view(spec)
    stepsize = _cyclic_stepsize(cyclic)
    ends = _end_position(cyclic)
    summary = {
        "stepsize": stepsize,
        "stepsize_epochs": stepsize / spec.steps_per_epoch,
        "cycle_steps": 2 * stepsize,
        "cycles": _cycle_steps(cyclic) / (2 * stepsize),
        "stages": _describe_stages(cyclic, stepsize, lr_at),
        "ends": ends,
    }
    if ends != "low":
        nearest = nearest_low_end(spec)
        summary["nearest_low_end"] = {**asdict(nearest), "message": nearest.message}
    return summary


def _describe_stages(spec: ScheduleSpec, stepsize: float, lr_at: LrFunction) -> list[dict]:
    """Each stage with its peak and the peaks the run actually reaches in it (a plain cycle is one stage)."""
    stages = spec.stages or ((_cycle_steps(spec) / (2 * stepsize), spec.lr),)
    peaks = [step for step in high_points(spec) if step < spec.total_steps]
    described, start = [], float(spec.warmup_steps)
    for (cycles, peak), end in zip(stages, _stage_ends(stages, stepsize)):
        end += spec.warmup_steps
        inside = [step for step in peaks if start <= step < end]
        described.append({
            "cycles": cycles,
            "peak_lr": peak,
            "first_step": _whole_or_float(start),
            "end_step": _whole_or_float(end),
            "peaks": len(inside),
            "peak_lrs": [lr_at(step) for step in inside],
        })
        start = end
    return described


def _notes(spec: ScheduleSpec) -> list[str]:
    """Plain-language warnings about settings that do less than a user may expect."""
    notes = []
    if spec.name == "constant" and spec.warmup_steps:
        notes.append("constant ignores lr_warmup_steps (as ED2 and diffusers do); use constant_with_warmup to warm up.")
    if spec.name in ("constant", "constant_with_warmup") and spec.decay_steps is not None:
        notes.append(f"{spec.name} ignores lr_decay_steps.")
    if cosine_oscillates(spec):
        twin = equivalent_cyclic(spec)
        notes.append(
            f"lr_decay_steps ({_ed2_decay_steps(spec)}) is shorter than the run ({spec.total_steps} steps): ED2's "
            "cosine falls to 0 and rises again. This is a cyclic LR: lr_scheduler 'cyclic' with lr_cycle_shape "
            f"'cosine', lr_cycle_start 'high' and lr_decay_steps {twin.decay_steps} gives the same curve."
        )
    if spec.name == "cosine_with_restarts" and spec.total_steps > _ed2_decay_steps(spec):
        notes.append("cosine_with_restarts never restarts with ED2's settings: the LR stays 0 after lr_decay_steps.")
    if spec.name == "cyclic" and spec.warmup_steps and spec.cycle_start == "low":
        notes.append("with lr_cycle_start 'low' the warmup ramps to lr_min; the cycle itself then rises to the peak.")
    if spec.name == "cyclic" and spec.stages:
        notes.extend(_stage_length_notes(spec))
    return notes


def _stage_length_notes(spec: ScheduleSpec) -> list[str]:
    planned = stages_total_steps(spec.stages, _cyclic_stepsize(spec), spec.warmup_steps)
    if planned > spec.total_steps:
        return [f"the run ({spec.total_steps} steps) stops before lr_cycle_stages end ({planned} steps)."]
    if planned < spec.total_steps:
        return [f"lr_cycle_stages end at step {planned}; the last stage keeps cycling to step {spec.total_steps}."]
    return []


# ---------------------------------------------------------------------------------------------------------
# The torch wrapper
# ---------------------------------------------------------------------------------------------------------

class FunctionLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets each param group's ABSOLUTE lr (and optionally beta1 / momentum) from functions of the step.

    Like every torch scheduler, call `step()` once after each `optimizer.step()`; the LR in the param groups
    before optimizer step k is `lr_fn(k)`. `momentum_fn`, when given, sets beta1 (Adam-style) or momentum
    (SGD-style) of every group: the groups share one phase, so they share the momentum. The state is only
    the step count (functions are never pickled): to resume, build it again from the same specs and
    `load_state_dict`; the param groups are set at once, so the next optimizer step continues the curve.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_fns: LrFunction | Sequence[LrFunction],
        momentum_fn: LrFunction | None = None,
    ) -> None:
        self.lr_fns = _one_per_group(optimizer, lr_fns)
        self.momentum_fn = momentum_fn
        if momentum_fn is not None:
            _check_optimizer_has_momentum(optimizer)
        super().__init__(optimizer)

    @classmethod
    def from_specs(cls, optimizer: torch.optim.Optimizer, specs: Sequence[ScheduleSpec]) -> "FunctionLR":
        """One spec per param group (e.g. UNet, text encoder); the momentum follows the first spec."""
        return cls(optimizer, [build_schedule(spec) for spec in specs], build_momentum(specs[0]))

    def get_lr(self) -> list[float]:
        if self.momentum_fn is not None:
            self._set_momentum(self.momentum_fn(self.last_epoch))
        return [lr_fn(self.last_epoch) for lr_fn in self.lr_fns]

    def state_dict(self) -> dict:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["step"])
        # torch waits for the next step() to apply a loaded state (#65342); apply it now instead.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _set_momentum(self, momentum: float) -> None:
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum


def _one_per_group(optimizer: torch.optim.Optimizer, lr_fns: LrFunction | Sequence[LrFunction]) -> list[LrFunction]:
    groups = len(optimizer.param_groups)
    if callable(lr_fns):
        return [lr_fns] * groups
    if len(lr_fns) != groups:
        raise ValueError(f"FunctionLR got {len(lr_fns)} lr_fns for an optimizer with {groups} param groups.")
    return list(lr_fns)


def _check_optimizer_has_momentum(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "betas" not in group and "momentum" not in group:
            raise ScheduleError(
                f"lr_cycle_momentum cycles beta1 or momentum, but {type(optimizer).__name__} has neither. "
                "Turn lr_cycle_momentum off for this optimizer."
            )
