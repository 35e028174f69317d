"""The end of a run: the copy of the final checkpoint, the plots and run_summary.json, and the run that stopped
before its first step. The Trainer's `finish` calls these in order; only the main process writes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from data.plan import RunPlan
from optimizer.lr import Schedules
from trainer.progress import Progress
from trainer.saving import write_json, write_plots
from trainer.stops import Stop
from utils.checkpoint import copy_atomic


def copy_final_checkpoint(final: dict, save_ckpt_dir: str | None) -> Stop | None:
    """save_ckpt_dir: a copy of the final single file (recorded in `final`). A failed copy stops nothing already
    done: the run's own checkpoint stays, and the returned stop's exit code says the copy failed."""
    if not (save_ckpt_dir and "single_file" in final):
        return None
    target = Path(save_ckpt_dir) / Path(final["single_file"]).name
    try:
        copy_atomic(Path(final["single_file"]), target)
    except OSError as error:
        return Stop.failed(
            "copy failed",
            f"the run is complete, but copying its final checkpoint to save_ckpt_dir failed ({error}); the "
            f"checkpoint is intact at {final['single_file']}. Copy it yourself once there is space.",
        )
    final["single_file_copy"] = str(target)
    return None


def write_outputs(
    run_dir: Path, summary: dict, schedules: Schedules, progress: Progress, plan: RunPlan, say: Callable[[str], None]
) -> None:
    """Plots and run_summary.json, last; a full disk here is said, not raised: every save is already done."""
    try:
        write_plots(run_dir, schedules, progress, plan)
        write_json(run_dir / "run_summary.json", summary)
    except OSError as error:
        say(
            f"error: writing the plots or run_summary.json in {run_dir} failed ({error}); the checkpoints and "
            f"states are intact, and metrics.csv holds the measurements"
        )


def end_before_training(
    run_dir: Path, resume_state: Path | None, stop: Stop, steps: int, is_main: bool, say: Callable[[str], None]
) -> dict:
    """A stop before this run trained a step saves nothing: a new run's folder is removed (it held only the config
    and a baseline), a resumed run's folder stays as it was. Returns the run's summary."""
    if resume_state:
        say(
            f"{stop.reason} before the first step: nothing more was trained; the run resumes from {resume_state} "
            f"as before"
        )
    else:
        if is_main:
            shutil.rmtree(run_dir, ignore_errors=True)
        say(
            f"{stop.reason} before the first step: nothing was trained or saved, and the new run folder {run_dir} "
            f"was removed"
        )
    return {"run_dir": str(run_dir), "steps": steps, "stopped": stop.reason, "exit_code": stop.exit_code}
