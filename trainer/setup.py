"""The pieces a run is built from, as small functions the Trainer calls in order: the accelerator and seed, the
run folder, the model and optimizer ready for the accelerator, the validators, the data report, the fingerprint
that resuming checks. Nothing here trains."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.loader import assign_buckets
from data.plan import RunPlan
from data.prepare import PreparedData, as_validation_item, prepare_data
from optimizer.lr import Schedules, build_lr_scheduler, plan_schedule
from optimizer.optimizers import build_optimizer, model_param_groups
from optimizer.preview import epoch_steps_text
from trainer.diffusion import vae_dtype
from trainer.memory_forecast import run_start_report
from trainer.model import (
    SDModel,
    compile_unet,
    configure_for_training,
    load_model,
    trained_weight_dtype,
    use_tf32,
)
from trainer.resume import (
    find_state_to_resume,
    images_fingerprint,
    model_layout,
    project_run_dirs,
    run_dir_of,
    trained_parameters,
)
from trainer.saving import RunSaver, write_json, write_skipped_images
from trainer.step import agreed
from trainer.validation import StabilizedLoss, validation_sets
from utils.config import ConfigError, TrainConfig
from utils.disk import SaveSizes, check_writable, disk_space_note, estimate_save_sizes
from utils.launch import launched_processes
from utils.metrics import RunLogger, start_wandb
from utils.run_lock import RunLock
from utils.state import remove_leftovers, seed_everything, trim_metrics


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def launched_on_cpus() -> bool:
    """`accelerate launch --num_processes N` on a machine without a GPU (CI, a laptop): the processes train on
    the CPU over gloo. accelerate forms that group only when it is told to use the CPU."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def refuse_sharded_training() -> None:
    """FSDP and DeepSpeed shard the weights or the optimizer state across the processes; the saves, validation,
    samples and exact resume here read whole models from the main process, as DDP keeps them."""
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "false").lower() in ("1", "true"):
            raise ConfigError(
                f"accelerate launch is set up for {name} (your accelerate config's distributed_type, or "
                f"--use_{name.lower()}), which EveryCycle does not support: it trains data-parallel (DDP), every "
                f"process holding the whole model. SD 1.x / 2.x fit one 12 GB GPU that way with optimizer "
                f"adamw8bit, gradient_checkpointing and a frozen text encoder. Launch with `accelerate launch "
                f"--multi_gpu --num_processes N train.py ...`, or run `accelerate config` and choose multi-GPU."
            )


def make_accelerator(config: TrainConfig) -> Accelerator:
    refuse_sharded_training()
    if config.deterministic:  # before CUDA starts: cuBLAS reads its workspace setting then
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)  # ops without a deterministic kernel warn, not fail
    return Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision), cpu=launched_on_cpus())


def resolve_num_workers(setting: int, device: torch.device, num_processes: int, batches_per_epoch: int) -> int:
    """num_workers -1 (auto): on CUDA, enough DataLoader workers that the GPU does not wait for image decoding:
    min(8, this process's share of the CPUs less one for itself, the batches of an epoch: more would only take
    longer to start); on the CPU none, as the workers would take cores from the training itself."""
    if setting >= 0:
        return setting
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // num_processes - 1, batches_per_epoch))


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randrange(2**31) if seed == -1 else seed


def seed_and_resume_state(config: TrainConfig, accelerator: Accelerator, say) -> tuple[int, Path | None, dict | None]:
    """The run's seed, the state it continues and that state's trainer_state.json (None, None for a new run). A
    continued run keeps the seed the interrupted one drew for seed -1. Each process then draws its own noise and
    timesteps (seed + rank); the data order comes from the seed alone."""
    seed = agreed(resolve_seed(config.seed))
    resume_state, saved = find_state_to_resume(config, accelerator.is_main_process, say)
    if saved and config.seed == -1:
        seed = saved["seed"]
    seed_everything(seed + accelerator.process_index)
    return seed, resume_state, saved


