"""Resuming a run: which state to continue from, whether the new config may continue it, and restoring it.

A resumed run must be the run it continues. Its fingerprint records what would silently change the
training if it changed: the model, the trained parameters, the optimizer, batch size, gradient accumulation,
resolution, seed, and the training and validation images (paths and sizes). A difference is refused with a
ConfigError naming the key. Everything else (run length, save cadence, logging, samples, validation cadence,
the LR schedule) comes from the new config, and the log lists what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from trainer.ema import restore_average
from trainer.progress import Progress
from trainer.saving import RunSaver, TrainingParts, write_skipped_images
from trainer.step import agreed
from trainer.stops import Stop
from utils.checkpoint import saved_checkpoints
from utils.config import ConfigError, TrainConfig
from utils.state import (
    STATE_FOLDER,
    DamagedStateError,
    TrainingState,
    newest_complete_state,
    read_trainer_state,
    restore_rng,
    seed_everything,
    set_aside_damaged,
    state_step,
    verify_state,
)

# Optimizer hyperparameters the config sets: after loading a state, the new config's values win.
CONFIGURED_HYPERPARAMETERS = ("betas", "eps", "weight_decay")

# fingerprint entry -> (the config key to name, what it is)
REFUSED_CHANGES = {
    "model_layout": ("resume_ckpt", "the model (the UNet / text encoder layout or prediction type differ)"),
    "trained_parameters": (
        "disable_unet_training / disable_textenc_training / train_text_encoder_2 / "
        "text_encoder_unfreeze_last_n_layers / text_encoder_2_unfreeze_last_n_layers",
        "which parameters train",
    ),
    "optimizer": ("optimizer", "the optimizer"),
    "batch_size": ("batch_size", "the batch size"),
    "grad_accum": ("grad_accum", "gradient accumulation"),
    "resolution": ("resolution", "the resolution"),
    "seed": ("seed", "the seed (it fixes the data order)"),
    "rated_epochs": (
        "rated_dataset / rated_dataset_target_dropout_percent / max_epochs",
        "the rated data set's epochs (how many images each trains)",
    ),
    "train_images": ("data_root", "the training images"),
    "validation_images": ("validation_config", "the validation split"),
    "weight_dtype": ("weight_dtype", "the trained weights' dtype"),
}


def project_run_dirs(logdir: str, project_name: str) -> list[Path]:
    """`<logdir>/<project_name>-<YYYYMMDD-HHMMSS>[-n]`: this project's run folders, not those of 'name-v2'."""
    pattern = re.compile(re.escape(project_name) + r"-\d{8}-\d{6}(-\d+)?$")
    root = Path(logdir)
    return sorted(p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)) if root.is_dir() else []


def locate_state(config: TrainConfig) -> tuple[Path | None, list[str]]:
    """The state folder `resume_from` points at, and notes for the log. `latest` with no state at all starts a
    new run (so one command serves the first start and every restart of a preemptible job)."""
    value = config.resume_from
    if value is None:
        return None, []
    if value == "latest":
        return _newest_state(
            project_run_dirs(config.logdir, config.project_name),
            value,
            f"of project '{config.project_name}' under logdir '{config.logdir}'",
        )
    path = Path(value)
    if (path / STATE_FOLDER).is_dir():  # a run folder: its newest complete state
        return _newest_state([path], value, f"in the run folder '{path}'")
    if path.is_file():
        raise ConfigError(f"key 'resume_from' = '{value}' is a file, not a folder: {_instead_of_file(path)}.")
    if not path.is_dir():
        raise ConfigError(
            f"key 'resume_from' = '{value}': no such folder. Give 'latest', a state folder "
            f"(<run>/state/state-gs<step>) or a run folder."
        )
    try:
        verify_state(path)
    except DamagedStateError as problem:
        raise ConfigError(f"key 'resume_from' = '{value}': not a complete training state ({problem}).") from None
    return path, []


