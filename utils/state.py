"""Resumable training state on disk: written atomically, verified before it is trusted, never unpickled.

A state is a folder `<run_dir>/state/state-gs<step>/`:

    unet.safetensors, text_encoder.safetensors   weights of the trained models (fp32 masters)
    optimizer.safetensors + optimizer.json       the optimizer's state_dict: tensors, and the rest as JSON
    rng.safetensors                              torch CPU (and CUDA) generator states
    trainer_state.json                           step, epoch, position in the epoch, seed, LR scheduler, grad scaler,
                                                 python/numpy RNG, progress, the run's fingerprint and config
    manifest.json                                written last: size and sha256 of every other file

The folder is written under a temporary name and renamed when complete (`atomic_path`), so a kill leaves
either the whole new state or nothing; the manifest also catches damage done later (a bad disk, a partial
copy). Tensors go through safetensors and everything else through JSON: loading a state runs no pickle.
accelerate's save_state was not used: it pickles the RNG states, writes in place and records no data position.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from utils.checkpoint import atomic_path, file_sha256

STATE_FORMAT = "everycycle-state"
STATE_VERSION = 1
STATE_FOLDER = "state"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
_STATE_NAME = re.compile(r"^state-gs(\d+)$")
# Leftovers of a save that was killed: atomic_path's `.<name>.tmp-<pid>` / `.<name>.old-<pid>` and the
# single-file writer's `<name>.tmp-<pid>`.
_LEFTOVER_NAME = re.compile(r"(^\..+\.(tmp|old)-\d+$)|(\.tmp-\d+$)")


class DamagedStateError(Exception):
    """A state folder that is incomplete or whose files do not match its manifest."""


@dataclass
class TrainingState:
    """Everything a run depends on, in memory."""

    step: int
    info: dict  # JSON: counters, scheduler, scaler, progress, fingerprint, config
    weights: dict[str, dict[str, torch.Tensor]]  # model name -> state_dict
    optimizer: dict  # torch optimizer state_dict
    rng: dict = field(default_factory=dict)  # from capture_rng()


@dataclass
class SavedState:
    path: Path
    bytes: int
    seconds: float


def state_folder_name(step: int) -> str:
    return f"state-gs{step:05d}"


# --- random generators ---------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every global generator a training step draws from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """The state of every global generator a training step draws from."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    rng = {
        "python": [version, list(python_state), gauss_next],
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> list[str]:
    """Put the generators back; returns notes on what could not be restored exactly."""
    version, python_state, gauss_next = rng["python"]
    random.setstate((version, tuple(python_state), gauss_next))
    numpy_state = rng["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            np.array(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(rng["torch_cpu"])
    saved_cuda = rng.get("cuda", [])
    if not torch.cuda.is_available():
        return ["the state holds CUDA generator states but there is no GPU now"] if saved_cuda else []
    if len(saved_cuda) != torch.cuda.device_count():
        return [
            f"the state holds {len(saved_cuda)} CUDA generator state(s) for {torch.cuda.device_count()} GPU(s) "
            f"now: the GPU random streams restart, so the run is not bit-identical to an uninterrupted one"
        ]
    torch.cuda.set_rng_state_all(saved_cuda)
    return []


# --- nested structures with tensors: JSON for the structure, safetensors for the tensors ---------------


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], key: str = "") -> Any:
    """A JSON-able copy of `value` with each tensor replaced by a reference into `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: split_tensors(v, tensors, f"{key}/{k}") for k, v in value.items()}
        return {"__items__": [[k, split_tensors(v, tensors, f"{key}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [split_tensors(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot store a {type(value).__name__} at '{key}' of a training state (only tensors, "
        f"numbers, strings, lists and dicts)"
    )


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors."""
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__tuple__" in value:
        return tuple(join_tensors(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {k: join_tensors(v, tensors) for k, v in value["__items__"]}
    return {k: join_tensors(v, tensors) for k, v in value.items()}


# --- writing -------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file (a seam for tests that simulate a full disk)."""
    save_file(_unshared(tensors), str(path))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (bitsandbytes' 8-bit optimizers share one quantization map
    among all parameters, some models tie weights): such a tensor is stored as a copy of its own."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def write_state(state: TrainingState, state_root: Path) -> SavedState:
    """Write `state` to `<state_root>/state-gs<step>/` atomically; the manifest is the last file written."""
    started = time.monotonic()
    final = Path(state_root) / state_folder_name(state.step)
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_json = split_tensors(state.rng, rng_tensors, "rng")
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_json = split_tensors(state.optimizer, optimizer_tensors, "optimizer")
    with atomic_path(final) as folder, ThreadPoolExecutor(max_workers=4) as hashing:
        folder.mkdir()
        digests = {}

        def written(name: str) -> None:
            # Hashing reads the file back from the page cache while the next one is written (hashlib
            # releases the GIL), so checksums cost little extra time.
            digests[name] = hashing.submit(file_sha256, folder / name)

        for model_name, weights in state.weights.items():
            write_tensors(folder / f"{model_name}.safetensors", weights)
            written(f"{model_name}.safetensors")
        write_tensors(folder / "optimizer.safetensors", optimizer_tensors)
        written("optimizer.safetensors")
        _write_json(folder / "optimizer.json", optimizer_json)
        written("optimizer.json")
        write_tensors(folder / "rng.safetensors", rng_tensors)
        written("rng.safetensors")
        info = {
            **state.info,
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": state.step,
            "models": sorted(state.weights),
            "rng": rng_json,
        }
        _write_json(folder / TRAINER_STATE, info)
        written(TRAINER_STATE)
        files = {
            name: {"bytes": (folder / name).stat().st_size, "sha256": digest.result()}
            for name, digest in digests.items()
        }
        _write_json(
            folder / MANIFEST,
            {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "step": state.step,
                "saved_at": time.time(),
                "files": files,
            },
        )
    total = sum(entry["bytes"] for entry in files.values())
    return SavedState(final, total, time.monotonic() - started)


# --- verifying and reading -----------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DamagedStateError("no manifest.json: the save did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DamagedStateError(f"manifest.json unreadable: {error}") from None
    if manifest.get("format") != STATE_FORMAT:
        raise DamagedStateError("manifest.json is not an EveryCycle state manifest")
    if manifest.get("version") != STATE_VERSION:
        raise DamagedStateError(
            f"state format version {manifest.get('version')}; this EveryCycle reads version {STATE_VERSION}"
        )
    return manifest


def verify_state(folder: Path) -> dict:
    """The manifest of a complete state; DamagedStateError naming the first problem otherwise."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    files = manifest.get("files", {})
    for required in (TRAINER_STATE, "optimizer.safetensors", "optimizer.json", "rng.safetensors"):
        if required not in files:
            raise DamagedStateError(f"the manifest lists no {required}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedStateError(f"{name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise DamagedStateError(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        actual = dict(zip(files, pool.map(file_sha256, (folder / name for name in files)), strict=True))
    for name, expected in files.items():
        if actual[name] != expected["sha256"]:
            raise DamagedStateError(f"{name} does not match its checksum (changed or damaged after the save)")
    return manifest


def read_trainer_state(folder: Path) -> dict:
    """Only the JSON part (step, fingerprint, config, ...): cheap, for checks before loading tensors."""
    return json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))


def read_state(folder: Path, verify: bool = True) -> TrainingState:
    folder = Path(folder)
    if verify:
        verify_state(folder)
    info = read_trainer_state(folder)
    weights = {name: load_file(str(folder / f"{name}.safetensors")) for name in info["models"]}
    optimizer = join_tensors(
        json.loads((folder / "optimizer.json").read_text(encoding="utf-8")),
        load_file(str(folder / "optimizer.safetensors")),
    )
    rng = join_tensors(info.pop("rng"), load_file(str(folder / "rng.safetensors")))
    return TrainingState(step=info["step"], info=info, weights=weights, optimizer=optimizer, rng=rng)


# --- finding, pruning, cleaning ----------------------------------------------------------------------


def state_step(folder: Path) -> int | None:
    match = _STATE_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_states(state_root: Path) -> list[Path]:
    """State folders under state_root (complete or not), by step; temporary folders are hidden and left out."""
    root = Path(state_root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and state_step(p) is not None), key=state_step)


def saved_at(folder: Path) -> float:
    try:
        return float(read_manifest(folder)["saved_at"])
    except (DamagedStateError, KeyError, TypeError, ValueError):
        return Path(folder).stat().st_mtime


@dataclass
class StateSearch:
    found: Path | None
    damaged: list[tuple[Path, str]]  # (folder, problem), newest first


def newest_complete_state(run_dirs: list[Path]) -> StateSearch:
    """Among the states of these run folders, the most recently saved one that verifies."""
    candidates = [state for run_dir in run_dirs for state in list_states(Path(run_dir) / STATE_FOLDER)]
    damaged = []
    for folder in sorted(candidates, key=saved_at, reverse=True):
        try:
            verify_state(folder)
        except DamagedStateError as problem:
            damaged.append((folder, str(problem)))
            continue
        return StateSearch(folder, damaged)
    return StateSearch(None, damaged)


def set_aside_damaged(folder: Path) -> Path:
    """Rename a damaged state to a hidden name: never picked again, kept for inspection."""
    target = folder.with_name(f".damaged-{folder.name}-{int(time.time())}")
    os.replace(folder, target)
    return target


def prune_states(state_root: Path, keep: int, current_step: int) -> list[Path]:
    """Delete all but the newest `keep` states up to current_step. Newer ones (from a timeline abandoned by
    resuming an older state) are left alone; a later save at their step replaces them."""
    older = [p for p in list_states(state_root) if state_step(p) <= current_step]
    removed = older[:-keep] if keep > 0 else older
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and folders of saves that were killed (kill -9, power loss)."""
    removed = []
    for folder in (Path(run_dir) / STATE_FOLDER, Path(run_dir) / "ckpts"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _LEFTOVER_NAME.search(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    return removed


def trim_metrics(csv_path: Path, last_step: int) -> int:
    """Drop metrics.csv rows after `last_step` (written by the interrupted run after its last state), so each
    step appears once when the resumed run appends. Returns the number of rows dropped."""
    if not csv_path.is_file():
        return 0
    lines = csv_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if _row_step(line) <= last_step]
    if len(kept) == len(lines):
        return 0
    with atomic_path(csv_path) as temporary:
        temporary.write_text("".join(kept), encoding="utf-8")
    return len(lines) - len(kept)


def _row_step(line: str) -> float:
    """The step of a metrics.csv row; a row cut short by a kill counts as past every step."""
    first = line.split(",", 1)[0]
    return int(first) if line.endswith("\n") and first.isdigit() else float("inf")
