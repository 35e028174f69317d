"""Silence the third-party messages that every start prints although nothing is wrong, and nothing else.

Each filter names one message and the logger it comes from, and drops only that message: the same loggers' other
records, and every other warning, still show. Only the standard library is imported here, so a script can call
`quiet_third_party_output()` before it imports torch, diffusers, transformers or bitsandbytes (the loggers are
looked up by name: a filter added before the package loads stays on its logger).
"""

from __future__ import annotations

import logging
import re

# (logger, message pattern) of the log records to drop.
NOISE = (
    # bitsandbytes/backends/cpu/ops.py, logger.warning at import on CPUs with AVX512-BF16: the optional `kernels`
    # package (a hub download of a faster CPU 4-bit matmul) is not installed. Only 4-bit layers on the CPU would
    # use it; we train with 8-bit optimizers on the GPU.
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
    # transformers/utils/import_utils.py, logger.warning_once in the lazy module's __getattr__: diffusers' pipelines
    # import CLIPImageProcessor and SiglipImageProcessor, which without torchvision fall back to the PIL processor.
    # That is the one we want: the pipelines' feature extractor only feeds the safety checker, which we never run.
    ("transformers.utils.import_utils", r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back"),
    # diffusers/models/modeling_utils.py, logger.warning in ModelMixin.to(): printed on every cast with a dtype,
    # even when the model has no modules to keep in float32 (the empty list). A non-empty list still shows.
    ("diffusers.models.modeling_utils", r"should be kept in float32: \[\]\."),
)


class DropMessage(logging.Filter):
    """Drops the records of a logger whose message matches one pattern."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


# Built once: Logger.addFilter skips a filter it already has, so calling quiet_third_party_output() again adds nothing.
_FILTERS = tuple((name, DropMessage(pattern)) for name, pattern in NOISE)


def quiet_third_party_output() -> None:
    """Install the filters; call it first, before torch, diffusers, transformers or bitsandbytes load."""
    for name, message_filter in _FILTERS:
        logging.getLogger(name).addFilter(message_filter)


def quiet_transformers_progress_bars() -> None:
    """transformers draws its own bars ("Loading weights" in from_pretrained, "Writing model shards" in
    save_pretrained) over ours at every load and save of a text encoder: off. Its switch turns huggingface_hub's
    bars off too, which are turned back on when they were on: a first download of SD 1.5 is worth its bar. Call it
    where transformers is imported anyway (trainer/model.py), not before: it imports transformers."""
    import huggingface_hub.utils
    import transformers.utils.logging

    hub_bars_were_on = not huggingface_hub.utils.are_progress_bars_disabled()
    transformers.utils.logging.disable_progress_bar()
    if hub_bars_were_on:
        huggingface_hub.utils.enable_progress_bars()
