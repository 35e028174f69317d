"""The optimizer factory: one optimizer, one parameter group per trained model (UNet, text encoder).

Each group carries its own LR function (see optimizer/lr.py), so the text encoder follows the same phase
of the schedule with its own bounds.
"""

from __future__ import annotations

import torch

from utils.config import ConfigError, TrainConfig


def build_optimizer(config: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """`param_groups`: [{"name": "unet", "params": [...]}, ...]; LRs are set by the scheduler."""
    groups = [{**group, "lr": 0.0} for group in param_groups if group["params"]]
    name = config.optimizer
    common = dict(betas=tuple(config.betas), weight_decay=config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, eps=config.epsilon, **_fast_adamw_kwargs(groups), **common)
    bnb = _import_bitsandbytes(name)
    if name == "adamw8bit":
        return bnb.optim.AdamW8bit(groups, eps=config.epsilon, **common)
    if name == "lion":
        return bnb.optim.Lion(groups, **common)
    if name == "lion8bit":
        return bnb.optim.Lion8bit(groups, **common)
    raise ConfigError(f"key 'optimizer' = '{name}': unknown optimizer")  # the schema refuses it before this


def _fast_adamw_kwargs(groups: list[dict]) -> dict:
    """Fused AdamW on CUDA (one kernel for all parameters); torch picks foreach elsewhere."""
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    return {"fused": True} if on_cuda else {}


def _import_bitsandbytes(name: str):
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            f"key 'optimizer' = '{name}' needs bitsandbytes: `pip install bitsandbytes`, or use 'adamw'."
        ) from None
    return bitsandbytes
