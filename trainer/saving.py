"""What a run writes to keep its work: checkpoints (diffusers folder + single file), resumable states, and at the
end the plots and run_summary.json. Every write is atomic (utils/checkpoint.py, utils/state.py). `RunSaver` does
the saves of a running Trainer: only the main process writes, and every process learns whether it worked (a failed
save stops the run)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from data.images import SkippedImage, write_skipped_report
from data.plan import RunPlan
from data.prepare import PreparedData
from optimizer.lr import Schedules
from trainer.ema import TrainedAverage
from trainer.model import SDModel
from trainer.progress import Progress
from trainer.step import agreed
from trainer.stops import Stop, save_failed
from utils.checkpoint import (
    BEST_SUFFIX,
    atomic_path,
    best_checkpoints,
    checkpoint_name,
    remove_checkpoint,
    save_checkpoint,
)
from utils.config import TrainConfig
from utils.plots import plot_losses, plot_lr, plotted_steps
from utils.state import (
    STATE_FOLDER,
    SavedState,
    TrainingState,
    capture_rng,
    prune_states,
    state_folder_name,
    write_state,
)


@dataclass(frozen=True)
class TrainingParts:
    """What a state holds besides the progress: the trained weights and what updates them."""

    model: SDModel  # unwrapped
    trained: dict[str, torch.nn.Module]  # the trained parts of `model`, by name
    optimizer: Any
    lr_scheduler: Any
    scaler: Any  # the fp16 GradScaler, or None
    ema: TrainedAverage | None = None


@dataclass(frozen=True)
class SaveOutcome:
    saved: bool
    paths: dict  # the checkpoint's paths; empty when none was written
    stop: Stop | None  # set when a save failed: the run stops, every process agreed


@dataclass
class RunSaver:
    """The saves of one run folder. Every process calls `save` / `save_state` at the same points (they are
    collectives); the main process writes."""

    config: TrainConfig
    run_dir: Path
    plan: RunPlan
    seed: int
    fingerprint: dict
    schedules: Schedules
    data: PreparedData
    accelerator: Accelerator
    say: Callable[[str], None]

    def save(self, parts: TrainingParts, progress: Progress) -> SaveOutcome:
        """A resumable state, then a checkpoint of the current weights. The state goes first: after a SIGTERM the
        time left may be short, and the state is what resuming needs."""
        state = self.save_state(parts, progress, checkpoint_follows=True)
        if not state.saved:
            return state
        progress.last_save_time = time.monotonic()
        paths, stop = self.write_checkpoint(parts, progress) if self.is_main else ({}, None)
        saved, stop = agreed((bool(paths), stop))
        return SaveOutcome(saved, paths, stop)

    def save_state(self, parts: TrainingParts, progress: Progress, checkpoint_follows: bool = False) -> SaveOutcome:
        """Everything the run depends on, to <run_dir>/state/state-gs<step>/, atomically; only the newest
        save_state_keep states are kept. `checkpoint_follows` is recorded: a resumed run writes the checkpoint a
        kill interrupted."""
        rng = {"processes": gather_object([capture_rng()])}  # also the barrier: every process finished the step
        progress.last_state_time = time.monotonic()
        last = progress.last_state
        already_saved = last and Path(last).name == state_folder_name(progress.global_step)
        stop = None
        if self.is_main and not already_saved:
            stop = self._write_state(parts, progress, rng, checkpoint_follows)
        failed, stop = agreed((stop is not None, stop))
        return SaveOutcome(not failed, {}, stop)

    def write_checkpoint(self, parts: TrainingParts, progress: Progress) -> tuple[dict, Stop | None]:
        """The current weights, unless this step's checkpoint exists (e.g. a stop right after an epoch's save);
        main process only. With EMA, its checkpoint (`<name>_ema`) goes first: a checkpoint that exists is
        complete. Returns the paths, or a stop when the disk refused."""
        step, checkpoints = progress.global_step, progress.checkpoints
        if checkpoints and checkpoints[-1]["step"] == step:
            return {key: value for key, value in checkpoints[-1].items() if key != "step"}, None
        try:
            paths = {}
            if parts.ema:
                with parts.ema.swapped_in(parts.trained):
                    ema = write_checkpoint(parts.model, self.config, self.plan, step, self.run_dir, suffix="_ema")
                paths = {f"ema_{kind}": path for kind, path in ema.items()}
            paths = {**write_checkpoint(parts.model, self.config, self.plan, step, self.run_dir), **paths}
        except OSError as error:
            return {}, save_failed("checkpoint", error, progress)
        checkpoints.append({"step": step, **paths})
        self.say(f"saved checkpoint {paths['diffusers']}")
        return paths, None

    def save_best(self, parts: TrainingParts, progress: Progress) -> SaveOutcome:
        """stop_when_val_rises: the weights at a new lowest validation loss as `<name>-best` (a checkpoint, no state:
        it is an output, not a point to resume from); the older `-best` one is removed once this one is written."""
        step, ckpts, stop, paths = progress.global_step, self.run_dir / "ckpts", None, {}
        if self.is_main:
            try:
                paths = write_checkpoint(parts.model, self.config, self.plan, step, self.run_dir, suffix=BEST_SUFFIX)
            except OSError as error:
                stop = save_failed("best checkpoint", error, progress)
            for older in best_checkpoints(ckpts) if paths else []:
                if older["diffusers"] != paths["diffusers"]:
                    remove_checkpoint(older)
            if paths:
                self.say(f"step {step}: lowest validation loss so far: saved {paths['diffusers']}")
        failed, stop = agreed((stop is not None, stop))
        return SaveOutcome(not failed, paths, stop)

    def rewrite_checkpoint(self, parts: TrainingParts, progress: Progress) -> Stop | None:
        """The checkpoint of the resumed state's step, which a kill left unwritten (every process calls this)."""
        progress.checkpoints = [entry for entry in progress.checkpoints if entry["step"] != progress.global_step]
        _, stop = self.write_checkpoint(parts, progress) if self.is_main else ({}, None)
        return agreed(stop)

    def _write_state(self, parts: TrainingParts, progress: Progress, rng: dict, checkpoint_follows: bool):
        step = progress.global_step
        try:
            state = training_state(
                step,
                self.plan,
                self.seed,
                self.accelerator.num_processes,
                self.schedules.lrs_at(step),
                progress,
                self.fingerprint,
                self.config,
                parts,
                rng,
                checkpoint_follows,
            )
            saved, pruned = write_training_state(state, self.run_dir, self.config.save_state_keep)
        except OSError as error:
            return save_failed("state", error, progress)
        progress.last_state = str(saved.path)
        self.say(
            f"saved state {saved.path} ({saved.bytes / 1e9:.2f} GB) in {saved.seconds:.1f} s"
            + (f"; removed {len(pruned)} older state(s)" if pruned else "")
        )
        return None

    def write_summary(
        self, final: dict, progress: Progress, seconds: float, resumed_from: Path | None, stop: Stop | None, trained
    ) -> dict:
        """run_summary.json and the plots, at the end of the run (every process calls this: it compares the
        processes' weights); returns the summary."""
        summary = run_summary(
            self.run_dir, final, progress, self.plan, self.data, self.seed, seconds, resumed_from, stop
        )
        summary["processes"] = weights_across_processes(trained, self.accelerator.num_processes)
        if not summary["processes"].get("weights_identical", True):
            self.say(
                f"warning: the processes ended with different weights ({summary['processes']}); the saved "
                f"checkpoint holds the main process's"
            )
        summary["validation_minimum"] = minimum_report(progress, self.plan, self.run_dir)
        if self.is_main:
            write_outputs(self.run_dir, summary, self.schedules, progress, self.plan, self.say)
        return summary

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def epoch_save_due(config: TrainConfig, epoch: int, step: int, plan: RunPlan) -> bool:
    """save_every_n_epochs after `epoch` (0-based) ends at `step`; the final save is the end of the run's."""
    every, finished = config.save_every_n_epochs, epoch + 1
    due = every and finished % every == 0 and finished >= config.save_ckpts_from_n_epochs
    return bool(due) and step < plan.total_steps


