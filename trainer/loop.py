"""The training run as a story: set up (the constructor), then `train`: for each optimizer step, batches → loss,
backward, step → schedule → what the processes agree on → log → validate / sample / save when due; `finish`
writes the final saves, plots and summary.

The pieces live elsewhere, one home each: trainer/setup.py builds, trainer/step.py steps and agrees,
trainer/saving.py writes, trainer/resume.py restores, trainer/stops.py says why a run stops. The public methods
here (`train_step`, `epoch_loader`, `next_micro_batches`, `update`, `use_lr_functions`, `validate`, `save`) are
the seams the LR finder, the benchmarks and the tests use."""

from __future__ import annotations

import gc
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data.images import ImageLoadError, SkippedImage
from data.loader import ImageBatchDataset, make_loader
from data.prepare import prepare_data
from optimizer.lr import FunctionLR, current_lrs, plan_schedule
from trainer.cache import build_caches
from trainer.model import SDModel
from trainer.progress import Progress
from trainer.resume import (
    checkpoint_missing,
    find_state_to_resume,
    restore_process_rng,
    restore_training,
    resume_notes,
    resumed_lines,
)
from trainer.sampling import SamplePrompts, make_samples, samples_due
from trainer.saving import (
    run_summary,
    training_state,
    weights_across_processes,
    write_checkpoint,
    write_json,
    write_plots,
    write_training_state,
)
from trainer.setup import (
    build_model_and_optimizer,
    build_validators,
    check_output_folders,
    claim_run_dir,
    make_accelerator,
    open_logs,
    plan_lines,
    report_data_problems,
    resolve_num_workers,
    resolve_seed,
    run_fingerprint,
    save_sizes,
    trained_part_names,
    unwrapped,
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
from utils.checkpoint import copy_atomic, saved_checkpoints
from utils.config import TrainConfig
from utils.disk import disk_space_note
from utils.state import TrainingState, capture_rng, read_state, seed_everything, state_folder_name


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
        self._stop_if_asked()

        # The data, the steps (of the whole group of processes) and the LR schedule, said before any model loads.
        self.data = prepare_data(config)
        self.say(self.data.summary())
        batches = self.data.batches_per_process(accelerator.num_processes)
        self.plan, self.schedules, notes = plan_schedule(config, batches)
        self.num_workers = resolve_num_workers(
            config.num_workers, accelerator.device, accelerator.num_processes, batches
        )
        for line in notes + plan_lines(
            self.plan,
            self.data,
            config,
            self.seed,
            accelerator.mixed_precision,
            accelerator.num_processes,
            self.num_workers,
        ):
            self.say(line)
        self.sample_prompts = (
            SamplePrompts(config.sample_prompts, self.data.train + self.data.val, config, self.say)
            if config.sample_prompts
            else None
        )
        self._stop_if_asked()

        self.model, self.optimizer, self.lr_scheduler, self.trained_modules = build_model_and_optimizer(
            config, accelerator, self.schedules, self.say
        )
        self.fingerprint = run_fingerprint(
            config, self.unwrapped_model(), self.trained_models(), self.data, self.seed, accelerator.mixed_precision
        )
        if self.resume_state:  # checked before anything in the run folder changes
            for note in resume_notes(
                self.resume_state,
                self.saved,
                self.fingerprint,
                self.plan.total_steps,
                config,
                self.schedules.lrs_at(self.saved["step"]),
            ):
                self.say(note)
        self.validator, self.extra_validators = build_validators(self.unwrapped_model(), config, self.data)
        # After the validators: they still encode with the VAE the latent cache may move off the device.
        self.caches = build_caches(
            config,
            self.data.train,
            self.data.batches.item_buckets,
            self.unwrapped_model(),
            accelerator,
            self.say,
            self.num_workers,
        )
        self._stop_if_asked()

        # The run can start: its folder is created (or, resumed, taken over) and locked, and written from here on.
        self.run_dir, self.run_lock = claim_run_dir(config, self.resume_state, run_dir, run_name, accelerator)
        try:
            self._write_run_start()
        except OSError:  # a full disk: a new folder is removed, a resumed one keeps what it had
            if self.run_lock:
                self.run_lock.release()
            if self.is_main and not self.resume_state:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self.started = time.monotonic()
        self.first_step = self.saved["step"] if self.saved else 0  # where this process's share of the run starts

    def _write_run_start(self) -> None:
        """config.json, the data report, the disk note and the opened logs: the first writes into the run folder."""
        config = self.config
        if self.is_main:
            write_json(self.run_dir / "config.json", {**config.model_dump(mode="json"), "seed": self.seed})
        report_data_problems(self.data, config.resolution, self.run_dir, self.is_main, self.say)
        sizes = save_sizes(self.unwrapped_model(), self.trained_models(), config, self.plan.epochs)
        self.say(disk_space_note(sizes, self.run_dir))
        self.logger = open_logs(self.run_dir, self.is_main, self.saved["step"] if self.saved else None, self.say)

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
        loaders = self.epoch_iterators(first_epoch, progress.global_step - first_epoch * plan.steps_per_epoch)
        try:
            for epoch in range(first_epoch, plan.epochs):
                first_step = progress.global_step - epoch * plan.steps_per_epoch  # > 0 where a resumed run starts
                loader = next(loaders)
                for step_in_epoch in range(first_step, plan.steps_per_epoch):
                    if progress.global_step >= plan.total_steps or self.stop:
                        break
                    yield self.train_step(loader, step_in_epoch, bar)
                if self.stop:
                    break
                if self.epoch_save_due(epoch):
                    self.save()
                    self.check_for_stop()
        finally:
            bar.close()

    def train_step(self, loader, step_in_epoch: int, bar) -> StepAgreement:
        """One optimizer step, and everything that is due after it."""
        config, progress, accelerator = self.config, self.progress, self.accelerator
        started = time.monotonic()
        micro_batches = self.next_micro_batches(loader, step_in_epoch)
        # A micro-batch whose images all failed to load is left out; the other processes leave one out too.
        micro_batches = micro_batches[: fewest_everywhere(accelerator, len(micro_batches))]
        loss = (
            optimizer_step(
                self.model,
                micro_batches,
                self.optimizer,
                accelerator,
                config,
                self.trained_modules,
                skip_nonfinite=True,
            )
            if micro_batches
            else math.nan
        )
        lrs = current_lrs(self.optimizer)
        # A skipped update still counts as a step: the LR curve and the data order stay aligned with it.
        self.lr_scheduler.step()
        progress.global_step += 1
        step = progress.global_step
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
        images_per_second = images / (time.monotonic() - started)
        self.logger.log(
            step,
            step / self.plan.steps_per_epoch,
            to_tensorboard=step % config.log_step == 0,
            loss_train=agreement.loss,
            lr_unet=lrs.get("unet"),
            lr_text_encoder=lrs.get("text_encoder"),
            images_per_second=images_per_second,
        )
        # refresh=False: update() redraws at most every mininterval (0.1 s), not at every step.
        bar.set_postfix(
            loss=f"{progress.recent_train_loss(config.log_step):.4f}",
            lr=f"{lrs['unet']:.3g}",
            img_s=f"{images_per_second:.1f}",
            refresh=False,
        )
        bar.update(1)

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

    # --- the data -------------------------------------------------------------------------------------
    def epoch_iterators(self, first_epoch: int, first_step: int):
        """Each epoch's batch iterator in turn, from `first_step` of `first_epoch` on. With workers, the next
        epoch's loader is started when an epoch starts: its workers fork and load its first batches while this
        epoch trains, so no epoch begins with a stall (a loader is built per epoch, see data/loader.py)."""
        ahead = self.num_workers > 0
        upcoming = iter(self.epoch_loader(first_epoch, first_step))
        for epoch in range(first_epoch, self.plan.epochs):
            current = upcoming
            has_next = epoch + 1 < self.plan.epochs
            upcoming = iter(self.epoch_loader(epoch + 1)) if ahead and has_next else None
            yield current
            if upcoming is None and has_next:
                upcoming = iter(self.epoch_loader(epoch + 1))

    def epoch_loader(self, epoch: int, first_step: int = 0):
        """The epoch's batches from its `first_step` on: the order is a function of (seed, epoch), so a resumed
        run skips exactly the batches its interrupted run consumed."""
        config, accelerator = self.config, self.accelerator
        batches = self.data.batches.epoch_batches(
            epoch, self.seed, accelerator.process_index, accelerator.num_processes
        )[first_step * self.plan.grad_accum :]
        dataset = ImageBatchDataset(
            self.data.train,
            self.data.batches,
            seed=self.seed,
            epoch=epoch,
            flip_p=config.flip_p,
            cond_dropout=config.cond_dropout,
            shuffle_tags=config.shuffle_tags,
            keep_tags=config.keep_tags,
            latents=self.caches.latents,
            text_embeddings=self.caches.text_embeddings,
        )
        return make_loader(
            dataset,
            batches,
            num_workers=self.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            prefetch_factor=config.prefetch_factor,
        )

    def next_micro_batches(self, loader, step_in_epoch: int) -> list[dict]:
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
            write_skipped_images(self.data, self.progress.failed_images, self.run_dir)

    # --- seams for a sweep (the LR finder) ------------------------------------------------------------
    def use_lr_functions(self, functions: dict[str, callable]) -> None:
        """Train on other LR functions (one per parameter group, by name) from now on, with beta1 held at the
        configured value where the run's schedule would have cycled it."""
        if self.config.lr_cycle_momentum:
            for group in self.optimizer.param_groups:
                group["betas"] = tuple(self.config.betas)
        self.lr_scheduler = FunctionLR(
            self.optimizer, [functions[group["name"]] for group in self.optimizer.param_groups]
        )

    def update(self, micro_batches: list[dict]) -> float:
        """One optimizer step on the given micro-batches and one LR-schedule step; the mean loss (NaN/inf not
        skipped: a sweep wants to see it)."""
        loss = optimizer_step(
            self.model, micro_batches, self.optimizer, self.accelerator, self.config, self.trained_modules
        )
        self.lr_scheduler.step()
        return loss

    # --- measurements -------------------------------------------------------------------------------
    def validate(self) -> float | None:
        """The extra validation sets, then the held-out validation loss (logged, returned)."""
        step = self.progress.global_step
        with self.caches.parts_on_device("text_encoder"):  # back from the CPU if the text cache moved it there
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
        try:
            with self.caches.parts_on_device("vae", "text_encoder"):  # back from the CPU if a cache moved them
                paths = make_samples(
                    self.unwrapped_model(),
                    self.sample_prompts.reread(),
                    self.run_dir / "samples",
                    step,
                    self.config.resolution,
                    self.accelerator.device,
                    self.seed,
                )
        except OSError as error:  # a full disk: the run stops as after a failed save (after its end: said only)
            self.say(f"error: writing the samples of step {step} failed: {error}")
            self.stop_request(save_failed("samples", error, self.progress))
            return
        for index, (_, image) in enumerate(paths):
            self.logger.image(f"samples/prompt_{index}", image, step)

    # --- saving -------------------------------------------------------------------------------------
    def save(self) -> dict:
        """A resumable state, then a checkpoint of the current weights (the main process writes, the others wait).
        The state goes first: after a SIGTERM the time left may be short, and the state is what resuming needs."""
        if not self.save_state(checkpoint_follows=True):
            return {}
        self.progress.last_save_time = time.monotonic()
        paths = self._write_checkpoint() if self.is_main else {}
        self._agree_on_save(bool(paths))
        return paths

    def _write_checkpoint(self) -> dict:
        step, checkpoints = self.progress.global_step, self.progress.checkpoints
        if checkpoints and checkpoints[-1]["step"] == step:  # e.g. a stop right after an epoch's save
            return {key: value for key, value in checkpoints[-1].items() if key != "step"}
        try:
            paths = write_checkpoint(self.unwrapped_model(), self.config, self.plan, step, self.run_dir)
        except OSError as error:
            self._save_failed("checkpoint", error)
            return {}
        checkpoints.append({"step": step, **paths})
        self.say(f"saved checkpoint {paths['diffusers']}")
        return paths

    def save_state(self, checkpoint_follows: bool = False) -> bool:
        """Everything the run depends on, to <run_dir>/state/state-gs<step>/, atomically; only the newest
        save_state_keep states are kept. False when the save failed (the run then stops). `checkpoint_follows`
        is recorded: a resumed run writes the checkpoint a kill interrupted."""
        rng = {"processes": gather_object([capture_rng()])}  # also the barrier: every process finished the step
        self.progress.last_state_time = time.monotonic()
        last = self.progress.last_state
        already_saved = last and Path(last).name == state_folder_name(self.progress.global_step)
        saved = self._write_state(rng, checkpoint_follows) if self.is_main and not already_saved else True
        return self._agree_on_save(saved)

    def _write_state(self, rng: dict, checkpoint_follows: bool) -> bool:
        try:
            state = training_state(
                self.progress.global_step,
                self.plan,
                self.seed,
                self.accelerator.num_processes,
                self.lr_scheduler,
                self.schedules.lrs_at(self.progress.global_step),
                self.accelerator.scaler,
                self.progress,
                self.fingerprint,
                self.config,
                self.trained_models(),
                self.optimizer,
                rng,
                checkpoint_follows,
            )
            saved, pruned = write_training_state(state, self.run_dir, self.config.save_state_keep)
        except OSError as error:
            self._save_failed("state", error)
            return False
        self.progress.last_state = str(saved.path)
        self.say(
            f"saved state {saved.path} ({saved.bytes / 1e9:.2f} GB) in {saved.seconds:.1f} s"
            + (f"; removed {len(pruned)} older state(s)" if pruned else "")
        )
        return True

    def _save_failed(self, what: str, error: OSError) -> None:
        self.stop = self.stop or save_failed(what, error, self.progress)  # said when the run ends

    def _agree_on_save(self, saved: bool) -> bool:
        """Only the main process writes: whether it managed to (a failed save stops the run) is news to the
        others, who wait for it here."""
        saved, stop = agreed((saved, self.stop))
        self.stop = self.stop or stop
        return saved

    # --- resuming -----------------------------------------------------------------------------------
    def restore(self, state: TrainingState) -> None:
        """Continue exactly where the state left off: weights, optimizer, LR position, grad scaler, progress and,
        last, the random generators (nothing may draw from them between here and the next step)."""
        restore_training(state, self.trained_models(), self.optimizer, self.lr_scheduler, self.accelerator.scaler)
        self.progress = Progress.from_json(state.info["progress"])
        self.progress.checkpoints = saved_checkpoints(self.run_dir / "ckpts", state.step)
        self.progress.last_state = str(self.resume_state)
        if self.is_main:
            write_skipped_images(self.data, self.progress.failed_images, self.run_dir)
        for line in resumed_lines(
            state,
            self.resume_state,
            self.plan,
            self.accelerator.num_processes,
            self.config.batch_size * self.config.grad_accum,
        ):
            self.say(line)
        if checkpoint_missing(self.resume_state, state.info, single_file=not self.config.no_save_ckpt):
            self.say(f"the interrupted run was killed while writing the checkpoint of step {state.step}: writing it")
            self.progress.checkpoints = [entry for entry in self.progress.checkpoints if entry["step"] != state.step]
            self._agree_on_save(bool(self._write_checkpoint()) if self.is_main else True)
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
            return self._stopped_before_training()
        final = self.save() if self.stop is None or self.stop.save else {}
        if self.stop is None:  # complete, and its final save worked
            self._copy_final_checkpoint(final)
            if self.sample_prompts and self.stop is None:
                self.sample()
        summary = run_summary(
            self.run_dir,
            final,
            progress,
            self.plan,
            self.data,
            self.seed,
            time.monotonic() - self.started,
            self.resume_state,
            self.stop,
        )
        summary["processes"] = weights_across_processes(self.trained_models(), self.accelerator.num_processes)
        if not summary["processes"].get("weights_identical", True):
            self.say(
                f"warning: the processes ended with different weights ({summary['processes']}); the saved "
                f"checkpoint holds the main process's"
            )
        if self.is_main:
            self._write_outputs(summary)
        self.close()
        if self.stop:
            self.say(how_it_stopped(self.stop, progress, self.plan.total_steps))
        return summary

    def _copy_final_checkpoint(self, final: dict) -> None:
        """save_ckpt_dir: a copy of the final single file. A failed copy stops nothing already done: the run's
        own checkpoint stays, and the exit code says the copy failed."""
        if not (self.is_main and self.config.save_ckpt_dir and "single_file" in final):
            return
        target = Path(self.config.save_ckpt_dir) / Path(final["single_file"]).name
        try:
            copy_atomic(Path(final["single_file"]), target)
            final["single_file_copy"] = str(target)
        except OSError as error:
            self.stop = Stop.failed(
                "copy failed",
                f"the run is complete, but copying its final checkpoint to "
                f"save_ckpt_dir failed ({error}); the checkpoint is intact at "
                f"{final['single_file']}. Copy it yourself once there is space.",
            )

    def _write_outputs(self, summary: dict) -> None:
        """Plots and run_summary.json, last; a full disk here is said, not raised: every save is already done."""
        try:
            write_plots(self.run_dir, self.schedules, self.progress, self.plan)
            write_json(self.run_dir / "run_summary.json", summary)
        except OSError as error:
            self.say(
                f"error: writing the plots or run_summary.json in {self.run_dir} failed ({error}); the "
                f"checkpoints and states are intact, and metrics.csv holds the measurements"
            )

    def _stopped_before_training(self) -> dict:
        """A stop before this run trained a step saves nothing: a new run's folder is removed (it held only the
        config and a baseline), a resumed run's folder stays as it was."""
        self.close()
        reason = self.stop.reason
        if self.resume_state:
            self.say(
                f"{reason} before the first step: nothing more was trained; the run resumes from "
                f"{self.resume_state} as before"
            )
        else:
            if self.is_main:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            self.say(
                f"{reason} before the first step: nothing was trained or saved, and the new run folder "
                f"{self.run_dir} was removed"
            )
        return {
            "run_dir": str(self.run_dir),
            "steps": self.progress.global_step,
            "stopped": reason,
            "exit_code": self.stop.exit_code,
        }

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

    # --- set-up helpers and views ---------------------------------------------------------------------
    def say(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """The models whose weights train, unwrapped, by name."""
        model = self.unwrapped_model()
        return {name: getattr(model, name) for name in trained_part_names(self.config)}

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