def _instead_of_file(file: Path) -> str:
    """What to give as resume_from instead of `file`: the state folder it is in, if it is one of a state's files;
    else, as it may be the model to start from, resume_ckpt."""
    if file.parent.parent.name == STATE_FOLDER:
        return f"give the state folder that holds it, '{file.parent}' (or 'latest', or a run folder)"
    return (
        "give 'latest', a state folder (<run>/state/state-gs<step>) or a run folder; to train on from a model "
        "file (.safetensors, .ckpt), give it as resume_ckpt instead"
    )


def _newest_state(run_dirs: list[Path], value: str, where: str) -> tuple[Path | None, list[str]]:
    search = newest_complete_state(run_dirs)
    notes = []
    for folder, problem in search.damaged:
        moved = set_aside_damaged(folder)
        notes.append(f"warning: state {folder} is damaged ({problem}); skipped, and renamed to {moved.name}")
    if search.found is None:
        if search.damaged or value != "latest":
            raise ConfigError(
                f"key 'resume_from' = '{value}': no complete state {where}" + "".join(f"\n  {note}" for note in notes)
            )
        notes.append(f"resume_from 'latest': no saved state {where} yet: starting a new run")
    elif search.damaged:
        notes.append(f"resuming from the previous complete state, {search.found}")
    return search.found, notes


def run_dir_of(state_folder: Path) -> Path | None:
    """The run folder a state belongs to (None for a state copied out of its run folder)."""
    return state_folder.parent.parent if state_folder.parent.name == STATE_FOLDER else None


# --- the fingerprint -------------------------------------------------------------------------------------


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def images_fingerprint(items, roots: list[str]) -> dict:
    """Count and hash of the sorted (path relative to its data folder, file size) pairs: moving the data
    folder keeps it, adding, removing or replacing an image changes it."""
    entries = sorted((_relative(item.path, roots), os.path.getsize(item.path)) for item in items)
    return {"count": len(entries), "sha256": _digest(entries), "first": [name for name, _ in entries[:3]]}


def _relative(path: Path, roots: list[str]) -> str:
    for root in roots:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return Path(path).name


def model_layout(modules: dict, prediction_type: str) -> str:
    """Parameter names and shapes of each model, and the prediction type."""
    shapes = {
        name: [[key, list(tensor.shape)] for key, tensor in module.state_dict().items()]
        for name, module in modules.items()
    }
    return _digest({"shapes": shapes, "prediction_type": prediction_type})


def trained_parameters(modules: dict) -> str:
    return _digest(
        {name: [key for key, p in module.named_parameters() if p.requires_grad] for name, module in modules.items()}
    )


def compare_fingerprints(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refusals, notes): what breaks the run, and what changed harmlessly."""
    refusals = []
    for entry, (key, what) in REFUSED_CHANGES.items():
        if saved.get(entry) != current.get(entry):
            refusals.append(
                f"key '{key}': {what} changed ({_describe(entry, saved.get(entry))} in the state, "
                f"{_describe(entry, current.get(entry))} now)"
            )
    notes = []
    if saved.get("model_source") != current.get("model_source") and saved.get("model_layout") == current.get(
        "model_layout"
    ):
        notes.append(
            f"resume_ckpt changed from '{saved.get('model_source')}' to '{current.get('model_source')}'; "
            f"same layout, so the run continues: trained weights come from the state, frozen parts "
            f"from the new path"
        )
    if saved.get("mixed_precision") != current.get("mixed_precision"):
        notes.append(
            f"mixed precision changed from {saved.get('mixed_precision')} to "
            f"{current.get('mixed_precision')}: the run continues, but not bit-identically"
        )
    return refusals, notes


def _describe(entry: str, value) -> str:
    if isinstance(value, dict) and "count" in value:
        first = ", ".join(value.get("first", []))
        return f"{value['count']} images ({first}{', ...' if value['count'] > 3 else ''})"
    if entry == "weight_dtype":
        return value or "fp32"
    if entry in ("model_layout", "trained_parameters") and isinstance(value, str):
        return f"layout {value[:12]}"
    return json.dumps(value)


def refuse_incompatible(state_folder: Path, saved: dict, current: dict) -> list[str]:
    """ConfigError naming every refused change; otherwise the notes for the log."""
    refusals, notes = compare_fingerprints(saved, current)
    if refusals:
        raise ConfigError(
            f"key 'resume_from': the state {state_folder} cannot continue with this config, because\n  "
            + "\n  ".join(refusals)
            + "\nPut these keys back as they were, or start a new run (without resume_from)."
        )
    return notes


def changed_settings(saved_config: dict, config: TrainConfig) -> list[str]:
    """Config keys whose value differs from the state's config, for the log ('max_epochs 2 -> 4')."""
    now = config.model_dump(mode="json")
    changed = []
    for key in sorted(set(saved_config) | set(now)):
        if key == "resume_from" or saved_config.get(key) == now.get(key):
            continue
        changed.append(f"{key} {json.dumps(saved_config.get(key))} -> {json.dumps(now.get(key))}")
    return changed


