"""The denoising objective shared by training, validation and the LR finder, and the model's conditioning: the
text (one CLIP encoder for SD 1.x/2.x; SDXL's two, plus the pooled projection) and SDXL's size and crop ids."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from trainer.model import SDModel, encode_prompts, sdxl_hidden_layer

# The text conditioning's tensors, by their batch key (data/loader.py Batch, trainer/cache.py TextEmbeddings).
HIDDEN_STATES = "encoder_hidden_states"  # [B, 77, D]: what the UNet cross-attends to
POOLED = "pooled_embeds"  # [B, P]: SDXL's pooled, projected embedding of its second text encoder
TIME_IDS = "add_time_ids"  # [B, 6]: SDXL's original size, crop top-left and target size (data/images.size_and_crop)


def vae_dtype(model: SDModel, low_precision: torch.dtype) -> torch.dtype:
    """The dtype the frozen VAE runs in under mixed precision `low_precision`: that one, except for SDXL's VAE
    under fp16, whose activations overflow fp16 (diffusers marks such a VAE with `force_upcast`, which its SDXL
    pipelines obey): fp32 there. bf16 has fp32's range. A replacement VAE whose config says force_upcast false
    (the fp16-fix one, through vae_path) runs in fp16."""
    if low_precision == torch.float16 and model.is_sdxl and getattr(model.vae.config, "force_upcast", True):
        return torch.float32
    return low_precision


def in_own_precision(module: torch.nn.Module):
    """A module kept in fp32 under mixed precision (SDXL's VAE, vae_dtype) runs in fp32: autocast would compute its
    convolutions in fp16 again. Modules in a low precision run as autocast has them."""
    parameter = next(module.parameters())
    if parameter.dtype != torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(parameter.device.type, enabled=False)


@torch.no_grad()
def vae_distribution(model: SDModel, pixel_values: torch.Tensor) -> DiagonalGaussianDistribution:
    """The VAE's latent distribution of the images (its `.parameters`: mean and logvar, what the latent cache
    keeps)."""
    # Copy, then convert on the device: from the loader's pinned memory the copy is asynchronous (the CPU goes on
    # launching work instead of waiting for the GPU's queue), and the dtype conversion runs on the GPU.
    pixel_values = pixel_values.to(device=model.vae.device, non_blocking=True).to(dtype=model.vae.dtype)
    with in_own_precision(model.vae):
        return model.vae.encode(pixel_values).latent_dist


@torch.no_grad()
def decode_latents(model: SDModel, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from latents scaled as the UNet sees them (the pipelines' own decode step)."""
    with in_own_precision(model.vae):
        return model.vae.decode((latents / model.vae_scale).to(model.vae.dtype)).sample


