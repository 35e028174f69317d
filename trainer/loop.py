"""The training loop, top to bottom: set up, then for each optimizer step: batch, loss, backward, step,
schedule; every so often: validation, samples, checkpoints, logs."""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from tqdm.auto import tqdm

from data.images import ImageLoadError, SkippedImage, scan_images, write_skipped_report
from data.loader import ImageBatchDataset, assign_buckets, make_loader
from data.prepare import PreparedData, as_validation_item, prepare_data
from optimizer.lr import build_lr_scheduler, current_lrs, plan_schedule
from optimizer.optimizers import build_optimizer, model_param_groups
from trainer.cache import TrainingCaches, build_caches
from trainer.diffusion import training_loss
from trainer.model import SDModel, compile_unet, configure_for_training, load_model, use_tf32
from trainer.resume import (changed_settings, images_fingerprint, locate_state, model_layout, refuse_incompatible,
                            run_dir_of, trained_parameters)
from trainer.safety import (SaveSizes, Stop, check_writable, disk_space_note, estimate_save_sizes, launched_processes,
                            resume_command, stop_signals_handled)
from trainer.sampling import make_samples, read_prompts, samples_due
from trainer.validation import StabilizedLoss
from utils.checkpoint import checkpoint_name, copy_atomic, save_checkpoint, saved_checkpoints
from utils.config import ConfigError, TrainConfig
from utils.metrics import RunLogger
from utils.plots import plot_losses, plot_lr
from utils.state import (STATE_FOLDER, TrainingState, capture_rng, prune_states, read_state, read_trainer_state,
                         remove_leftovers, restore_rng, state_folder_name, trim_metrics, write_state)

# Optimizer hyperparameters the config sets: after loading a state, the new config's values win.
CONFIGURED_HYPERPARAMETERS = ("betas", "eps", "weight_decay")


@dataclass
class Progress:
    """Where the run is, and what it has measured so far; saved in every state (the clocks excepted)."""

    global_step: int = 0
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    skipped_updates: list[tuple[int, str]] = field(default_factory=list)  # (step, why the update was skipped)
    nonfinite_in_a_row: int = 0
    failed_images: list[tuple[int, str, str]] = field(default_factory=list)  # (step, path, reason): load failures
    last_state: Optional[str] = None
    last_save_time: float = field(default_factory=time.monotonic)
    last_state_time: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict:
        """The checkpoints are left out: a resumed run lists the ones in its ckpts folder."""
        return {key: value for key, value in asdict(self).items()
                if key != "checkpoints" and not key.endswith("_time")}

    @classmethod
    def from_json(cls, data: dict) -> "Progress":
        pairs = ("val_losses", "train_losses", "skipped_updates", "failed_images")
        return cls(**{**data, **{key: [tuple(entry) for entry in data[key]] for key in pairs}})


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
                f"--multi_gpu --num_processes N train.py ...`, or run `accelerate config` and choose multi-GPU.")


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randrange(2**31) if seed == -1 else seed


def agreed(value):
    """The main process's `value` on every process: what is picked once (a run folder name, a random seed, the
    state to resume) must be the same everywhere. (accelerate's collectives return their input on one process.)"""
    return broadcast_object_list([value], from_process=0)[0]


def first_stop(stop: Optional[Stop]) -> Optional[Stop]:
    """The stop request of the lowest process that has one (a signal may reach the processes one by one)."""
    return next((request for request in gather_object([stop]) if request is not None), None)


def trained_part_names(config: TrainConfig) -> list[str]:
    """The parts of the model whose weights train."""
    return ([] if config.disable_unet_training else ["unet"]) + (["text_encoder"] if config.train_text_encoder else [])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_frozen_parts(model: SDModel, accelerator: Accelerator, train_text_encoder: bool) -> None:
    """Frozen parts run in the low-precision dtype (less memory, faster); trained parts stay fp32 masters."""
    dtype = weight_dtype_of(accelerator)
    model.vae.to(accelerator.device, dtype=dtype)
    if not train_text_encoder:
        model.text_encoder.to(accelerator.device, dtype=dtype)


def optimizer_step(model, micro_batches, optimizer, accelerator, config, trained_modules,
                   skip_nonfinite: bool = False) -> float:
    """Accumulate the micro-batches' gradients (averaged, not summed), clip, step. Returns the mean loss.

    With `skip_nonfinite`, a NaN/inf loss is caught before its backward (which would poison every weight):
    the gradients are zeroed, the weights stay as they were, and the non-finite loss is returned."""
    total = 0.0
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with contextlib.ExitStack() as stack:
            if not is_last:  # gradients are all-reduced once per step, not per micro-batch
                for module in trained_modules:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                loss = training_loss(model, batch, config, accelerator.device)
            # The loss is read once: with skip_nonfinite before the backward (to skip it), and that same value is
            # summed, so no second read makes the CPU wait for the backward (it loads the next batch meanwhile).
            value = loss.item() if skip_nonfinite else None
            if skip_nonfinite and not finite_everywhere(accelerator, value):
                optimizer.zero_grad(set_to_none=True)
                return math.nan
            accelerator.backward(loss / len(micro_batches))
        total += value if value is not None else loss.detach().item()
    if config.clip_grad_norm:
        for module in trained_modules:
            accelerator.clip_grad_norm_(module.parameters(), config.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)