# --- continuing ------------------------------------------------------------------------------------------


def resume_notes(
    state_folder: Path,
    saved: dict,
    fingerprint: dict,
    total_steps: int,
    config: TrainConfig,
    next_lrs: dict[str, float],
) -> list[str]:
    """Refuse, with a ConfigError naming the key, a state this config cannot continue; otherwise the notes on
    what changed, for the log."""
    step = saved["step"]
    notes = refuse_incompatible(state_folder, saved["fingerprint"], fingerprint)
    if step >= total_steps and run_finished(state_folder, saved, not config.no_save_ckpt):
        raise ConfigError(
            f"key 'resume_from': the state {state_folder} is at step {step} and this config trains "
            f"{total_steps} steps: nothing is left to train. Raise max_epochs or max_steps to go on."
        )
    changed = changed_settings(saved["config"], config)
    if changed:
        notes.append("changed since the state was saved (the new values apply): " + "; ".join(changed))
    if next_lrs != saved["next_lrs"]:

        def listed(lrs: dict) -> str:
            return ", ".join(f"{group} {lr:.4g}" for group, lr in lrs.items())

        notes.append(
            f"the LR schedule changed: from step {step + 1} on the run follows the new curve "
            f"(next LR {listed(next_lrs)}, was {listed(saved['next_lrs'])})"
        )
    return notes


def restore_training(state: TrainingState, parts: TrainingParts, resume_state: Path, run_dir: Path) -> Progress:
    """Weights, optimizer, LR position and grad scaler as the state left them; returns the run's progress, with
    the checkpoints its run folder holds up to the state's step."""
    for name, module in parts.trained.items():
        module.load_state_dict(state.weights[name])
    load_optimizer_state(parts.optimizer, state.optimizer)
    parts.lr_scheduler.load_state_dict(state.info["lr_scheduler"])
    if parts.scaler is not None and state.info["grad_scaler"]:
        parts.scaler.load_state_dict(state.info["grad_scaler"])
    progress = Progress.from_json(state.info["progress"])
    progress.checkpoints = saved_checkpoints(run_dir / "ckpts", state.step)
    progress.last_state = str(resume_state)
    return progress


def restore_run(
    state: TrainingState, parts: TrainingParts, saver: RunSaver, resume_state: Path
) -> tuple[Progress, Stop | None]:
    """Continue exactly where the state left off: weights, optimizer, LR position, grad scaler and EMA, the
    progress, the checkpoint a kill left unwritten (a failed write is the returned stop) and, last, this process's
    random generators (nothing may draw from them between here and the next step). Every process calls this."""
    say, config, accelerator = saver.say, saver.config, saver.accelerator
    progress = restore_training(state, parts, resume_state, saver.run_dir)
    ema_note = restore_average(parts.ema, state, parts.trained)
    if ema_note:
        say(f"note: {ema_note}")
    if saver.is_main:
        write_skipped_images(saver.data, progress.failed_images, saver.run_dir)
    global_batch = config.batch_size * config.grad_accum
    for line in resumed_lines(state, resume_state, saver.plan, accelerator.num_processes, global_batch):
        say(line)
    stop = None
    if checkpoint_missing(resume_state, state.info, single_file=not config.no_save_ckpt):
        say(f"the interrupted run was killed while writing the checkpoint of step {state.step}: writing it")
        stop = saver.rewrite_checkpoint(parts, progress)
    for warning in restore_process_rng(state, accelerator.process_index, saver.seed):
        say(f"warning: {warning}")
    return progress, stop


