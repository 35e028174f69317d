"""From the config and the RunPlan to one LR function per parameter group (UNet, text encoder).

This is where config keys become `ScheduleSpec`s, where ED2's automatic defaults are applied, and where a
schedule may fix the run length (staged cycles, ending on a low point). Everything else about schedules
lives in optimizer/schedules.py as pure functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from data.plan import RunPlan, plan_run
from optimizer import schedules
from optimizer.schedules import FunctionLR, ScheduleError, ScheduleSpec
from utils.config import ConfigError, TrainConfig

MOMENTUM_RANGE = (0.85, 0.95)  # Smith's cyclical momentum: 0.95 at the LR's low, 0.85 at its peak


def warmup_steps(name: str, warmup: int | None, decay: int | None, total_steps: int) -> int:
    """The warmup given, or ED2's automatic 2% of the decay steps for the ED2 schedules that warm up."""
    if warmup is not None:
        return warmup
    if name in schedules.ED2_NAMES and name != "constant":
        return schedules.ed2_default_warmup_steps(decay or schedules.ed2_default_decay_steps(total_steps))
    return 0


def unet_spec(config: TrainConfig, plan: RunPlan) -> ScheduleSpec:
    stages = tuple((stage.cycles, stage.lr) for stage in config.lr_cycle_stages or ())
    return ScheduleSpec(
        name=config.lr_scheduler,
        lr=config.lr,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        lr_min=config.lr_min,
        warmup_steps=warmup_steps(config.lr_scheduler, config.lr_warmup_steps, config.lr_decay_steps,
                                  plan.total_steps),
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


def text_encoder_spec(config: TrainConfig, unet: ScheduleSpec) -> ScheduleSpec:
    """The same phase as the UNet with the text encoder's own bounds (explicit, or the UNet's x scale), or
    its own ED2-style schedule when text_encoder_lr_scheduler names a different one (ED2's optimizer.json
    default trains the UNet constant and the text encoder on cosine)."""
    scale = config.text_encoder_lr_scale
    peak = config.text_encoder_lr if config.text_encoder_lr is not None else config.lr * scale
    name = config.text_encoder_lr_scheduler
    if name and name != config.lr_scheduler:
        if name not in schedules.ED2_NAMES:
            raise ConfigError(f"key 'text_encoder_lr_scheduler' = '{name}': a separate text encoder schedule must be "
                              f"one of {', '.join(schedules.ED2_NAMES)}; cyclic and one_cycle are shared with the UNet "
                              f"(leave text_encoder_lr_scheduler null and set text_encoder_lr / _lr_min).")
        decay = config.text_encoder_lr_decay_steps or config.lr_decay_steps
        warmup = config.text_encoder_lr_warmup_steps
        return ScheduleSpec(name=name, lr=peak, total_steps=unet.total_steps, steps_per_epoch=unet.steps_per_epoch,
                            decay_steps=decay, warmup_steps=warmup_steps(name, warmup, decay, unet.total_steps))
    low = config.text_encoder_lr_min if config.text_encoder_lr_min is not None else config.lr_min * scale
    if low > peak:
        raise ConfigError(f"text_encoder_lr_min ({low:g}) must not exceed text_encoder_lr ({peak:g}).")
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
    return plan.with_total_steps(schedules.stages_total_steps(stages, stepsize, warmup))


def _end_on_low_point(config: TrainConfig, plan: RunPlan, spec: ScheduleSpec, notes: list[str]) -> RunPlan:
    """Say when a cyclic run does not end on a low point; with lr_end_at_low, move the end to the nearest."""
    if spec.name != "cyclic" or schedules.describe(spec)["ends"] == "low":
        return plan
    described = schedules.describe(spec)
    nearest = schedules.nearest_low_end(spec)
    if config.lr_end_at_low and nearest.nearest_steps:
        notes.append(f"lr_end_at_low: run length changed from {plan.total_steps} to {nearest.nearest_steps} steps "
                     f"so that it ends on a low point of the cycle")
        return plan.with_total_steps(nearest.nearest_steps)
    notes.append(f"warning: the run ends {described['ends']} (LR {described['end_lr']:.3g}), not on a low point. "
                 f"{nearest.message}"
                 + ("" if config.lr_end_at_low else " Set lr_end_at_low: true to end on the nearest one."))
    return plan


def plan_schedule(config: TrainConfig, batches_per_epoch: int) -> tuple[RunPlan, dict[str, Callable[[int], float]], list[str]]:
    """The final RunPlan, an LR function per group ("unet", "text_encoder") and notes for the log."""
    notes: list[str] = []
    try:
        plan = plan_run(batches_per_epoch, config.grad_accum, config.max_epochs, config.max_steps)
        plan = _stages_length(config, plan)
        plan = _end_on_low_point(config, plan, unet_spec(config, plan), notes)
        spec = unet_spec(config, plan)
        specs = {"unet": spec}
        if config.train_text_encoder:
            specs["text_encoder"] = text_encoder_spec(config, spec)
        functions = {group: schedules.build_schedule(s) for group, s in specs.items()}
        momentum = schedules.build_momentum(spec)
    except ScheduleError as error:
        raise ConfigError(str(error)) from None
    notes.extend(f"note: {note}" for note in schedules.describe(spec)["notes"])
    if momentum is not None:
        functions["momentum"] = momentum
    return plan, functions, notes


def build_lr_scheduler(optimizer: torch.optim.Optimizer, functions: dict, cycle_momentum: bool) -> FunctionLR:
    """Wrap the pure functions for torch; groups are matched by name."""
    lr_functions = [functions[group["name"]] for group in optimizer.param_groups]
    return FunctionLR(optimizer, lr_functions, momentum_fn=functions.get("momentum") if cycle_momentum else None)


def current_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}
