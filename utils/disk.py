"""Checks made before training starts so that a save never fails late: the output folders are writable, and the
disk holds what the run's states and checkpoints will need."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from utils.config import ConfigError

GIGABYTE = 1024**3
# Bytes of optimizer state per trained parameter (fp32 moments; 8-bit optimizers keep one byte per moment).
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,
    "adamw8bit": 2,
    "lion": 4,
    "lion8bit": 1,
    "prodigy": 16,
    "dadapt_adam": 12,
    "dadapt_lion": 8,
    "dadapt_sgd": 8,
    "coordinate_dowg": 8,
    "scalar_dowg": 4,
    "adafactor": 1,  # factored second moments: a row and a column per matrix, well under a byte per parameter
}


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and write a probe file: a clear error now rather than a crash at the first save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"key '{key}': cannot write to the folder '{folder}' ({error.strerror or error}). Give a folder you can "
            f"write to, or fix its permissions."
        ) from None


@dataclass(frozen=True)
class SaveSizes:
    state_bytes: int
    checkpoint_bytes: int
    states_on_disk: int  # at most, while a new state is written before the oldest is pruned
    checkpoints: int  # planned (epoch saves and the final one; time-based ones come on top)

    @property
    def total(self) -> int:
        return self.states_on_disk * self.state_bytes + self.checkpoints * self.checkpoint_bytes


def estimate_save_sizes(
    trained_params: int,
    all_params: int,
    optimizer: str,
    states_kept: int,
    checkpoints: int,
    single_file: bool,
    half: bool,
) -> SaveSizes:
    """Bytes the saves will need, from parameter counts: fp32 weights + optimizer state per state; a diffusers
    folder (fp32) and the single file (fp16 unless full precision) per checkpoint."""
    state = trained_params * (4 + OPTIMIZER_STATE_BYTES.get(optimizer, 8))
    checkpoint = all_params * 4 + (all_params * (2 if half else 4) if single_file else 0)
    return SaveSizes(state, checkpoint, states_kept + 1, checkpoints)


def disk_space_note(sizes: SaveSizes, folder: Path) -> str:
    """One line for the start of the run; a warning with the numbers when the disk looks too small."""
    free = shutil.disk_usage(folder).free
    need = (
        f"{sizes.total / GIGABYTE:.2f} GB ({sizes.checkpoints} checkpoint(s) of "
        f"{sizes.checkpoint_bytes / GIGABYTE:.2f} GB, up to {sizes.states_on_disk} state(s) of "
        f"{sizes.state_bytes / GIGABYTE:.2f} GB)"
    )
    if free >= sizes.total:
        return f"disk: the saves need about {need}; {free / GIGABYTE:.2f} GB free on {folder}"
    return (
        f"warning: the saves of this run need about {need} but only {free / GIGABYTE:.2f} GB are free on "
        f"{folder}. Free some space, lower save_state_keep or save less often: a save that finds the disk full "
        f"stops the run with its last good state."
    )
