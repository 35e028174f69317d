"""Tiny, randomly initialised Stable Diffusion models for the demo and the tests.

`tiny` has the architecture of SD 1.x (UNet2DConditionModel, AutoencoderKL with an 8x downsampling VAE,
CLIPTextModel, CLIPTokenizer, DDPM-style noise schedule) at a size that trains on a CPU in seconds.
`tiny-sdxl` has SDXL's: a UNet with the `text_time` added conditioning that cross-attends to both text
encoders' hidden states side by side, a CLIPTextModel and a CLIPTextModelWithProjection (whose pooled,
projected output feeds the added conditioning), two tokenizers (the second pads with "!"), SDXL's own noise
schedule. Each is written to disk as an ordinary diffusers folder, so the trainer loads it through exactly the
same code path as SD 1.5 / SDXL. Nothing is downloaded: the tokenizers' vocabulary is generated here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_MODEL_NAME = "tiny"
TINY_SDXL_MODEL_NAME = "tiny-sdxl"
# A small model pretrained on drawn shapes (scripts/pretrain_tiny.py), committed in the repository: it draws what
# it is asked ("a red circle"), so samples and fine-tuning show something; `tiny` stays random for the tests.
TINY_PRETRAINED_MODEL_NAME = "tiny-pretrained"
TINY_PRETRAINED_PATH = Path(__file__).resolve().parents[1] / "models" / TINY_PRETRAINED_MODEL_NAME
TINY_SEED = 1234
TINY_VERSION = "1"  # bump when the architecture below changes, so cached copies are rebuilt
TINY_SDXL_VERSION = "1"  # the same for tiny-sdxl
# tiny-sdxl's widths. The two text encoders differ in width as SDXL's do (768 and 1280): diffusers tells them
# apart in a single file by that width (single_file_utils.create_diffusers_clip_model_from_ldm).
TINY_SDXL_TEXT_WIDTHS = (32, 64)
TINY_SDXL_POOLED_WIDTH = 32  # text_encoder_2's projection_dim (SDXL: 1280)
TINY_SDXL_TIME_EMBED_WIDTH = 8  # addition_time_embed_dim (SDXL: 256)
# SDXL's add_time_ids: original size, crop top-left, target size, two numbers each, each embedded separately.
SDXL_TIME_IDS = 6
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


def write_tokenizer_files(folder: Path, pad_token: str = "<|endoftext|>") -> None:
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
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def tiny_vae(scaling_factor: float = 0.18215):
    """The tiny models' VAE: SD's 8x downsampling AutoencoderKL, 16-32 channels wide."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_text_config(**overrides):
    """A 4-layer CLIP text model config over the character-level vocabulary of write_tokenizer_files."""
    from transformers import CLIPTextConfig

    values = {
        "vocab_size": 514,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
        "projection_dim": 32,
    }
    return CLIPTextConfig(**(values | overrides))


def tiny_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over the character-level vocabulary, its files written in `folder` first."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, pad_token)
    return CLIPTokenizer.from_pretrained(str(folder))


def build_tiny_pipeline(folder: Path) -> Path:
    """Build the tiny model deterministically and save it as a diffusers folder at `folder`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

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
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config())
    tokenizer_dir = folder.parent / f".{folder.name}-tokenizer-src"
    tokenizer = tiny_tokenizer(tokenizer_dir)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    save_sd_folder(folder, unet, vae, text_encoder, tokenizer, scheduler)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def save_sd_folder(folder: Path, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    """SD 1.x parts saved as a StableDiffusionPipeline diffusers folder (safetensors, no safety checker)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)


def build_tiny_sdxl_pipeline(folder: Path) -> Path:
    """Build tiny-sdxl from TINY_SEED and save it as a diffusers folder (StableDiffusionXLPipeline layout) at
    `folder`. The caller's random generators are left as they were."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from trainer.single_file import BUNDLED

    width_1, width_2 = TINY_SDXL_TEXT_WIDTHS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(
            sample_size=8,  # 64 px images, 8x smaller latents
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            # SDXL's pattern: no attention at the highest resolution, several transformer layers deeper down.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=width_1 + width_2,  # both encoders' hidden states, concatenated (SDXL: 2048)
            addition_embed_type="text_time",
            addition_time_embed_dim=TINY_SDXL_TIME_EMBED_WIDTH,
            projection_class_embeddings_input_dim=TINY_SDXL_POOLED_WIDTH + SDXL_TIME_IDS * TINY_SDXL_TIME_EMBED_WIDTH,
            norm_num_groups=32,
        )
        vae = tiny_vae(scaling_factor=0.13025)  # SDXL's VAE scaling
        text_encoder = CLIPTextModel(tiny_text_config(hidden_size=width_1))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_text_config(
                hidden_size=width_2,
                intermediate_size=2 * width_2,
                hidden_act="gelu",  # OpenCLIP's exact GELU, as ViT-bigG
                projection_dim=TINY_SDXL_POOLED_WIDTH,
            )
        )
    tokenizer_dir = folder.parent / f".{folder.name}-tokenizer-src"
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(tokenizer_dir / "tokenizer"),
        tokenizer_2=tiny_tokenizer(tokenizer_dir / "tokenizer_2", pad_token="!"),  # as SDXL's second
        scheduler=EulerDiscreteScheduler.from_pretrained(BUNDLED / "sdxl", subfolder="scheduler"),
        add_watermarker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    return folder


def tiny_model_path(cache_dir: Path | None = None) -> Path:
    """The path of the tiny model's diffusers folder, building it once per cache dir and version."""
    return built_once(cache_dir, f"tiny-sd-v{TINY_VERSION}", build_tiny_pipeline)


def tiny_sdxl_model_path(cache_dir: Path | None = None) -> Path:
    """The path of tiny-sdxl's diffusers folder, building it once per cache dir and version."""
    return built_once(cache_dir, f"tiny-sdxl-v{TINY_SDXL_VERSION}", build_tiny_sdxl_pipeline)


def built_once(cache_dir: Path | None, name: str, build) -> Path:
    """`cache_dir/name`, a diffusers folder that `build(folder)` writes on first use."""
    cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    folder = cache_dir / name
    if (folder / "model_index.json").exists():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".{name}.{os.getpid()}.tmp"
    import torch

    # The builder seeds torch; the caller's generator is left as it was, so a run that builds the model first
    # draws the same noise as one that finds it built.
    with torch.random.fork_rng(devices=[]):
        build(staging)
    try:
        os.replace(staging, folder)  # atomic: a concurrent builder's complete copy is as good as ours
    except OSError:
        if not (folder / "model_index.json").exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return folder
