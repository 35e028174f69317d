"""`train.py --find_lr`: the LR range test (Smith 2017, section 3.3) with a stabilized probe loss.

The sweep trains exactly as a run of the same config would (same data, model, precision, optimizer,
`optimizer_step`), but with the LR ramped every optimizer step from `lr_find_start` to `lr_find_end`. Every
`lr_find_probe_every` steps it scores the stabilized probe loss (`trainer.validation.StabilizedLoss`: the same
images, noise and fixed timesteps every time, from private generators, so the training RNG is untouched).
The raw training loss of a diffusion model swings with the sampled timestep and noise far more than it moves
with the LR, which is why the range is read from the probe and not from the training loss.

The run writes into its own folder, `<logdir>/<project_name>-lrfind-<timestamp>/`, and never saves a model:
the base model on disk is only read.

How the range is read (`suggest_range`, a pure function of the probe points):

1. The probe points are taken up to the first non-finite loss (a NaN or inf counts as a turn upwards).
2. Smoothing: a running median of 3 (one spike cannot move the curve), then a centred moving average over
   `2h+1` points, `h = max(1, n // 20)` (5 points for 40 probes). Centred, so unlike an EMA it does not
   shift the curve towards higher LRs. Probes are equally spaced on the ramp's own axis (log LR for an
   exponential ramp, LR for a linear one), so the smoothing and slopes are taken on that axis.
3. Noise: sigma = 1.4826 x the median absolute residual of the raw points around local quadratic fits (over
   `2 max(2, h) + 1` points), corrected for the share of noise the fit absorbs. A change is "clear" when it
   exceeds the margin `max(3 sigma, 0.5% of the median smoothed loss)`.
4. Descent: from the highest smoothed point before the lowest one (the top) down to the lowest (the best).
   A fall smaller than the margin is no descent.
5. The onset (where the loss starts to fall): the first probe at which the smoothed loss has fallen from the
   top by the margin and by at least 10% of the whole descent.
6. `lr` (where the loss stops falling): the first probe from the onset on whose smoothed loss is within the
   margin of the best; past it the loss no longer falls measurably, and where exactly on that floor the
   minimum sits is noise.
7. It must turn: after the best point the smoothed loss rises by more than the margin (or turns NaN/inf).
   Without a turn the upper bound lies beyond the sweep, and no `lr` is given.
8. `lr_steepest`: the most negative slope of the smoothed curve (on the ramp's axis) between the onset and `lr`.
9. `lr_min` is `lr_steepest`, not the onset: an exponential sweep's onset can lie decades below `lr`, where the
   loss barely moves, and a cycle spends half its time in the lower half of its range. Fine-tuning
   `tiny-pretrained`, cycles down to the onset reached a validation loss up to 10% above the best constant LR's,
   cycles from the steepest point within 5% (bench/lr_finder_check.py, docs/lr-finder.md).

Anything short of that (too few probes, no clear fall, a fall too small to place both bounds, no turn) gives
no backed range: the status and reason say what was seen and how to sweep instead.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import shlex
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from accelerate import PartialState  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from optimizer.lr import text_encoder_scale  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.saving import write_json  # noqa: E402
from trainer.setup import stabilized_loss  # noqa: E402
from trainer.step import finite_everywhere  # noqa: E402
from trainer.validation import StabilizedLoss  # noqa: E402
from utils.checkpoint import atomic_path  # noqa: E402
from utils.config import (  # noqa: E402
    PATH_KEYS,
    ConfigError,
    TrainConfig,
    holds_path,
    load_config,
    read_json_file,
    text_encoder_setting,
)
from utils.launch import launcher_prefix  # noqa: E402

DEFAULT_STEPS = 200  # with the default 4-decade exponential ramp: 50 steps per decade
PROBES_PER_SWEEP = 40  # the default probe cadence aims at this many probe points
CSV_COLUMNS = ("step", "lr", "probe_loss", "smoothed_loss", "train_loss")

# The suggestion rule (see the module docstring).
MIN_PROBES = 8
NOISE_MULTIPLE = 3.0
RELATIVE_FLOOR = 0.005
ONSET_SHARE = 0.1
# A probe this many margins (6 sigma) above the lowest raw loss since the steepest point is a jump, not noise:
# Smith's "becomes ragged", the top of the range even where the smoothed curve still falls.
RAGGED_MARGINS = 2.0
MAD_TO_SIGMA = 1.4826  # the median absolute deviation of a normal distribution is 0.6745 sigma

# The stepsize the written config gets when it has none: Smith's 2-10 x the epoch size; 4 is what he used on
# CIFAR-10 (stepsize 2000 = 4 epochs).
DEFAULT_STEPSIZE_EPOCHS = 4
STEPSIZE_KEYS = ("lr_decay_steps", "lr_stepsize_epochs", "lr_cycles")
# A suggestion is a plain cycle between lr_min and lr: the 1cycle keys and staged peaks would contradict it.
KEYS_A_PLAIN_CYCLE_DROPS = (
    "lr_pct_start",
    "lr_div_factor",
    "lr_final_div_factor",
    "lr_three_phase",
    "lr_anneal_strategy",
    "lr_cycle_stages",
)

# ---------------------------------------------------------------------------------------------------------
# The sweep: its settings and the ramp
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    start: float
    end: float
    ramp: str  # "linear" | "exponential"
    steps: int
    probe_every: int
    diverge: float

    def lr_at(self, step: int) -> float:
        """The LR of optimizer step `step` (0-based): `start` at step 0, `end` at the last step."""
        return ramp_lr(self.start, self.end, self.steps, self.ramp)(step)


def ramp_lr(start: float, end: float, steps: int, ramp: str) -> Callable[[int], float]:
    """The LR of step k in [0, steps): first exactly `start`, last exactly `end` (torch-lr-finder's ramp)."""

    def lr(step: int) -> float:
        fraction = min(step, steps - 1) / (steps - 1)
        if fraction == 1:
            return end  # exact, whatever the float rounding of the power below
        if ramp == "exponential":
            return start * (end / start) ** fraction
        return start + (end - start) * fraction

    return lr


def sweep_settings(config: TrainConfig, steps_per_epoch: int) -> Sweep:
    if config.lr_find_end <= config.lr_find_start:
        raise ConfigError(
            f"lr_find_end ({config.lr_find_end:g}) must be above lr_find_start "
            f"({config.lr_find_start:g}): the sweep raises the LR."
        )
    if config.lr_find_steps is not None and config.lr_find_epochs is not None:
        raise ConfigError("Give the sweep length once: lr_find_steps or lr_find_epochs, not both.")
    if config.lr_find_epochs is not None:
        steps = max(2, round(config.lr_find_epochs * steps_per_epoch))
    else:
        steps = config.lr_find_steps or DEFAULT_STEPS
    every = config.lr_find_probe_every or max(1, round(steps / PROBES_PER_SWEEP))
    return Sweep(config.lr_find_start, config.lr_find_end, config.lr_find_ramp, steps, every, config.lr_find_diverge)


def describe_sweep(config: TrainConfig, sweep: Sweep) -> str:
    """The sweep in one line, each setting marked when it is a default (so users see what they did not set)."""

    def mark(*keys: str) -> str:
        return "" if config.model_fields_set.intersection(keys) else " (default)"

    return (
        f"sweep: {sweep.ramp}{mark('lr_find_ramp')} from {sweep.start:g}{mark('lr_find_start')} to "
        f"{sweep.end:g}{mark('lr_find_end')} over {sweep.steps} steps{mark('lr_find_steps', 'lr_find_epochs')}, "
        f"probe every {sweep.probe_every} steps{mark('lr_find_probe_every')}, stop at "
        f"{sweep.diverge:g} x the best probe loss{mark('lr_find_diverge')}"
    )


def text_encoder_ratio(config: TrainConfig, part: str = "text_encoder") -> float:
    """A text encoder's LR relative to the UNet's, as in training: its explicit LR / lr, or its scale (`part`:
    "text_encoder" or SDXL's "text_encoder_2"; optimizer/lr.py text_encoder_peak)."""
    explicit = text_encoder_setting(config, part, "lr")
    return explicit / config.lr if explicit is not None else text_encoder_scale(config, part)


def ramp_functions(config: TrainConfig, sweep: Sweep, groups) -> dict[str, Callable[[int], float]]:
    """The sweep's LR per parameter group, for Trainer.use_lr_functions: each text encoder follows the ramp at its
    usual ratio to the UNet."""
    ramp = ramp_lr(sweep.start, sweep.end, sweep.steps, sweep.ramp)
    return {group: _scaled(ramp, 1.0 if group == "unet" else text_encoder_ratio(config, group)) for group in groups}


def _scaled(function: Callable[[int], float], ratio: float) -> Callable[[int], float]:
    return lambda step: function(step) * ratio


# ---------------------------------------------------------------------------------------------------------
# The suggestion rule (pure)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    status: str  # "ok" | "too_few_points" | "no_descent" | "weak_descent" | "no_turn"
    reason: str
    lr_min: float | None = None
    lr: float | None = None
    lr_steepest: float | None = None
    lr_onset: float | None = None  # where the loss starts to fall (with no turn, lr_min; otherwise below it)
    smoothed: tuple[float, ...] = ()  # one value per finite probe point, in order
    noise: float | None = None  # sigma of the probe loss around the curve
    margin: float | None = None  # the smallest change the rule calls clear

    @property
    def backed(self) -> bool:
        return self.status == "ok"


def smooth(values: Sequence[float], half_window: int) -> np.ndarray:
    """Running median of 3, then a centred moving average over 2*half_window+1 points (fewer at the ends)."""
    values = np.asarray(values, dtype=float)
    despiked = values.copy()
    if len(values) >= 3:
        despiked[1:-1] = np.median(np.stack([values[:-2], values[1:-1], values[2:]]), axis=0)
    kernel = np.ones(2 * half_window + 1)
    sums = np.convolve(despiked, kernel, mode="same")
    counts = np.convolve(np.ones_like(despiked), kernel, mode="same")
    return sums / counts


def noise_level(values: Sequence[float], half_window: int) -> float:
    """Robust sigma of the probe loss around local quadratic fits over 2*half_window+1 points. A quadratic
    follows the curve's bends, so what is left is noise (the residuals of a moving average would count the
    curvature of a steep descent as noise). The fit absorbs a share c0 of each point's own noise, hence the
    correction."""
    values = np.asarray(values, dtype=float)
    offsets = np.arange(-half_window, half_window + 1)
    design = np.vander(offsets, 3)
    centre_weights = (design @ np.linalg.pinv(design))[half_window]  # the fit's value at the centre point
    windows = np.lib.stride_tricks.sliding_window_view(values, len(offsets))
    residuals = values[half_window : len(values) - half_window] - windows @ centre_weights
    return float(MAD_TO_SIGMA * np.median(np.abs(residuals)) / math.sqrt(1 - centre_weights[half_window]))


def suggest_range(lrs: Sequence[float], losses: Sequence[float], ramp: str) -> Suggestion:
    """lr_min, lr and lr_steepest from probe points (LR of the last step before each probe, probe loss), or a
    plain statement of why the curve backs no range. `ramp` names the axis the points are equally spaced on;
    the rule works on the points in order, so it only enters the wording."""
    lrs, losses, truncated = _finite_prefix(lrs, losses)
    if len(losses) < MIN_PROBES:
        return Suggestion("too_few_points", _too_few_reason(len(losses), truncated))
    half = max(1, len(losses) // 20)
    smoothed = smooth(losses, half)
    noise = noise_level(losses, max(2, half))  # a quadratic needs 5 points to leave a residual
    margin = max(NOISE_MULTIPLE * noise, RELATIVE_FLOOR * float(np.median(np.abs(smoothed))))
    measured = {"smoothed": tuple(float(v) for v in smoothed), "noise": noise, "margin": margin}
    best = int(np.argmin(smoothed))
    top = int(np.argmax(smoothed[: best + 1]))
    drop = smoothed[top] - smoothed[best]
    if drop < margin:
        return Suggestion("no_descent", _no_descent_reason(drop, margin, smoothed, truncated), **measured)
    onset = _first(range(top, best + 1), lambda i: smoothed[top] - smoothed[i] >= max(margin, ONSET_SHARE * drop))
    upper = _first(range(onset, best + 1), lambda i: smoothed[i] - smoothed[best] <= margin)
    if upper == onset:
        return Suggestion(
            "weak_descent",
            (
                f"the probe loss falls by only {drop:.3g}, {drop / margin:.1f} x the noise margin: too little to tell "
                "where it starts and where it stops falling. Sweep over more steps (a slower ramp lets the loss fall "
                "further), or probe more images (a steadier probe)."
            ),
            **measured,
        )
    turned = truncated or smoothed[best:].max() - smoothed[best] >= margin
    if not turned:
        return Suggestion(
            "no_turn",
            (
                f"the probe loss starts to fall at LR {lrs[onset]:.3g} but does not turn up by the end of the sweep "
                f"(LR {lrs[-1]:.3g}): the upper bound lies beyond it. Sweep to a higher lr_find_end."
            ),
            lr_min=lrs[onset],
            lr_onset=lrs[onset],
            **measured,
        )
    slopes = np.gradient(smoothed)
    steepest = onset + int(np.argmin(slopes[onset : upper + 1]))
    high = last_before_a_jump(losses, steepest, upper, RAGGED_MARGINS * margin)  # never past `upper`
    return Suggestion(
        "ok",
        _ok_reason(lrs, (onset, steepest, high, best), truncated, ramp, high < upper),
        lr_min=lrs[steepest],
        lr=lrs[high],
        lr_steepest=lrs[steepest],
        lr_onset=lrs[onset],
        **measured,
    )


def last_before_a_jump(losses: Sequence[float], start: int, stop: int, jump: float) -> int:
    """The last probe before the first raw loss in (start, stop] that lies more than `jump` above the lowest raw
    loss since `start` (at least start + 1, so the range keeps a width); `stop` when none does. From scratch
    the smoothed loss can go on falling slowly through LRs that already throw single probes up: the sweep's
    training carries it down, and such an LR breaks a run that holds it for a while."""
    lowest = losses[start]
    for index in range(start + 1, stop + 1):
        if losses[index] - lowest > jump:
            return max(start + 1, index - 1)
        lowest = min(lowest, losses[index])
    return stop


def _finite_prefix(lrs: Sequence[float], losses: Sequence[float]) -> tuple[list[float], list[float], bool]:
    """The points before the first non-finite loss, and whether there was one."""
    for index, loss in enumerate(losses):
        if not math.isfinite(loss):
            return list(lrs[:index]), list(losses[:index]), True
    return list(lrs), list(losses), False


def _first(indices: range, condition: Callable[[int], bool]) -> int:
    return next(i for i in indices if condition(i))


def _too_few_reason(count: int, truncated: bool) -> str:
    why = " before the loss turned NaN/inf" if truncated else ""
    return (
        f"only {count} probe points{why}; the rule needs {MIN_PROBES}. Probe more often (lr_find_probe_every) "
        "or sweep over more steps (lr_find_steps)" + (", from a lower lr_find_start." if truncated else ".")
    )


def _no_descent_reason(drop: float, margin: float, smoothed: np.ndarray, truncated: bool) -> str:
    seen = (
        f"the smoothed probe loss never fell clearly: its largest fall, {drop:.3g}, is below the noise margin "
        f"{margin:.3g}. "
    )
    if truncated or smoothed[-1] - smoothed[0] >= margin:
        return seen + "It only rose: lr_find_start is already too high; start the sweep lower."
    return seen + "Sweep to a higher lr_find_end, or over more steps (lr_find_steps / lr_find_epochs)."


def _ok_reason(lrs, points: tuple[int, int, int, int], truncated: bool, ramp: str, ragged: bool) -> str:
    """`points`: the indices of the onset, the steepest fall, the upper bound and the lowest point; `ragged`:
    the upper bound is the last probe before a jump, not where the loss stops falling."""
    onset, steepest, upper, best = points
    turn = "turns NaN/inf" if truncated else "turns up"
    if best > upper:
        turn += f" after LR {lrs[best]:.3g}"
    top = f"turns ragged after {lrs[upper]:.3g} (a probe jumps up)" if ragged else f"stops falling at {lrs[upper]:.3g}"
    reason = (
        f"the smoothed probe loss falls clearly from LR {lrs[onset]:.3g}, fastest at {lrs[steepest]:.3g}, {top} "
        f"and then {turn} ({ramp} sweep)."
    )
    if onset == 0:
        reason += " It falls from the first probe: learning may start below lr_find_start."
    return reason


# ---------------------------------------------------------------------------------------------------------
# Divergence (online, during the sweep)
# ---------------------------------------------------------------------------------------------------------


def divergence(probe_losses: Sequence[float], factor: float) -> str | None:
    """Why the sweep should stop now, or None. The smoothed loss here is the running median of the last 3
    probes (causal, and one spike cannot trigger it); it diverged when it exceeds `factor` x its best."""
    last = probe_losses[-1]
    if not math.isfinite(last):
        return f"the probe loss became {last}"
    medians = [float(np.median(probe_losses[max(0, i - 2) : i + 1])) for i in range(len(probe_losses))]
    if medians[-1] > factor * min(medians):
        return f"the smoothed probe loss reached {medians[-1] / min(medians):.2f} x its best (limit {factor:g} x)"
    return None


# ---------------------------------------------------------------------------------------------------------
# Running the sweep
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SweepLog:
    """One row per optimizer step (step 0: the probe before any update, LR 0), and what the probes cost."""

    rows: list[dict] = field(default_factory=list)
    probe_seconds: float = 0.0
    seconds: float = 0.0
    stopped_early: str | None = None

    def probe_points(self) -> tuple[list[float], list[float]]:
        """(LR, probe loss) of every probe after an update: the points the rule reads."""
        probed = [row for row in self.rows if row["probe_loss"] is not None and row["step"] > 0]
        return [row["lr"] for row in probed], [row["probe_loss"] for row in probed]

    @property
    def probe_count(self) -> int:
        return sum(row["probe_loss"] is not None for row in self.rows)


@dataclass
class FinderResult:
    run_dir: Path
    sweep: Sweep
    log: SweepLog
    suggestion: Suggestion
    probe_source: str
    fragment: dict | None


def training_subset_probe(trainer: Trainer) -> StabilizedLoss:
    """Validation is off: probe a fixed, seeded choice of training images instead."""
    config, items = trainer.config, trainer.data.train
    chosen = random.Random(config.validation.seed).sample(items, min(config.lr_find_probe_images, len(items)))
    chosen.sort(key=lambda item: item.path)
    with trainer.caches.parts_on_device("vae"):  # it encodes its images: back from the CPU if the cache moved it
        return stabilized_loss(trainer.unwrapped_model(), config, chosen)


def micro_batch_stream(trainer: Trainer):
    """The run's own batches, epoch after epoch, as many as the sweep asks for (the loop's per-epoch loader
    and micro-batch assembly: same order, same seed, same handling of images that fail to load)."""
    plan = trainer.plan
    for epoch in itertools.count():
        loader = iter(trainer.feed.epoch_loader(epoch))
        for step_in_epoch in range(plan.steps_in_epoch(epoch)):
            micro_batches = trainer.next_micro_batches(loader, epoch, step_in_epoch)
            if micro_batches:  # every image of the step failed to load: nothing to train on
                yield micro_batches


def run_sweep(trainer: Trainer, probe: StabilizedLoss, sweep: Sweep) -> SweepLog:
    log = SweepLog()
    started = time.monotonic()
    probes: list[float] = []

    def measure(step: int, lr: float, train_loss: float | None) -> None:
        probe_started = time.monotonic()
        with trainer.accelerator.autocast(), trainer.caches.parts_on_device("text_encoder"):
            loss = probe(trainer.unwrapped_model(), trainer.accelerator)  # averaged over the processes
        log.probe_seconds += time.monotonic() - probe_started
        probes.append(loss)
        log.rows.append({"step": step, "lr": lr, "probe_loss": loss, "train_loss": train_loss})

    measure(0, 0.0, None)
    batches = micro_batch_stream(trainer)
    bar = tqdm(total=sweep.steps, disable=not trainer.is_main, unit="step", desc="LR sweep")
    for step in range(1, sweep.steps + 1):
        lr = sweep.lr_at(step - 1)
        train_loss = trainer.update(next(batches))
        trainer.progress.global_step = step  # the Trainer's messages (e.g. a failed image) name the right step
        trainer.logger.log(step, step / trainer.plan.steps_per_epoch, loss_train=train_loss, lr_unet=lr)
        bar.update(1)
        # A NaN/inf training loss means NaN weights: probe at once, so the sweep stops there.
        due = step % sweep.probe_every == 0 or step == sweep.steps
        if due or not finite_everywhere(trainer.accelerator, train_loss):
            measure(step, lr, train_loss)
            bar.set_postfix(lr=f"{lr:.3g}", probe=f"{probes[-1]:.4f}")
            log.stopped_early = divergence(probes, sweep.diverge)
            if log.stopped_early:
                break
        else:
            log.rows.append({"step": step, "lr": lr, "probe_loss": None, "train_loss": train_loss})
    bar.close()
    log.seconds = time.monotonic() - started
    return log


def find_lr(config: TrainConfig) -> FinderResult:
    """Set up a run of this config in its own folder, sweep, suggest, and write the outputs there."""
    trainer = Trainer(
        config.model_copy(update={"resume_from": None}),  # a sweep starts afresh
        run_name=f"{config.project_name}-lrfind",
    )
    run_dir = trainer.run_dir
    sweep = sweep_settings(config, trainer.plan.steps_per_epoch)
    trainer.use_lr_functions(ramp_functions(config, sweep, trainer.schedules.lr))
    held_out = trainer.validation_sets.get("val")
    probe = held_out or training_subset_probe(trainer)
    source = "held-out validation" if held_out else "training (validation is off)"
    probe_source = f"{probe.num_images} {source} images x {len(probe.timesteps)} fixed timesteps"
    trainer.say(describe_sweep(config, sweep))
    trainer.say(f"probe: {probe_source}")
    try:
        log = run_sweep(trainer, probe, sweep)
    finally:
        trainer.close()
    suggestion = suggest_range(*log.probe_points(), sweep.ramp)
    fragment = config_fragment(config, suggestion) if suggestion.backed else None
    result = FinderResult(run_dir, sweep, log, suggestion, probe_source, fragment)
    if trainer.is_main:
        write_outputs(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Outputs: lr_find.csv, lr_find.png, lr_find.json, the printed summary
# ---------------------------------------------------------------------------------------------------------


def config_fragment(config: TrainConfig, suggestion: Suggestion) -> dict:
    """The keys that turn this config into a cyclic run over the suggested range."""
    fragment = {"lr_scheduler": "cyclic", "lr_min": _round(suggestion.lr_min), "lr": _round(suggestion.lr)}
    if all(getattr(config, key) is None for key in STEPSIZE_KEYS):
        fragment["lr_stepsize_epochs"] = DEFAULT_STEPSIZE_EPOCHS
    return fragment


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")


def write_outputs(result: FinderResult) -> None:
    write_csv(result.run_dir / "lr_find.csv", result.log, result.suggestion)
    plot_sweep(result.run_dir / "lr_find.png", result)
    write_json(result.run_dir / "lr_find.json", result_json(result))


def write_csv(path: Path, log: SweepLog, suggestion: Suggestion) -> None:
    """One row per step; probe_loss and smoothed_loss only on probe rows (smoothed_loss is the curve the rule
    reads, so it is empty for the step-0 baseline and after a NaN)."""
    smoothed = iter(suggestion.smoothed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in log.rows:
            probed = row["probe_loss"] is not None
            value = next(smoothed, None) if probed and row["step"] > 0 else None
            writer.writerow(
                [row["step"], _cell(row["lr"]), _cell(row["probe_loss"]), _cell(value), _cell(row["train_loss"])]
            )


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.8g}"


def result_json(result: FinderResult) -> dict:
    suggestion, log = result.suggestion, result.log
    return {
        "lr_min": suggestion.lr_min,
        "lr": suggestion.lr,
        "lr_steepest": suggestion.lr_steepest,
        "lr_onset": suggestion.lr_onset,
        "status": suggestion.status,
        "reason": suggestion.reason,
        "noise": suggestion.noise,
        "margin": suggestion.margin,
        "config_fragment": result.fragment,
        "sweep": asdict(result.sweep),
        "steps_done": log.rows[-1]["step"],
        "stopped_early": log.stopped_early,
        "probe": {
            "measures": result.probe_source,
            "count": log.probe_count,
            "seconds": round(log.probe_seconds, 2),
            "share_of_run": round(log.probe_seconds / max(log.seconds, 1e-9), 4),
        },
        "seconds": round(log.seconds, 2),
        "run_dir": str(result.run_dir),
    }


def plot_sweep(path: Path, result: FinderResult) -> None:
    """Probe loss against LR, on the ramp's own axis, with the suggested range marked."""
    lrs, losses = result.log.probe_points()
    suggestion = result.suggestion
    figure, axis = plt.subplots(figsize=(9, 5))
    axis.plot(lrs, losses, "o", markersize=3, color="tab:orange", alpha=0.6, label="probe loss")
    axis.plot(lrs[: len(suggestion.smoothed)], suggestion.smoothed, color="tab:orange", label="smoothed")
    axis.axhline(result.log.rows[0]["probe_loss"], color="gray", linestyle=":", label="before the sweep")
    if suggestion.lr_min is not None and suggestion.lr is not None:
        axis.axvspan(
            suggestion.lr_min,
            suggestion.lr,
            color="tab:green",
            alpha=0.15,
            label=f"suggested range {suggestion.lr_min:.3g} to {suggestion.lr:.3g}",
        )
    elif suggestion.lr_min is not None:
        axis.axvline(suggestion.lr_min, color="tab:green", label=f"starts to fall {suggestion.lr_min:.3g}")
    if suggestion.lr_steepest is not None:
        axis.axvline(
            suggestion.lr_steepest,
            color="tab:blue",
            linestyle="--",
            label=f"steepest descent {suggestion.lr_steepest:.3g}",
        )
    if result.sweep.ramp == "exponential":
        axis.set_xscale("log")
    axis.set_ylim(*_loss_limits(losses, suggestion))
    axis.set_xlabel(f"learning rate ({result.sweep.ramp} sweep)")
    axis.set_ylabel("stabilized probe loss")
    axis.set_title(f"LR range test: {suggestion.status}")
    axis.text(0.01, 0.02, textwrap.fill(suggestion.reason, 110), transform=axis.transAxes, fontsize=7, va="bottom")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _loss_limits(losses: list[float], suggestion: Suggestion) -> tuple[float, float]:
    """Keep the descent readable: a diverged tail is cut off above the highest point before the best."""
    finite = [loss for loss in losses if math.isfinite(loss)] or [0.0, 1.0]
    curve = list(suggestion.smoothed) or finite
    before_best = finite[: int(np.argmin(curve)) + 1]
    low, high = min(finite), min(max(finite), max(before_best) + 0.5 * (max(before_best) - min(finite)))
    pad = 0.05 * (high - low or abs(high) or 1.0)
    return low - pad, high + pad


def summary_lines(result: FinderResult) -> list[str]:
    log, suggestion = result.log, result.suggestion
    steps_done = log.rows[-1]["step"]
    lines = [
        f"LR range test: {steps_done} of {result.sweep.steps} steps"
        + (f", stopped early: {log.stopped_early}" if log.stopped_early else ""),
        f"probe: {result.probe_source}; {log.probe_count} probes took {log.probe_seconds:.1f} s, "
        f"{100 * log.probe_seconds / max(log.seconds, 1e-9):.0f}% of the sweep's {log.seconds:.1f} s",
    ]
    if suggestion.noise is not None:
        lines.append(f"noise: sigma {suggestion.noise:.3g}; a clear change is more than {suggestion.margin:.3g}")
    lines.append(f"{suggestion.status}: {suggestion.reason}")
    if suggestion.backed:
        lines.append(
            f"suggested range: lr_min {suggestion.lr_min:.3g}, lr {suggestion.lr:.3g}; "
            f"steepest descent at {suggestion.lr_steepest:.3g}"
        )
        lines.append("for the cyclic schedule, put in your config:")
        lines.extend("  " + line for line in json.dumps(result.fragment, indent=2).splitlines())
        lines.append("or write a ready config with --find_lr_write NEW.json")
    elif suggestion.lr_min is not None:
        lines.append(f"only the lower bound is backed: the loss starts to fall at {suggestion.lr_min:.3g}")
    lines.append(f"outputs: {result.run_dir}/lr_find.csv, lr_find.png, lr_find.json")
    return lines


# ---------------------------------------------------------------------------------------------------------
# --find_lr_write: the user's config with the suggestion in it
# ---------------------------------------------------------------------------------------------------------


def suggested_config(raw: dict, config: TrainConfig, fragment: dict) -> tuple[dict, list[str]]:
    """The user's own keys (file plus command line) with the suggestion applied, and the keys dropped."""
    written = {**raw, **fragment}
    if written.get("lr_cycle_decay") == "stages":
        written.pop("lr_cycle_decay")
    dropped = [key for key in KEYS_A_PLAIN_CYCLE_DROPS if written.pop(key, None) is not None]
    for part in ("text_encoder", "text_encoder_2"):  # explicit text encoder LRs keep the ratio the sweep ramped
        ratio = text_encoder_ratio(config, part)
        for setting in ("lr", "lr_min"):
            if raw.get(f"{part}_{setting}") is not None:
                written[f"{part}_{setting}"] = _round(fragment[setting] * ratio)
    return written, dropped


def rebase_paths(data: dict, old_dir: Path | None, new_dir: Path) -> dict:
    """Relative paths that load_config found beside the old config, made relative to the new one's folder."""
    if old_dir is None:
        return data
    rebased = dict(data)
    for key in PATH_KEYS:
        value = data.get(key)
        if holds_path(key, value):
            rebased[key] = _rebase(value, old_dir, new_dir)
    validation = data.get("validation_config")
    if isinstance(validation, dict) and isinstance(validation.get("manual_data_root"), str):
        rebased["validation_config"] = {
            **validation,
            "manual_data_root": _rebase(validation["manual_data_root"], old_dir, new_dir),
        }
    return rebased


def _rebase(value: str, old_dir: Path, new_dir: Path) -> str:
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (old_dir / path).exists():
        return value  # found from the working directory (or nowhere): load_config reads it the same way
    return os.path.relpath(old_dir / path, new_dir)


def write_suggested_config(
    path: Path, config_path: Path | None, overrides: dict, config: TrainConfig, fragment: dict
) -> list[str]:
    """Write NEW.json, only once it is known to load with the suggestion in force. Returns the keys dropped."""
    raw = read_json_file(Path(config_path), "config") if config_path else {}
    written, dropped = suggested_config({**raw, **overrides}, config, fragment)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = rebase_paths(written, Path(config_path).parent if config_path else None, path.parent)
    with atomic_path(path) as staging:  # beside NEW.json: relative paths resolve alike
        staging.write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
        check_suggestion_in_force(load_config(staging), fragment)  # raising here leaves NEW.json unwritten
    return dropped


def check_suggestion_in_force(loaded: TrainConfig, fragment: dict) -> None:
    """ED2's optimizer.json wins over train.json keys (lr_scheduler among them): say so rather than write a
    config that would not run the suggested cycle."""
    effective = {key: getattr(loaded, key) for key in fragment}
    if effective != fragment:
        raise ConfigError(
            f"the written config would not run the suggestion: it loads as {effective}, not {fragment}"
            + (
                f"; optimizer_config '{loaded.optimizer_config}' overrides these keys, remove them there."
                if loaded.optimizer_config
                else "."
            )
        )


def check_write_target(path: Path | None, config_path: Path | None) -> None:
    """Refuse before the sweep, not after it, to overwrite the user's own config."""
    if path and config_path and Path(path).resolve() == Path(config_path).resolve():
        raise ConfigError(f"--find_lr_write {path} would overwrite the config it reads; give a new file name.")


def find_lr_command(config: TrainConfig, config_path: Path | None, overrides: dict, write_path: Path | None) -> int:
    """train.py --find_lr [--find_lr_write NEW.json]: exit status 0, or 1 when NEW.json cannot be backed."""
    check_write_target(write_path, config_path)
    result = find_lr(config)
    if not PartialState().is_main_process:  # under accelerate launch the main process reports and writes
        return 0
    for line in summary_lines(result):
        print(line)
    if write_path is None:
        return 0
    if not result.suggestion.backed:
        print(
            f"error: not writing {write_path}: the sweep backs no range ({result.suggestion.status}). "
            "Sweep again as the reason above says.",
            file=sys.stderr,
        )
        return 1
    dropped = write_suggested_config(Path(write_path), config_path, overrides, config, result.fragment)
    if dropped:
        print(
            f"dropped from the written config (a plain cycle between lr_min and lr ignores them): {', '.join(dropped)}"
        )
    print(f"wrote {write_path}; next: {shlex.join([*launcher_prefix(), 'train.py', '--config', str(write_path)])}")
    return 0