def finite_everywhere(accelerator: Accelerator, loss: float) -> bool:
    """Whether the loss is finite on every process. They skip an update together or not at all: a process that
    skipped its backward would leave the others waiting in the gradient all-reduce."""
    bad = 0.0 if math.isfinite(loss) else 1.0
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(torch.tensor([bad], device=accelerator.device), "sum").item()
    return bad == 0


def fewest_everywhere(accelerator: Accelerator, count: int) -> int:
    """The smallest `count` of all processes (each must run as many forward/backward passes as the others)."""
    if accelerator.num_processes == 1:
        return count
    counts = accelerator.gather(torch.tensor([count], device=accelerator.device))
    return int(counts.min().item())


def new_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.logdir) / f"{config.project_name}-{stamp}"
    suffix = 1
    while run_dir.exists():  # two runs started in the same second
        run_dir = Path(config.logdir) / f"{config.project_name}-{stamp}-{suffix}"
        suffix += 1
    return run_dir


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


class Trainer:
    """Holds what a run needs between steps; `run()` is the story."""

    def __init__(self, config: TrainConfig, run_dir: Optional[Path] = None, stop_at_step: Optional[int] = None):
        """`stop_at_step`: stop after that step as if a SIGTERM had come during it (the tests' kill)."""
        self.config = config
        refuse_sharded_training()
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision),
                                       cpu=launched_on_cpus())
        self.is_main = self.accelerator.is_main_process
        self.seed = agreed(resolve_seed(config.seed))
        self.run_dir = agreed(Path(run_dir) if run_dir else new_run_dir(config))
        self.progress = Progress()
        self.resume_state: Optional[Path] = None  # the state folder this run continues
        self.stop: Optional[Stop] = None  # agreed by every process: the run stops after the current step
        self.stop_requested: Optional[Stop] = None  # asked on this process; becomes `stop` at the step's end
        self.saves_due = (False, False)  # (checkpoint, state) timed saves, agreed at the step's end
        self.stop_at_step = stop_at_step

    # --- set-up -------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def set_up(self) -> None:
        config = self.config
        # Each process draws its own noise and timesteps; the data order comes from the seed alone.
        seed_everything(self.seed + self.accelerator.process_index)
        self._check_output_folders()
        self._plan_the_run()
        self._build_model_and_optimizer()
        self.fingerprint = self._fingerprint()
        if self.resume_state:
            self._check_resume_compatible()  # before anything in the run folder changes
        if self.is_main:
            write_json(self.run_dir / "config.json", {**config.model_dump(mode="json"), "seed": self.seed})
        self._report_data_problems()
        self.say(disk_space_note(self._save_sizes(), self.run_dir))
        self.logger = self._open_logs()
        self.validator = self._build_validator()
        self.extra_validators = self._build_extra_validators()
        self.sample_prompts = (read_prompts(config.sample_prompts, self.data.train + self.data.val)
                               if config.sample_prompts else [])
        # Last: the validators above still encode with the VAE the latent cache may move off the device.
        self.caches: TrainingCaches = build_caches(config, self.data.train, self.data.batches.item_buckets,
                                                   self.unwrapped_model(), self.accelerator, self.say, self.num_workers)

    def _plan_the_run(self) -> None:
        """The data, the steps (of the whole group of processes) and the LR schedule, said before any model loads."""
        config, processes = self.config, self.accelerator.num_processes
        self.data: PreparedData = prepare_data(config)
        self.say(self.data.summary())
        batches = self.data.batches_per_process(processes)
        self.plan, self.schedules, notes = plan_schedule(config, batches)
        for note in notes:
            self.say(note)
        self.say(f"run: {self.plan.steps_per_epoch} steps per epoch, {self.plan.total_steps} steps, "
                 f"{self.plan.epochs} epochs, seed {self.seed}, precision {self.accelerator.mixed_precision}")
        if processes > 1:
            self.say(self.data.global_batch_line(processes, config.grad_accum))
        self.num_workers = resolve_num_workers(config.num_workers, self.accelerator.device, processes, batches)
        if config.num_workers == -1 and self.num_workers:
            self.say(f"data loading: {self.num_workers} worker processes per GPU (num_workers -1, auto)")

    def _build_model_and_optimizer(self) -> None:
        config, device = self.config, self.accelerator.device
        model_notes: list[str] = []
        with self.accelerator.local_main_process_first():  # one process per machine builds a cached model first
            self.model = load_model(config, model_notes)
        for note in config.notes + model_notes:
            self.say(f"note: {note}")
        use_tf32(device, config.allow_tf32)
        configure_for_training(self.model, config)
        place_frozen_parts(self.model, self.accelerator, config.train_text_encoder)
        # The trained parts go to the device before the optimizer is built, in fp32: AdamW is fused only when it
        # is given CUDA parameters (accelerator.prepare below would move them only after it was built).
        for name in trained_part_names(config):
            getattr(self.model, name).to(device)
        self.optimizer = build_optimizer(config, model_param_groups(config, self.model.unet, self.model.text_encoder))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.schedules, config.lr_cycle_momentum)
        self._prepare_for_accelerator()

    def _prepare_for_accelerator(self) -> None:
        accelerator, model, config = self.accelerator, self.model, self.config
        if config.disable_unet_training:
            model.unet.to(accelerator.device, dtype=weight_dtype_of(accelerator))
        else:
            model.unet = accelerator.prepare(model.unet)
        if config.torch_compile:
            model.unet = compile_unet(model.unet)
        if config.train_text_encoder:
            model.text_encoder = accelerator.prepare(model.text_encoder)
        self.optimizer = accelerator.prepare(self.optimizer)
        self.trained_modules = [getattr(model, name) for name in trained_part_names(config)]
        # The LR scheduler is deliberately not prepared: ours is a pure function of the optimizer step,
        # and accelerate would step it once per process.

    def _build_validator(self) -> Optional[StabilizedLoss]:
        return self._stabilized_loss(self.data.val) if self.data.val else None

    def _stabilized_loss(self, items) -> StabilizedLoss:
        settings = self.config.validation
        return StabilizedLoss(self.unwrapped_model(), items, self.config.resolution,
                              settings.batch_size or self.config.batch_size, settings.timesteps,
                              settings.seed, self.config.clip_skip)

    def _build_extra_validators(self) -> dict[str, StabilizedLoss]:
        """ED2's extra manual validation sets (loss/<name>) and the stabilized training subset
        (loss/stabilize-train): the same fixed-noise measurement on other images."""
        settings = self.config.validation
        if not settings.enabled:
            return {}
        extras = {name: self._stabilized_loss([as_validation_item(i) for i in scan_images(Path(folder)).items])
                  for name, folder in settings.extra_manual_datasets.items()}
        if settings.stabilize_training_loss:
            count = max(1, round(len(self.data.train) * settings.stabilize_split_proportion))
            subset = sorted(random.Random(settings.seed).sample(self.data.train, count), key=lambda i: i.path)
            extras["stabilize-train"] = self._stabilized_loss([as_validation_item(i) for i in subset])
        return extras

    def _check_output_folders(self) -> None:
        """A clear error naming the folder now, rather than a crash at the first save hours later."""
        if self.is_main:
            check_writable(self.run_dir, "logdir")
            if self.config.save_ckpt_dir:
                check_writable(Path(self.config.save_ckpt_dir), "save_ckpt_dir")

    def _report_data_problems(self) -> None:
        """Skipped images, caption warnings and undersized images: in the start summary and in the run folder
        (skipped_images.txt, data_warnings.txt)."""
        for skipped in self.data.skipped:
            self.say(f"skipped {skipped.path}: {skipped.reason}")
        undersized = self._undersized_images()
        if undersized:
            self.say(f"warning: {len(undersized)} image(s) smaller than their bucket will be upscaled (blurrier): "
                     + ", ".join(undersized[:5]) + (", ..." if len(undersized) > 5 else "")
                     + " (all in data_warnings.txt)")
        warnings = list(self.data.warnings) + [f"undersized (upscaled to its bucket): {line}" for line in undersized]
        if self.is_main:
            self._write_skipped_report()
            if warnings:
                (self.run_dir / "data_warnings.txt").write_text("\n".join(warnings) + "\n", encoding="utf-8")

    def _undersized_images(self) -> list[str]:
        items = self.data.train + self.data.val
        found = []
        for item, (width, height) in zip(items, assign_buckets(items, self.config.resolution)):
            if item.width < width or item.height < height:
                found.append(f"{item.path} ({item.width}x{item.height}, bucket {width}x{height})")
        return found

    def _write_skipped_report(self) -> None:
        """Images skipped by the scan, then those that failed to load during training (with the step)."""
        failed = [SkippedImage(Path(path), f"failed to load at step {step}: {reason}")
                  for step, path, reason in self.progress.failed_images]
        if self.data.skipped or failed:
            write_skipped_report(list(self.data.skipped) + failed, self.run_dir / "skipped_images.txt")

    def _save_sizes(self) -> SaveSizes:
        model, config = self.unwrapped_model(), self.config
        trained = sum(p.numel() for module in self.trained_models().values() for p in module.parameters())
        everything = sum(p.numel() for part in (model.unet, model.vae, model.text_encoder) for p in part.parameters())
        every = config.save_every_n_epochs
        checkpoints = 1 + ((self.plan.epochs - 1) // every if every else 0)
        return estimate_save_sizes(trained, everything, config.optimizer, config.save_state_keep, checkpoints,
                                   single_file=not config.no_save_ckpt, half=not config.save_full_precision)

    def _open_logs(self) -> RunLogger:
        """metrics.csv and TensorBoard; a resumed run first drops what its interrupted run logged after the
        state, so that every step appears once."""
        if not self.resume_state:
            return RunLogger(self.run_dir, enabled=self.is_main)
        step = self.saved["step"]
        dropped = trim_metrics(self.run_dir / "metrics.csv", step) if self.is_main else 0
        if dropped:
            self.say(f"metrics.csv: dropped {dropped} row(s) that the interrupted run logged after step {step}")
        return RunLogger(self.run_dir, enabled=self.is_main, purge_step=step + 1)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models whose weights train, unwrapped, by name."""
        model = self.unwrapped_model()
        return {name: getattr(model, name) for name in trained_part_names(self.config)}

    def _fingerprint(self) -> dict:
        """What must not change when this run is resumed (trainer/resume.py refuses a change)."""
        config, model = self.config, self.unwrapped_model()
        roots = [config.data_root] + [config.validation.manual_data_root or config.data_root]
        return {
            "model_source": config.resume_ckpt,
            "model_layout": model_layout({"unet": model.unet, "text_encoder": model.text_encoder},
                                         model.prediction_type),
            "trained_parameters": trained_parameters(self.trained_models()),
            "optimizer": config.optimizer,
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "resolution": config.resolution,
            "seed": self.seed,
            "train_images": images_fingerprint(self.data.train, roots),
            "validation_images": images_fingerprint(self.data.val, roots),
            "mixed_precision": self.accelerator.mixed_precision,
        }

    # --- resuming ------------------------------------------------------------------------------------
    def _find_state_to_resume(self) -> None:
        """resume_from: the state to continue, and with it the run folder to keep writing into."""
        # The main process alone looks (it may set a damaged state aside), then tells the others.
        self.resume_state, notes = agreed(locate_state(self.config) if self.is_main else None)
        for note in notes:
            self.say(note)
        if self.resume_state is None:
            return
        self.saved = read_trainer_state(self.resume_state)
        self.run_dir = run_dir_of(self.resume_state) or self.run_dir
        if self.config.seed == -1:
            self.seed = self.saved["seed"]  # the one the continued run picked at random
        for leftover in remove_leftovers(self.run_dir) if self.is_main else []:
            self.say(f"removed {leftover}, left by a save that was killed")

    def _check_resume_compatible(self) -> None:
        """Refuse, with a ConfigError naming the key, a state this config cannot continue; note what changed."""
        saved, step = self.saved, self.saved["step"]
        notes = refuse_incompatible(self.resume_state, saved["fingerprint"], self.fingerprint)
        if step >= self.plan.total_steps:
            raise ConfigError(
                f"key 'resume_from': the state {self.resume_state} is at step {step} and this config trains "
                f"{self.plan.total_steps} steps: nothing is left to train. Raise max_epochs or max_steps to go on.")
        changed = changed_settings(saved["config"], self.config)
        if changed:
            notes.append("changed since the state was saved (the new values apply): " + "; ".join(changed))
        next_lrs = self._next_lrs(step)
        if next_lrs != saved["next_lrs"]:
            def listed(lrs: dict) -> str:
                return ", ".join(f"{group} {lr:.4g}" for group, lr in lrs.items())

            notes.append(f"the LR schedule changed: from step {step + 1} on the run follows the new curve "
                         f"(next LR {listed(next_lrs)}, was {listed(saved['next_lrs'])})")
        for note in notes:
            self.say(note)

    def _next_lrs(self, step: int) -> dict[str, float]:
        return {group: schedule(step) for group, schedule in self.schedules.items() if group != "momentum"}

    def restore(self, state: TrainingState) -> None:
        """Continue exactly where the state left off: weights, optimizer, LR position, grad scaler, progress and,
        last, the random generators (nothing may draw from them between here and the next step)."""
        for name, module in self.trained_models().items():
            module.load_state_dict(state.weights[name])
        self._load_optimizer_state(state.optimizer)
        self.lr_scheduler.load_state_dict(state.info["lr_scheduler"])
        if self.accelerator.scaler is not None and state.info["grad_scaler"]:
            self.accelerator.scaler.load_state_dict(state.info["grad_scaler"])
        self.progress = Progress.from_json(state.info["progress"])
        self.progress.checkpoints = saved_checkpoints(self.run_dir / "ckpts", state.step)
        self.progress.last_state = str(self.resume_state)
        if self.is_main:
            self._write_skipped_report()
        epoch, step_in_epoch = divmod(state.step, self.plan.steps_per_epoch)
        self.say(f"resumed from {self.resume_state}: step {state.step} of {self.plan.total_steps}, epoch "
                 f"{epoch + 1} with {step_in_epoch} of its {self.plan.steps_per_epoch} steps done")
        self._note_process_count_change(state.info)
        self._restore_rng(state)

    def _note_process_count_change(self, info: dict) -> None:
        """Another number of processes deals the epoch's batches out differently and changes the global batch and
        the steps per epoch: the run goes on from the same step number, but not with the batches, noise and epoch
        position the interrupted run would have had."""
        before, now = info["num_processes"], self.accelerator.num_processes
        if before == now:
            return
        self.say(f"note: the state was saved by {before} process(es) and this run has {now}: a step now trains "
                 f"{now * self.config.batch_size * self.config.grad_accum} images instead of "
                 f"{before * self.config.batch_size * self.config.grad_accum}, an epoch has "
                 f"{self.plan.steps_per_epoch} steps instead of {info['steps_per_epoch']} (step "
                 f"{self.progress.global_step} was epoch {info['epoch'] + 1} step {info['step_in_epoch']}), and the "
                 f"data order and noise from here on differ from what the interrupted run would have drawn")

    def _restore_rng(self, state: TrainingState) -> None:
        """Each process takes back its own generators; a process the state has none for starts fresh ones."""
        saved = state.rng["processes"]
        rank = self.accelerator.process_index
        if rank >= len(saved):
            seed_everything(self.seed + rank + 1_000_003 * state.step)
            return
        for note in restore_rng(saved[rank]):
            self.say(f"warning: {note}")

    def _load_optimizer_state(self, saved: dict) -> None:
        """torch's load_state_dict also brings back the saved betas / eps / weight decay; the new config's
        values are put back, as for every other setting that may change on resume."""
        configured = [{key: group[key] for key in CONFIGURED_HYPERPARAMETERS if key in group}
                      for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)

    def unwrapped_model(self) -> SDModel:
        """The model with its accelerate/DDP and torch.compile wrappers removed, for inference and saving (plain
        state-dict keys, no `_orig_mod.`)."""
        def unwrap(module):
            return self.accelerator.unwrap_model(module, keep_torch_compile=False)
        return SDModel(unet=unwrap(self.model.unet), vae=self.model.vae, text_encoder=unwrap(self.model.text_encoder),
                       tokenizer=self.model.tokenizer, noise_scheduler=self.model.noise_scheduler,
                       source=self.model.source)

    # --- the story ------------------------------------------------------------------------------------
    def run(self) -> dict:
        self._find_state_to_resume()
        self.set_up()
        if self.resume_state:
            self.restore(read_state(self.resume_state, verify=False))  # verified when it was found
        else:
            self.validate()  # the baseline before any training
        with stop_signals_handled(self.request_stop):
            self.train()
            return self.finish()

    def train(self) -> None:
        """Optimizer steps until the last one of the plan, or until a stop is requested."""
        plan, progress = self.plan, self.progress
        self.started = time.monotonic()
        bar = tqdm(total=plan.total_steps, initial=progress.global_step, disable=not self.is_main, unit="step")
        first_epoch = plan.epoch_of(progress.global_step)
        loaders = self._epoch_iterators(first_epoch, progress.global_step - first_epoch * plan.steps_per_epoch)
        for epoch in range(first_epoch, plan.epochs):
            first_step = progress.global_step - epoch * plan.steps_per_epoch  # > 0 where a resumed run starts
            loader = next(loaders)
            for step_in_epoch in range(first_step, plan.steps_per_epoch):
                if progress.global_step >= plan.total_steps or self.stop:
                    break
                self._train_step(loader, step_in_epoch, bar)
            if self.stop:
                break
            self._after_epoch(epoch)
        bar.close()

    def _epoch_iterators(self, first_epoch: int, first_step: int):
        """Each epoch's batch iterator in turn, from `first_step` of `first_epoch` on. With workers, the next
        epoch's loader is started when an epoch starts: its workers fork and load its first batches while this
        epoch trains, so no epoch begins with a stall (a loader is built per epoch, see data/loader.py)."""
        ahead = self.num_workers > 0
        upcoming = iter(self._epoch_loader(first_epoch, first_step))
        for epoch in range(first_epoch, self.plan.epochs):
            current = upcoming
            has_next = epoch + 1 < self.plan.epochs
            upcoming = iter(self._epoch_loader(epoch + 1)) if ahead and has_next else None
            yield current
            if upcoming is None and has_next:
                upcoming = iter(self._epoch_loader(epoch + 1))

    def _train_step(self, loader, step_in_epoch: int, bar) -> None:
        progress = self.progress
        step_start = time.monotonic()
        micro_batches = self._next_micro_batches(loader, step_in_epoch)
        # A micro-batch whose images all failed to load is left out; the other processes leave one out too.
        micro_batches = micro_batches[:fewest_everywhere(self.accelerator, len(micro_batches))]
        images = sum(len(b["captions"]) for b in micro_batches)
        loss = optimizer_step(self.model, micro_batches, self.optimizer, self.accelerator, self.config,
                              self.trained_modules, skip_nonfinite=True) if micro_batches else math.nan
        lrs = current_lrs(self.optimizer)
        # A skipped update still counts as a step: the LR curve and the data order stay aligned with it.
        self.lr_scheduler.step()
        progress.global_step += 1
        if progress.global_step == self.stop_at_step:
            self.request_stop(Stop("stop_at_step", 0, save=True))
        loss = self._agree_after_step(loss)
        self._count_skipped_update(loss, bool(micro_batches))
        self._after_step(loss, lrs, images * self.accelerator.num_processes / (time.monotonic() - step_start), bar)

    def _next_micro_batches(self, loader, step_in_epoch: int) -> list[dict]:
        """This step's micro-batches. The loader drops images that fail to decode and lists them under
        "failed"; they are reported. A micro-batch in which every image failed is left out."""
        batches = []
        for _ in self.plan.micro_batches_of(step_in_epoch):
            try:
                batch = next(loader)
            except ImageLoadError as error:
                self._report_failed_images([SkippedImage(Path("(a whole micro-batch)"), str(error))])
                continue
            self._report_failed_images(batch.get("failed", []))
            batches.append(batch)
        return batches

    def _report_failed_images(self, failed: list[SkippedImage]) -> None:
        if not failed:
            return
        step = self.progress.global_step + 1
        for entry in failed:
            self.say(f"step {step}: could not load {entry.path}: {entry.reason}; left out of the step")
            self.progress.failed_images.append((step, str(entry.path), entry.reason))
        if self.is_main:
            self._write_skipped_report()

    def _count_skipped_update(self, loss: float, trained: bool) -> None:
        """A NaN/inf loss skipped its update; after max_nan_steps in a row the run stops with its last good
        state (no new one is saved: weights that give NaN losses are not worth keeping)."""
        progress, step = self.progress, self.progress.global_step
        if math.isfinite(loss):
            progress.nonfinite_in_a_row = 0
            return
        if trained:
            progress.nonfinite_in_a_row += 1
            reason = f"loss is {loss}"
        else:
            reason = "no image of the step could be loaded"
        progress.skipped_updates.append((step, reason))
        self.say(f"step {step}: {reason}: update skipped (weights unchanged, gradients zeroed)")
        if progress.nonfinite_in_a_row >= self.config.max_nan_steps:
            self.stop = self.stop or self._diverged()  # every process counts the same agreed losses

    def _diverged(self) -> Stop:
        config, progress = self.config, self.progress
        first = progress.global_step - progress.nonfinite_in_a_row + 1
        lower = config.lr / 10
        return Stop.failed("diverged", (
            f"the loss was NaN/inf for {progress.nonfinite_in_a_row} steps in a row (steps {first}-"
            f"{progress.global_step}; max_nan_steps {config.max_nan_steps}), so the run stops without saving. "
            f"Last good state: {progress.last_state or 'none saved yet'}. Lower the learning rate (lr is "
            f"{config.lr:g}; try {lower:g}) and "
            + (f"resume: {resume_command(changes={'lr': f'{lower:g}'})}" if progress.last_state else "start again.")))

    def request_stop(self, stop: Stop) -> None:
        """Stop after the current step (a signal, the tests' stop_at_step); the first reason wins. Every process
        stops after the same step: the request takes effect when the step's end agrees on it."""
        self.stop_requested = self.stop_requested or stop

    def _agree_after_step(self, loss: float) -> float:
        """One all-reduce per step settles what every process must do alike: the group's mean loss (logged),
        whether any process asked to stop, and whether a timed save is due (by any process's clock)."""
        config, progress, accelerator = self.config, self.progress, self.accelerator
        now = time.monotonic()
        checkpoint_due = bool(config.ckpt_every_n_minutes) and \
            now - progress.last_save_time >= config.ckpt_every_n_minutes * 60
        state_due = bool(config.save_state_every_n_minutes) and \
            now - progress.last_state_time >= config.save_state_every_n_minutes * 60
        wanted = [loss, self.stop_requested is not None, checkpoint_due, state_due]
        if accelerator.num_processes > 1:
            flags = torch.tensor([float(value) for value in wanted], dtype=torch.float64, device=accelerator.device)
            wanted = accelerator.reduce(flags, "sum").tolist()
            wanted[0] /= accelerator.num_processes
            if wanted[1]:  # a signal may have reached only some processes yet: all stop, for the first one's reason
                self.stop_requested = first_stop(self.stop_requested)
        if wanted[1]:
            self.stop = self.stop or self.stop_requested
        self.saves_due = (bool(wanted[2]), bool(wanted[3]))
        return wanted[0]

    def _epoch_loader(self, epoch: int, first_step: int = 0):
        """The epoch's batches from its `first_step` on: the order is a function of (seed, epoch), so a resumed
        run skips exactly the batches its interrupted run consumed."""
        accelerator = self.accelerator
        batches = self.data.batches.epoch_batches(epoch, self.seed, accelerator.process_index,
                                                  accelerator.num_processes)[first_step * self.plan.grad_accum:]
        config = self.config
        dataset = ImageBatchDataset(self.data.train, self.data.batches, seed=self.seed, epoch=epoch,
                                    flip_p=config.flip_p, cond_dropout=config.cond_dropout,
                                    shuffle_tags=config.shuffle_tags, keep_tags=config.keep_tags,
                                    latents=self.caches.latents, text_embeddings=self.caches.text_embeddings)
        return make_loader(dataset, batches, num_workers=self.num_workers,
                           pin_memory=self.accelerator.device.type == "cuda", prefetch_factor=config.prefetch_factor)

    def _after_step(self, loss: float, lrs: dict[str, float], images_per_second: float, bar) -> None:
        config, progress = self.config, self.progress
        step = progress.global_step
        epoch = step / self.plan.steps_per_epoch
        if math.isfinite(loss):
            progress.train_losses.append((step, loss))
        window = [value for _, value in progress.train_losses[-config.log_step:]] or [math.nan]
        self.logger.log(step, epoch, to_tensorboard=step % config.log_step == 0, loss_train=loss,
                        lr_unet=lrs.get("unet"), lr_text_encoder=lrs.get("text_encoder"),
                        images_per_second=images_per_second)
        # refresh=False: update() redraws at most every mininterval (0.1 s), not at every step.
        bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lrs['unet']:.3g}",
                        img_s=f"{images_per_second:.1f}", refresh=False)
        bar.update(1)
        if self._validation_due(step):
            self.validate()
        # Not once a stop is requested: a stop may have little time left.
        if self.sample_prompts and samples_due(step, self.plan, config, self.sample_prompts) and not self.stop:
            self.sample()
        checkpoint_due, state_due = self.saves_due
        if checkpoint_due:
            self.save()
        in_nan_streak = progress.nonfinite_in_a_row > 0  # the last good state stays the newest one
        if state_due and not in_nan_streak:
            self.save_state()

    def _validation_due(self, step: int) -> bool:
        if not (self.validator or self.extra_validators):
            return False
        every = max(1, round(self.config.validation.every_n_epochs * self.plan.steps_per_epoch))
        return step % every == 0 or step == self.plan.total_steps

    def _after_epoch(self, epoch: int) -> None:
        every = self.config.save_every_n_epochs
        finished_epoch = epoch + 1
        due = every and finished_epoch % every == 0 and finished_epoch >= self.config.save_ckpts_from_n_epochs
        if due and self.progress.global_step < self.plan.total_steps:
            self.save()

    # --- measurements and outputs -------------------------------------------------------------------
    def validate(self) -> Optional[float]:
        with self.caches.parts_on_device("text_encoder"):  # back from the CPU if the text cache moved it there
            return self._validate()

    def _validate(self) -> Optional[float]:
        step = self.progress.global_step
        for name, extra in self.extra_validators.items():
            with self.accelerator.autocast():
                extra_loss = extra(self.unwrapped_model(), self.accelerator)
            self.logger.scalar(f"loss/{name}", extra_loss, step)
            self.say(f"step {step}: {name} loss {extra_loss:.5f}")
        if not self.validator:
            return None
        with self.accelerator.autocast():
            loss = self.validator(self.unwrapped_model(), self.accelerator)
        self.progress.val_losses.append((step, loss))
        self.logger.log(step, step / self.plan.steps_per_epoch, loss_val=loss)
        self.say(f"step {step}: validation loss {loss:.5f}")
        return loss

    def sample(self) -> None:
        if not self.is_main:
            return
        step = self.progress.global_step
        with self.caches.parts_on_device("vae", "text_encoder"):  # back from the CPU if a cache moved them there
            paths = make_samples(self.unwrapped_model(), self.sample_prompts, self.run_dir / "samples", step,
                                 self.config.resolution, self.accelerator.device, self.seed)
        for index, (path, image) in enumerate(paths):
            self.logger.image(f"samples/prompt_{index}", image, step)

    def save(self) -> dict:
        """A resumable state, then a checkpoint of the current weights (the main process writes, the others wait).
        The state goes first: after a SIGTERM the time left may be short, and the state is what resuming needs."""
        if not self.save_state():
            return {}
        self.progress.last_save_time = time.monotonic()
        paths = self._write_checkpoint() if self.is_main else {}
        self._shared_save_outcome(bool(paths))
        return paths

    def _write_checkpoint(self) -> dict:
        step, checkpoints = self.progress.global_step, self.progress.checkpoints
        if checkpoints and checkpoints[-1]["step"] == step:  # e.g. a stop right after an epoch's save
            return {key: value for key, value in checkpoints[-1].items() if key != "step"}
        name = checkpoint_name(self.config.project_name, self.plan.epoch_of(max(step - 1, 0)), step)
        model = self.unwrapped_model()
        try:
            paths = save_checkpoint(model.pipeline(), self.run_dir / "ckpts", name,
                                    half=not self.config.save_full_precision, single_file=not self.config.no_save_ckpt)
        except OSError as error:
            self._save_failed("checkpoint", error)
            return {}
        checkpoints.append({"step": step, **paths})
        self.say(f"saved checkpoint {paths['diffusers']}")
        return paths

    def save_state(self) -> bool:
        """Everything the run depends on, to <run_dir>/state/state-gs<step>/, atomically; only the newest
        save_state_keep states are kept. False when the save failed (the run then stops)."""
        rng = self._every_process_rng()  # also the barrier: every process has finished the step
        self.progress.last_state_time = time.monotonic()
        step, last = self.progress.global_step, self.progress.last_state
        already_saved = last and Path(last).name == state_folder_name(step)
        return self._shared_save_outcome(self._write_state(rng) if self.is_main and not already_saved else True)

    def _write_state(self, rng: dict) -> bool:
        step = self.progress.global_step
        try:
            saved = write_state(self._training_state(rng), self.run_dir / STATE_FOLDER)
        except OSError as error:
            self._save_failed("state", error)
            return False
        self.progress.last_state = str(saved.path)
        pruned = prune_states(self.run_dir / STATE_FOLDER, self.config.save_state_keep, step)
        self.say(f"saved state {saved.path} ({saved.bytes / 1e9:.2f} GB) in {saved.seconds:.1f} s"
                 + (f"; removed {len(pruned)} older state(s)" if pruned else ""))
        return True

    def _shared_save_outcome(self, saved: bool) -> bool:
        """Only the main process writes: whether it managed to (a failed save stops the run) is news to the
        others, who wait for it here."""
        saved, stop = agreed((saved, self.stop))
        self.stop = self.stop or stop
        return saved

    def _every_process_rng(self) -> dict:
        """The random generators of every process, in process order: each draws its own noise."""
        return {"processes": gather_object([capture_rng()])}

    def _training_state(self, rng: dict) -> TrainingState:
        step = self.progress.global_step
        epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
        scaler = self.accelerator.scaler
        info = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,  # optimizer steps done in the epoch; its batch order comes from the seed
            "seed": self.seed,
            "num_processes": self.accelerator.num_processes,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "next_lrs": self._next_lrs(step),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "progress": self.progress.to_json(),
            "fingerprint": self.fingerprint,
            "config": self.config.model_dump(mode="json"),
        }
        weights = {name: module.state_dict() for name, module in self.trained_models().items()}
        return TrainingState(step, info, weights, self.optimizer.state_dict(), rng)

    def _save_failed(self, what: str, error: OSError) -> None:
        """Nothing half-written is left (atomic writes) and the previous files are intact: say so, and stop."""
        step = self.progress.global_step
        disk_full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
        checkpoints = self.progress.checkpoints
        self.say(f"error: saving the {what} at step {step} failed{disk_full}: {error}")
        self.stop = self.stop or Stop.failed("save failed", (
            f"saving the {what} at step {step} failed{disk_full}: {error}. No half-written file was left and the "
            f"previous saves are intact: last state {self.progress.last_state or 'none'}, last checkpoint "
            f"{checkpoints[-1]['diffusers'] if checkpoints else 'none'}. Free some space, then resume: "
            f"{resume_command()}"))

    def finish(self) -> dict:
        """The end of the run, complete or stopped: final saves, samples, plots, summary. A stopped run says
        how to resume it; its summary carries the exit code."""
        if self.stop and self.stop.save and self.progress.global_step >= self.plan.total_steps:
            self.stop = None  # the signal came during the last step: nothing is left to resume
        final = self.save() if self.stop is None or self.stop.save else {}
        if self.stop is None:  # complete, and its final save worked
            if self.is_main and self.config.save_ckpt_dir and "single_file" in final:
                target = Path(self.config.save_ckpt_dir) / Path(final["single_file"]).name
                copy_atomic(Path(final["single_file"]), target)
                final["single_file_copy"] = str(target)
            if self.sample_prompts:
                self.sample()
        summary = self._summary(final)
        summary["processes"] = self._weights_across_processes()
        if self.is_main:
            self._plots()
            write_json(self.run_dir / "run_summary.json", summary)
        self.close()
        if self.stop:
            self._say_how_it_stopped()
        return summary

    def close(self) -> None:
        """Logs closed, then the process group. The DDP wrappers go first, while the group is still registered:
        freed after it, a wrapper takes the group's last reference down with it while holding the GIL, and gloo's
        destructor can then wait forever on a worker thread that needs the GIL (seen as a hang at exit)."""
        self.logger.close()
        self.accelerator.wait_for_everyone()
        self.model = self.unwrapped_model()
        self.trained_modules = []
        self.accelerator.free_memory()  # accelerate's own references to the prepared models and optimizer
        gc.collect()
        self.accelerator.end_training()

    def _weights_across_processes(self) -> dict:
        """With several processes, a hash of each one's trained weights: data parallel training keeps them equal,
        and the run summary shows that it did."""
        count = self.accelerator.num_processes
        if count == 1:
            return {"count": 1}
        digest = hashlib.sha256()
        for name, module in sorted(self.trained_models().items()):
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
        hashes = gather_object([digest.hexdigest()])
        identical = len(set(hashes)) == 1
        if not identical:
            self.say(f"warning: the {count} processes ended with different weights (sha256 {hashes}); the saved "
                     f"checkpoint holds the main process's")
        return {"count": count, "weights_identical": identical, "weights_sha256": hashes}

    def _say_how_it_stopped(self) -> None:
        stop, step = self.stop, self.progress.global_step
        if not stop.save:
            self.say(f"error: {stop.message}")
            return
        self.say(f"stopped ({stop.reason}) after step {step} of {self.plan.total_steps}; state "
                 f"{self.progress.last_state}. To resume:\n    {resume_command()}")

    def _plots(self) -> None:
        steps = list(range(self.progress.global_step))
        series = {"unet": [self.schedules["unet"](k) for k in steps]}
        if "text_encoder" in self.schedules:
            series["text_encoder"] = [self.schedules["text_encoder"](k) for k in steps]
        plot_lr(steps, series, self.run_dir / "plots" / "lr.png", self.plan.steps_per_epoch)
        plot_losses(self.progress.train_losses, self.progress.val_losses, self.run_dir / "plots" / "loss.png",
                    self.plan.steps_per_epoch)

    def _summary(self, final: dict) -> dict:
        val = self.progress.val_losses
        best = min(val, key=lambda item: item[1]) if val else None
        return {
            "run_dir": str(self.run_dir),
            "final_checkpoint": final,
            "checkpoints": self.progress.checkpoints,
            "steps": self.progress.global_step,
            "epochs": round(self.progress.global_step / self.plan.steps_per_epoch, 4),
            "steps_per_epoch": self.plan.steps_per_epoch,
            "seed": self.seed,
            "images": {"found": self.data.found, "skipped": len(self.data.skipped), "train": len(self.data.train),
                       "validation": len(self.data.val)},
            "val_loss": {
                "first": val[0][1] if val else None,
                "min": best[1] if best else None,
                "min_step": best[0] if best else None,
                "final": val[-1][1] if val else None,
                "history": val,
            },
            "final_train_loss": self.progress.train_losses[-1][1] if self.progress.train_losses else None,
            "seconds": round(time.monotonic() - self.started, 2),
            "finite": all(math.isfinite(v) for _, v in self.progress.train_losses),
            "skipped_updates": self.progress.skipped_updates,
            "failed_images": len(self.progress.failed_images),
            "resumed_from": str(self.resume_state) if self.resume_state else None,
            "last_state": self.progress.last_state,
            "stopped": self.stop.reason if self.stop else None,
            "exit_code": self.stop.exit_code if self.stop else 0,
        }


def train(config: TrainConfig, run_dir: Optional[Path] = None) -> dict:
    """Train (or, with resume_from, continue) a run; the summary's exit_code is non-zero when it stopped early."""
    return Trainer(config, run_dir).run()
