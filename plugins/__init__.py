"""ED2-compatible plugins. A plugin written for ED2 (`from plugins.plugins import BasePlugin`) runs unchanged: name it
in the config's `plugins` list as `plugins.<file>.<Class>`. Besides this folder, a `plugins/` folder next to the
config file (or in the working folder) is searched; see docs/ed2.md, "Plugins"."""
