"""The training loop, top to bottom: set up, then for each optimizer step: batch, loss, backward, step,
schedule; every so often: validation, samples, checkpoints, logs."""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.loader import ImageBatchDataset, make_loader
from data.prepare import PreparedData, prepare_data
from optimizer.lr import build_lr_scheduler, current_lrs, plan_schedule
from optimizer.optimizers import build_optimizer
from trainer.diffusion import denoising_loss, drop_captions, encode_latents, sample_noise
from trainer.model import SDModel, configure_for_training, encode_prompts, load_model
from trainer.sampling import make_samples, read_prompts
from trainer.validation import StabilizedLoss
from utils.checkpoint import checkpoint_name, copy_atomic, save_checkpoint
from utils.config import TrainConfig
from utils.metrics import RunLogger
from utils.plots import plot_losses, plot_lr


@dataclass
class Progress:
    """Where the run is, and what it has measured so far."""

    global_step: int = 0
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    last_save_time: float = field(default_factory=time.monotonic)


def resolve_mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_seed(seed: int) -> int:
    return random.SystemRandom().randrange(2**31) if seed == -1 else seed


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


def param_groups(model: SDModel, train_text_encoder: bool) -> list[dict]:
    groups = [{"name": "unet", "params": [p for p in model.unet.parameters() if p.requires_grad]}]
    if train_text_encoder:
        groups.append({"name": "text_encoder", "params": [p for p in model.text_encoder.parameters()]})
    return groups


def training_loss(model: SDModel, batch: dict, config: TrainConfig, device) -> torch.Tensor:
    """Mean denoising loss of one micro-batch: encode, noise, predict."""
    latents = encode_latents(model, batch["pixel_values"])
    noise = sample_noise(latents, config.zero_frequency_noise_ratio)
    num_timesteps = model.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), device=latents.device)
    captions = drop_captions(batch["captions"], config.cond_dropout)
    hidden = encode_prompts(model, captions, config.clip_skip, device)
    return denoising_loss(model, latents, hidden, noise, timesteps, config.min_snr_gamma).mean()