def token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    """The captions as CLIP token ids, padded and truncated to the tokenizer's 77 tokens (as the pipelines do)."""
    return tokenizer(
        captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids.to(device)


def encode_text(model: SDModel, captions: list[str], clip_skip: int, device) -> dict[str, torch.Tensor]:
    """The text conditioning of the captions, by batch key. SD 1.x/2.x: the CLIP hidden states (trainer/model.py
    encode_prompts). SDXL, as it was trained (diffusers' train_text_to_image_sdxl.py encode_prompt and
    StableDiffusionXLPipeline.encode_prompt): each encoder's hidden state of sdxl_hidden_layer, not normalized,
    side by side on the feature axis, and the pooled, projected output of the second (text_embeds). An empty
    caption (caption dropout) is encoded as any other, as SDXL's training drops captions."""
    if not model.is_sdxl:
        return {HIDDEN_STATES: encode_prompts(model, captions, clip_skip, device)}
    layer = sdxl_hidden_layer(clip_skip)
    hidden = []
    for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
        output = encoder(token_ids(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(output.hidden_states[-layer])
    return {HIDDEN_STATES: torch.cat(hidden, dim=-1), POOLED: output.text_embeds}


def added_conditioning(model: SDModel, text: dict[str, torch.Tensor], time_ids: torch.Tensor | None) -> dict | None:
    """The UNet's added_cond_kwargs: SDXL's pooled text embedding and size/crop ids; None for SD 1.x/2.x."""
    if not model.is_sdxl:
        return None
    if time_ids is None:
        raise ValueError("an SDXL model needs each image's add_time_ids (original size, crop, target size)")
    return {"text_embeds": text[POOLED], "time_ids": time_ids}


@torch.no_grad()
def encode_latents(model: SDModel, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """VAE latents, scaled as the UNet expects. `sample=False` takes the mean (deterministic, for validation)."""
    dist = vae_distribution(model, pixel_values)
    latents = dist.sample() if sample else dist.mode()
    return latents.float() * model.vae_scale


def sample_cached_latents(parameters: torch.Tensor, vae_scale: float, device) -> torch.Tensor:
    """A fresh latent sample from cached VAE distribution parameters ([B, 2C, h, w]: mean, then logvar), with
    the very math of an encode (diffusers' DiagonalGaussianDistribution.sample: mean + std * randn from the global
    RNG, same shape, dtype and device), so a cached run draws what an uncached run draws."""
    dist = DiagonalGaussianDistribution(parameters.to(device))
    return dist.sample().float() * vae_scale


def sample_noise(
    latents: torch.Tensor,
    offset_ratio: float,
    generator: torch.Generator | None = None,
    pyramid_discount: float | None = None,
):
    """Gaussian noise; plus pyramid noise (coarser noise levels, each `discount` times weaker) and offset noise
    (one value per image and channel) when asked."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if pyramid_discount:
        noise = add_pyramid_noise(noise, pyramid_discount, generator)
    if offset_ratio > 0:
        b, c = latents.shape[:2]
        noise = noise + offset_ratio * torch.randn(
            (b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    return noise


def add_pyramid_noise(noise: torch.Tensor, discount: float, generator: torch.Generator | None) -> torch.Tensor:
    """Multi-resolution noise: upsampled noise of ever coarser grids (random 2-4x steps), weighted discount**i,
    then rescaled to unit variance, so low frequencies get noised too."""
    b, c, h, w = noise.shape
    total, level = noise.clone(), 1
    while True:
        factor = 2 + torch.rand(1, generator=generator).item() * 2
        h, w = int(h / factor), int(w / factor)
        if h < 1 or w < 1:
            break
        coarse = torch.randn((b, c, h, w), generator=generator, device=noise.device, dtype=noise.dtype)
        total = total + F.interpolate(coarse, size=noise.shape[-2:], mode="bilinear") * discount**level
        level += 1
    return total / total.std()


def denoising_loss(
    model: SDModel,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    min_snr_gamma: float | None = None,
    loss_type: str = "mse",
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-image loss between the UNet's prediction and its target (epsilon or v): MSE unless `loss_type`.
    `added_cond`: SDXL's added conditioning (added_conditioning)."""
    scheduler = model.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if model.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    unet_dtype = next(model.unet.parameters()).dtype
    if added_cond is not None:
        added_cond = {key: value.to(device=noisy.device, dtype=unet_dtype) for key, value in added_cond.items()}
    prediction = model.unet(
        noisy.to(unet_dtype), timesteps, encoder_hidden_states.to(unet_dtype), added_cond_kwargs=added_cond
    ).sample
    loss = per_image_loss(
        prediction.float(), target.float(), timesteps, loss_type, scheduler.config.num_train_timesteps
    )
    if min_snr_gamma:
        loss = loss * min_snr_weights(scheduler, timesteps, min_snr_gamma, model.prediction_type)
    return loss


def per_image_loss(prediction, target, timesteps, loss_type: str, num_timesteps: int) -> torch.Tensor:
    """mse, huber (delta 1), or ED2's timestep blends. ED2's code (not its docs) defines mse_huber as Huber
    weighted by 1 - t/T plus MSE weighted by t/T: Huber near t=0, MSE near t=T. huber_mse is the reverse."""
    mse = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    if loss_type == "mse":
        return mse
    huber = F.huber_loss(prediction, target, reduction="none", delta=1.0).mean(dim=(1, 2, 3))
    if loss_type == "huber":
        return huber
    mse_weight = timesteps.float() / num_timesteps
    if loss_type == "huber_mse":
        mse_weight = 1 - mse_weight
    return mse_weight * mse + (1 - mse_weight) * huber


def perturb_embeddings(hidden: torch.Tensor, gamma: float) -> torch.Tensor:
    """Embedding perturbation (arXiv 2405.20494): Gaussian noise with std gamma / sqrt(width)."""
    if gamma <= 0:
        return hidden
    return hidden + torch.randn_like(hidden) * gamma / hidden.shape[-1] ** 0.5


def training_loss(model: SDModel, batch: dict, config, device) -> torch.Tensor:
    """Mean denoising loss of one micro-batch: encode, noise, predict, compare. A batch from the latent cache
    (trainer/cache.py) carries "latents", the VAE distribution parameters, instead of "pixel_values", and one
    from the text-embedding cache carries the text conditioning (encode_text's keys)."""
    if "latents" in batch:
        latents = sample_cached_latents(batch["latents"], model.vae_scale, device)
    else:
        latents = encode_latents(model, batch["pixel_values"])
    noise = sample_noise(latents, config.zero_frequency_noise_ratio, pyramid_discount=config.pyramid_noise_discount)
    last = min(config.timestep_end, model.noise_scheduler.config.num_train_timesteps)
    timesteps = torch.randint(config.timestep_start, last, (latents.shape[0],), device=latents.device)
    # Captions arrive with conditional dropout and tag shuffling applied by the dataset (seeded per sample).
    if HIDDEN_STATES in batch:
        text = {key: batch[key].to(device) for key in (HIDDEN_STATES, POOLED) if key in batch}
    else:
        text = encode_text(model, batch["captions"], config.clip_skip, device)
    hidden = perturb_embeddings(text[HIDDEN_STATES], config.embedding_perturbation)
    added = added_conditioning(model, text, batch.get(TIME_IDS))
    losses = denoising_loss(
        model, latents, hidden, noise, timesteps, config.min_snr_gamma, config.loss_type, added_cond=added
    )
    return (losses * batch["loss_scales"].to(losses.device)).mean()


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr
