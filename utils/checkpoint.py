"""Checkpoint I/O: every file or folder is written under a temporary name and renamed when complete.

A crash or a kill in the middle of a save therefore never leaves a half-written checkpoint behind: the
previous one stays intact and the new one either exists whole or not at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write into; rename it over `final` on success only."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(temporary)
    try:
        try:
            yield temporary
        except Exception as error:
            converted = as_os_error(error)
            if converted is error:
                raise
            raise converted from error
        _fsync_tree(temporary)
        if final.is_dir():
            # os.replace cannot swap non-empty folders: move the old one aside first, remove it after.
            retired = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, retired)
            os.replace(temporary, final)
            _remove(retired)
        else:
            os.replace(temporary, final)
        _fsync_dir(final.parent)
    finally:
        _remove(temporary)


def as_os_error(error: Exception) -> Exception:
    """An I/O failure reported by a library as its own exception type (safetensors' SafetensorError says "I/O error:
    No space left on device (os error 28)") as the OSError it is, so a full disk is handled as one everywhere; any
    other error as it was."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error))
    if not found:
        return error
    code = int(found.group(1))
    return OSError(code, f"{os.strerror(code)} ({type(error).__name__}: {error})")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    """Flush file contents before the rename makes them visible, so a power cut cannot expose empty files."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def checkpoint_name(project_name: str, epoch: int, global_step: int) -> str:
    return f"{project_name}-ep{epoch:03d}-gs{global_step:05d}"


def checkpoints_in(ckpts_dir: Path, suffix: str = "") -> list[dict]:
    """The complete checkpoints `<name>-gs<step><suffix>` of a run folder, oldest first."""
    found = []
    for folder in Path(ckpts_dir).glob(f"*-gs*{suffix}"):
        match = re.search(rf"-gs(\d+){suffix}$", folder.name)
        if folder.name.startswith(".") or not match or not (folder / "model_index.json").is_file():
            continue  # hidden: the temporary folder of a save in progress
        single_file = folder.with_name(f"{folder.name}.safetensors")
        extra = {"single_file": str(single_file)} if single_file.is_file() else {}
        found.append({"step": int(match.group(1)), "diffusers": str(folder), **extra})
    return sorted(found, key=lambda entry: entry["step"])


def saved_checkpoints(ckpts_dir: Path, up_to_step: int) -> list[dict]:
    """The complete checkpoints of a run folder up to a step, oldest first (a resumed run's list)."""
    return [entry for entry in checkpoints_in(ckpts_dir) if entry["step"] <= up_to_step]


BEST_SUFFIX = "-best"  # stop_when_val_rises: the checkpoint of the lowest validation loss so far


def best_checkpoints(ckpts_dir: Path) -> list[dict]:
    """The complete `<name>-gs<step>-best` checkpoints of a run folder, oldest first (one, but for a run killed
    between writing a new one and removing the old)."""
    return checkpoints_in(ckpts_dir, BEST_SUFFIX)


def remove_checkpoint(entry: dict) -> None:
    """A checkpoint's folder and single file (after a newer one of its kind was written)."""
    shutil.rmtree(entry["diffusers"], ignore_errors=True)
    if "single_file" in entry:
        Path(entry["single_file"]).unlink(missing_ok=True)


def save_checkpoint(pipeline, ckpts_dir: Path, name: str, half: bool, single_file: bool) -> dict[str, str]:
    """A diffusers folder (StableDiffusionPipeline / StableDiffusionXLPipeline.from_pretrained loads it) and, unless
    turned off, a single-file .safetensors in the original SD or SDXL layout (A1111, ComfyUI, from_single_file)."""
    from utils.convert import save_single_file

    paths = {}
    folder = Path(ckpts_dir) / name
    with atomic_path(folder) as temporary:
        pipeline.save_pretrained(str(temporary), safe_serialization=True)
    paths["diffusers"] = str(folder)
    if single_file:
        target = Path(ckpts_dir) / f"{name}.safetensors"
        save_single_file(
            pipeline.unet,
            pipeline.vae,
            pipeline.text_encoder,
            target,
            half=half,
            scheduler_config=dict(pipeline.scheduler.config),
            text_encoder_2=getattr(pipeline, "text_encoder_2", None),  # SDXL's second text encoder
        )
        paths["single_file"] = str(target)
    return paths


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(Path(target)) as temporary:
        shutil.copyfile(source, temporary)