def optimizer_step(model, micro_batches, optimizer, accelerator, config, trained_modules) -> float:
    """Accumulate the micro-batches' gradients (averaged, not summed), clip, step. Returns the mean loss."""
    total = 0.0
    for index, batch in enumerate(micro_batches):
        is_last = index == len(micro_batches) - 1
        with contextlib.ExitStack() as stack:
            if not is_last:  # gradients are all-reduced once per step, not per micro-batch
                for module in trained_modules:
                    stack.enter_context(accelerator.no_sync(module))
            with accelerator.autocast():
                loss = training_loss(model, batch, config, accelerator.device)
            accelerator.backward(loss / len(micro_batches))
        total += loss.detach().item()
    if config.clip_grad_norm:
        for module in trained_modules:
            accelerator.clip_grad_norm_(module.parameters(), config.clip_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)


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

    def __init__(self, config: TrainConfig, run_dir: Optional[Path] = None):
        self.config = config
        self.seed = resolve_seed(config.seed)
        self.accelerator = Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision))
        self.is_main = self.accelerator.is_main_process
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(config)
        self.progress = Progress()

    # --- set-up -------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def set_up(self) -> None:
        config = self.config
        seed_everything(self.seed)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", {**config.model_dump(mode="json"), "seed": self.seed})
        self.data: PreparedData = prepare_data(config)
        self.say(self.data.summary())
        self._report_skipped()
        self.plan, self.schedules, notes = plan_schedule(config, self.data.batches.num_batches)
        for note in notes:
            self.say(note)
        self.say(f"run: {self.plan.steps_per_epoch} steps per epoch, {self.plan.total_steps} steps, "
                 f"{self.plan.epochs} epochs, seed {self.seed}, precision {self.accelerator.mixed_precision}")

        self.model = load_model(config.resume_ckpt, config.model_cache_dir)
        configure_for_training(self.model, config.attn_type, config.gradient_checkpointing, config.train_text_encoder)
        place_frozen_parts(self.model, self.accelerator, config.train_text_encoder)
        self.optimizer = build_optimizer(config, param_groups(self.model, config.train_text_encoder))
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.schedules, config.lr_cycle_momentum)
        self._prepare_for_accelerator()
        self.logger = RunLogger(self.run_dir, enabled=self.is_main)
        self.validator = self._build_validator()
        self.sample_prompts = read_prompts(config.sample_prompts, self.data.train) if config.sample_prompts else []

    def _prepare_for_accelerator(self) -> None:
        accelerator, model = self.accelerator, self.model
        if self.config.train_text_encoder:
            model.unet, model.text_encoder, self.optimizer = accelerator.prepare(
                model.unet, model.text_encoder, self.optimizer)
            self.trained_modules = [model.unet, model.text_encoder]
        else:
            model.unet, self.optimizer = accelerator.prepare(model.unet, self.optimizer)
            self.trained_modules = [model.unet]
        # The LR scheduler is deliberately not prepared: ours is a pure function of the optimizer step,
        # and accelerate would step it once per process.

    def _build_validator(self) -> Optional[StabilizedLoss]:
        settings = self.config.validation
        if not self.data.val:
            return None
        return StabilizedLoss(self.unwrapped_model(), self.data.val, self.config.resolution,
                              settings.batch_size or self.config.batch_size, settings.timesteps,
                              settings.seed, self.config.clip_skip)

    def _report_skipped(self) -> None:
        if not self.data.skipped:
            return
        for skipped in self.data.skipped:
            self.say(f"skipped {skipped.path}: {skipped.reason}")
        if self.is_main:
            lines = [f"{s.path}\t{s.reason}" for s in self.data.skipped]
            (self.run_dir / "skipped_images.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def unwrapped_model(self) -> SDModel:
        """The model with its accelerate/DDP wrappers removed, for inference and saving."""
        unwrap = self.accelerator.unwrap_model
        return SDModel(unet=unwrap(self.model.unet), vae=self.model.vae, text_encoder=unwrap(self.model.text_encoder),
                       tokenizer=self.model.tokenizer, noise_scheduler=self.model.noise_scheduler,
                       source=self.model.source)

    # --- the story ------------------------------------------------------------------------------------
    def run(self) -> dict:
        self.set_up()
        config, plan, progress = self.config, self.plan, self.progress
        self.validate()  # the baseline before any training
        self.started = time.monotonic()
        bar = tqdm(total=plan.total_steps, initial=progress.global_step, disable=not self.is_main, unit="step")
        for epoch in range(plan.epoch_of(progress.global_step), plan.epochs):
            loader = iter(self._epoch_loader(epoch))
            for step_in_epoch in range(plan.steps_per_epoch):
                if progress.global_step >= plan.total_steps:
                    break
                step_start = time.monotonic()
                micro_batches = [next(loader) for _ in plan.micro_batches_of(step_in_epoch)]
                images = sum(len(b["captions"]) for b in micro_batches)
                loss = optimizer_step(self.model, micro_batches, self.optimizer, self.accelerator, config,
                                      self.trained_modules)
                lrs = current_lrs(self.optimizer)
                self.lr_scheduler.step()
                progress.global_step += 1
                self._after_step(loss, lrs, images / (time.monotonic() - step_start), bar)
            self._after_epoch(epoch)
        bar.close()
        return self.finish()

    def _epoch_loader(self, epoch: int):
        batches = self.data.batches.epoch_batches(epoch, self.seed)
        dataset = ImageBatchDataset(self.data.train, self.data.batches, flip_p=self.config.flip_p, seed=self.seed,
                                    epoch=epoch)
        return make_loader(dataset, batches, num_workers=self.config.num_workers,
                           pin_memory=self.accelerator.device.type == "cuda")

    def _after_step(self, loss: float, lrs: dict[str, float], images_per_second: float, bar) -> None:
        config, progress = self.config, self.progress
        step = progress.global_step
        epoch = step / self.plan.steps_per_epoch
        progress.train_losses.append((step, loss))
        window = [value for _, value in progress.train_losses[-config.log_step:]]
        self.logger.log(step, epoch, to_tensorboard=step % config.log_step == 0, loss_train=loss,
                        lr_unet=lrs.get("unet"), lr_text_encoder=lrs.get("text_encoder"),
                        images_per_second=images_per_second)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", lr=f"{lrs['unet']:.3g}",
                        img_s=f"{images_per_second:.1f}")
        if self._validation_due(step):
            self.validate()
        if self.sample_prompts and step % config.sample_steps == 0:
            self.sample()
        minutes = config.ckpt_every_n_minutes
        if minutes and time.monotonic() - progress.last_save_time >= minutes * 60:
            self.save()

    def _validation_due(self, step: int) -> bool:
        if not self.validator:
            return False
        every = max(1, round(self.config.validation.every_n_epochs * self.plan.steps_per_epoch))
        return step % every == 0 or step == self.plan.total_steps

    def _after_epoch(self, epoch: int) -> None:
        every = self.config.save_every_n_epochs
        finished_epoch = epoch + 1
        if every and finished_epoch % every == 0 and self.progress.global_step < self.plan.total_steps:
            self.save()

    # --- measurements and outputs -------------------------------------------------------------------
    def validate(self) -> Optional[float]:
        if not self.validator:
            return None
        with self.accelerator.autocast():
            loss = self.validator(self.unwrapped_model())
        step = self.progress.global_step
        self.progress.val_losses.append((step, loss))
        self.logger.log(step, step / self.plan.steps_per_epoch, loss_val=loss)
        self.say(f"step {step}: validation loss {loss:.5f}")
        return loss

    def sample(self) -> None:
        if not self.is_main:
            return
        step = self.progress.global_step
        paths = make_samples(self.unwrapped_model(), self.sample_prompts, self.run_dir / "samples", step,
                             self.config.resolution, self.accelerator.device, self.seed)
        for index, (path, image) in enumerate(paths):
            self.logger.image(f"samples/prompt_{index}", image, step)

    def save(self) -> dict:
        """A checkpoint of the current weights (main process writes, all processes wait)."""
        self.accelerator.wait_for_everyone()
        self.progress.last_save_time = time.monotonic()
        if not self.is_main:
            return {}
        step = self.progress.global_step
        name = checkpoint_name(self.config.project_name, self.plan.epoch_of(max(step - 1, 0)), step)
        model = self.unwrapped_model()
        paths = save_checkpoint(model.pipeline(), self.run_dir / "ckpts", name,
                                half=not self.config.save_full_precision, single_file=not self.config.no_save_ckpt)
        self.progress.checkpoints.append({"step": step, **paths})
        self.say(f"saved checkpoint {paths['diffusers']}")
        return paths

    def finish(self) -> dict:
        final = self.save()
        if self.is_main and self.config.save_ckpt_dir and "single_file" in final:
            target = Path(self.config.save_ckpt_dir) / Path(final["single_file"]).name
            copy_atomic(Path(final["single_file"]), target)
            final["single_file_copy"] = str(target)
        if self.sample_prompts:
            self.sample()
        summary = self._summary(final)
        if self.is_main:
            self._plots()
            write_json(self.run_dir / "run_summary.json", summary)
        self.logger.close()
        self.accelerator.end_training()
        return summary

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
        }


def train(config: TrainConfig, run_dir: Optional[Path] = None) -> dict:
    return Trainer(config, run_dir).run()
