"""The optimizer factory: one optimizer, one parameter group per trained model (UNet, text encoder, SDXL's second
text encoder).

Each group carries its own LR function (see optimizer/lr.py), so a text encoder follows the same phase
of the schedule with its own bounds, and its own weight decay / betas / epsilon when configured. With
fused_backward_pass or stochastic_rounding the optimizer is one per parameter behind one face
(optimizer/per_parameter.py), with the same groups.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from optimizer.per_parameter import PerParameterOptimizer
from optimizer.stochastic_rounding import StochasticRounding
from utils.config import ConfigError, TrainConfig, text_encoder_setting

# name -> (module, class, the hyperparameters it takes from the config); the module is imported on use.
OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", ("betas", "eps", "weight_decay")),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", ("betas", "eps", "weight_decay")),
    "lion": ("lion_pytorch", "Lion", ("betas", "weight_decay")),  # lucidrains' Lion, as ED2's "lion"
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", ("betas", "weight_decay")),
    "prodigy": ("prodigyopt", "Prodigy", ("betas", "eps", "weight_decay")),
    "dadapt_adam": ("dadaptation", "DAdaptAdam", ("betas", "eps", "weight_decay")),
    "dadapt_lion": ("dadaptation", "DAdaptLion", ("betas", "weight_decay")),
    "dadapt_sgd": ("dadaptation", "DAdaptSGD", ("weight_decay",)),
    "coordinate_dowg": ("dowg", "CoordinateDoWG", ()),  # its eps is a distance estimate, not Adam's epsilon
    # transformers' Adafactor: factored second moments (a row and a column vector per matrix instead of a full
    # tensor) and, with its default beta1 None, no first moment: the least optimizer memory here. Its eps is a pair
    # of its own (not Adam's epsilon); its weight decay is decoupled (p -= lr * weight_decay * p), as AdamW's.
    "adafactor": ("transformers.optimization", "Adafactor", ("weight_decay",)),
}
# Our schedule drives Adafactor's LR, so the three options that would let Adafactor set or scale it are fixed
# off: relative_step=True replaces the group's lr with Adafactor's own 1/sqrt(step) schedule (and refuses an lr),
# scale_parameter=True multiplies the lr by each weight's RMS (the LR logged and planned would not be the one
# applied), and warmup_init is a variant of relative_step. With all three off the update is lr(step) x the
# clipped, normalized gradient: the LR of optimizer/lr.py, each step.
ADAFACTOR_FIXED = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
PACKAGE_OF = {
    "transformers.optimization": "transformers",
    "bitsandbytes.optim": "bitsandbytes",
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "dowg": "dowg",
}


def model_param_groups(
    config: TrainConfig,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    text_encoder_2: torch.nn.Module | None = None,
) -> list[dict]:
    """The trained parameters, grouped by model (named as the model's parts), with each model's own
    hyperparameters. `text_encoder_2`: SDXL's second text encoder, needed when train_text_encoder_2."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    if text_encoder_2 is None and config.train_text_encoder_2:
        raise ValueError("train_text_encoder_2: the model's second text encoder must be given")
    groups = [
        {
            "name": name,
            "params": [p for p in models[name].parameters() if p.requires_grad],
            **_hyperparameters(config, name),
        }
        for name in config.trained_parts
    ]
    return [group for group in groups if group["params"]]


def _hyperparameters(config: TrainConfig, part: str) -> dict:
    """The UNet's betas, eps and weight decay; a text encoder's own where given (utils/config.py text_encoder_key)."""

    def pick(setting: str, value):
        own = None if part == "unet" else text_encoder_setting(config, part, setting)
        return own if own is not None else value

    return {
        "betas": tuple(pick("betas", config.betas)),
        "eps": pick("epsilon", config.epsilon),
        "weight_decay": pick("weight_decay", config.weight_decay),
    }


def build_optimizer(config: TrainConfig, param_groups: list[dict], seed: int = 0) -> torch.optim.Optimizer:
    """`param_groups` from model_param_groups; LRs start at 0 and are set by the LR scheduler. `seed`: the run's
    seed, which seeds stochastic rounding (the same on every process)."""
    module_name, class_name, takes = OPTIMIZERS[config.optimizer]
    optimizer_class = getattr(_import(module_name, config.optimizer), class_name)
    groups = [
        {key: value for key, value in group.items() if key in takes or key in ("name", "params")} | {"lr": 0.0}
        for group in param_groups
    ]
    kwargs = _checked_extra_arguments(optimizer_class, config)
    if config.optimizer == "adafactor":
        kwargs.update(ADAFACTOR_FIXED)
    if config.optimizer == "adamw" and all(p.is_cuda for g in groups for p in g["params"]):
        # One kernel for all parameters. Elsewhere torch's default (foreach=None) takes the multi-tensor foreach
        # kernels on devices that have them and the per-tensor loop on the CPU, where foreach measured no faster
        # (bench/step_overhead.py's machine, tiny model). The trainer moves the trained parts to the GPU first.
        kwargs["fused"] = True
    if not (config.fused_backward_pass or config.stochastic_rounding):
        return optimizer_class(groups, **kwargs)
    parameters = [p for group in groups for p in group["params"]]
    rounding = StochasticRounding(seed, parameters[0].device, len(parameters)) if config.stochastic_rounding else None
    return PerParameterOptimizer(
        groups,
        functools.partial(optimizer_class, **kwargs),
        fused_backward=config.fused_backward_pass,
        rounding=rounding,
    )


def _checked_extra_arguments(optimizer_class, config: TrainConfig) -> dict:
    """optimizer_args (ED2's d0, growth_rate, decouple ...) must be arguments the optimizer takes."""
    accepted = set(inspect.signature(optimizer_class.__init__).parameters) - {"self", "params", "lr"}
    for key in config.optimizer_args:
        if config.optimizer == "adafactor" and key in ADAFACTOR_FIXED:
            raise ConfigError(
                f"key 'optimizer_args' has '{key}': with adafactor, EveryCycle's LR schedule sets the LR, so "
                f"relative_step, scale_parameter and warmup_init are always false (they would replace or scale "
                f"the scheduled LR). Leave '{key}' out; beta1, clip_threshold, decay_rate and eps may be given."
            )
        if key not in accepted:
            raise ConfigError(
                f"key 'optimizer_args' has '{key}', which optimizer '{config.optimizer}' does not take. "
                f"It takes: {', '.join(sorted(accepted))}."
            )
    return dict(config.optimizer_args)


def _import(module_name: str, optimizer_name: str):
    try:
        return importlib.import_module(module_name)
    except ImportError:
        package = PACKAGE_OF.get(module_name, module_name)
        raise ConfigError(
            f"key 'optimizer' = '{optimizer_name}' needs the package {package}: `pip install {package}`, or use "
            f"'adamw'."
        ) from None