def write_skipped_images(data: PreparedData, failed_images: list[tuple[int, str, str]], run_dir: Path) -> None:
    """skipped_images.txt: images skipped by the scan, then those that failed to load during training (with the
    step)."""
    failed = [
        SkippedImage(Path(path), f"failed to load at step {step}: {reason}") for step, path, reason in failed_images
    ]
    if data.skipped or failed:
        write_skipped_report(list(data.skipped) + failed, run_dir / "skipped_images.txt")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (compare.py, a resume) sees the old file or the new one, never a part."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_checkpoint(
    model: SDModel, config: TrainConfig, plan: RunPlan, step: int, run_dir: Path, suffix: str = ""
) -> dict:
    """The current weights as `ckpts/<project>-ep<E>-gs<S><suffix>` (diffusers folder, and the single file unless
    no_save_ckpt); returns their paths. Raises OSError when the disk refuses."""
    name = checkpoint_name(config.project_name, plan.epoch_of(max(step - 1, 0)), step) + suffix
    return save_checkpoint(
        model.pipeline(),
        run_dir / "ckpts",
        name,
        half=not config.save_full_precision,
        single_file=not config.no_save_ckpt,
    )


def write_training_state(state: TrainingState, run_dir: Path, keep: int) -> tuple[SavedState, list[Path]]:
    """The state under <run_dir>/state/state-gs<step>/, then only the newest `keep` states kept. Returns the saved
    state and the pruned folders. Raises OSError when the disk refuses."""
    saved = write_state(state, run_dir / STATE_FOLDER)
    return saved, prune_states(run_dir / STATE_FOLDER, keep, state.step)


