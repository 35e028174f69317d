"""The optimizer factory: one optimizer, one parameter group per trained model (UNet, text encoder).

Each group carries its own LR function (see optimizer/lr.py), so the text encoder follows the same phase
of the schedule with its own bounds, and its own weight decay / betas / epsilon when configured.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from utils.config import ConfigError, TrainConfig

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
}
PACKAGE_OF = {
    "bitsandbytes.optim": "bitsandbytes",
    "lion_pytorch": "lion-pytorch",
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "dowg": "dowg",
}


def model_param_groups(config: TrainConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> list[dict]:
    """The trained parameters, grouped by model, with each model's own hyperparameters."""
    groups = []
    if not config.disable_unet_training:
        groups.append(
            {
                "name": "unet",
                "params": [p for p in unet.parameters() if p.requires_grad],
                **_hyperparameters(config, text_encoder=False),
            }
        )
    if config.train_text_encoder:
        groups.append(
            {
                "name": "text_encoder",
                "params": [p for p in text_encoder.parameters() if p.requires_grad],
                **_hyperparameters(config, text_encoder=True),
            }
        )
    return [group for group in groups if group["params"]]


def _hyperparameters(config: TrainConfig, text_encoder: bool) -> dict:
    def pick(te_value, value):
        return te_value if text_encoder and te_value is not None else value

    return {
        "betas": tuple(pick(config.text_encoder_betas, config.betas)),
        "eps": pick(config.text_encoder_epsilon, config.epsilon),
        "weight_decay": pick(config.text_encoder_weight_decay, config.weight_decay),
    }


def build_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """`param_groups` from model_param_groups; LRs start at 0 and are set by the LR scheduler."""
    module_name, class_name, takes = OPTIMIZERS[config.optimizer]
    optimizer_class = getattr(_import(module_name, config.optimizer), class_name)
    groups = [
        {key: value for key, value in group.items() if key in takes or key in ("name", "params")} | {"lr": 0.0}
        for group in param_groups
    ]
    kwargs = _checked_extra_arguments(optimizer_class, config)
    if config.optimizer == "adamw" and all(p.is_cuda for g in groups for p in g["params"]):
        # One kernel for all parameters. Elsewhere torch's default (foreach=None) takes the multi-tensor foreach
        # kernels on devices that have them and the per-tensor loop on the CPU, where foreach measured no faster
        # (bench/step_overhead.py's machine, tiny model). The trainer moves the trained parts to the GPU first.
        kwargs["fused"] = True
    return optimizer_class(groups, **kwargs)


def _checked_extra_arguments(optimizer_class, config: TrainConfig) -> dict:
    """optimizer_args (ED2's d0, growth_rate, decouple ...) must be arguments the optimizer takes."""
    accepted = set(inspect.signature(optimizer_class.__init__).parameters) - {"self", "params", "lr"}
    for key in config.optimizer_args:
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
