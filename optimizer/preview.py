"""`train.py --plot_schedule`: the LR curve of a run before any GPU is paid for.

It scans the data and applies the split exactly as training will, then evaluates the schedule's pure
functions at every step (at evenly spaced steps of a run longer than PLOTTED_POINTS). No model is loaded.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from pathlib import Path

from data.prepare import prepare_data
from optimizer.lr import plan_schedule, unet_spec
from optimizer.schedule_report import describe
from utils.config import TrainConfig
from utils.plots import plot_lr, plotted_steps

# Rows of lr_schedule.csv and points of its plot. A longer run is sampled at evenly spaced steps: every step of a
# run of millions of steps would take minutes to write and draw, and no plot shows more points than this.


# lr_schedule.csv's column of each param group's LR, in this order (a group that does not train has none).
SCHEDULE_COLUMNS = {"unet": "lr", "text_encoder": "lr_text_encoder", "text_encoder_2": "lr_text_encoder_2"}


def write_schedule_csv(path: Path, steps: list[int], series: dict[str, list[float]]) -> None:
    groups = [group for group in SCHEDULE_COLUMNS if group in series]
    header = ["step"] + [SCHEDULE_COLUMNS[group] for group in groups]
    columns = [series[group] for group in groups]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row, step in enumerate(steps):
            writer.writerow([step] + [f"{column[row]:.10g}" for column in columns])


def epoch_steps_text(plan, shown: int = 8) -> str:
    """Steps per epoch: one number, or where a rated data set's epochs differ, each run of equal epochs
    ("10 (epochs 1-2), 9 (epoch 3), ...", the middle left out past `shown` runs)."""
    if not plan.varies:
        return str(plan.steps_per_epoch)
    runs = []
    epochs = range(1, plan.epochs + 1)
    for steps, group in itertools.groupby(epochs, key=lambda epoch: plan.steps_in_epoch(epoch - 1)):
        numbers = list(group)
        where = f"epoch {numbers[0]}" if len(numbers) == 1 else f"epochs {numbers[0]}-{numbers[-1]}"
        runs.append(f"{steps} ({where})")
    if len(runs) > shown:
        runs = runs[: shown // 2] + ["..."] + runs[-(shown // 2) :]
    return ", ".join(runs)


def summary_lines(plan, described: dict) -> list[str]:
    """The preview's summary in words: run length, cycle geometry, peaks, and where the run ends."""
    lines = [
        f"steps per epoch: {epoch_steps_text(plan)}, epochs: {plan.total_epochs_exact:g}, "
        f"total steps: {plan.total_steps}",
        f"schedule: {described['schedule']}, warmup {described['warmup_steps']} steps, "
        f"LR at the first step {described['lr_first_step']:.4g}, at the last {described['lr_last_step']:.4g}",
    ]
    if "stepsize" in described:
        lines.append(
            f"stepsize: {described['stepsize']:g} steps ({described['stepsize_epochs']:g} epochs), "
            f"cycle {described['cycle_steps']:g} steps, {described['cycles']:g} cycles"
        )
        for number, stage in enumerate(described["stages"], start=1):
            counts = Counter(f"{lr:.4g}" for lr in stage["peak_lrs"])
            peaks = ", ".join(f"{n} x {lr}" for lr, n in counts.items()) or "none reached"
            lines.append(
                f"stage {number}: {stage['cycles']:g} cycles at peak {stage['peak_lr']:.4g}, steps "
                f"{stage['first_step']:g}-{stage['end_step']:g}, peaks reached: {peaks}"
            )
        where = {"low": "on a low point", "high": "on a peak", "mid-cycle": "mid-cycle"}[described["ends"]]
        lines.append(f"the run ends {where} (LR {described['end_lr']:.4g})")
    return lines  # the schedule's own notes come with plan_schedule's


def preview_schedule(config: TrainConfig, out_dir: Path, num_processes: int = 1) -> dict:
    """With `num_processes` (GPUs under accelerate launch) the epoch's batches are dealt out across them, so an
    epoch has fewer, larger optimizer steps: the preview counts the steps of the whole group, as training does."""
    data = prepare_data(config)
    plan, schedules, notes = plan_schedule(config, data.epoch_batches_per_process(num_processes))
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = plotted_steps(plan.total_steps)
    series = {group: [lr_at(k) for k in steps] for group, lr_at in schedules.lr.items()}
    write_schedule_csv(out_dir / "lr_schedule.csv", steps, series)
    plot_lr(
        steps,
        series,
        out_dir / "lr_schedule.png",
        plan.steps_per_epoch,
        title=f"{config.lr_scheduler} schedule, {plan.total_steps} steps",
    )
    described = describe(unet_spec(config, plan))
    print(data.summary())
    if num_processes > 1:
        print(data.global_batch_line(num_processes, config.grad_accum))
    for line in summary_lines(plan, described) + notes:
        print(line)
    sampled = f" (one step in {steps[1]} of {plan.total_steps})" if len(steps) < plan.total_steps else ""
    print(f"wrote {out_dir / 'lr_schedule.csv'}{sampled} and {out_dir / 'lr_schedule.png'}")
    return {"plan": plan, "describe": described, "notes": notes}