def training_state(
    step: int,
    plan: RunPlan,
    seed: int,
    num_processes: int,
    next_lrs: dict,
    progress: Progress,
    fingerprint: dict,
    config: TrainConfig,
    parts: TrainingParts,
    rng: dict,
    checkpoint_follows: bool,
) -> TrainingState:
    """Everything the run depends on at `step`, for write_training_state. `checkpoint_follows`: this state is the
    first half of a checkpoint save (resume writes the checkpoint if a kill left it unwritten)."""
    epoch = plan.epoch_of(step)
    step_in_epoch = step - plan.first_step_of(epoch)
    info = {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,  # optimizer steps done in the epoch; its batch order comes from the seed
        "seed": seed,
        "num_processes": num_processes,
        "steps_per_epoch": plan.steps_per_epoch,
        "lr_scheduler": parts.lr_scheduler.state_dict(),
        "next_lrs": next_lrs,
        "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "progress": progress.to_json(),
        "fingerprint": fingerprint,
        "config": config.model_dump(mode="json"),
        "checkpoint_follows": checkpoint_follows,
        "ema_updates": parts.ema.updates if parts.ema else None,
    }
    weights = {name: module.state_dict() for name, module in parts.trained.items()}
    if parts.ema:
        weights.update(parts.ema.weights(parts.trained))
    return TrainingState(step, info, weights, parts.optimizer.state_dict(), rng)


def weights_sha256(trained: dict[str, torch.nn.Module]) -> str:
    """One hash over the trained weights (the run summary compares the processes' hashes)."""
    digest = hashlib.sha256()
    for name, module in sorted(trained.items()):
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_plots(run_dir: Path, schedules: Schedules, progress: Progress, plan: RunPlan) -> None:
    """plots/lr.png (the LR of every trained group up to the last step) and plots/loss.png."""
    steps = plotted_steps(progress.global_step)
    series = {group: [schedule(k) for k in steps] for group, schedule in schedules.lr.items()}
    plot_lr(steps, series, run_dir / "plots" / "lr.png", plan.steps_per_epoch)
    plot_losses(progress.train_losses, progress.val_losses, run_dir / "plots" / "loss.png", plan.steps_per_epoch)


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


