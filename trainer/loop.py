"""The training run as a story: set up (the constructor), then `train`: for each optimizer step, batches → loss,
backward, step → schedule → what the processes agree on → log → validate / sample / save when due; `finish`
writes the final saves, plots and summary.

The pieces live elsewhere, one home each: trainer/setup.py builds, trainer/step.py steps and agrees,
trainer/saving.py writes, trainer/resume.py restores, trainer/stops.py says why a run stops. The public methods
here (`train_step`, `epoch_loader`, `next_micro_batches`, `update`, `use_lr_functions`, `validate`, `save`) are
the seams the LR finder, the benchmarks and the tests use."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from optimizer.lr import current_lrs, scheduler_following
from trainer.cache import build_caches
from trainer.ema import build_average, sampled_weights
from trainer.feed import EpochFeed
from trainer.finish import close_run, copy_final_checkpoint, end_before_training
from trainer.model import SDModel
from trainer.plugin_hooks import RunPlugins, ed_state_of, load_run_plugins
from trainer.progress import Progress, show_step
from trainer.resume import restore_run, resume_notes
from trainer.sampling import RunSamples, sample_prompts_of
from trainer.saving import RunSaver, SaveOutcome, TrainingParts, epoch_save_due, minimum_lines
from trainer.setup import (
    build_model_and_optimizer,
    build_validators,
    check_output_folders,
    claim_run_dir,
    make_accelerator,
    prepare_and_plan,
    run_fingerprint,
    save_sizes,
    seed_and_resume_state,
    unwrapped,
    write_run_start,
    write_skipped_images,
)
from trainer.step import (
    StepAgreement,
    agree_after_step,
    agree_on_live_settings,
    agree_on_stop,
    fewest_everywhere,
    optimizer_step,
    timed_saves_due,
)
from trainer.stops import (
    SetUpStopped,
    Stop,
    StopRequest,
    diverged,
    how_it_stopped,
    outranking,
    save_failed,
    stop_signals_handled,
    validation_rose,
)
from trainer.validation import score_sets, validation_due
from utils.checkpoint import best_checkpoints
from utils.config import TrainConfig
from utils.plugins import PluginError
from utils.state import TrainingState, read_state


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
        self.seed, self.resume_state, self.saved = seed_and_resume_state(config, accelerator, self.say)
        if self.is_main:
            check_output_folders(config)
        plugins = load_run_plugins(config, self.say)
        self._stop_if_asked()

        self.data, self.plan, self.schedules, num_workers = prepare_and_plan(config, accelerator, self.seed, self.say)
        prompts = sample_prompts_of(config, self.data.train + self.data.val, self.say)
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
        self.validation_sets = build_validators(model, config, self.data, ema=bool(self.ema))
        # After the validators: they still encode with the VAE the latent cache may move off the device.
        self.caches = build_caches(
            config, self.data.train, self.data.batches.item_buckets, model, accelerator, self.say, num_workers
        )
        self.feed = EpochFeed(config, self.data, self.plan, self.seed, accelerator, self.caches, num_workers, plugins)
        self._stop_if_asked()

        # The run can start: its folder is created (or, resumed, taken over) and locked, and written from here on.
        self.run_dir, self.run_lock = claim_run_dir(config, self.resume_state, run_dir, run_name, accelerator)
        self.saver = RunSaver(
            config, self.run_dir, self.plan, self.seed, fingerprint, self.schedules, self.data, accelerator, self.say
        )
        ed_state = partial(ed_state_of, model, self.optimizer)  # what ED2's hooks are given
        self.plugins = RunPlugins(plugins, config, self.run_dir, ed_state, self.stop_request)
        self.plugins.model_load()
        drawn = {name: partial(self.weights_of, ema=name == "ema") for name in sampled_weights(config, self.ema)}
        self.samples = prompts and RunSamples(
            prompts, self.run_dir, config.resolution, accelerator.device, self.seed, drawn
        )
        sizes = save_sizes(model, self.trained_models(), config, self.plan.epochs)
        self.logger = write_run_start(self.saver, self.run_lock, sizes, self.saved["step"] if self.saved else None)
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
                if self.samples and self.samples.prompts.settings.pretrain:  # ED2's generate_pretrain_samples
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
                    for line in agree_on_live_settings(self.config, self.is_main):
                        self.say(f"note: {line}")
                self.plugins.epoch_start(epoch, progress.global_step, plan.batches_in_epoch(epoch))
                loader = next(loaders)
                for step_in_epoch in range(first_step, plan.steps_in_epoch(epoch)):
                    if progress.global_step >= plan.total_steps or self.stop:
                        break
                    yield self.train_step(loader, epoch, step_in_epoch, bar)
                if self.stop:
                    break
                self.plugins.epoch_end(epoch, progress.global_step)
                if epoch_save_due(self.config, epoch, progress.global_step, plan):
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
        seconds = time.monotonic() - started
        show_step(self.logger, bar, progress, self.plan, config.log_step, agreement.loss, lrs, images / seconds)

        # Then each unit of work that is due, checking for a stop after each one: a stopping run has little time
        # left, and its one save comes from finish(). Validation still runs at the stop's step: the resumed run
        # starts after it, and its metrics must be the uninterrupted run's.
        if self.validation_sets and validation_due(step, self.plan, config.validation.every_n_epochs):
            self.validate()
            self.watch_validation_curve()
            self.check_for_stop()
        if self.samples and self.samples.due(step, self.plan, config) and not self.stop:
            self.sample()
            self.check_for_stop()
        if agreement.checkpoint_due and not self.stop:
            self.save()
            self.check_for_stop()
        elif agreement.state_due and progress.nonfinite_in_a_row == 0 and not self.stop:  # keep the last good one
            self.save_state()
            self.check_for_stop()
        return agreement

    def watch_validation_curve(self) -> None:
        """stop_when_val_rises: a new lowest validation loss is saved as the `-best` checkpoint; that many
        validations in a row above it end the run as complete. Every process has the same losses: they agree."""
        patience = self.config.stop_when_val_rises
        if not patience or self.stop or not self.progress.val_losses:
            return
        since = self.progress.validations_since_minimum()
        if since == 0:
            self._stop_if_failed(self.saver.save_best(self.training_parts(), self.progress))
        elif since >= patience:
            self.stop = validation_rose(self.config, self.progress)

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
        step = self.progress.global_step + 1
        for entry in failed:
            self.say(f"step {step}: could not load {entry.path}: {entry.reason}; left out of the step")
            self.progress.failed_images.append((step, str(entry.path), entry.reason))
        if failed and self.is_main:
            write_skipped_images(self.data, self.progress.failed_images, self.run_dir)
        return batches

    def update(self, micro_batches: list[dict], skip_nonfinite: bool = False) -> float:
        """One optimizer step on the given micro-batches and one LR-schedule step; the mean loss (NaN with no
        micro-batch: a skipped update still counts as a step, so the LR and the data order stay aligned).
        `skip_nonfinite`: a NaN/inf loss skips the update (the run's steps do; a sweep wants to see it)."""
        parts = (self.model, micro_batches, self.optimizer, self.accelerator, self.config, self.trained_modules)
        loss = optimizer_step(*parts, skip_nonfinite=skip_nonfinite) if micro_batches else math.nan
        self.lr_scheduler.step()
        return loss

    def use_lr_functions(self, functions: dict[str, callable]) -> None:
        """Train on other LR functions (one per parameter group, by name) from now on, with beta1 held at the
        configured value where the run's schedule would have cycled it."""
        betas = self.config.betas if self.config.lr_cycle_momentum else None
        self.lr_scheduler = scheduler_following(self.optimizer, functions, betas)

    # --- measurements -------------------------------------------------------------------------------
    def validate(self) -> float | None:
        """The extra validation sets, the EMA's loss when asked, then the held-out validation loss (logged,
        returned)."""
        step = self.progress.global_step
        with self.caches.parts_on_device("text_encoder"):  # back from the CPU if the text cache moved it there
            losses = score_sets(self.unwrapped_model(), self.validation_sets, self.accelerator, self.weights_of)
        for name, loss in losses.items():
            self.say(f"step {step}: {'validation' if name == 'val' else name} loss {loss:.5f}")
            if name != "val":
                self.logger.scalar(f"loss/{name}", loss, step)
        if "val" not in losses:
            return None
        self.progress.val_losses.append((step, losses["val"]))
        self.logger.log(step, self.plan.epochs_at(step), loss_val=losses["val"])
        return losses["val"]

    def sample(self) -> None:
        if not self.is_main:
            return
        step = self.progress.global_step
        try:
            with self.caches.parts_on_device("vae", "text_encoder"):  # back from the CPU if a cache moved them
                grids = self.samples.round(self.unwrapped_model(), step)
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
        self.stop = outranking(self.stop, outcome.stop)
        return outcome

    def restore(self, state: TrainingState) -> None:
        """Continue exactly where the state left off (trainer/resume.py `restore_run`)."""
        self.progress, stop = restore_run(state, self.training_parts(), self.saver, self.resume_state)
        self.stop = self.stop or stop

    # --- the end ------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """The end of the run, complete, ended early or stopped: final saves, samples, plots, summary. A stopped run
        says how to resume it; its summary carries the exit code."""
        progress = self.progress
        if self.stop and self.stop.save and progress.global_step >= self.plan.total_steps and not self.stop.complete:
            self.stop = None  # the signal came during the last step: nothing is left to resume
        if self.stop and self.stop.save and progress.global_step == self.first_step:
            self.close()
            return end_before_training(
                self.run_dir, self.resume_state, self.stop, progress.global_step, self.is_main, self.say
            )
        if self.ends_complete:
            self.plugins.training_end()
        final = self.save() if self.stop is None or self.stop.save else {}
        if self.ends_complete:  # and its final save worked
            if self.is_main:
                best = best_checkpoints(self.run_dir / "ckpts")[-1:] if self.config.stop_when_val_rises else []
                self.stop = outranking(self.stop, copy_final_checkpoint(final, self.config.save_ckpt_dir, *best))
            if self.samples and self.ends_complete:
                self.sample()
        seconds = time.monotonic() - self.started
        summary = self.saver.write_summary(
            final, progress, seconds, self.resume_state, self.stop, self.trained_models()
        )
        self.close()
        for line in minimum_lines(summary["validation_minimum"]):
            self.say(line)
        if self.stop:
            self.say(how_it_stopped(self.stop, progress, self.plan.total_steps))
        return summary

    @property
    def ends_complete(self) -> bool:
        """No stop, or an early stop: the run ends with its final save, copy and samples."""
        return self.stop is None or self.stop.complete

    def close(self) -> None:
        """Logs, the run folder's lock, then the process group (trainer/finish.py `close_run`)."""
        self.model, self.trained_modules = self.unwrapped_model(), []  # the DDP wrappers go before the group
        close_run(self.logger, self.run_lock, self.accelerator)

    # --- views ------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models whose weights train, unwrapped, by name."""
        model = self.unwrapped_model()
        return {name: getattr(model, name) for name in self.config.trained_parts}

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
