"""A tiny, randomly initialised Stable Diffusion model for the demo and the tests.

It has the architecture of SD 1.x (UNet2DConditionModel, AutoencoderKL with an 8x downsampling VAE,
CLIPTextModel, CLIPTokenizer, DDPM-style noise schedule) at a size that trains on a CPU in seconds.
It is written to disk as an ordinary diffusers folder, so the trainer loads it through exactly the
same code path as SD 1.5. Nothing is downloaded: the tokenizer's vocabulary is generated here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_MODEL_NAME = "tiny"
TINY_SEED = 1234
TINY_VERSION = "1"  # bump when the architecture below changes, so cached copies are rebuilt
DEFAULT_CACHE_DIR = Path(os.environ.get("EVERYCYCLE_CACHE", Path.home() / ".cache" / "everycycle"))


def bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table every CLIP/GPT-2 BPE vocabulary is built on."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def write_tokenizer_files(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (every byte, with and without the end-of-word mark)."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # One header line and no merges: every word is spelled out character by character.
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def build_tiny_pipeline(folder: Path) -> Path:
    """Build the tiny model deterministically and save it as a diffusers folder at `folder`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,  # 64 px images, 8x smaller latents
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer_dir = folder.parent / f".{folder.name}-tokenizer-src"
    write_tokenizer_files(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """The path of the tiny model's diffusers folder, building it once per cache dir and version."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    folder = cache_dir / f"tiny-sd-v{TINY_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".tiny-sd-v{TINY_VERSION}.{os.getpid()}.tmp"
    build_tiny_pipeline(staging)
    try:
        os.replace(staging, folder)  # atomic: a concurrent builder's complete copy is as good as ours
    except OSError:
        if not (folder / "model_index.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder
