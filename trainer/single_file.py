"""Single-file base models (what users download from model sites): converted once, offline, then cached.

The architecture is detected from the file's keys (SD 1.x: CLIP ViT-L text encoder, 768-wide
cross-attention; SD 2.x: OpenCLIP ViT-H, 1024; SDXL: two text encoders under `conditioner.embedders.`) and
described by the bundled configs in trainer/model_configs/, so no hub access is needed. The conversion itself is
diffusers' single-file loader (utils/convert.py wraps it); `.ckpt` files are only ever read with
torch.load(weights_only=True).
The converted diffusers folder is written atomically: a failed conversion leaves nothing behind (ED2 left an
empty cache folder that broke the next run).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

from trainer.tiny_model import bytes_to_unicode
from utils.checkpoint import atomic_path
from utils.config import ConfigError
from utils.convert import (
    ConversionError,
    detect_prediction_type,
    inspect_checkpoint,
    is_sdxl_checkpoint,
    load_single_file_pipeline,
)

BUNDLED = Path(__file__).resolve().parent / "model_configs"
CLIP_BPE = BUNDLED / "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses from that file (the rest are never applied)


def architecture_of(info) -> str:
    """'sdxl' from its conditioner keys, else 'sd1' or 'sd2' from the text encoder's layout and the UNet's
    cross-attention width."""
    if is_sdxl_checkpoint(info):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in info.keys) or info.context_dim == 1024:
        return "sd2"
    return "sd1"


def choose_prediction_type(info, architecture: str, override: str | None, notes: list[str]) -> str:
    if override:
        return override
    declared = detect_prediction_type(info)
    if declared:
        return declared
    if architecture in ("sd1", "sdxl"):  # SDXL base is epsilon; v-prediction derivatives say so (v_pred key)
        return "epsilon"
    # SD 2.x base (512) and 768-v share one architecture; without a hint in the file, assume the 768-v
    # model, as diffusers does, and say how to change it.
    notes.append(
        f"{info.path.name}: SD 2.x without a prediction-type hint; assuming v_prediction (the 768-v "
        f'model). Set "prediction_type": "epsilon" for SD 2.x-base (512) models.'
    )
    return "v_prediction"


def bundled_config_name(architecture: str, prediction: str) -> str:
    """The trainer/model_configs folder of an architecture (SD 2.x has one per prediction type)."""
    if architecture == "sd2":
        return "sd2_768_v" if prediction == "v_prediction" else "sd2_512"
    return architecture


def bundled_config_dir(name: str, cache_dir: Path) -> Path:
    """A complete diffusers config folder (configs + CLIP tokenizer files, no weights) in the cache."""
    target = cache_dir / "model-configs" / name
    if (target / "tokenizer" / "vocab.json").exists():
        return target
    with atomic_path(target) as temporary:
        shutil.copytree(BUNDLED / name, temporary)
        for tokenizer in sorted(temporary.glob("tokenizer*")):  # SDXL has two, both CLIP BPE
            write_clip_tokenizer_files(tokenizer)
    return target


def write_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of the CLIP tokenizer, rebuilt from CLIP's BPE merges the way CLIP does."""
    lines = gzip.open(CLIP_BPE, "rt", encoding="utf-8").read().split("\n")[1 : CLIP_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(line.split()) for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")


def _cache_key(path: Path, config_dir: Path, prediction_type: str) -> str:
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{config_dir.resolve()}|{prediction_type}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def converted_model_path(
    path: Path,
    cache_dir: Path,
    config_override: str | None = None,
    prediction_type: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """The cached diffusers folder of a single-file checkpoint, converting it on first use."""
    notes = notes if notes is not None else []
    try:
        info = inspect_checkpoint(path)
        architecture = architecture_of(info)
        prediction = choose_prediction_type(info, architecture, prediction_type, notes)
        if config_override:
            config_dir = Path(config_override)
        else:
            config_dir = bundled_config_dir(bundled_config_name(architecture, prediction), cache_dir)
        target = cache_dir / "converted" / f"{path.stem}-{_cache_key(path, config_dir, prediction)}"
        if (target / "model_index.json").exists():
            return target
        pipeline = load_single_file_pipeline(path, config_dir=config_dir, prediction_type=prediction)
    except ConversionError as error:
        raise ConfigError(f"key 'resume_ckpt' = '{path}': {error}") from None
    with atomic_path(target) as temporary:
        pipeline.save_pretrained(str(temporary), safe_serialization=True)
    return target
