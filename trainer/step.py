"""One optimizer step, and what the processes agree on after it.

`optimizer_step` is the whole arithmetic of a step (forward, backward over the micro-batches, clip, update);
`agree_after_step` is the one collective per step that makes every process take the same decisions (the logged
loss, a stop, the timed saves), returned as a value for the loop to act on."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from trainer.diffusion import training_loss
from trainer.progress import Progress
from trainer.stops import Stop
from utils.config import TrainConfig, settings_changes


def optimizer_step(
    model, micro_batches, optimizer, accelerator, config, trained_modules, skip_nonfinite: bool = False
) -> float:
    """Accumulate the micro-batches' gradients (averaged, not summed), clip, step. Returns the mean loss.

    With `skip_nonfinite`, a NaN/inf loss is caught before its backward (which would poison every weight):
    the gradients are zeroed, the weights stay as they were, and the non-finite loss is returned.

    With fused_backward_pass the optimizer (optimizer/per_parameter.py) updates each weight inside the backward and
    frees its gradient, so `optimizer.step()` finds nothing left to do; the config refuses clipping and gradient
    accumulation with it, which need every gradient first."""
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


@dataclass(frozen=True)
class StepAgreement:
    """What every process takes from the end of a step, alike."""

    loss: float  # the group's mean loss (NaN when any process skipped the update)
    stop: Stop | None  # a stop asked on any process: all stop after this step, for the first one's reason
    checkpoint_due: bool  # ckpt_every_n_minutes has passed (on any process's clock)
    state_due: bool  # save_state_every_n_minutes has passed


def timed_saves_due(config: TrainConfig, progress: Progress, now: float) -> tuple[bool, bool]:
    """(checkpoint, state): whether the time-based saves are due on this process's clock."""
    checkpoint = bool(config.ckpt_every_n_minutes) and now - progress.last_save_time >= config.ckpt_every_n_minutes * 60
    state = (
        bool(config.save_state_every_n_minutes)
        and now - progress.last_state_time >= config.save_state_every_n_minutes * 60
    )
    return checkpoint, state


def agree_after_step(
    accelerator: Accelerator, loss: float, stop_asked: Stop | None, saves_due: tuple[bool, bool]
) -> StepAgreement:
    """One all-reduce per step settles what every process must do alike."""
    wanted = [loss, stop_asked is not None, *saves_due]
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(value) for value in wanted], dtype=torch.float64, device=accelerator.device)
        wanted = accelerator.reduce(flags, "sum").tolist()
        wanted[0] /= accelerator.num_processes
        if wanted[1]:  # a signal may have reached only some processes yet
            stop_asked = first_stop(stop_asked)
    return StepAgreement(
        loss=wanted[0],
        stop=stop_asked if wanted[1] else None,
        checkpoint_due=bool(wanted[2]),
        state_due=bool(wanted[3]),
    )


def agree_on_stop(accelerator: Accelerator, asked: Stop | None) -> Stop | None:
    """The stop every process takes when any of them was asked to stop (None when none was)."""
    if accelerator.num_processes == 1:
        return asked
    flag = torch.tensor([float(asked is not None)], device=accelerator.device)
    return first_stop(asked) if accelerator.reduce(flag, "sum").item() else None


def first_stop(stop: Stop | None) -> Stop | None:
    """The stop request of the lowest process that has one (a signal may reach the processes one by one)."""
    return next((request for request in gather_object([stop]) if request is not None), None)


def agreed(value):
    """The main process's `value` on every process: what is picked once (a run folder name, a random seed, the
    state to resume, whether a save worked) must be the same everywhere. (accelerate's collectives return their
    input on one process.)"""
    return broadcast_object_list([value], from_process=0)[0]


def agree_on_live_settings(config: TrainConfig, is_main: bool) -> list[str]:
    """load_settings_every_epoch: the main process reads the config file again; the keys the loop reads as it goes
    (LIVE_KEYS) take the new values in `config` on every process, the others wait for a resume. Returns what to
    say about the changes."""
    live, lines = agreed(settings_changes(config) if is_main else ({}, []))
    for key, value in live.items():
        setattr(config, key, value)  # the one config object every part of the run reads
    return lines
