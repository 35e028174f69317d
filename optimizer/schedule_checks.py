"""What makes a schedule spec valid, and the numbers a check has to work out first.

`check_spec(spec)` raises `ScheduleError`, whose message names the config key, the value and what would be
valid. `ScheduleSpec` (optimizer/schedules.py) calls it on creation, so every spec that exists is valid.

That sets the direction of the imports: schedules.py imports this module, and this module never imports
schedules.py (it reads a spec only through its fields). Some checks can only be made on numbers derived from
the spec, so those numbers are worked out here, once, and the curves in schedules.py take them from here:

* the cyclic stepsize: which of lr_decay_steps / lr_stepsize_epochs / lr_cycles sets it, and whether it comes
  out at a step or more (`cyclic_stepsize`);
* lr_decay_steps as ED2 resolves it, null or below 1 meaning 1.5 runs (`ed2_decay_steps`);
* where torch's one_cycle phases end, none of which may be empty (`one_cycle_phase_ends`).
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING

from utils.config import SCHEDULE_NAMES

if TYPE_CHECKING:  # for annotations only: schedules.py imports this module
    from optimizer.schedules import ScheduleSpec

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
# must keep loading; schedule_report's notes say so instead.)
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
WHOLE_TOLERANCE = 1e-6


class ScheduleError(ValueError):
    """A schedule setting that cannot work; the message names the config key and what would be valid."""


# ---------------------------------------------------------------------------------------------------------
# The checks: every message names the config key, the value and what would be valid
# ---------------------------------------------------------------------------------------------------------


def check_spec(spec: ScheduleSpec) -> None:
    """Raise ScheduleError for the first setting of `spec` that cannot work."""
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
    defaults = {field.name: field.default for field in fields(spec)}
    for field, schedules in _FIELDS_ONLY_FOR.items():
        if spec.name not in schedules and getattr(spec, field) != defaults[field]:
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
    decay_steps = ed2_decay_steps(spec)
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
    cyclic_stepsize(spec)  # raises on a missing, doubled or too small stepsize


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
    for end in one_cycle_phase_ends(spec):
        if end <= start:
            raise ScheduleError(
                f"lr_pct_start {spec.pct_start:g} over a one_cycle of {cycle_steps(spec)} steps leaves a "
                "phase with no steps in it. Use a longer run or an lr_pct_start nearer 0.3."
            )
        start = end


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
# The numbers the checks work out (and the curves use)
# ---------------------------------------------------------------------------------------------------------


def cycle_steps(spec: ScheduleSpec) -> int:
    """Steps after warmup: where cyclic and one_cycle schedules run."""
    return spec.total_steps - spec.warmup_steps


def whole_or_float(value: float) -> int | float:
    """`value` as an int when it is whole up to WHOLE_TOLERANCE, else unchanged."""
    return round(value) if abs(value - round(value)) <= WHOLE_TOLERANCE else value


def cyclic_stepsize(spec: ScheduleSpec) -> int | float:
    """Half-cycle length in steps of a cyclic spec.

    A cyclic spec needs exactly one of lr_decay_steps (the stepsize itself), lr_stepsize_epochs (times the
    epoch size: Smith's 2-10 rule) and lr_cycles (cycles after warmup; exact, so 5.5 cycles of 550 steps is
    stepsize 50). With lr_cycle_stages, lr_cycles is implied by the stages and the other two are optional.
    The result is an int when whole, else the exact float (the curve does not need whole stepsizes).
    """
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
        stepsize = cycle_steps(spec) / (2 * sum(c for c, _ in spec.stages))
    else:
        key, value = next(iter(given.items()))
        stepsize = _stepsize_from_option(spec, key, value)
    if stepsize < 1:
        raise ScheduleError(
            f"the cyclic stepsize comes out at {stepsize:g} steps, less than one step per half cycle. Use fewer "
            "lr_cycles, a larger lr_stepsize_epochs or lr_decay_steps, or a longer run."
        )
    return whole_or_float(stepsize)


def _stepsize_from_option(spec: ScheduleSpec, key: str, value: float) -> float:
    if key == "lr_decay_steps":
        _check_int(value, "lr_decay_steps (the cyclic stepsize)", 1)
        return value
    if not (math.isfinite(value) and value > 0):
        raise ScheduleError(f"{key} is {value!r}, but must be a positive number.")
    if key == "lr_stepsize_epochs":
        return value * spec.steps_per_epoch
    return cycle_steps(spec) / (2 * value)


def ed2_default_decay_steps(total_steps: int) -> int:
    """ED2's automatic lr_decay_steps: 1.5 runs, so a cosine ends at about a quarter of the peak."""
    return int(total_steps * 1.5)


def ed2_decay_steps(spec: ScheduleSpec) -> int:
    """lr_decay_steps as ED2 resolves it: null or below 1 means 1.5 runs."""
    if spec.decay_steps is None or spec.decay_steps < 1:
        return ed2_default_decay_steps(spec.total_steps)
    _check_int(spec.decay_steps, "lr_decay_steps", 1)
    return spec.decay_steps


def one_cycle_phase_ends(spec: ScheduleSpec) -> list[float]:
    """Where torch's OneCycleLR phases end, in steps since warmup: the rise, (with three_phase, the fall back to
    the initial LR,) and the final anneal."""
    length = cycle_steps(spec)
    rise_end = float(spec.pct_start * length) - 1
    if not spec.three_phase:
        return [rise_end, length - 1]
    return [rise_end, float(2 * spec.pct_start * length) - 2, length - 1]
