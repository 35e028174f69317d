"""Loading the Stable Diffusion components a run trains: UNet, VAE, text encoder, tokenizer, noise schedule.

Everything goes through diffusers / transformers `from_pretrained`, so SD 1.5 from the hub, a local
diffusers folder and the built-in tiny model take the same path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.tiny_model import TINY_MODEL_NAME, tiny_model_path
from utils.config import ConfigError


@dataclass
class SDModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return getattr(self.vae.config, "scaling_factor", 0.18215)

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline:
        """An inference pipeline over the live (possibly training) components, for samples and saving."""
        return StableDiffusionPipeline(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=scheduler or self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def resolve_model_source(resume_ckpt: str, cache_dir: Optional[str]) -> str:
    """A diffusers folder path or hub id for `resume_ckpt` ('tiny' is built locally on first use)."""
    if resume_ckpt == TINY_MODEL_NAME:
        return str(tiny_model_path(Path(cache_dir) if cache_dir else None))
    path = Path(resume_ckpt)
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ConfigError(
                f"key 'resume_ckpt' = '{resume_ckpt}': the folder is not a diffusers Stable Diffusion model "
                f"(no model_index.json or unet/ inside). Give a diffusers folder, a hub id such as "
                f"'stable-diffusion-v1-5/stable-diffusion-v1-5', or 'tiny'."
            )
        return str(path)
    if path.suffix in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise ConfigError(f"key 'resume_ckpt' = '{resume_ckpt}': no such file.")
        raise ConfigError(
            f"key 'resume_ckpt' = '{resume_ckpt}': single-file checkpoints are not loaded yet; "
            f"give a diffusers folder or a hub id."
        )
    return resume_ckpt  # a hub id: diffusers downloads it when the machine is online


def load_model(resume_ckpt: str, cache_dir: Optional[str] = None) -> SDModel:
    source = resolve_model_source(resume_ckpt, cache_dir)
    try:
        return SDModel(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            # Training always adds noise the DDPM way; the model's own scheduler config carries the betas
            # and the prediction type (epsilon for SD 1.x / 2.x-base, v_prediction for SD 2.x 768-v).
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            source=source,
        )
    except OSError as error:
        raise ConfigError(
            f"key 'resume_ckpt' = '{resume_ckpt}': could not load a Stable Diffusion model from it ({error}). "
            f"Give a local diffusers folder, a hub id (needs network), or 'tiny'."
        ) from None


def configure_for_training(model: SDModel, attn_type: str, gradient_checkpointing: bool, train_text_encoder: bool):
    """Which parts train, the attention kernel and gradient checkpointing."""
    model.vae.requires_grad_(False)
    model.vae.eval()
    model.unet.train()
    model.text_encoder.requires_grad_(train_text_encoder)
    model.text_encoder.train(train_text_encoder)
    if attn_type == "xformers":
        enable_xformers(model)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            model.text_encoder.gradient_checkpointing_enable()


def enable_xformers(model: SDModel) -> None:
    if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
        raise ConfigError(
            "key 'attn_type' = 'xformers': xformers needs a CUDA GPU and `pip install xformers`. "
            "Use 'sdp' (torch scaled-dot-product attention, the default) otherwise."
        )
    model.unet.enable_xformers_memory_efficient_attention()


def encode_prompts(model: SDModel, captions: list[str], clip_skip: int, device) -> torch.Tensor:
    """CLIP hidden states for the UNet's cross-attention; clip_skip n uses the n-th last layer (ED2 semantics)."""
    ids = model.tokenizer(
        captions, padding="max_length", truncation=True, max_length=model.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    if clip_skip <= 1:
        return model.text_encoder(ids)[0]
    hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return model.text_encoder.text_model.final_layer_norm(hidden)
