"""ED2's plugins (its doc/PLUGINS.md): classes named `module.Class` in the config's `plugins` list, extending
plugins.plugins.BasePlugin, whose hooks the trainer calls at ED2's moments with ED2's keyword arguments. A plugin's
failure names the plugin and the hook."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plugins
from plugins.plugins import BasePlugin

# ED2's PluginRunner warns when a hook takes longer than these (its model hooks are ours: given the training limit).
SLOW_HOOK_SECONDS = {"epoch": 5.0, "training": 20.0, "model": 20.0}
SLOW_STEP_HOOK_SECONDS = 0.5


class PluginError(Exception):
    """A plugin could not be loaded, or one of its hooks raised."""


def plugin_folders(config_dir: Path | None) -> list[Path]:
    """Where `plugins.<file>` is looked for besides EveryCycle's own plugins/: a plugins/ folder next to the config
    and in the working folder (ED2 users keep theirs in ED2's folder, which is their working folder there)."""
    candidates = [Path.cwd() / "plugins"] + ([config_dir / "plugins"] if config_dir else [])
    return [folder.resolve() for folder in candidates if folder.is_dir()]


def load_plugin(name: str, folders: list[Path]) -> BasePlugin:
    """An instance of the plugin class `name` ("module.path.Class")."""
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise PluginError(
            f"plugin '{name}': give the class as module.Class, e.g. plugins.example_plugin.EpochAnnouncer"
        )
    for folder in folders:  # the package `plugins` also spans the users' plugin folders
        if str(folder) not in plugins.__path__:
            plugins.__path__.append(str(folder))
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a missing module, or one that fails while it is imported
        searched = ", ".join(str(folder) for folder in [Path(plugins.__path__[0]), *folders])
        raise PluginError(
            f"plugin '{name}': its module '{module_name}' could not be imported ({type(error).__name__}: {error}). "
            f"plugins.<file> is looked for in {searched}."
        ) from None
    plugin_class = getattr(module, class_name, None)
    if not (isinstance(plugin_class, type) and issubclass(plugin_class, BasePlugin)):
        raise PluginError(
            f"plugin '{name}': '{class_name}' in {module.__file__} is not a class extending "
            f"plugins.plugins.BasePlugin (ED2's base class of plugins)."
        )
    try:
        return plugin_class()
    except Exception as error:
        raise PluginError(f"plugin '{name}': creating it failed ({type(error).__name__}: {error}).") from None


class PluginRunner:
    """The loaded plugins, called in the order the config lists them."""

    def __init__(self, loaded: dict[str, BasePlugin], say: Callable[[str], None] = print):
        self.loaded, self.say = loaded, say

    def __bool__(self) -> bool:
        return bool(self.loaded)

    def overriding(self, hook: str) -> list[str]:
        """The plugins whose class overrides `hook`."""
        return [name for name, plugin in self.loaded.items() if _overrides(plugin, hook)]

    def call(self, hook: str, **kwargs: Any) -> None:
        """Each plugin's `hook(**kwargs)`; ED2's warning when one takes long; a failure names the plugin."""
        limit = next((seconds for kind, seconds in SLOW_HOOK_SECONDS.items() if kind in hook), SLOW_STEP_HOOK_SECONDS)
        for name, plugin in self.loaded.items():
            if not _overrides(plugin, hook):
                continue
            started = time.monotonic()
            try:
                getattr(plugin, hook)(**kwargs)
            except Exception as error:
                raise PluginError(f"plugin '{name}' failed in {hook}: {type(error).__name__}: {error}") from error
            seconds = time.monotonic() - started
            if seconds > limit:
                self.say(f"warning: plugin '{name}' took {seconds:.1f} s in {hook} (more than {limit:g} s)")

    def transform(self, hook: str, value: Any) -> Any:
        """transform_caption / transform_pil_image of each plugin in turn (the data loader calls it)."""
        for name, plugin in self.loaded.items():
            if _overrides(plugin, hook):
                try:
                    value = getattr(plugin, hook)(value)
                except Exception as error:
                    raise PluginError(f"plugin '{name}' failed in {hook}: {type(error).__name__}: {error}") from error
        return value


def _overrides(plugin: BasePlugin, hook: str) -> bool:
    return getattr(type(plugin), hook, None) is not getattr(BasePlugin, hook)


def load_plugins(names: list[str], config_dir: Path | None, say: Callable[[str], None] = print) -> PluginRunner:
    folders = plugin_folders(config_dir)
    if config_dir and str(config_dir) not in sys.path:
        sys.path.append(str(config_dir))  # a plugin module beside the config, outside plugins/
    return PluginRunner({name: load_plugin(name, folders) for name in names}, say)


@dataclass
class EveryDreamTrainingState:
    """What ED2 hands its plugins as `ed_state` (the same attribute names; train_batch is None: EveryCycle's data
    order is planned, not a mutable batch object)."""

    optimizer: Any
    train_batch: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    vae: Any
    unet_ema: Any = None
    text_encoder_ema: Any = None


def refuse_grad_accum_change(arg: str, new_value: Any) -> None:
    """ED2's `arg_update_callback` lets a plugin change grad_accum mid-run; here the RunPlan (steps, schedule,
    resume) is fixed at the start, so the request is refused with the reason."""
    raise PluginError(
        f"a plugin asked to change '{arg}' to {new_value!r} mid-run: EveryCycle plans every step at the start (the LR "
        f"schedule, saves and exact resume depend on it). Set it in the config instead."
    )
