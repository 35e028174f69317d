"""From the config and the RunPlan to the run's schedules, and onto the torch optimizer.

This is where config keys become `ScheduleSpec`s, where ED2's automatic defaults are applied, and where a
schedule may fix the run length (staged cycles, ending on a low point). `plan_schedule` returns the result as
`Schedules`: one LR function per parameter group (UNet, text encoders) and the cycled beta1, if any.
`FunctionLR` is the one torch object: it sets those functions' values on the optimizer's param groups. The
schedules themselves are pure functions, in optimizer/schedules.py (see its docstring for the other modules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from data.plan import RunPlan, plan_run
from optimizer.schedule_checks import ScheduleError, ed2_default_decay_steps
from optimizer.schedule_report import describe, nearest_low_end
from optimizer.schedules import LrFunction, ScheduleSpec, build_momentum, build_schedule, stages_total_steps
from utils.config import (
    ED2_SCHEDULE_NAMES,
    MAX_STEPS,
    ConfigError,
    TrainConfig,
    text_encoder_key,
    text_encoder_setting,
)

MOMENTUM_RANGE = (0.85, 0.95)  # Smith's cyclical momentum: 0.95 at the LR's low, 0.85 at its peak


def ed2_default_warmup_steps(decay_steps: int) -> int:
    """ED2's automatic lr_warmup_steps (used when it is null): 2% of lr_decay_steps."""
    return int(decay_steps / 50)


def warmup_steps(name: str, warmup: int | None, decay: int | None, total_steps: int) -> int:
    """The warmup given, or ED2's automatic 2% of the decay steps for the ED2 schedules that warm up."""
    if warmup is not None:
        return warmup
    if name in ED2_SCHEDULE_NAMES and name != "constant":
        return ed2_default_warmup_steps(decay or ed2_default_decay_steps(total_steps))
    return 0


def unet_spec(config: TrainConfig, plan: RunPlan) -> ScheduleSpec:
    stages = tuple((stage.cycles, stage.lr) for stage in config.lr_cycle_stages or ())
    return ScheduleSpec(
        name=config.lr_scheduler,
        lr=config.lr,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        lr_min=config.lr_min,
        warmup_steps=warmup_steps(config.lr_scheduler, config.lr_warmup_steps, config.lr_decay_steps, plan.total_steps),
        decay_steps=None if config.lr_scheduler == "one_cycle" else config.lr_decay_steps,
        stepsize_epochs=config.lr_stepsize_epochs,
        cycles=config.lr_cycles,
        cycle_shape=config.lr_cycle_shape,
        cycle_start=config.lr_cycle_start,
        cycle_decay=config.lr_cycle_decay,
        gamma=config.lr_gamma,
        stages=stages,
        pct_start=config.lr_pct_start,
        div_factor=config.lr_div_factor,
        final_div_factor=config.lr_final_div_factor,
        three_phase=config.lr_three_phase,
        anneal=config.lr_anneal_strategy,
        momentum_cycle=MOMENTUM_RANGE if config.lr_cycle_momentum else None,
    )


def text_encoder_scale(config: TrainConfig, part: str) -> float:
    """A text encoder's LRs relative to the UNet's where they are not given (text_encoder_2_lr_scale null: 1)."""
    scale = text_encoder_setting(config, part, "lr_scale")
    return 1.0 if scale is None else scale


def text_encoder_peak(config: TrainConfig, part: str) -> float:
    """The peak LR of text encoder `part`: explicit, or the UNet's x its scale (keys: utils/config.py
    text_encoder_key)."""
    explicit = text_encoder_setting(config, part, "lr")
    return explicit if explicit is not None else config.lr * text_encoder_scale(config, part)


def text_encoder_spec(config: TrainConfig, unet: ScheduleSpec, part: str = "text_encoder") -> ScheduleSpec:
    """The same phase as the UNet with the text encoder's own bounds (explicit, or the UNet's x scale), or
    its own ED2-style schedule when its lr_scheduler names a different one (ED2's optimizer.json default trains
    the UNet constant and the text encoder on cosine). `part`: "text_encoder", or SDXL's "text_encoder_2", whose
    keys left null are the first's (utils/config.py text_encoder_key)."""
    peak = text_encoder_peak(config, part)
    scheduler_key = text_encoder_key(config, part, "lr_scheduler")
    name = getattr(config, scheduler_key)
    if name and name != config.lr_scheduler:
        if name not in ED2_SCHEDULE_NAMES:
            raise ConfigError(
                f"key '{scheduler_key}' = '{name}': a separate text encoder schedule must be "
                f"one of {', '.join(ED2_SCHEDULE_NAMES)}; cyclic and one_cycle are shared with the UNet "
                f"(leave {scheduler_key} null and set {part}_lr / _lr_min)."
            )
        decay = text_encoder_setting(config, part, "lr_decay_steps") or config.lr_decay_steps
        warmup = text_encoder_setting(config, part, "lr_warmup_steps")
        return ScheduleSpec(
            name=name,
            lr=peak,
            total_steps=unet.total_steps,
            steps_per_epoch=unet.steps_per_epoch,
            decay_steps=decay,
            warmup_steps=warmup_steps(name, warmup, decay, unet.total_steps),
        )
    explicit_low = text_encoder_setting(config, part, "lr_min")
    low = explicit_low if explicit_low is not None else config.lr_min * text_encoder_scale(config, part)
    if low > peak:
        min_key, peak_key = text_encoder_key(config, part, "lr_min"), text_encoder_key(config, part, "lr")
        raise ConfigError(f"{min_key} ({low:g}) must not exceed {peak_key} ({peak:g}).")
    ratio = peak / config.lr
    stages = tuple((cycles, lr * ratio) for cycles, lr in unet.stages)
    return replace(unet, lr=peak, lr_min=low, stages=stages)


def _stages_length(config: TrainConfig, plan: RunPlan) -> RunPlan:
    """With lr_cycle_stages and no max_epochs / max_steps, the stages set the run length."""
    if not config.lr_cycle_stages or config.max_epochs is not None or config.max_steps is not None:
        return plan
    if config.lr_decay_steps:
        stepsize = config.lr_decay_steps
    elif config.lr_stepsize_epochs:
        stepsize = config.lr_stepsize_epochs * plan.steps_per_epoch
    else:
        raise ConfigError(
            "lr_cycle_stages with max_epochs null: the run length follows from the stages, so the stepsize must "
            "be given in steps (lr_decay_steps) or epochs (lr_stepsize_epochs)."
        )
    stages = [(stage.cycles, stage.lr) for stage in config.lr_cycle_stages]
    warmup = config.lr_warmup_steps or 0
    return plan.with_total_steps(stages_total_steps(stages, stepsize, warmup))


def _end_on_low_point(config: TrainConfig, plan: RunPlan, spec: ScheduleSpec, notes: list[str]) -> RunPlan:
    """Say when a cyclic run does not end on a low point; with lr_end_at_low, move the end to the nearest."""
    if spec.name != "cyclic":
        return plan
    described = describe(spec)
    if described["ends"] == "low":
        return plan
    nearest = nearest_low_end(spec)
    if config.lr_end_at_low and nearest.nearest_steps:
        notes.append(
            f"lr_end_at_low: run length changed from {plan.total_steps} to {nearest.nearest_steps} steps "
            f"so that it ends on a low point of the cycle"
        )
        return plan.with_total_steps(nearest.nearest_steps)
    notes.append(
        f"warning: the run ends {described['ends']} (LR {described['end_lr']:.3g}), not on a low point. "
        f"{nearest.message}" + ("" if config.lr_end_at_low else " Set lr_end_at_low: true to end on the nearest one.")
    )
    return plan


@dataclass(frozen=True)
class Schedules:
    """The run's schedules as functions of the optimizer step (0 = the first step of the run)."""

    lr: dict[str, LrFunction]  # the absolute LR of each param group: "unet", and the text encoders that train
    momentum: LrFunction | None  # beta1 / SGD momentum, shared by the groups; None unless lr_cycle_momentum

    def lrs_at(self, step: int) -> dict[str, float]:
        return {group: lr_at(step) for group, lr_at in self.lr.items()}


def refuse_overlong(plan: RunPlan) -> None:
    """max_epochs x the steps of an epoch can pass MAX_STEPS though each key is within its own bound."""
    if plan.total_steps > MAX_STEPS:
        raise ConfigError(
            f"key 'max_epochs': {plan.epochs:,} epochs of {plan.steps_per_epoch:,} steps make "
            f"{plan.total_steps:,} steps; the longest run accepted is {MAX_STEPS:,} steps. Lower "
            f"max_epochs, or give max_steps."
        )


