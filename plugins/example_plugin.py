"""An example plugin: says where the run is at the start and end of each epoch."""

from plugins.plugins import BasePlugin


class EpochAnnouncer(BasePlugin):
    def on_epoch_start(self, **kwargs):
        print(f"example plugin: epoch {kwargs['epoch']} starts at step {kwargs['global_step']}")

    def on_epoch_end(self, **kwargs):
        print(f"example plugin: epoch {kwargs['epoch']} ended at step {kwargs['global_step']}")
