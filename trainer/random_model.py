"""`resume_ckpt: random:sd15` / `random:sd21`: the real architecture with random weights, nothing downloaded.

What the GPU check and the benchmarks train when no real weights are at hand: the UNet, VAE and CLIP text
encoder of SD 1.5 or SD 2.1 at full size, built from the bundled configs (trainer/model_configs, the same ones
single-file conversion uses) with the CLIP tokenizer rebuilt from the bundled BPE merges. The weights are drawn
from a fixed seed, so every machine with the same torch builds the same model; it is written once, atomically,
as an ordinary diffusers folder under model_cache_dir, and from then on loads through `from_pretrained` like any
SD 1.5 folder.
"""

from __future__ import annotations

from pathlib import Path

from trainer.single_file import bundled_config_dir
from utils.checkpoint import atomic_path
from utils.config import RANDOM_MODEL_PREFIX, ConfigError

# name -> the bundled config folder of its architecture. SD 2.1 is the 768 px v-prediction model.
RANDOM_MODELS = {"sd15": "sd1", "sd21": "sd2_768_v"}
RANDOM_SEED = 1234
RANDOM_VERSION = "1"  # bump when the build below changes, so that cached copies are rebuilt


def is_random_model(resume_ckpt: str) -> bool:
    return resume_ckpt.startswith(RANDOM_MODEL_PREFIX)


def random_model_path(resume_ckpt: str, cache_dir: Path) -> Path:
    """The diffusers folder of `random:<name>`, built on first use."""
    name = resume_ckpt.removeprefix(RANDOM_MODEL_PREFIX)
    if name not in RANDOM_MODELS:
        valid = ", ".join(f"'{RANDOM_MODEL_PREFIX}{known}'" for known in RANDOM_MODELS)
        raise ConfigError(f"key 'resume_ckpt' = '{resume_ckpt}': no such random model. Use one of: {valid}.")
    target = Path(cache_dir) / f"random-{name}-v{RANDOM_VERSION}"
    if (target / "model_index.json").exists():
        return target
    pipeline = build_random_pipeline(bundled_config_dir(RANDOM_MODELS[name], Path(cache_dir)))
    # A concurrent builder's folder is replaced by ours: both hold the same weights.
    with atomic_path(target) as temporary:
        pipeline.save_pretrained(str(temporary), safe_serialization=True)
    return target


def build_random_pipeline(config_dir: Path):
    """A StableDiffusionPipeline of the architecture in `config_dir` (configs only; weights there are not read),
    its weights drawn from RANDOM_SEED on the CPU in fp32, like a downloaded model's. The caller's random
    generators are left as they were: a run that builds the model on first use trains as one that finds it."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
    # The tokenizer and the scheduler (of the class model_index.json names) come from the folder itself.
    return StableDiffusionPipeline.from_pretrained(
        str(config_dir),
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
