"""Sample images during training, with fixed seeds so the same prompt is comparable across steps.

Sampling uses private generators and runs under `torch.random.fork_rng`, so it never changes the
training RNG: a run with samples trains exactly like one without.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image

from trainer.model import SDModel

SAMPLE_GUIDANCE_SCALES = (7.0, 4.0, 1.0)
SAMPLE_INFERENCE_STEPS = 20
RANDOM_CAPTIONS = 4


def read_prompts(path: str, train_items) -> list[str]:
    """One prompt a line; an empty file samples a few training captions instead (as ED2)."""
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if prompts:
        return prompts
    captions = sorted({item.caption for item in train_items})
    return captions[:RANDOM_CAPTIONS]


@torch.no_grad()
def make_samples(model: SDModel, prompts: list[str], out_dir: Path, step: int, resolution: int, device,
                 seed: int) -> list[tuple[Path, np.ndarray]]:
    """One grid per prompt (one column per guidance scale), saved as samples/gs<step>-p<i>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = DDIMScheduler.from_config(model.noise_scheduler.config)
    pipeline = model.pipeline(scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    was_training = (model.unet.training, model.text_encoder.training)
    model.unet.eval()
    model.text_encoder.eval()
    results = []
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for index, prompt in enumerate(prompts):
            columns = []
            for scale in SAMPLE_GUIDANCE_SCALES:
                generator = torch.Generator(device="cpu").manual_seed(seed + index)
                image = pipeline(prompt, height=resolution, width=resolution, guidance_scale=scale,
                                 num_inference_steps=SAMPLE_INFERENCE_STEPS, generator=generator,
                                 output_type="np").images[0]
                columns.append(image)
            grid = (np.concatenate(columns, axis=1) * 255).round().astype(np.uint8)
            path = out_dir / f"gs{step:05d}-p{index}.png"
            Image.fromarray(grid).save(path)
            results.append((path, grid))
    model.unet.train(was_training[0])
    model.text_encoder.train(was_training[1])
    return results