def run_summary(
    run_dir: Path,
    final: dict,
    progress: Progress,
    plan: RunPlan,
    data: PreparedData,
    seed: int,
    seconds: float,
    resumed_from: Path | None,
    stop: Stop | None,
) -> dict:
    """run_summary.json: what the run did, measured and left, for people and for compare.py."""
    val = progress.val_losses
    best = min(val, key=lambda item: item[1]) if val else None
    return {
        "run_dir": str(run_dir),
        "final_checkpoint": final,
        "checkpoints": progress.checkpoints,
        "steps": progress.global_step,
        "epochs": round(plan.epochs_at(progress.global_step), 4),
        "steps_per_epoch": plan.steps_per_epoch,
        "seed": seed,
        "images": {
            "found": data.found,
            "skipped": len(data.skipped),
            "train": len(data.train),
            "validation": len(data.val),
        },
        "val_loss": {
            "first": val[0][1] if val else None,
            "min": best[1] if best else None,
            "min_step": best[0] if best else None,
            "final": val[-1][1] if val else None,
            "history": val,
        },
        "final_train_loss": progress.train_losses[-1][1] if progress.train_losses else None,  # the last finite one
        "final_train_loss_step": progress.train_losses[-1][0] if progress.train_losses else None,
        "seconds": round(seconds, 2),
        "finite": not progress.skipped_updates,  # a skipped update had a NaN/inf loss or no image to train on
        "skipped_update_count": len(progress.skipped_updates),
        "skipped_updates": progress.skipped_updates,
        "failed_images": len(progress.failed_images),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "last_state": progress.last_state,
        "stopped": stop.reason if stop else None,
        "exit_code": stop.exit_code if stop else 0,
    }


def minimum_report(progress: Progress, plan: RunPlan, run_dir: Path) -> dict | None:
    """Where the validation loss was lowest, the checkpoint nearest to that step and how to keep that point next
    time: the post picks its best epoch by eye from the curve; this names it. None without validation."""
    lowest = progress.val_minimum()
    if lowest is None:
        return None
    step, loss = lowest
    saved = progress.checkpoints + best_checkpoints(run_dir / "ckpts")
    nearest = min(saved, key=lambda entry: abs(entry["step"] - step), default=None)
    return {
        "step": step,
        "epoch": round(plan.epochs_at(step), 4),
        "loss": loss,
        "nearest_checkpoint": {**nearest, "steps_from_minimum": nearest["step"] - step} if nearest else None,
        "advice": keep_minimum_advice(step, plan, nearest),
    }


def keep_minimum_advice(step: int, plan: RunPlan, nearest: dict | None) -> str | None:
    """What would have saved the weights of the validation minimum (None when a checkpoint holds them)."""
    if step == 0:
        return (
            "the validation loss never went below the base model's: the run only moved away from it; try lower "
            "learning rates (lr, lr_min), e.g. from --find_lr"
        )
    if nearest and nearest["step"] == step:
        return None
    epoch = plan.epochs_at(step)
    automatic = "or stop_when_val_rises: 3, which keeps the checkpoint of the lowest validation loss by itself"
    if abs(epoch - round(epoch)) > 1e-6:
        return f"the minimum fell inside epoch {math.ceil(epoch)}: set stop_when_val_rises (e.g. 3) to keep it"
    whole = round(epoch)
    # The smallest interval that lands on the minimum's epoch and saves at most ~10 times, else the epoch itself.
    every = next((d for d in range(1, whole + 1) if whole % d == 0 and plan.epochs / d <= 10), whole)
    return f"save_every_n_epochs: {every} saves at epoch {whole}, where the minimum was, {automatic}"


def minimum_lines(report: dict | None) -> list[str]:
    """What the end of a run says about its validation minimum."""
    if report is None:
        return []
    nearest = report["nearest_checkpoint"]
    lines = [f"lowest validation loss {report['loss']:.5f} at step {report['step']} (epoch {report['epoch']:g})"]
    if nearest:
        away = nearest["steps_from_minimum"]
        where = "at that step" if away == 0 else f"{abs(away)} steps {'after' if away > 0 else 'before'} it"
        lines.append(f"nearest checkpoint: {nearest['diffusers']} ({where})")
    return lines + ([f"advice: {report['advice']}"] if report["advice"] else [])


def weights_across_processes(trained: dict[str, torch.nn.Module], num_processes: int) -> dict:
    """With several processes, a hash of each one's trained weights: data parallel training keeps them equal, and
    the run summary shows that it did (every process must call this)."""
    if num_processes == 1:
        return {"count": 1}
    hashes = gather_object([weights_sha256(trained)])
    return {"count": num_processes, "weights_identical": len(set(hashes)) == 1, "weights_sha256": hashes}
