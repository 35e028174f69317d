"""ED2's EMA (its doc/ADVANCED_TWEAKING.md, "EMA Decay Features"): a moving average of the trained weights,
updated every `ema_update_interval` optimizer steps as ema = decay * ema + (1 - decay) * weights, kept on
`ema_device`, saved in every state (exact resume) and as its own checkpoint (`<name>_ema`), sampled and validated
when asked.

diffusers' EMAModel does the averaging. Two of its defaults are not ED2's and are set off on purpose: its decay
warm-up ((1 + n) / (10 + n), capped at `decay`) is pinned by min_decay = decay, and its first update (which copies
the weights) is skipped by update_after_step = -1, so every update uses the configured decay, as ED2's does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.training_utils import EMAModel

from trainer.model import load_model
from utils.config import TrainConfig
from utils.state import TrainingState

ED2_DEFAULT_INTERVAL = 500  # ED2 train.py: --ema_update_interval's default
ED2_DEFAULT_DEVICE = "cpu"  # ED2 train.py: --ema_device's default


def ema_enabled(config: TrainConfig) -> bool:
    """ED2 turns EMA on with either key (train.py: `use_ema_dacay_training`)."""
    return config.ema_decay_rate is not None or config.ema_strength_target is not None


def ema_decay(config: TrainConfig, total_steps: int) -> float:
    """ema_decay_rate, or the decay that leaves ema_strength_target of the starting weights' share after the
    run's updates: decay ** (total_steps / interval) == target (ED2 train.py, main(): the same relation with its
    counts in batches, interval x grad_accum batches per update)."""
    if config.ema_strength_target is None:
        return config.ema_decay_rate
    updates = max(total_steps / config.ema_update_interval, 1.0)
    return config.ema_strength_target ** (1.0 / updates)


def ema_device(config: TrainConfig, training_device: torch.device) -> torch.device:
    """`cuda` means the training GPU; on a machine without one, the EMA stays where training runs."""
    return training_device if config.ema_device == "cuda" else torch.device("cpu")


class TrainedAverage:
    """The moving average of each trained part's weights (by part name: "unet", "text_encoder", "text_encoder_2")."""

    def __init__(self, trained: dict[str, torch.nn.Module], decay: float, interval: int, device: torch.device):
        self.decay, self.interval, self.device = decay, interval, device
        self.averages = {
            name: EMAModel(self._on_device(module), decay=decay, min_decay=decay, update_after_step=-1)
            for name, module in trained.items()
        }

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based): ED2 updates after every interval x grad_accum batches."""
        return step % self.interval == 0

    @torch.no_grad()
    def update(self, trained: dict[str, torch.nn.Module]) -> None:
        for name, module in trained.items():
            self.averages[name].step(self._on_device(module))

    def _on_device(self, module: torch.nn.Module) -> list[torch.Tensor]:
        """The module's parameters as EMAModel should see them: fp32 on the EMA's device, each still marked
        trainable or not (EMAModel copies the frozen ones instead of averaging them). fp32 parameters on that
        device are handed over as they are; others (on the GPU, or bf16 weights, in which a 0.9999 decay's small
        steps would round away) as fp32 copies."""
        parameters = list(module.parameters())
        if all(parameter.device == self.device and parameter.dtype == torch.float32 for parameter in parameters):
            return parameters
        return [
            parameter.detach().to(self.device, torch.float32).requires_grad_(parameter.requires_grad)
            for parameter in parameters
        ]

    @property
    def updates(self) -> int:
        return next(iter(self.averages.values())).optimization_step

    def weights(self, trained: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
        """The averages as state dicts, by "ema_<part>" (how a training state stores them)."""
        return {
            f"ema_{name}": {
                key: shadow.detach().cpu()
                for (key, _), shadow in zip(
                    trained[name].named_parameters(), self.averages[name].shadow_params, strict=True
                )
            }
            for name in self.averages
        }

    def load_weights(
        self, weights: dict[str, dict[str, torch.Tensor]], updates: int, trained: dict[str, torch.nn.Module]
    ) -> None:
        """Back from `weights()` (a resumed state, its tensors by parameter name): the averages and their count."""
        for name, average in self.averages.items():
            saved = weights[f"ema_{name}"]
            for shadow, (key, _) in zip(average.shadow_params, trained[name].named_parameters(), strict=True):
                shadow.copy_(saved[key])
            average.optimization_step = updates

    def start_from(self, models: dict[str, torch.nn.Module]) -> None:
        """ema_resume_model: the averages start from another model's weights (its parts of the same names)."""
        for name, average in self.averages.items():
            for shadow, parameter in zip(average.shadow_params, models[name].parameters(), strict=True):
                shadow.copy_(parameter.detach())

    @contextlib.contextmanager
    def swapped_in(self, trained: dict[str, torch.nn.Module]) -> Iterator[None]:
        """The trained parts hold the averages inside the block (a sample round, a validation, a checkpoint), and
        their own weights again after it, whatever happens inside."""
        for name, module in trained.items():
            self.averages[name].store(module.parameters())
            self.averages[name].copy_to(module.parameters())
        try:
            yield
        finally:
            for name, module in trained.items():
                self.averages[name].restore(module.parameters())


def build_average(
    config: TrainConfig, trained: dict[str, torch.nn.Module], total_steps: int, device: torch.device, say
) -> TrainedAverage | None:
    """The run's EMA (None when off), started from the trained weights or from ema_resume_model."""
    if not ema_enabled(config):
        return None
    decay = ema_decay(config, total_steps)
    where = ema_device(config, device)
    average = TrainedAverage(trained, decay, config.ema_update_interval, where)
    origin = "the base model"
    if config.ema_resume_model:
        start = load_model(config.model_copy(update={"resume_ckpt": config.ema_resume_model}))
        average.start_from(start.trainable_parts())
        origin = config.ema_resume_model
    target = f", from ema_strength_target {config.ema_strength_target}" if config.ema_strength_target else ""
    say(
        f"EMA: decay {decay:.6g}{target}, updated every {config.ema_update_interval} steps "
        f"({total_steps // config.ema_update_interval} updates in the run), kept on {where}, starting from {origin}"
    )
    if config.sample_prompts and not (config.ema_sample_ema_model or config.ema_sample_nonema_model):
        say(
            "note: EMA on and neither ema_sample_ema_model nor ema_sample_nonema_model set: the samples are the "
            "EMA's, as ED2's doc says (ED2's code would draw none)"
        )
    if config.ema_device == "cuda" and where.type != "cuda":
        say(f"note: ema_device 'cuda', but training runs on {device}: the EMA is kept there")
    return average


def restore_average(
    average: TrainedAverage | None, state: TrainingState, trained: dict[str, torch.nn.Module]
) -> str | None:
    """The EMA as the state left it; what to say when the state and the config disagree about EMA."""
    saved = state.info.get("ema_updates")
    if average is None:
        return "the state holds an EMA, and this config has none: it is dropped" if saved is not None else None
    if saved is None:
        return "the state holds no EMA: the EMA starts from the resumed weights"
    average.load_weights(state.weights, saved, trained)
    return None


def sampled_weights(config: TrainConfig, average: TrainedAverage | None) -> list[str]:
    """Which weights a sample round draws: "trained", "ema" or both, by ED2's keys. ED2's doc says the EMA model
    samples by default; its code samples nothing when both keys are false, so that case follows the doc."""
    if average is None:
        return ["trained"]
    chosen = ["trained"] if config.ema_sample_nonema_model else []
    if config.ema_sample_ema_model or not chosen:
        chosen.append("ema")
    return chosen
