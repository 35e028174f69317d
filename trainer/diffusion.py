"""The denoising objective shared by training, validation and the LR finder."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from trainer.model import SDModel


@torch.no_grad()
def encode_latents(model: SDModel, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """VAE latents, scaled as the UNet expects. `sample=False` takes the mean (deterministic, for validation)."""
    pixel_values = pixel_values.to(device=model.vae.device, dtype=model.vae.dtype)
    dist = model.vae.encode(pixel_values).latent_dist
    latents = dist.sample() if sample else dist.mode()
    return latents.float() * model.vae_scale


def sample_noise(latents: torch.Tensor, offset_ratio: float, generator: Optional[torch.Generator] = None):
    """Gaussian noise, plus offset noise (one value per image and channel) when `offset_ratio` > 0."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset_ratio > 0:
        b, c = latents.shape[:2]
        noise = noise + offset_ratio * torch.randn((b, c, 1, 1), generator=generator, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def drop_captions(captions: list[str], probability: float) -> list[str]:
    """Conditional dropout: train some captions as the empty prompt, so classifier-free guidance works."""
    if probability <= 0:
        return captions
    keep = torch.rand(len(captions)) >= probability
    return [caption if k else "" for caption, k in zip(captions, keep.tolist())]


def denoising_loss(
    model: SDModel,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Per-image loss: MSE between the UNet's prediction and its target (epsilon or v)."""
    scheduler = model.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if model.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    unet_dtype = next(model.unet.parameters()).dtype
    prediction = model.unet(noisy.to(unet_dtype), timesteps, encoder_hidden_states.to(unet_dtype)).sample
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * min_snr_weights(scheduler, timesteps, min_snr_gamma, model.prediction_type)
    return loss


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
