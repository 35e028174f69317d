"""The training run as a story: set up (the constructor), then `train`: for each optimizer step, batches → loss,
backward, step → schedule → what the processes agree on → log → validate / sample / save when due; `finish`
writes the final saves, plots and summary.

The pieces live elsewhere, one home each: trainer/setup.py builds, trainer/step.py steps and agrees,
trainer/saving.py writes, trainer/resume.py restores, trainer/stops.py says why a run stops. The public methods
here (`train_step`, `epoch_loader`, `next_micro_batches`, `update`, `use_lr_functions`, `validate`, `save`) are
the seams the LR finder, the benchmarks and the tests use."""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.images import SkippedImage
from optimizer.lr import FunctionLR, current_lrs
from trainer.cache import build_caches
from trainer.ema import build_average, restore_average, sampled_weights
from trainer.feed import EpochFeed
from trainer.finish import copy_final_checkpoint, end_before_training, write_outputs
from trainer.model import SDModel
from trainer.plugin_hooks import RunPlugins, ed_state_of, load_run_plugins
from trainer.progress import Progress, show_step
from trainer.resume import (
    checkpoint_missing,
    find_state_to_resume,
    restore_process_rng,
    restore_training,
    resume_notes,
    resumed_lines,
)
from trainer.sampling import SamplePrompts, sample_round, samples_due
from trainer.saving import RunSaver, SaveOutcome, TrainingParts, run_summary, weights_across_processes
from trainer.setup import (
    build_model_and_optimizer,
    build_validators,
    check_output_folders,
    claim_run_dir,
    make_accelerator,
    prepare_and_plan,
    resolve_seed,
    run_fingerprint,
    save_sizes,
    trained_part_names,
    unwrapped,
    write_run_start,
    write_skipped_images,
)
from trainer.step import (
    StepAgreement,
    agree_after_step,
    agree_on_stop,
    agreed,
    fewest_everywhere,
    optimizer_step,
    timed_saves_due,
)
from trainer.stops import SetUpStopped, Stop, StopRequest, diverged, how_it_stopped, save_failed, stop_signals_handled
from utils.config import TrainConfig, settings_changes
from utils.plugins import PluginError
from utils.state import TrainingState, read_state, seed_everything


