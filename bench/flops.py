"""FLOPs of one training step, counted rather than estimated.

torch.utils.flop_counter.FlopCounterMode counts the matrix multiplications, convolutions and attention of
whatever runs under it (2 FLOPs per multiply-add), backward included. The models are built on the meta
device from their diffusers configs: meta tensors carry shapes but no data, so the counter sees every op of
SD 1.5 at 512 px without a GPU, without allocating its 3.4 GB of weights and in seconds on a CPU.

The count is a property of the architecture and the resolution, not of the kernels: xformers, torch.compile
and gradient checkpointing do not change it. Checkpointing recomputes the forward in the backward, but MFU
counts model FLOPs only (the PaLM paper's convention), so that recomputation shows up as a lower MFU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

META = torch.device("meta")


@dataclass(frozen=True)
class FlopsPerImage:
    """FLOPs per image of the parts of a training step at one resolution."""

    resolution: int
    unet_forward: float
    unet_forward_backward: float
    vae_encode: float
    text_encoder_forward: float

    def training_step(self, cached_latents: bool) -> float:
        """One image's share of a step: UNet forward and backward, the frozen text encoder's forward, and the
        VAE encode unless the latents were cached beforehand."""
        vae = 0.0 if cached_latents else self.vae_encode
        return self.unet_forward_backward + self.text_encoder_forward + vae

    def as_dict(self) -> dict:
        return asdict(self)


def count_flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def meta_models(config_dir: Path) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    """UNet, VAE and text encoder of a diffusers folder (configs only; weights, if any, are not read)."""
    with META:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    return unet, vae, text_encoder


def latent_side(vae: AutoencoderKL, resolution: int) -> int:
    """Each VAE down block but the last halves the image: 8x for SD."""
    return resolution // 2 ** (len(vae.config.block_out_channels) - 1)


def count_step_flops(config_dir: Path, resolution: int, batch_size: int = 1) -> dict[str, int]:
    """Total FLOPs of each part of a training step for a batch (not divided by the batch size)."""
    unet, vae, text_encoder = meta_models(config_dir)
    side = latent_side(vae, resolution)
    tokens = text_encoder.config.max_position_embeddings
    latents = torch.randn(batch_size, unet.config.in_channels, side, side, device=META)
    timesteps = torch.full((batch_size,), 500, device=META)
    hidden = torch.randn(batch_size, tokens, unet.config.cross_attention_dim, device=META)
    pixels = torch.randn(batch_size, vae.config.in_channels, resolution, resolution, device=META)
    token_ids = torch.zeros(batch_size, tokens, dtype=torch.long, device=META)

    def unet_forward_backward():
        unet(latents, timesteps, hidden).sample.float().square().mean().backward()

    with torch.no_grad():
        counts = {
            "unet_forward": count_flops(lambda: unet(latents, timesteps, hidden)),
            "vae_encode": count_flops(lambda: vae.encode(pixels).latent_dist.sample()),
            "text_encoder_forward": count_flops(lambda: text_encoder(token_ids)),
        }
    counts["unet_forward_backward"] = count_flops(unet_forward_backward)
    return counts


def flops_per_image(config_dir: Path, resolution: int) -> FlopsPerImage:
    """Counted on a batch of one; every part is exactly linear in the batch size (see the tests)."""
    counts = count_step_flops(config_dir, resolution, batch_size=1)
    return FlopsPerImage(resolution=resolution, **{name: float(value) for name, value in counts.items()})


def parameter_counts(config_dir: Path) -> dict[str, int]:
    unet, vae, text_encoder = meta_models(config_dir)
    return {
        name: sum(p.numel() for p in model.parameters())
        for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    }


def main() -> None:
    """Print the counts of the bundled SD 1.5 architecture at 512 px (the README's CPU verification)."""
    config_dir = Path(__file__).resolve().parents[1] / "trainer" / "model_configs" / "sd1"
    flops = flops_per_image(config_dir, 512)
    for name, value in flops.as_dict().items():
        if name != "resolution":
            print(f"{name:<22} {value / 1e12:.3f} TFLOP per image at {flops.resolution} px")


if __name__ == "__main__":
    main()