def plan_schedule(config: TrainConfig, batches_per_epoch: int | Sequence[int]) -> tuple[RunPlan, Schedules, list[str]]:
    """The final RunPlan, the run's Schedules and notes for the log. batches_per_epoch: one count for every epoch,
    or each epoch's (PreparedData.epoch_batches_per_process), which a rated data set needs: its epochs differ."""
    if config.rated_dataset and isinstance(batches_per_epoch, int):
        raise ValueError("a rated data set's epochs differ: give each epoch's batch count (epoch_batches_per_process)")
    notes: list[str] = []
    try:
        plan = _stages_length(
            config, plan_run(batches_per_epoch, config.grad_accum, config.max_epochs, config.max_steps)
        )
        refuse_overlong(plan)  # before any per-cycle work on it
        plan = _end_on_low_point(config, plan, unet_spec(config, plan), notes)
        spec = unet_spec(config, plan)
        specs = {"unet": spec}
        for part in config.trained_text_encoders:
            specs[part] = text_encoder_spec(config, spec, part)
        # unet_spec sets momentum_cycle only with lr_cycle_momentum, so momentum is None without it.
        schedules = Schedules(
            lr={group: build_schedule(s) for group, s in specs.items()}, momentum=build_momentum(spec)
        )
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
    notes.extend(f"note: {note}" for note in describe(spec)["notes"])
    return plan, schedules, notes


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedules: Schedules) -> FunctionLR:
    """Wrap the pure functions for torch; groups are matched by name."""
    lr_fns = [schedules.lr[group["name"]] for group in optimizer.param_groups]
    return FunctionLR(optimizer, lr_fns, momentum_fn=schedules.momentum)


def scheduler_following(optimizer: torch.optim.Optimizer, functions: dict[str, LrFunction], betas) -> FunctionLR:
    """A scheduler that sets each param group (by name) from `functions`, with beta1 put back at its configured
    value (`betas`, where a cycled momentum moved it) and held there."""
    if betas is not None:
        for group in optimizer.param_groups:
            group["betas"] = tuple(betas)
    return build_lr_scheduler(optimizer, Schedules(lr=functions, momentum=None))


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


# ---------------------------------------------------------------------------------------------------------
# The torch wrapper
# ---------------------------------------------------------------------------------------------------------


class FunctionLR(torch.optim.lr_scheduler.LRScheduler):
    """Sets each param group's ABSOLUTE lr (and optionally beta1 / momentum) from functions of the step.

    Like every torch scheduler, call `step()` once after each `optimizer.step()`; the LR in the param groups
    before optimizer step k is `lr_fn(k)`. `momentum_fn`, when given, sets beta1 (Adam-style) or momentum
    (SGD-style) of every group: the groups share one phase, so they share the momentum. The state is only
    the step count (functions are never pickled): to resume, build it again from the same schedules and
    `load_state_dict`; the param groups are set at once, so the next optimizer step continues the curve.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_fns: LrFunction | Sequence[LrFunction],
        momentum_fn: LrFunction | None = None,
    ) -> None:
        self.lr_fns = _one_per_group(optimizer, lr_fns)
        self.momentum_fn = momentum_fn
        if momentum_fn is not None:
            _check_optimizer_has_momentum(optimizer)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        if self.momentum_fn is not None:
            self._set_momentum(self.momentum_fn(self.last_epoch))
        return [lr_fn(self.last_epoch) for lr_fn in self.lr_fns]

    def state_dict(self) -> dict:
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = int(state_dict["step"])
        # torch waits for the next step() to apply a loaded state (#65342); apply it now instead.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _set_momentum(self, momentum: float) -> None:
        for group in self.optimizer.param_groups:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum


def _one_per_group(optimizer: torch.optim.Optimizer, lr_fns: LrFunction | Sequence[LrFunction]) -> list[LrFunction]:
    groups = len(optimizer.param_groups)
    if callable(lr_fns):
        return [lr_fns] * groups
    if len(lr_fns) != groups:
        raise ValueError(f"FunctionLR got {len(lr_fns)} lr_fns for an optimizer with {groups} param groups.")
    return list(lr_fns)


def _check_optimizer_has_momentum(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if "betas" not in group and "momentum" not in group:
            raise ScheduleError(
                f"lr_cycle_momentum cycles beta1 or momentum, but {type(optimizer).__name__} has neither. "
                "Turn lr_cycle_momentum off for this optimizer."
            )
