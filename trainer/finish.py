"""The end of a run: the copy of the final checkpoint, and the run that stopped before its first step (the plots
and run_summary.json are `RunSaver.write_summary`'s). Only the main process writes."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from pathlib import Path

from trainer.stops import Stop
from utils.checkpoint import copy_atomic


def copy_final_checkpoint(final: dict, save_ckpt_dir: str | None, best: dict | None = None) -> Stop | None:
    """save_ckpt_dir: a copy of the final single file, or of `best` (stop_when_val_rises: the checkpoint of the
    lowest validation loss) when given; recorded in `final`. A failed copy stops nothing already done: the run's
    own checkpoint stays, and the returned stop's exit code says the copy failed."""
    kept = best if best and "single_file" in best else final
    if not (save_ckpt_dir and "single_file" in kept):
        return None
    target = Path(save_ckpt_dir) / Path(kept["single_file"]).name
    try:
        copy_atomic(Path(kept["single_file"]), target)
    except OSError as error:
        return Stop.failed(
            "copy failed",
            f"the run is complete, but copying its final checkpoint to save_ckpt_dir failed ({error}); the "
            f"checkpoint is intact at {kept['single_file']}. Copy it yourself once there is space.",
        )
    final["single_file_copy"] = str(target)
    return None


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


def close_run(logger, run_lock, accelerator) -> None:
    """Logs closed, the run folder's lock released, then the process group ended. The caller drops its references
    to the DDP wrappers first, so that they are freed here while the group is still registered: freed after it, a
    wrapper takes the group's last reference down with it while holding the GIL, and gloo's destructor can then wait
    forever on a worker thread that needs the GIL (seen as a hang at exit)."""
    logger.close()
    if run_lock:
        run_lock.release()
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # accelerate's own references to the prepared models and optimizer
    gc.collect()
    accelerator.end_training()
