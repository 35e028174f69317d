"""Loading the Stable Diffusion components a run trains: UNet, VAE, text encoder, tokenizer, noise schedule.

Everything goes through diffusers / transformers `from_pretrained`, so SD 1.5 from the hub, a local
diffusers folder and the built-in tiny models take the same path. An SDXL model (a StableDiffusionXLPipeline
folder: a second text encoder and tokenizer in text_encoder_2/ and tokenizer_2/) loads both; SDModel carries
the second pair in optional fields, None for SD 1.x/2.x.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.random_model import is_random_model, random_model_path
from trainer.tiny_model import (
    DEFAULT_CACHE_DIR,
    TINY_MODEL_NAME,
    TINY_PRETRAINED_MODEL_NAME,
    TINY_PRETRAINED_PATH,
    TINY_SDXL_MODEL_NAME,
    tiny_model_path,
    tiny_sdxl_model_path,
)
from utils.config import ConfigError, refuse_second_text_encoder, text_encoder_setting
from utils.quiet import quiet_transformers_progress_bars

quiet_transformers_progress_bars()  # every load and save of a model goes through this module

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class SDModel:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    source: str
    # SDXL's second text encoder (OpenCLIP ViT-bigG with its projection) and tokenizer; None for SD 1.x/2.x.
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by part name: "text_encoder", and SDXL's "text_encoder_2"."""
        second = {"text_encoder_2": self.text_encoder_2} if self.is_sdxl else {}
        return {"text_encoder": self.text_encoder, **second}

    def trainable_parts(self) -> dict[str, torch.nn.Module]:
        """The parts that can train, by name (the VAE never does): the UNet and the text encoders."""
        return {"unet": self.unet, **self.text_encoders()}

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale(self) -> float:
        return getattr(self.vae.config, "scaling_factor", 0.18215)

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """An inference pipeline over the live (possibly training) components, for samples and saving."""
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                unet=self.unet,
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                scheduler=scheduler or self.noise_scheduler,
                add_watermarker=False,  # samples and checkpoints hold the model's own output
            )
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


def resolve_model_source(
    resume_ckpt: str,
    cache_dir: str | None,
    single_file_config: str | None = None,
    prediction_type: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """A diffusers folder path or hub id for `resume_ckpt` ('tiny', 'tiny-sdxl' and 'random:sd15' / 'random:sd21'
    are built locally on first use; 'tiny-pretrained' is the repository's models/ folder; a single .safetensors /
    .ckpt file is converted once into a cached diffusers folder)."""
    if resume_ckpt == TINY_MODEL_NAME:
        return str(tiny_model_path(Path(cache_dir) if cache_dir else None))
    if resume_ckpt == TINY_SDXL_MODEL_NAME:
        return str(tiny_sdxl_model_path(Path(cache_dir) if cache_dir else None))
    if resume_ckpt == TINY_PRETRAINED_MODEL_NAME:
        return str(TINY_PRETRAINED_PATH)  # committed; scripts/pretrain_tiny.py rebuilds it
    if is_random_model(resume_ckpt):
        return str(random_model_path(resume_ckpt, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR))
    path = Path(resume_ckpt)
    if path.is_dir():
        if not (path / "model_index.json").exists() and not (path / "unet").is_dir():
            raise ConfigError(
                f"key 'resume_ckpt' = '{resume_ckpt}': the folder is not a diffusers Stable Diffusion model "
                f"(no model_index.json or unet/ inside). Give a diffusers folder, a hub id such as "
                f"'stable-diffusion-v1-5/stable-diffusion-v1-5', 'tiny' or 'tiny-sdxl'."
            )
        return str(path)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"key 'resume_ckpt' = '{resume_ckpt}': no such file.")
        from trainer.single_file import converted_model_path

        return str(
            converted_model_path(
                path, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR, single_file_config, prediction_type, notes
            )
        )
    return resume_ckpt  # a hub id: diffusers downloads it when the machine is online


