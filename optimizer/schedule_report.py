"""What a schedule does, in numbers and in words: for the schedule preview, the run's log and lr_end_at_low.

Everything here reads a valid `ScheduleSpec` and its curve (optimizer/schedules.py) and changes nothing:
the stepsize and cycles of a cycling schedule, its low and high points, where a run ends and the nearest run
lengths that end low, ED2's oscillating cosine seen as the cyclic schedule it is, and plain-language notes
about settings that do less than a user may expect. `describe` gathers it all in one JSON-ready summary.

Ending on a low point. A run of N steps covers the half-open span [0, N) of the curve, the way torch's
schedulers count: step k uses `lr(k)`, and `lr(N)` is where the curve stands when the run stops. The run ENDS
LOW when `lr(N)` is a low point, i.e. N is in `low_points`. The final update (k = N-1) is then the last step
of a falling ramp, one ramp step above the low. This is what makes the post's run of 5.5 cycles (550 steps,
stepsize 50, starting high) both start at the peak (k = 0) and end at the low (k = 550); with start low, a run
of whole cycles ends low.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from optimizer.schedule_checks import (
    WHOLE_TOLERANCE,
    ScheduleError,
    cycle_steps,
    cyclic_stepsize,
    ed2_decay_steps,
    whole_or_float,
)
from optimizer.schedules import LrFunction, ScheduleSpec, build_schedule, stage_ends, stages_total_steps


def stepsize_of(spec: ScheduleSpec) -> int | float:
    """Half-cycle length in steps: of a cyclic spec, or of the cyclic twin of an ED2 cosine (see
    `schedule_checks.cyclic_stepsize` for how the options set it)."""
    return cyclic_stepsize(_cyclic_view(spec))


# ---------------------------------------------------------------------------------------------------------
# ED2's cosine seen as a cycle
# ---------------------------------------------------------------------------------------------------------


def cosine_oscillates(spec: ScheduleSpec) -> bool:
    """True when an ED2 `cosine` reaches 0 inside the run and climbs again (lr_decay_steps < run - 1)."""
    return spec.name == "cosine" and spec.total_steps - 1 > ed2_decay_steps(spec)


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
        decay_steps=ed2_decay_steps(spec) - spec.warmup_steps,
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
    stepsize = cyclic_stepsize(spec)
    parity = (0 if low else 1) + (1 if spec.cycle_start == "high" else 0)
    points, n = [], parity % 2
    while spec.warmup_steps + n * stepsize <= up_to + WHOLE_TOLERANCE:
        step = spec.warmup_steps + n * stepsize
        if abs(step - round(step)) <= WHOLE_TOLERANCE:
            points.append(round(step))
        n += 2
    return points


def _end_position(spec: ScheduleSpec) -> str:
    cyclic = _cyclic_view(spec)
    half_cycles = cycle_steps(cyclic) / cyclic_stepsize(cyclic) + (1 if cyclic.cycle_start == "high" else 0)
    if abs(half_cycles - round(half_cycles)) > WHOLE_TOLERANCE:
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
            return f"The stepsize follows the run length, so change the number of cycles: {cycles} end on a low point."
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
    reach = total + 2 * cyclic_stepsize(spec) * (per_epoch + 1)
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
    half_cycles = cycle_steps(spec) / cyclic_stepsize(spec)
    parity = 1 if spec.cycle_start == "high" else 0
    shorter = math.floor(half_cycles + WHOLE_TOLERANCE)
    longer = math.ceil(half_cycles - WHOLE_TOLERANCE)
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
    stepsize = cyclic_stepsize(cyclic)
    ends = _end_position(cyclic)
    summary = {
        "stepsize": stepsize,
        "stepsize_epochs": stepsize / spec.steps_per_epoch,
        "cycle_steps": 2 * stepsize,
        "cycles": cycle_steps(cyclic) / (2 * stepsize),
        "stages": _describe_stages(cyclic, stepsize, lr_at),
        "ends": ends,
    }
    if ends != "low":
        nearest = nearest_low_end(spec)
        summary["nearest_low_end"] = {**asdict(nearest), "message": nearest.message}
    return summary


def _describe_stages(spec: ScheduleSpec, stepsize: float, lr_at: LrFunction) -> list[dict]:
    """Each stage with its peak and the peaks the run actually reaches in it (a plain cycle is one stage)."""
    stages = spec.stages or ((cycle_steps(spec) / (2 * stepsize), spec.lr),)
    peaks = [step for step in high_points(spec) if step < spec.total_steps]
    described, start = [], float(spec.warmup_steps)
    for (cycles, peak), end in zip(stages, stage_ends(stages, stepsize), strict=True):
        end += spec.warmup_steps
        inside = [step for step in peaks if start <= step < end]
        described.append(
            {
                "cycles": cycles,
                "peak_lr": peak,
                "first_step": whole_or_float(start),
                "end_step": whole_or_float(end),
                "peaks": len(inside),
                "peak_lrs": [lr_at(step) for step in inside],
            }
        )
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
            f"lr_decay_steps ({ed2_decay_steps(spec)}) is shorter than the run ({spec.total_steps} steps): ED2's "
            "cosine falls to 0 and rises again. This is a cyclic LR: lr_scheduler 'cyclic' with lr_cycle_shape "
            f"'cosine', lr_cycle_start 'high' and lr_decay_steps {twin.decay_steps} gives the same curve."
        )
    if spec.name == "cosine_with_restarts" and spec.total_steps > ed2_decay_steps(spec):
        notes.append("cosine_with_restarts never restarts with ED2's settings: the LR stays 0 after lr_decay_steps.")
    if spec.name == "cyclic" and spec.warmup_steps and spec.cycle_start == "low":
        notes.append("with lr_cycle_start 'low' the warmup ramps to lr_min; the cycle itself then rises to the peak.")
    if spec.name == "cyclic" and spec.stages:
        notes.extend(_stage_length_notes(spec))
    return notes


def _stage_length_notes(spec: ScheduleSpec) -> list[str]:
    planned = stages_total_steps(spec.stages, cyclic_stepsize(spec), spec.warmup_steps)
    if planned > spec.total_steps:
        return [f"the run ({spec.total_steps} steps) stops before lr_cycle_stages end ({planned} steps)."]
    if planned < spec.total_steps:
        return [f"lr_cycle_stages end at step {planned}; the last stage keeps cycling to step {spec.total_steps}."]
    return []
