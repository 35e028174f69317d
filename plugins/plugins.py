"""The base class ED2 plugins extend (ED2's plugins/plugins.py names the same hooks). Override the hooks you need;
the keyword arguments each one receives are listed in docs/ed2.md, "Plugins"."""

from __future__ import annotations

from PIL import Image


class BasePlugin:
    def on_training_start(self, **kwargs):
        pass

    def on_training_end(self, **kwargs):
        pass

    def on_epoch_start(self, **kwargs):
        pass

    def on_epoch_end(self, **kwargs):
        pass

    def on_step_start(self, **kwargs):
        pass

    def on_step_end(self, **kwargs):
        pass

    def on_model_load(self, **kwargs):
        pass

    def on_model_save(self, **kwargs):
        pass

    def transform_caption(self, caption: str) -> str:
        return caption

    def transform_pil_image(self, img: Image.Image) -> Image.Image:
        return img
