"""ED2's plugin hooks, called at ED2's moments with ED2's keyword arguments (its train.py main(): the
`plugin_runner.run_on_*` calls). A hook that fails stops the run after the current unit of work, with a state and
a checkpoint saved, and the message names the plugin and the hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from trainer.model import SDModel
from trainer.stops import EXIT_FAILED, Stop
from utils.config import ConfigError, TrainConfig
from utils.plugins import (
    EveryDreamTrainingState,
    PluginError,
    PluginRunner,
    load_plugins,
    refuse_grad_accum_change,
)


class RunPlugins:
    """The run's plugins. `ed_state` builds ED2's `ed_state` view of the model when a hook needs it; `stop` asks
    the run to stop when a hook fails."""

    def __init__(
        self,
        runner: PluginRunner,
        config: TrainConfig,
        run_dir: Path,
        ed_state: Callable[[], EveryDreamTrainingState],
        stop: Callable[[Stop], None],
    ):
        self.runner, self.config, self.run_dir = runner, config, run_dir
        self.ed_state, self.stop = ed_state, stop

    def training_start(self) -> None:
        self._call("on_training_start", log_folder=str(self.run_dir), project_name=self.config.project_name)

    def training_end(self) -> None:
        self._call("on_training_end")

    def epoch_start(self, epoch: int, global_step: int, epoch_length: int) -> None:
        self._call(
            "on_epoch_start",
            epoch=epoch,
            global_step=global_step,
            epoch_length=epoch_length,
            **self._where(),
            arg_update_callback=refuse_grad_accum_change,
        )

    def epoch_end(self, epoch: int, global_step: int) -> None:
        self._call(
            "on_epoch_end",
            epoch=epoch,
            global_step=global_step,
            **self._where(),
            arg_update_callback=refuse_grad_accum_change,
        )

    def step_start(self, epoch: int, local_step: int, global_step: int, batch: dict | None) -> None:
        """`batch`: the step's first micro-batch (an ED2 step is one batch)."""
        if self.runner.overriding("on_step_start"):
            self._call(
                "on_step_start",
                epoch=epoch,
                local_step=local_step,
                global_step=global_step,
                project_name=self.config.project_name,
                log_folder=str(self.run_dir),
                batch=batch,
                ed_state=self.ed_state(),
            )

    def step_end(self, epoch: int, local_step: int, global_step: int, batch: dict | None) -> None:
        if self.runner.overriding("on_step_end"):
            self._call(
                "on_step_end",
                epoch=epoch,
                global_step=global_step,
                local_step=local_step,
                **self._where(),
                batch=batch,
                ed_state=self.ed_state(),
            )

    def model_load(self) -> None:
        if self.runner.overriding("on_model_load"):
            self._call("on_model_load", ed_state=self.ed_state())

    def model_save(self, save_folder: str) -> None:
        if self.runner.overriding("on_model_save"):
            self._call("on_model_save", ed_state=self.ed_state(), save_folder=save_folder)

    def _where(self) -> dict:
        return {
            "project_name": self.config.project_name,
            "log_folder": str(self.run_dir),
            "data_root": self.config.data_root,
        }

    def _call(self, hook: str, **kwargs) -> None:
        if not self.runner:
            return
        try:
            self.runner.call(hook, **kwargs)
        except PluginError as error:
            self.failed(error)

    def failed(self, error: PluginError) -> None:
        """A hook raised (here, or in the data loader's transforms): the run stops with its work saved."""
        # From a loader worker, torch hands the error back with the worker's traceback before its message.
        said = str(error).strip().splitlines()[-1].removeprefix(f"{PluginError.__module__}.PluginError: ")
        message = f"{said}. The run stopped with its work saved."
        self.stop(Stop("plugin failed", EXIT_FAILED, save=True, message=message))


def load_run_plugins(config: TrainConfig, say: Callable[[str], None]) -> PluginRunner:
    """The config's plugins, imported and created before any model loads; a failure is a config error."""
    config_dir = config.config_file.parent if config.config_file else None
    try:
        runner = load_plugins(config.plugins, config_dir, say)
    except PluginError as error:
        raise ConfigError(f"key 'plugins': {error}") from None
    for hook, cache_key, what in (
        ("transform_pil_image", "cache_latents", "images"),
        ("transform_caption", "cache_text_embeddings", "captions"),
    ):
        if runner.overriding(hook) and getattr(config, cache_key):
            raise ConfigError(
                f"key 'plugins': {', '.join(runner.overriding(hook))} transforms the {what} as they load "
                f"({hook}), and {cache_key} is on: the cache would hold them untransformed. Set {cache_key} "
                f"to false for this run."
            )
    return runner


def ed_state_of(model: SDModel, optimizer) -> EveryDreamTrainingState:
    return EveryDreamTrainingState(
        optimizer=optimizer,
        train_batch=None,
        unet=model.unet,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        scheduler=model.noise_scheduler,
        vae=model.vae,
    )