def create_new_run_dir(logdir: Path, name: str) -> Path:
    """`<logdir>/<name>-<YYYYMMDD-HHMMSS>[-n]`, created here: mkdir fails when the folder exists, so two runs
    started in the same second get two folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in itertools.count():
        run_dir = logdir / (f"{name}-{stamp}" + (f"-{suffix}" if suffix else ""))
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def claim_run_dir(
    config: TrainConfig, resume_state: Path | None, run_dir: Path | None, run_name: str | None, accelerator: Accelerator
) -> tuple[Path, RunLock | None]:
    """The run folder, created and locked by the main process: a resumed run's own folder (where what a killed
    save left is removed once the lock is held), the folder asked for, or a new one. The outcome, a folder or the
    error that refused it (in use, a full disk), is told to every process, so all of them go on or raise alike."""
    folder, lock, error = None, None, None
    if accelerator.is_main_process:
        try:
            folder, lock = lock_run_dir(config, resume_state, run_dir, run_name)
        except (ConfigError, OSError) as refused:
            error = refused
    folder, error = agreed((folder, error))
    if error:
        raise error
    return folder, lock


def lock_run_dir(
    config: TrainConfig, resume_state: Path | None, run_dir: Path | None, run_name: str | None
) -> tuple[Path, RunLock]:
    continued = run_dir_of(resume_state) if resume_state else None
    if continued or run_dir:
        folder = Path(continued or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lock = RunLock(folder, shlex.join(sys.argv)).acquire()
    else:
        remove_abandoned_leftovers(config)
        folder = create_new_run_dir(Path(config.logdir), run_name or config.project_name)
        try:
            lock = RunLock(folder, shlex.join(sys.argv)).acquire()
        except OSError:  # a full disk: the new, empty folder goes too
            shutil.rmtree(folder, ignore_errors=True)
            raise
    for leftover in remove_leftovers(folder) if continued else []:
        tqdm.write(f"removed {leftover}, left by a save that was killed")
    return folder, lock


def remove_abandoned_leftovers(config: TrainConfig) -> None:
    """A run killed during its first state write leaves a temporary folder in a run folder that `latest` never
    continues (it holds no complete state): a new run of the project removes it, from every folder no run holds."""
    for folder in project_run_dirs(config.logdir, config.project_name):
        try:
            lock = RunLock(folder, "cleaning up").acquire()
        except (ConfigError, OSError):
            continue  # in use by a running run, or unwritable: left as it is
        try:
            for leftover in remove_leftovers(folder):
                tqdm.write(f"removed {leftover}, left by a save that was killed")
        finally:
            lock.release()


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_parts(model: SDModel, accelerator: Accelerator, config: TrainConfig) -> None:
    """Frozen parts run in the low-precision dtype (less memory, faster); trained parts stay fp32 masters unless
    weight_dtype is bf16. The trained parts go to the device before the optimizer is built: AdamW is fused only
    when it is given CUDA parameters (accelerator.prepare would move them only after it was built)."""
    dtype = weight_dtype_of(accelerator)
    model.vae.to(accelerator.device, dtype=vae_dtype(model, dtype))  # SDXL's VAE: never fp16
    for name, encoder in model.text_encoders().items():
        if name not in config.trained_text_encoders:
            encoder.to(accelerator.device, dtype=dtype)
    for name in config.trained_parts:
        getattr(model, name).to(accelerator.device, dtype=trained_weight_dtype(config))


def check_memory_recipes(config: TrainConfig, accelerator: Accelerator) -> None:
    """What the fused backward pass and bf16 weights need of the launch (utils/config.py checks the rest)."""
    if config.fused_backward_pass and accelerator.num_processes > 1:
        raise ConfigError(
            f"key 'fused_backward_pass': this run has {accelerator.num_processes} processes, and DDP averages the "
            f"gradients across them only after the backward, while the fused pass updates each weight inside it "
            f"(from this process's gradient alone). Launch one process, or turn fused_backward_pass off."
        )
    if accelerator.mixed_precision == "fp16" and (config.fused_backward_pass or config.weight_dtype == "bf16"):
        key = "fused_backward_pass" if config.fused_backward_pass else "weight_dtype"
        raise ConfigError(
            f"key '{key}': mixed_precision resolved to fp16 (mixed_precision auto on a GPU without bf16, or fp16), "
            f"whose gradient scaler must see every gradient before any update and does not take bf16 gradients. "
            f"Use a GPU with bf16 and mixed_precision bf16, or turn {key} off."
        )


def prepare_for_accelerator(model: SDModel, optimizer, accelerator: Accelerator, config: TrainConfig):
    """Wrap the trained parts (DDP when launched on several processes) and the optimizer; returns the optimizer
    and the trained modules as the loop uses them. The LR scheduler is deliberately not prepared: ours is a pure
    function of the optimizer step, and accelerate would step it once per process."""
    if config.disable_unet_training:
        model.unet.to(accelerator.device, dtype=weight_dtype_of(accelerator))
    else:
        model.unet = accelerator.prepare(model.unet)
    if config.torch_compile:
        model.unet = compile_unet(model.unet)
    for name in config.trained_text_encoders:
        setattr(model, name, accelerator.prepare(getattr(model, name)))
    return accelerator.prepare(optimizer), [getattr(model, name) for name in config.trained_parts]


def build_model_and_optimizer(config: TrainConfig, accelerator: Accelerator, schedules: Schedules, say):
    """The model loaded and placed, the optimizer over its trained parts and the LR scheduler, all prepared for
    the accelerator: (model, optimizer, lr_scheduler, trained modules)."""
    check_memory_recipes(config, accelerator)  # before minutes of loading
    notes: list[str] = []
    with accelerator.local_main_process_first():  # one process per machine builds a cached model first
        model = load_model(config, notes)
    for note in config.notes + notes:
        say(f"note: {note}")
    use_tf32(accelerator.device, config.allow_tf32)
    configure_for_training(model, config)
    place_parts(model, accelerator, config)
    # The Trainer seeded torch with seed + process index; the main process's seed is the run's, and stochastic
    # rounding must round alike on every process (their weights stay equal).
    seed = agreed(torch.initial_seed()) if config.stochastic_rounding else 0
    groups = model_param_groups(config, model.unet, model.text_encoder, model.text_encoder_2)
    optimizer = build_optimizer(config, groups, seed)
    lr_scheduler = build_lr_scheduler(optimizer, schedules)
    optimizer, trained_modules = prepare_for_accelerator(model, optimizer, accelerator, config)
    return model, optimizer, lr_scheduler, trained_modules


def unwrapped(model: SDModel, accelerator: Accelerator) -> SDModel:
    """The model with its accelerate/DDP and torch.compile wrappers removed, for inference and saving (plain
    state-dict keys, no `_orig_mod.`)."""

    def unwrap(module):
        return accelerator.unwrap_model(module, keep_torch_compile=False)

    # replace: the tokenizers and the other fields stay with the model
    return dataclasses.replace(model, **{name: unwrap(part) for name, part in model.trainable_parts().items()})


def stabilized_loss(model: SDModel, config: TrainConfig, items) -> StabilizedLoss:
    settings = config.validation
    return StabilizedLoss(
        model,
        items,
        config.resolution,
        settings.batch_size or config.batch_size,
        settings.timesteps,
        settings.seed,
        config.clip_skip,
    )


def build_validators(model: SDModel, config: TrainConfig, data: PreparedData, ema: bool) -> dict[str, StabilizedLoss]:
    """What a validation pass scores, by name (trainer/validation.py `validation_sets`): the held-out validation
    loss ("val", none without a split; "val_ema" too with an EMA and ema_validate), ED2's extra manual validation
    sets (loss/<name>) and the stabilized training subset (loss/stabilize-train): the same fixed-noise measurement
    on other images."""
    settings = config.validation
    held_out = stabilized_loss(model, config, data.val) if data.val else None
    extras = {}
    if settings.enabled:
        extras = {name: stabilized_loss(model, config, items) for name, items in data.extra_validation.items()}
    if settings.enabled and settings.stabilize_training_loss:
        count = max(1, round(len(data.train) * settings.stabilize_split_proportion))
        subset = sorted(random.Random(settings.seed).sample(data.train, count), key=lambda i: i.path)
        extras["stabilize-train"] = stabilized_loss(model, config, [as_validation_item(i) for i in subset])
    return validation_sets(held_out, extras, ema_validate=ema and config.ema_validate)


def undersized_images(data: PreparedData, resolution: int) -> list[str]:
    """Images smaller than their bucket (they are upscaled, so blurrier), one line each."""
    items = data.train + data.val
    found = []
    for item, (width, height) in zip(items, assign_buckets(items, resolution), strict=True):
        if item.width < width or item.height < height:
            found.append(f"{item.path} ({item.width}x{item.height}, bucket {width}x{height})")
    return found


def save_sizes(model: SDModel, trained: dict[str, torch.nn.Module], config: TrainConfig, epochs: int) -> SaveSizes:
    trained_count = sum(p.numel() for module in trained.values() for p in module.parameters())
    parts = [model.vae, *model.trainable_parts().values()]  # every part a checkpoint holds (SDXL: both encoders)
    everything = sum(p.numel() for part in parts for p in part.parameters())
    every = config.save_every_n_epochs
    checkpoints = 1 + ((epochs - 1) // every if every else 0)
    return estimate_save_sizes(
        trained_count,
        everything,
        config.optimizer,
        config.save_state_keep,
        checkpoints,
        single_file=not config.no_save_ckpt,
        half=not config.save_full_precision,
    )


def run_fingerprint(
    config: TrainConfig,
    model: SDModel,
    trained: dict[str, torch.nn.Module],
    data: PreparedData,
    seed: int,
    mixed_precision: str,
) -> dict:
    """What must not change when this run is resumed (trainer/resume.py refuses a change)."""
    roots = [config.data_root] + [config.validation.manual_data_root or config.data_root]
    return {
        "model_source": config.resume_ckpt,
        "model_layout": model_layout({"unet": model.unet, "text_encoder": model.text_encoder}, model.prediction_type),
        "trained_parameters": trained_parameters(trained),
        "optimizer": config.optimizer,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "resolution": config.resolution,
        "seed": seed,
        "rated_epochs": (
            [config.max_epochs, config.rated_dataset_target_dropout_percent] if config.rated_dataset else None
        ),
        "train_images": images_fingerprint(data.train, roots),
        "validation_images": images_fingerprint(data.val, roots),
        "mixed_precision": mixed_precision,
        "weight_dtype": None if config.weight_dtype == "fp32" else config.weight_dtype,  # None: as older states
    }


def prepare_and_plan(
    config: TrainConfig, accelerator: Accelerator, seed: int, say
) -> tuple[PreparedData, RunPlan, Schedules, int]:
    """The data, the steps (of the whole group of processes), the LR schedule and the loader's workers, said
    before any model loads."""
    data = prepare_data(config)
    say(data.summary())
    batches = data.epoch_batches_per_process(accelerator.num_processes)
    plan, schedules, notes = plan_schedule(config, batches)
    num_workers = resolve_num_workers(config.num_workers, accelerator.device, accelerator.num_processes, max(batches))
    lines = [
        f"run: {epoch_steps_text(plan)} steps per epoch, {plan.total_steps} steps, {plan.epochs} epochs, seed "
        f"{seed}, precision {accelerator.mixed_precision}"
    ]
    if accelerator.num_processes > 1:
        lines.append(data.global_batch_line(accelerator.num_processes, config.grad_accum))
    if config.num_workers == -1 and num_workers:
        lines.append(f"data loading: {num_workers} worker processes per GPU (num_workers -1, auto)")
    lines += run_start_report(config, data.batches.item_buckets, accelerator)  # the memory forecast, on CUDA
    for line in notes + lines:
        say(line)
    return data, plan, schedules, num_workers


def check_output_folders(config: TrainConfig) -> None:
    """A clear error naming the folder now, rather than a crash at the first save hours later (the run folder
    itself is created only when the run can start)."""
    check_writable(Path(config.logdir), "logdir")
    if config.save_ckpt_dir:
        check_writable(Path(config.save_ckpt_dir), "save_ckpt_dir")


def report_data_problems(data: PreparedData, resolution: int, run_dir: Path, is_main: bool, say) -> None:
    """Skipped images, caption warnings and undersized images: in the start summary and in the run folder
    (skipped_images.txt, data_warnings.txt)."""
    for skipped in data.skipped:
        say(f"skipped {skipped.path}: {skipped.reason}")
    undersized = undersized_images(data, resolution)
    if undersized:
        say(
            f"warning: {len(undersized)} image(s) smaller than their bucket will be upscaled (blurrier): "
            + ", ".join(undersized[:5])
            + (", ..." if len(undersized) > 5 else "")
            + " (all in data_warnings.txt)"
        )
    warnings = list(data.warnings) + [f"undersized (upscaled to its bucket): {line}" for line in undersized]
    if is_main:
        write_skipped_images(data, [], run_dir)
        if warnings:
            (run_dir / "data_warnings.txt").write_text("\n".join(warnings) + "\n", encoding="utf-8")


def open_logs(run_dir: Path, config: TrainConfig, is_main: bool, resumed_step: int | None, say) -> RunLogger:
    """metrics.csv and TensorBoard (and Weights & Biases with `wandb`); a resumed run first drops what its
    interrupted run logged after the state, so that every step appears once."""
    settings = config.model_dump(mode="json")
    wandb_run = start_wandb(run_dir, config.project_name, settings) if config.wandb and is_main else None
    if resumed_step is None:
        return RunLogger(run_dir, enabled=is_main, wandb_run=wandb_run)
    dropped = trim_metrics(run_dir / "metrics.csv", resumed_step) if is_main else 0
    if dropped:
        say(f"metrics.csv: dropped {dropped} row(s) that the interrupted run logged after step {resumed_step}")
    return RunLogger(run_dir, enabled=is_main, purge_step=resumed_step + 1, wandb_run=wandb_run)


def write_run_start(saver: RunSaver, run_lock: RunLock | None, sizes: SaveSizes, resumed_step: int | None) -> RunLogger:
    """The first writes into the claimed run folder: config.json, the data report, the disk note, the opened logs.
    A full disk here removes a new run's folder (a resumed one keeps what it had) and raises."""
    run_dir, config, is_main, say = saver.run_dir, saver.config, saver.is_main, saver.say
    try:
        if is_main:
            write_json(run_dir / "config.json", {**config.model_dump(mode="json"), "seed": saver.seed})
        report_data_problems(saver.data, config.resolution, run_dir, is_main, say)
        say(disk_space_note(sizes, run_dir))
        return open_logs(run_dir, config, is_main, resumed_step, say)
    except OSError:
        if run_lock:
            run_lock.release()
        if is_main and resumed_step is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