def load_model(config, notes: list[str] | None = None) -> SDModel:
    """The model a config trains: `resume_ckpt`, with the config's noise-schedule options applied.
    What loading noticed (a guessed prediction type, say) is appended to `notes`."""
    model = load_pretrained(
        resolve_model_source(
            config.resume_ckpt, config.model_cache_dir, config.single_file_config, config.prediction_type, notes
        ),
        config.resume_ckpt,
    )
    overrides = {}
    if config.prediction_type:
        overrides["prediction_type"] = config.prediction_type
    if config.enable_zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    if overrides:
        model.noise_scheduler = DDPMScheduler.from_config(model.noise_scheduler.config, **overrides)
    if config.vae_path:
        model.vae = load_vae(config.vae_path)
    return model


def load_vae(vae_path: str) -> AutoencoderKL:
    """The VAE of vae_path (a diffusers AutoencoderKL folder or hub id), in place of the model's own."""
    try:
        return AutoencoderKL.from_pretrained(vae_path)
    except OSError as error:
        raise ConfigError(
            f"key 'vae_path' = '{vae_path}': could not load a diffusers AutoencoderKL from it ({error}). Give a "
            f"folder with the VAE's config.json and weights, a hub id (needs network), or null for the model's own."
        ) from None


def is_sdxl_source(source: str) -> bool:
    """Whether a diffusers model is SDXL: it has a second text encoder (StableDiffusionXLPipeline layout). A local
    folder says so by its text_encoder_2/; a hub id by its model_index.json (the only file read for this)."""
    path = Path(source)
    if path.is_dir():
        return (path / "text_encoder_2").is_dir()
    try:
        return "text_encoder_2" in DiffusionPipeline.load_config(source)
    except OSError:  # no index at hand (offline, only the parts cached): loaded as SD 1.x/2.x are
        return False


def load_pretrained(source: str, resume_ckpt: str) -> SDModel:
    try:
        second_text_encoder = (
            {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"),
                "tokenizer_2": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            }
            if is_sdxl_source(source)
            else {}
        )
        return SDModel(
            unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            # Training always adds noise the DDPM way; the model's own scheduler config carries the betas
            # and the prediction type (epsilon for SD 1.x / 2.x-base / SDXL, v_prediction for SD 2.x 768-v).
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            source=source,
            **second_text_encoder,
        )
    except OSError as error:
        raise ConfigError(
            f"key 'resume_ckpt' = '{resume_ckpt}': could not load a Stable Diffusion model from it ({error}). "
            f"Give a local diffusers folder, a hub id (needs network), 'tiny' or 'tiny-sdxl'."
        ) from None


def configure_for_training(model: SDModel, config) -> None:
    """Which parts train (and which text encoder layers), the attention kernel, gradient checkpointing, the
    memory format."""
    refuse_second_text_encoder(config, model.is_sdxl)
    train_unet = not config.disable_unet_training
    model.vae.requires_grad_(False)
    model.vae.eval()
    model.unet.requires_grad_(train_unet)
    model.unet.train(train_unet)
    for name, encoder in model.text_encoders().items():
        trains = name in config.trained_text_encoders
        encoder.requires_grad_(trains)
        encoder.train(trains)
        unfrozen_layers = text_encoder_setting(config, name, "unfreeze_last_n_layers")
        if trains and unfrozen_layers is not None:
            freeze_text_encoder_front(encoder, unfrozen_layers)
        if trains and config.gradient_checkpointing:
            encoder.activation_checkpointing_enable()  # gradient_checkpointing_enable: deprecated
    if config.train_text_encoder:  # SDXL's second encoder uses every layer: its last one feeds the pooled output
        freeze_unused_text_layers(model.text_encoder, config.clip_skip, model.is_sdxl)
    if config.attn_type == "xformers":
        enable_xformers(model)
    elif config.attn_type == "slice":
        model.unet.set_attention_slice("auto")
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    if config.channels_last:
        # NHWC activations: cuDNN's tensor-core convolutions run without layout transposes. Only 4-D weights
        # change layout; later .to(device, dtype) calls keep it (they preserve the memory format).
        model.unet.to(memory_format=torch.channels_last)
        if not config.cache_latents:  # with cached latents the VAE does not run while training
            model.vae.to(memory_format=torch.channels_last)


TRAINED_WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def trained_weight_dtype(config) -> torch.dtype:
    """The dtype the trained parts are stored and updated in (weight_dtype): fp32 master weights, or bf16 ones with
    no fp32 copy (the optimizer then rounds each update into bf16, stochastically with stochastic_rounding).
    Their gradients have the same dtype, so bf16 halves both the weights and the gradient buffer."""
    return TRAINED_WEIGHT_DTYPES[config.weight_dtype]