class Trainer:
    """One run: built by the constructor, trained by `run()` (or `train()` + `finish()`)."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path | None = None,
        stop_at_step: int | None = None,
        stop_request: StopRequest | None = None,
        run_name: str | None = None,
    ):
        """Set up everything the steps need, in order; nothing trains yet, and the run folder is created (and
        locked) only once the run can start. `run_dir` / `run_name`: the folder, or its name before the time stamp
        (default project_name). `stop_request`: where signal handlers put a stop (one is made if not given); a stop
        during set-up raises SetUpStopped. `stop_at_step`: stop after that step as if a SIGTERM had come during it
        (the tests' kill)."""
        self.config, self.stop_at_step = config, stop_at_step
        self.stop_request = stop_request or StopRequest()  # asked on this process; agreed between units of work
        self.stop: Stop | None = None  # agreed by every process: the run stops after the current unit of work
        self.accelerator = accelerator = make_accelerator(config)
        self.is_main = accelerator.is_main_process
        self.progress = Progress()
        self.seed = agreed(resolve_seed(config.seed))
        self.resume_state, self.saved = find_state_to_resume(config, self.is_main, self.say)
        if self.saved and config.seed == -1:
            self.seed = self.saved["seed"]  # the one the continued run picked at random
        # Each process draws its own noise and timesteps; the data order comes from the seed alone.
        seed_everything(self.seed + accelerator.process_index)
        if self.is_main:
            check_output_folders(config)
        plugins = load_run_plugins(config, self.say)
        self._stop_if_asked()

        self.data, self.plan, self.schedules, num_workers = prepare_and_plan(config, accelerator, self.seed, self.say)
        self.sample_prompts = (
            SamplePrompts(config.sample_prompts, self.data.train + self.data.val, config, self.say)
            if config.sample_prompts
            else None
        )
        self._stop_if_asked()

        self.model, self.optimizer, self.lr_scheduler, self.trained_modules = build_model_and_optimizer(
            config, accelerator, self.schedules, self.say
        )
        self.ema = build_average(config, self.trained_models(), self.plan.total_steps, accelerator.device, self.say)
        model = self.unwrapped_model()
        precision = accelerator.mixed_precision
        fingerprint = run_fingerprint(config, model, self.trained_models(), self.data, self.seed, precision)
        if self.resume_state:  # checked before anything in the run folder changes
            lrs, total = self.schedules.lrs_at(self.saved["step"]), self.plan.total_steps
            for note in resume_notes(self.resume_state, self.saved, fingerprint, total, config, lrs):
                self.say(note)
        self.validator, self.extra_validators = build_validators(model, config, self.data)
        # After the validators: they still encode with the VAE the latent cache may move off the device.
        self.caches = build_caches(
            config, self.data.train, self.data.batches.item_buckets, model, accelerator, self.say, num_workers
        )
        self.feed = EpochFeed(config, self.data, self.plan, self.seed, accelerator, self.caches, num_workers, plugins)
        self._stop_if_asked()

        # The run can start: its folder is created (or, resumed, taken over) and locked, and written from here on.
        self.run_dir, self.run_lock = claim_run_dir(config, self.resume_state, run_dir, run_name, accelerator)
        self.saver = RunSaver(
            config, self.run_dir, self.plan, self.seed, fingerprint, self.schedules, accelerator, self.say
        )
        self.plugins = RunPlugins(
            plugins,
            config,
            self.run_dir,
            lambda: ed_state_of(self.unwrapped_model(), self.optimizer),
            self.stop_request,
        )
        self.plugins.model_load()
        self.logger = write_run_start(
            self.run_dir,
            self.run_lock,
            config,
            self.seed,
            self.data,
            save_sizes(model, self.trained_models(), config, self.plan.epochs),
            self.saved["step"] if self.saved else None,
            accelerator.is_main_process,
            self.say,
        )
        self.started = time.monotonic()
        self.first_step = self.saved["step"] if self.saved else 0  # where this process's share of the run starts

    def _stop_if_asked(self) -> None:
        """Between the units of set-up: a signal stops the run here, before any folder was written."""
        stop = agree_on_stop(self.accelerator, self.stop_request.stop)
        if stop:
            self.accelerator.end_training()
            raise SetUpStopped(stop)

    # --- the story ------------------------------------------------------------------------------------
    def run(self) -> dict:
        with stop_signals_handled(self.stop_request):
            if self.resume_state:
                self.restore(read_state(self.resume_state, verify=False))  # verified when it was found
            else:
                self.validate()  # the baseline before any training
                if self.sample_prompts and self.sample_prompts.settings.pretrain:  # ED2's generate_pretrain_samples
                    self.sample()
            self.plugins.training_start()
            self.check_for_stop()
            self.train()
            return self.finish()

    def train(self) -> None:
        """Optimizer steps until the last one of the plan, or until a stop is requested."""
        for _ in self.steps():
            pass

    def steps(self) -> Iterator[StepAgreement]:
        """The loop, one optimizer step per item (the step-overhead benchmark takes them in blocks)."""
        plan, progress = self.plan, self.progress
        bar = tqdm(total=plan.total_steps, initial=progress.global_step, disable=not self.is_main, unit="step")
        first_epoch = plan.epoch_of(progress.global_step)
        loaders = self.feed.epoch_iterators(first_epoch, progress.global_step - plan.first_step_of(first_epoch))
        try:
            for epoch in range(first_epoch, plan.epochs):
                first_step = progress.global_step - plan.first_step_of(epoch)  # > 0 where a resumed run starts
                if self.config.load_settings_every_epoch and epoch > first_epoch:
                    self.reload_settings()
                self.plugins.epoch_start(epoch, progress.global_step, plan.batches_in_epoch(epoch))
                loader = next(loaders)
                for step_in_epoch in range(first_step, plan.steps_in_epoch(epoch)):
                    if progress.global_step >= plan.total_steps or self.stop:
                        break
                    yield self.train_step(loader, epoch, step_in_epoch, bar)
                if self.stop:
                    break
                self.plugins.epoch_end(epoch, progress.global_step)
                if self.epoch_save_due(epoch):
                    self.save()
                    self.check_for_stop()
        finally:
            bar.close()

    def train_step(self, loader, epoch: int, step_in_epoch: int, bar) -> StepAgreement:
        """One optimizer step, and everything that is due after it."""
        config, progress, accelerator = self.config, self.progress, self.accelerator
        started = time.monotonic()
        micro_batches = self.next_micro_batches(loader, epoch, step_in_epoch)
        # A micro-batch whose images all failed to load is left out; the other processes leave one out too.
        micro_batches = micro_batches[: fewest_everywhere(accelerator, len(micro_batches))]
        first_batch = micro_batches[0] if micro_batches else None
        self.plugins.step_start(epoch, step_in_epoch, progress.global_step, first_batch)
        lrs = current_lrs(self.optimizer)
        loss = self.update(micro_batches, skip_nonfinite=True)
        self.plugins.step_end(epoch, step_in_epoch, progress.global_step, first_batch)
        progress.global_step += 1
        step = progress.global_step
        if self.ema and self.ema.due(step):
            self.ema.update(self.trained_models())
        if step == self.stop_at_step:
            self.stop_request(Stop("stop_at_step", 0, save=True))

        self._stop_on_failed_writes()
        agreement = agree_after_step(
            accelerator, loss, self.stop_request.stop, timed_saves_due(config, progress, time.monotonic())
        )
        self.stop = self.stop or agreement.stop
        skipped = progress.record_update(agreement.loss, trained=bool(micro_batches))
        if skipped:
            self.say(f"step {step}: {skipped}: update skipped (weights unchanged, gradients zeroed)")
        if progress.nonfinite_in_a_row >= config.max_nan_steps:
            self.stop = self.stop or diverged(config, progress)  # every process counts the same agreed losses
        images = sum(len(batch["captions"]) for batch in micro_batches) * accelerator.num_processes
        show_step(
            self.logger,
            bar,
            progress,
            self.plan,
            config.log_step,
            loss_train=agreement.loss,
            lr_unet=lrs.get("unet"),
            lr_text_encoder=lrs.get("text_encoder"),
            images_per_second=images / (time.monotonic() - started),
        )

        # Then each unit of work that is due, checking for a stop after each one: a stopping run has little time
        # left, and its one save comes from finish(). Validation still runs at the stop's step: the resumed run
        # starts after it, and its metrics must be the uninterrupted run's.
        if self.validation_due(step):
            self.validate()
            self.check_for_stop()
        if self.sample_prompts and samples_due(step, self.plan, config, self.sample_prompts.settings) and not self.stop:
            self.sample()
            self.check_for_stop()
        if agreement.checkpoint_due and not self.stop:
            self.save()
            self.check_for_stop()
        elif agreement.state_due and progress.nonfinite_in_a_row == 0 and not self.stop:  # keep the last good one
            self.save_state()
            self.check_for_stop()
        return agreement

    def validation_due(self, step: int) -> bool:
        if not (self.validator or self.extra_validators):
            return False
        every = max(1, round(self.config.validation.every_n_epochs * self.plan.steps_per_epoch))
        return step % every == 0 or step == self.plan.total_steps

    def epoch_save_due(self, epoch: int) -> bool:
        """save_every_n_epochs after `epoch` (0-based) ends; the final save comes from finish()."""
        every, finished = self.config.save_every_n_epochs, epoch + 1
        due = every and finished % every == 0 and finished >= self.config.save_ckpts_from_n_epochs
        return bool(due) and self.progress.global_step < self.plan.total_steps

    def reload_settings(self) -> None:
        """load_settings_every_epoch: the main process reads the config file again; the keys the loop reads as it
        goes take the new values on every process (LIVE_KEYS), the others wait for a resume."""
        live, lines = agreed(settings_changes(self.config) if self.is_main else ({}, []))
        for key, value in live.items():
            setattr(self.config, key, value)  # the one config object every part of the run reads
        for line in lines:
            self.say(f"note: {line}")

    def check_for_stop(self) -> None:
        """A stop asked while a unit of work ran (validation, samples, a save) takes effect now, not after one more
        step. Every process calls this at the same points: it is a collective."""
        self._stop_on_failed_writes()
        self.stop = self.stop or agree_on_stop(self.accelerator, self.stop_request.stop)

    def _stop_on_failed_writes(self) -> None:
        """metrics.csv could not be written (a full disk): the run stops as after a failed save (the main process
        asks; the agreement that follows makes every process stop after the same step)."""
        if self.logger.error:
            self.stop_request(save_failed("metrics.csv", self.logger.error, self.progress))

    # --- seams: the step's batches and its update (the LR finder drives these) ---------------------------------
    def next_micro_batches(self, loader, epoch: int, step_in_epoch: int) -> list[dict]:
        """This step's micro-batches; images that failed to load are reported (and recorded) and left out. A
        plugin's transform that raised leaves the step without batches (its update is skipped) and stops the run."""
        try:
            batches, failed = self.feed.micro_batches(loader, epoch, step_in_epoch)
        except PluginError as error:
            self.plugins.failed(error)
            return []
        if failed:
            self._report_failed_images(failed)
        return batches

    def _report_failed_images(self, failed: list[SkippedImage]) -> None:
        step = self.progress.global_step + 1
        for entry in failed:
            self.say(f"step {step}: could not load {entry.path}: {entry.reason}; left out of the step")
            self.progress.failed_images.append((step, str(entry.path), entry.reason))
        if self.is_main:
            write_skipped_images(self.data, self.progress.failed_images, self.run_dir)

    def update(self, micro_batches: list[dict], skip_nonfinite: bool = False) -> float:
        """One optimizer step on the given micro-batches and one LR-schedule step; the mean loss (NaN with no
        micro-batch: a skipped update still counts as a step, so the LR and the data order stay aligned).
        `skip_nonfinite`: a NaN/inf loss skips the update (the run's steps do; a sweep wants to see it)."""
        loss = (
            optimizer_step(
                self.model,
                micro_batches,
                self.optimizer,
                self.accelerator,
                self.config,
                self.trained_modules,
                skip_nonfinite=skip_nonfinite,
            )
            if micro_batches
            else math.nan
        )
        self.lr_scheduler.step()
        return loss

    def use_lr_functions(self, functions: dict[str, callable]) -> None:
        """Train on other LR functions (one per parameter group, by name) from now on, with beta1 held at the
        configured value where the run's schedule would have cycled it."""
        if self.config.lr_cycle_momentum:
            for group in self.optimizer.param_groups:
                group["betas"] = tuple(self.config.betas)
        self.lr_scheduler = FunctionLR(
            self.optimizer, [functions[group["name"]] for group in self.optimizer.param_groups]
        )

    # --- measurements -------------------------------------------------------------------------------
    def validate(self) -> float | None:
        """The extra validation sets, the EMA's loss when asked, then the held-out validation loss (logged,
        returned)."""
        step, extra = self.progress.global_step, dict(self.extra_validators)
        if self.ema and self.config.ema_validate and self.validator:
            extra["val_ema"] = self.validator
        with self.caches.parts_on_device("text_encoder"):  # back from the CPU if the text cache moved it there
            for name, validator in extra.items():
                with self.accelerator.autocast(), self.weights_of(ema=name == "val_ema"):
                    extra_loss = validator(self.unwrapped_model(), self.accelerator)
                self.logger.scalar(f"loss/{name}", extra_loss, step)
                self.say(f"step {step}: {name} loss {extra_loss:.5f}")
            if not self.validator:
                return None
            with self.accelerator.autocast():
                loss = self.validator(self.unwrapped_model(), self.accelerator)
        self.progress.val_losses.append((step, loss))
        self.logger.log(step, self.plan.epochs_at(step), loss_val=loss)
        self.say(f"step {step}: validation loss {loss:.5f}")
        return loss

    def sample(self) -> None:
        if not self.is_main:
            return
        step = self.progress.global_step
        weights = {name: partial(self.weights_of, ema=name == "ema") for name in sampled_weights(self.config, self.ema)}
        try:
            with self.caches.parts_on_device("vae", "text_encoder"):  # back from the CPU if a cache moved them
                grids = sample_round(
                    self.unwrapped_model(),
                    self.sample_prompts.reread(),
                    self.run_dir,
                    step,
                    self.config.resolution,
                    self.accelerator.device,
                    self.seed,
                    weights,
                )
        except OSError as error:  # a full disk: the run stops as after a failed save (at its end: said only)
            self.say(f"error: writing the samples of step {step} failed: {error}")
            self.stop_request(save_failed("samples", error, self.progress))
            return
        for tag, image in grids:
            self.logger.image(tag, image, step)

    # --- saving and resuming (trainer/saving.py writes; a failed save stops the run) ----------------------------
    def save(self) -> dict:
        """A resumable state, then a checkpoint of the current weights; the checkpoint's paths."""
        paths = self._stop_if_failed(self.saver.save(self.training_parts(), self.progress)).paths
        if paths:  # the main process's
            self.plugins.model_save(paths["diffusers"])
        return paths

    def save_state(self) -> bool:
        return self._stop_if_failed(self.saver.save_state(self.training_parts(), self.progress)).saved

    def _stop_if_failed(self, outcome: SaveOutcome) -> SaveOutcome:
        self.stop = self.stop or outcome.stop
        return outcome

    def restore(self, state: TrainingState) -> None:
        """Continue exactly where the state left off: weights, optimizer, LR position, grad scaler, progress and,
        last, the random generators (nothing may draw from them between here and the next step)."""
        self.progress = restore_training(state, self.training_parts(), self.resume_state, self.run_dir)
        ema_note = restore_average(self.ema, state, self.trained_models())
        if ema_note:
            self.say(f"note: {ema_note}")
        if self.is_main:
            write_skipped_images(self.data, self.progress.failed_images, self.run_dir)
        global_batch = self.config.batch_size * self.config.grad_accum
        for line in resumed_lines(state, self.resume_state, self.plan, self.accelerator.num_processes, global_batch):
            self.say(line)
        if checkpoint_missing(self.resume_state, state.info, single_file=not self.config.no_save_ckpt):
            self.say(f"the interrupted run was killed while writing the checkpoint of step {state.step}: writing it")
            self.stop = self.stop or self.saver.rewrite_checkpoint(self.training_parts(), self.progress)
        for warning in restore_process_rng(state, self.accelerator.process_index, self.seed):
            self.say(f"warning: {warning}")

    # --- the end ------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The end of the run, complete or stopped: final saves, samples, plots, summary. A stopped run says
        how to resume it; its summary carries the exit code."""
        progress = self.progress
        if self.stop and self.stop.save and progress.global_step >= self.plan.total_steps:
            self.stop = None  # the signal came during the last step: nothing is left to resume
        if self.stop and self.stop.save and progress.global_step == self.first_step:
            self.close()
            return end_before_training(
                self.run_dir, self.resume_state, self.stop, progress.global_step, self.is_main, self.say
            )
        if self.stop is None:
            self.plugins.training_end()
        final = self.save() if self.stop is None or self.stop.save else {}
        if self.stop is None:  # complete, and its final save worked
            if self.is_main:
                self.stop = copy_final_checkpoint(final, self.config.save_ckpt_dir)
            if self.sample_prompts and self.stop is None:
                self.sample()
        seconds = time.monotonic() - self.started
        summary = run_summary(
            self.run_dir, final, progress, self.plan, self.data, self.seed, seconds, self.resume_state, self.stop
        )
        summary["processes"] = weights_across_processes(self.trained_models(), self.accelerator.num_processes)
        if not summary["processes"].get("weights_identical", True):
            self.say(
                f"warning: the processes ended with different weights ({summary['processes']}); the saved "
                f"checkpoint holds the main process's"
            )
        if self.is_main:
            write_outputs(self.run_dir, summary, self.schedules, progress, self.plan, self.say)
        self.close()
        if self.stop:
            self.say(how_it_stopped(self.stop, progress, self.plan.total_steps))
        return summary

    def close(self) -> None:
        """Logs closed, then the process group. The DDP wrappers go first, while the group is still registered:
        freed after it, a wrapper takes the group's last reference down with it while holding the GIL, and gloo's
        destructor can then wait forever on a worker thread that needs the GIL (seen as a hang at exit)."""
        self.logger.close()
        if self.run_lock:
            self.run_lock.release()
        self.accelerator.wait_for_everyone()
        self.model = self.unwrapped_model()
        self.trained_modules = []
        self.accelerator.free_memory()  # accelerate's own references to the prepared models and optimizer
        gc.collect()
        self.accelerator.end_training()

    # --- views ------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models whose weights train, unwrapped, by name."""
        model = self.unwrapped_model()
        return {name: getattr(model, name) for name in trained_part_names(self.config)}

    def training_parts(self) -> TrainingParts:
        model = self.unwrapped_model()
        trained, scaler = self.trained_models(), self.accelerator.scaler
        return TrainingParts(model, trained, self.optimizer, self.lr_scheduler, scaler, self.ema)

    def weights_of(self, ema: bool):
        """Inside the block, the model holds the EMA's weights when `ema` (and its own again after it)."""
        return self.ema.swapped_in(self.trained_models()) if ema else contextlib.nullcontext()

    def unwrapped_model(self) -> SDModel:
        return unwrapped(self.model, self.accelerator)


def train(config: TrainConfig, run_dir: Path | None = None) -> dict:
    """Train (or, with resume_from, continue) a run; the summary's exit_code is non-zero when it stopped early.
    Signals are handled from the first moment: a stop during set-up ends the run before any folder is written."""
    request = StopRequest()
    with stop_signals_handled(request):
        try:
            trainer = Trainer(config, run_dir, stop_request=request)
        except SetUpStopped as stopped:
            tqdm.write(
                f"{stopped.stop.reason} during set-up: stopped before training started; nothing was trained "
                f"and no run folder was written. Run the same command again to start."
            )
            return {"run_dir": None, "steps": 0, "stopped": stopped.stop.reason, "exit_code": stopped.stop.exit_code}
        return trainer.run()