def load_optimizer_state(optimizer, saved: dict) -> None:
    """torch's load_state_dict also brings back the saved betas / eps / weight decay; the new config's
    values are put back, as for every other setting that may change on resume."""
    configured = [
        {key: group[key] for key in CONFIGURED_HYPERPARAMETERS if key in group} for group in optimizer.param_groups
    ]
    optimizer.load_state_dict(saved)
    for group, values in zip(optimizer.param_groups, configured, strict=True):
        group.update(values)


def restore_process_rng(state: TrainingState, rank: int, seed: int) -> list[str]:
    """Each process takes back its own generators (restored last: nothing may draw from them before the next
    step); a process the state has none for starts fresh ones. Returns warnings."""
    saved = state.rng["processes"]
    if rank >= len(saved):
        seed_everything(seed + rank + 1_000_003 * state.step)
        return []
    return restore_rng(saved[rank])


def resumed_lines(state: TrainingState, folder: Path, plan, num_processes: int, images_per_process_step: int):
    """What the log says on resuming: where the run continues, and what another process count changes."""
    epoch = plan.epoch_of(state.step)
    step_in_epoch = state.step - plan.first_step_of(epoch)
    lines = [
        f"resumed from {folder}: step {state.step} of {plan.total_steps}, epoch {epoch + 1} with "
        f"{step_in_epoch} of its {plan.steps_in_epoch(epoch)} steps done"
    ]
    note = process_count_note(state.info, num_processes, images_per_process_step, plan.steps_per_epoch, state.step)
    return lines + ([note] if note else [])


def process_count_note(
    info: dict, num_processes: int, images_per_process_step: int, steps_per_epoch: int, step: int
) -> str | None:
    """Another number of processes deals the epoch's batches out differently and changes the global batch and
    the steps per epoch: the run goes on from the same step number, but not with the batches, noise and epoch
    position the interrupted run would have had."""
    before = info["num_processes"]
    if before == num_processes:
        return None
    return (
        f"note: the state was saved by {before} process(es) and this run has {num_processes}: a step now trains "
        f"{num_processes * images_per_process_step} images instead of {before * images_per_process_step}, an "
        f"epoch has {steps_per_epoch} steps instead of {info['steps_per_epoch']} (step {step} was epoch "
        f"{info['epoch'] + 1} step {info['step_in_epoch']}), and the data order and noise from here on differ "
        f"from what the interrupted run would have drawn"
    )


def find_state_to_resume(config: TrainConfig, is_main: bool, say) -> tuple[Path | None, dict | None]:
    """resume_from: the state to continue and its trainer_state.json (None, None for a new run). The main process
    alone looks (it may set a damaged state aside), then tells the others."""
    state, notes = agreed(locate_state(config) if is_main else None)
    for note in notes:
        say(note)
    return (state, read_trainer_state(state)) if state else (None, None)


def run_finished(state_folder: Path, info: dict, single_file: bool) -> bool:
    """Whether the run of a state at its last step wrote its end: the final checkpoint and run_summary.json (a kill
    after the final save, during the last samples, leaves a run whose resume only writes what its end writes)."""
    run_dir = run_dir_of(state_folder)
    summary = run_dir / "run_summary.json" if run_dir else None
    ended = summary is None or (
        summary.is_file() and json.loads(summary.read_text())["steps"] >= state_step(state_folder)
    )
    return ended and not checkpoint_missing(state_folder, info, single_file)


def checkpoint_missing(state_folder: Path, info: dict, single_file: bool) -> bool:
    """Whether the state was saved as the first half of a checkpoint save whose checkpoint is not complete in
    the run folder: a kill during the checkpoint write leaves only a temporary folder or file (and a kill between
    the two formats, the diffusers folder without its single file)."""
    run_dir = run_dir_of(state_folder)
    if not info.get("checkpoint_follows") or run_dir is None:
        return False
    step = state_step(state_folder)
    return not any(
        entry["step"] == step and ("single_file" in entry or not single_file)
        for entry in saved_checkpoints(run_dir / "ckpts", step)
    )