def use_tf32(device: torch.device, allowed: bool = True) -> None:
    """On CUDA, let fp32 matmuls and cuDNN convolutions use TF32 tensor cores (10-bit mantissa, fp32 range).
    Under bf16/fp16 autocast most of a step is already low precision; what stays fp32 (the loss, norms, the
    fp32 parts of the text encoder when it trains) gets the tensor cores too. Nothing changes on the CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def compile_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """torch.compile (inductor) of the UNet, after accelerator.prepare, as accelerate's own dynamo support
    compiles (last, around the DDP wrapper), but for the UNet alone. The compiled wrapper shares the UNet's
    parameters; Trainer.unwrapped_model takes it off again, so checkpoints and states keep plain keys (no
    `_orig_mod.` prefix)."""
    from accelerate.utils import is_compiled_module

    return unet if is_compiled_module(unet) else torch.compile(unet)


# SDXL was trained on both text encoders' penultimate layer, not normalized (generative-models' FrozenCLIPEmbedder
# layer="penultimate"; diffusers' StableDiffusionXLPipeline.encode_prompt hidden_states[-2]).
SDXL_DEFAULT_LAYER = 2


def sdxl_hidden_layer(clip_skip: int) -> int:
    """Which hidden state, counted from the last, SDXL's encoders give: clip_skip n the n-th last (ED2 / A1111),
    and SDXL's own penultimate for 0, 1 and 2. diffusers' StableDiffusionXLPipeline counts from the penultimate
    instead: its clip_skip k is our k + 2."""
    return max(SDXL_DEFAULT_LAYER, clip_skip)


def freeze_unused_text_layers(text_encoder: CLIPTextModel, clip_skip: int, sdxl: bool) -> None:
    """The layers after the hidden state the conditioning takes (clip_skip; SDXL's penultimate), and SDXL's final
    norm, which it does not apply, get no gradient: frozen, so that data-parallel training (DDP) does not wait for
    their gradients, and their weights stay as they were."""
    skipped = sdxl_hidden_layer(clip_skip) - 1 if sdxl else max(clip_skip, 1) - 1
    layers = text_encoder.encoder.layers
    for layer in layers[len(layers) - skipped :] if skipped else []:
        layer.requires_grad_(False)
    if sdxl:
        text_encoder.final_layer_norm.requires_grad_(False)


def freeze_text_encoder_front(text_encoder: CLIPTextModel | CLIPTextModelWithProjection, unfrozen_layers: int) -> None:
    """Train only the last N transformer layers and the final norm (and SDXL's second encoder's projection, which
    follows them); the embeddings only when all layers train.

    Frozen parameters get requires_grad=False (ED2 only left them out of the optimizer and still computed
    their gradients)."""
    transformer = getattr(text_encoder, "text_model", text_encoder)  # the CLIP transformer under a projection
    layers = transformer.encoder.layers
    text_encoder.requires_grad_(False)
    for layer in layers[len(layers) - min(unfrozen_layers, len(layers)) :] if unfrozen_layers else []:
        layer.requires_grad_(True)
    transformer.final_layer_norm.requires_grad_(unfrozen_layers > 0)
    transformer.embeddings.requires_grad_(unfrozen_layers >= len(layers))
    if transformer is not text_encoder:
        text_encoder.text_projection.requires_grad_(unfrozen_layers > 0)


@contextlib.contextmanager
def evaluating(model: SDModel) -> Iterator[None]:
    """eval() for inference (validation, samples: no dropout), then back to each part's training mode."""
    parts = model.trainable_parts().values()
    modes = [part.training for part in parts]
    for part in parts:
        part.eval()
    try:
        yield
    finally:
        for part, mode in zip(parts, modes, strict=True):
            part.train(mode)


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
        captions,
        padding="max_length",
        truncation=True,
        max_length=model.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(device)
    if clip_skip <= 1:
        return model.text_encoder(ids)[0]
    hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    # The final norm of the module itself: under data-parallel training text_encoder is its DDP wrapper.
    return getattr(model.text_encoder, "module", model.text_encoder).final_layer_norm(hidden)
