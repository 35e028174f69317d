"""What a run writes to keep its work: checkpoints (diffusers folder + single file), resumable states, and at the
end the plots and run_summary.json. Every write is atomic (utils/checkpoint.py, utils/state.py); the Trainer
decides when, and only its main process calls these."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate.utils import gather_object

from data.plan import RunPlan
from data.prepare import PreparedData
from optimizer.lr import Schedules
from trainer.model import SDModel
from trainer.progress import Progress
from trainer.stops import Stop
from utils.checkpoint import atomic_path, checkpoint_name, save_checkpoint
from utils.config import TrainConfig
from utils.plots import plot_losses, plot_lr, plotted_steps
from utils.state import STATE_FOLDER, SavedState, TrainingState, prune_states, write_state


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (compare.py, a resume) sees the old file or the new one, never a part."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_checkpoint(model: SDModel, config: TrainConfig, plan: RunPlan, step: int, run_dir: Path) -> dict:
    """The current weights as `ckpts/<project>-ep<E>-gs<S>` (diffusers folder, and the single file unless
    no_save_ckpt); returns their paths. Raises OSError when the disk refuses."""
    name = checkpoint_name(config.project_name, plan.epoch_of(max(step - 1, 0)), step)
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
    lr_scheduler,
    next_lrs: dict,
    scaler,
    progress: Progress,
    fingerprint: dict,
    config: TrainConfig,
    trained: dict[str, torch.nn.Module],
    optimizer,
    rng: dict,
    checkpoint_follows: bool,
) -> TrainingState:
    """Everything the run depends on at `step`, for write_training_state. `checkpoint_follows`: this state is the
    first half of a checkpoint save (resume writes the checkpoint if a kill left it unwritten)."""
    epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
    info = {
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,  # optimizer steps done in the epoch; its batch order comes from the seed
        "seed": seed,
        "num_processes": num_processes,
        "steps_per_epoch": plan.steps_per_epoch,
        "lr_scheduler": lr_scheduler.state_dict(),
        "next_lrs": next_lrs,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "progress": progress.to_json(),
        "fingerprint": fingerprint,
        "config": config.model_dump(mode="json"),
        "checkpoint_follows": checkpoint_follows,
    }
    weights = {name: module.state_dict() for name, module in trained.items()}
    return TrainingState(step, info, weights, optimizer.state_dict(), rng)


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
        "epochs": round(progress.global_step / plan.steps_per_epoch, 4),
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


def weights_across_processes(trained: dict[str, torch.nn.Module], num_processes: int) -> dict:
    """With several processes, a hash of each one's trained weights: data parallel training keeps them equal, and
    the run summary shows that it did (every process must call this)."""
    if num_processes == 1:
        return {"count": 1}
    hashes = gather_object([weights_sha256(trained)])
    return {"count": num_processes, "weights_identical": len(set(hashes)) == 1, "weights_sha256": hashes}
