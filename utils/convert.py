"""Conversion between diffusers models and original Stable Diffusion single-file checkpoints.

The single-file ("LDM" / CompVis) layout is what AUTOMATIC1111, ComfyUI and most model hubs use:
one `.safetensors` (or legacy `.ckpt`) holding the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.` and the text encoder under `cond_stage_model.` (OpenAI CLIP layout for SD 1.x,
OpenCLIP layout for SD 2.x). SDXL files hold two text encoders instead, under `conditioner.embedders.0.transformer.`
(OpenAI CLIP ViT-L) and `conditioner.embedders.1.model.` (OpenCLIP ViT-bigG, with its text projection), and the
UNet's extra `text_time` embedding under `label_emb.0.*`.

The export mapping here is the exact inverse of diffusers' own importers
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), so a file written by
`save_single_file` loads back through `StableDiffusionPipeline.from_single_file` bit for bit.
Block indices are derived from the model configs, not from SD 1.5 constants, so any UNet/VAE of the
SD 1.x/2.x family (including the tiny test model) converts.

Loading never touches the network and never unpickles arbitrary objects: `.ckpt` files are read with
`torch.load(weights_only=True)` only (which is also what diffusers does for them).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import safetensors
import safetensors.torch
import torch
import yaml

from utils.checkpoint import atomic_path

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

TextEncoderLayout = Literal["clip", "open_clip"]
PredictionType = Literal["epsilon", "v_prediction"]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPEN_CLIP_PREFIX = "cond_stage_model.model."
LDM_TEXT_ENCODER_PREFIX = "cond_stage_model."
# SDXL (the "conditioner" of Stability's generative-models): embedder 0 is CLIP ViT-L, embedder 1 OpenCLIP ViT-bigG.
LDM_SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
LDM_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
LDM_CONDITIONER_PREFIX = "conditioner.embedders."
# The SDXL refiner's only text encoder, OpenCLIP as embedder 0 (diffusers' `open_clip_sdxl_refiner` key).
_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."
# Weightless markers that ComfyUI and Forge read in SDXL files (comfy/supported_models.py, SDXL.model_type):
# a `v_pred` key means v-prediction, `ztsnr` zero-terminal-SNR betas. v-prediction SDXL models carry them.
SDXL_V_PREDICTION_MARKER = "v_pred"
SDXL_ZERO_SNR_MARKER = "ztsnr"

# The standard SAI "modelspec" safetensors metadata key; its values are "epsilon" and "v".
MODELSPEC_PREDICTION_TYPE = "modelspec.prediction_type"
_MODELSPEC_PREDICTION_NAMES = {"epsilon": "epsilon", "v_prediction": "v"}

# diffusers' SD 2.x detection key: cross-attention keys of width 1024 mean an OpenCLIP-H text encoder.
_SD2_PROBE_KEY = LDM_UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_SD2_CONTEXT_DIM = 1024
# The released SD 2.0-base checkpoint (epsilon) stopped at this step; the 768-v ones did not.
_SD2_BASE_GLOBAL_STEP = 875000


class ConversionError(ValueError):
    """A model or checkpoint file cannot be converted (wrong kind of file, unknown weight, bad config)."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _config_value(config: Mapping[str, Any] | Any, name: str) -> Any:
    """Read `name` from a diffusers config (a mapping) or a transformers config (an object)."""
    if isinstance(config, Mapping):
        return config[name]
    return getattr(config, name)


def _rename_module(name: str, renames: Mapping[str, str], what: str) -> str:
    """Rename the leading module of `name` (e.g. `norm1.weight` -> `in_layers.0.weight`)."""
    module, _, parameter = name.partition(".")
    if module not in renames:
        raise ConversionError(f"no LDM name for {what} weight {name!r}")
    return f"{renames[module]}.{parameter}"


# A table of (pattern, builder) rules; the first matching pattern names the LDM key.
Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _apply_rules(key: str, rules: list[Rule], what: str) -> str:
    for pattern, build in rules:
        match = pattern.fullmatch(key)
        if match:
            return build(match)
    raise ConversionError(f"no LDM name for {what} weight {key!r}; is this an SD 1.x/2.x {what}?")


# --------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------

_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET_MODULES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _unet_rules(unet_config: Mapping[str, Any]) -> list[Rule]:
    """Rules placing each diffusers UNet weight in the LDM `input_blocks`/`middle_block`/`output_blocks`.

    LDM numbers the blocks flat: input block 0 is conv_in, then every down block contributes
    `layers_per_block` (resnet, attention) slots plus one slot for its downsampler; every up block
    contributes `layers_per_block + 1` slots, the last of which also holds its upsampler, placed after
    the attention when the block has one.
    """
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise ConversionError(f"per-block layers_per_block {layers!r} has no LDM single-file layout")
    up_has_attention = ["CrossAttn" in block for block in unet_config["up_block_types"]]

    def down_slot(m: re.Match[str], layer: int | None = None) -> int:
        return 1 + int(m["block"]) * (layers + 1) + (int(m["layer"]) if layer is None else layer)

    def up_slot(m: re.Match[str], layer: int | None = None) -> int:
        return int(m["block"]) * (layers + 1) + (int(m["layer"]) if layer is None else layer)

    def resnet(rest: str) -> str:
        return _rename_module(rest, _UNET_RESNET_MODULES, "UNet resnet")

    def upsampler(m: re.Match[str]) -> str:
        position = 2 if up_has_attention[int(m["block"])] else 1
        return f"output_blocks.{up_slot(m, layer=layers)}.{position}.conv.{m['rest']}"

    top_level = "|".join(re.escape(name) for name in _UNET_TOP_LEVEL)
    addition_embedding = _unet_addition_embedding_names()
    return [
        (
            re.compile(rf"(?P<name>{top_level})\.(?P<rest>weight|bias)"),
            lambda m: f"{_UNET_TOP_LEVEL[m['name']]}.{m['rest']}",
        ),
        (re.compile("|".join(map(re.escape, addition_embedding))), lambda m: addition_embedding[m.string]),
        (
            re.compile(r"down_blocks\.(?P<block>\d+)\.resnets\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"input_blocks.{down_slot(m)}.0.{resnet(m['rest'])}",
        ),
        (
            re.compile(r"down_blocks\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"input_blocks.{down_slot(m)}.1.{m['rest']}",
        ),
        (
            re.compile(r"down_blocks\.(?P<block>\d+)\.downsamplers\.0\.conv\.(?P<rest>.+)"),
            lambda m: f"input_blocks.{down_slot(m, layer=layers)}.0.op.{m['rest']}",
        ),
        # The mid block is resnet, attention, resnet: LDM slots 0, 1, 2.
        (
            re.compile(r"mid_block\.resnets\.(?P<layer>[01])\.(?P<rest>.+)"),
            lambda m: f"middle_block.{2 * int(m['layer'])}.{resnet(m['rest'])}",
        ),
        (re.compile(r"mid_block\.attentions\.0\.(?P<rest>.+)"), lambda m: f"middle_block.1.{m['rest']}"),
        (
            re.compile(r"up_blocks\.(?P<block>\d+)\.resnets\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"output_blocks.{up_slot(m)}.0.{resnet(m['rest'])}",
        ),
        (
            re.compile(r"up_blocks\.(?P<block>\d+)\.attentions\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"output_blocks.{up_slot(m)}.1.{m['rest']}",
        ),
        (re.compile(r"up_blocks\.(?P<block>\d+)\.upsamplers\.0\.conv\.(?P<rest>.+)"), upsampler),
    ]


def _unet_addition_embedding_names() -> dict[str, str]:
    """SDXL's `text_time` embedding (`add_embedding.linear_{1,2}`) -> LDM `label_emb.0.{0,2}`: diffusers' own map,
    the one its importer `convert_ldm_unet_checkpoint` reads these weights with."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])


def unet_to_ldm(unet_sd: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The UNet weights under their `model.diffusion_model.*` names; attention internals keep theirs."""
    rules = _unet_rules(unet_config)
    return {LDM_UNET_PREFIX + _apply_rules(key, rules, "UNet"): tensor for key, tensor in unet_sd.items()}


# --------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------

_VAE_RESNET_MODULES = {name: name for name in ("norm1", "conv1", "norm2", "conv2")} | {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_MODULES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",  # diffusers' `to_out.0`; the `.0` is dropped below
}


def _vae_attention_name(rest: str) -> str:
    return _rename_module(rest.replace("to_out.0.", "to_out."), _VAE_ATTENTION_MODULES, "VAE attention")


def _vae_rules(vae_config: Mapping[str, Any]) -> list[Rule]:
    """Rules for the VAE. LDM numbers the decoder's up blocks from the lowest resolution, diffusers
    from the highest."""
    num_up_blocks = len(vae_config["up_block_types"])

    def resnet(rest: str) -> str:
        return _rename_module(rest, _VAE_RESNET_MODULES, "VAE resnet")

    def ldm_up(m: re.Match[str]) -> int:
        return num_up_blocks - 1 - int(m["block"])

    return [
        (
            re.compile(r"(?P<part>encoder|decoder)\.(?P<name>conv_in|conv_out)\.(?P<rest>weight|bias)"),
            lambda m: m.string,
        ),
        (
            re.compile(r"(?P<part>encoder|decoder)\.conv_norm_out\.(?P<rest>weight|bias)"),
            lambda m: f"{m['part']}.norm_out.{m['rest']}",
        ),
        (re.compile(r"(?:post_)?quant_conv\.(?:weight|bias)"), lambda m: m.string),
        (
            re.compile(r"encoder\.down_blocks\.(?P<block>\d+)\.resnets\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"encoder.down.{m['block']}.block.{m['layer']}.{resnet(m['rest'])}",
        ),
        (
            re.compile(r"encoder\.down_blocks\.(?P<block>\d+)\.downsamplers\.0\.conv\.(?P<rest>.+)"),
            lambda m: f"encoder.down.{m['block']}.downsample.conv.{m['rest']}",
        ),
        (
            re.compile(r"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<layer>[01])\.(?P<rest>.+)"),
            lambda m: f"{m['part']}.mid.block_{int(m['layer']) + 1}.{resnet(m['rest'])}",
        ),
        (
            re.compile(r"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<rest>.+)"),
            lambda m: f"{m['part']}.mid.attn_1.{_vae_attention_name(m['rest'])}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(?P<block>\d+)\.resnets\.(?P<layer>\d+)\.(?P<rest>.+)"),
            lambda m: f"decoder.up.{ldm_up(m)}.block.{m['layer']}.{resnet(m['rest'])}",
        ),
        (
            re.compile(r"decoder\.up_blocks\.(?P<block>\d+)\.upsamplers\.0\.conv\.(?P<rest>.+)"),
            lambda m: f"decoder.up.{ldm_up(m)}.upsample.conv.{m['rest']}",
        ),
    ]


def _as_ldm_vae_attention_weight(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The LDM VAE's mid-block attention projections are 1x1 convolutions, diffusers' are linear layers."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def vae_to_ldm(vae_sd: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The VAE weights under their `first_stage_model.*` names."""
    rules = _vae_rules(vae_config)
    converted = {}
    for key, tensor in vae_sd.items():
        ldm_key = _apply_rules(key, rules, "VAE")
        converted[LDM_VAE_PREFIX + ldm_key] = _as_ldm_vae_attention_weight(ldm_key, tensor)
    return converted


# --------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------


def text_encoder_layout_for(
    text_encoder_config: Mapping[str, Any] | Any, override: TextEncoderLayout | None = None
) -> TextEncoderLayout:
    """Which single-file layout a text encoder belongs in: `open_clip` for SD 2.x, `clip` for SD 1.x.

    SD 2.x's text encoder is OpenCLIP ViT-H (hidden size 1024), trained with exact GELU; OpenAI's CLIP
    text encoders of SD 1.x use `quick_gelu`. The activation is what tells the two families apart (it
    also holds for small test models, whose hidden size says nothing).
    """
    if override is not None:
        if override not in ("clip", "open_clip"):
            raise ConversionError(f"unknown text encoder layout {override!r}; expected 'clip' or 'open_clip'")
        return override
    return "open_clip" if _config_value(text_encoder_config, "hidden_act") == "gelu" else "clip"


def _flat_text_encoder_key(key: str) -> str:
    """The key without `text_model.`: transformers >= 5.6 flattened CLIPTextModel, older ones wrap it."""
    return key.removeprefix("text_model.")


def _clip_to_ldm(text_encoder_sd: Mapping[str, torch.Tensor], prefix: str = LDM_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """OpenAI CLIP layout: the transformers names under `<prefix>text_model.` (`cond_stage_model.transformer.` in
    SD 1.x files, `conditioner.embedders.0.transformer.` in SDXL ones)."""
    converted = {}
    for key, tensor in text_encoder_sd.items():
        flat = _flat_text_encoder_key(key)
        name = flat if flat == "text_projection.weight" else f"text_model.{flat}"
        converted[prefix + name] = tensor
    return converted


_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_MODULES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_LAYER_KEY = re.compile(r"encoder\.layers\.(?P<layer>\d+)\.(?P<module>.+)\.(?P<param>weight|bias)")
_OPEN_CLIP_QKV = ("q_proj", "k_proj", "v_proj")
# A non-persistent buffer in current transformers; OpenCLIP has no such tensor.
_CLIP_POSITION_IDS = "embeddings.position_ids"


def _open_clip_name(flat: str) -> str:
    if flat in _OPEN_CLIP_TOP_LEVEL:
        return _OPEN_CLIP_TOP_LEVEL[flat]
    match = _OPEN_CLIP_LAYER_KEY.fullmatch(flat)
    if match and match["module"] in _OPEN_CLIP_LAYER_MODULES:
        module = _OPEN_CLIP_LAYER_MODULES[match["module"]]
        return f"transformer.resblocks.{match['layer']}.{module}.{match['param']}"
    raise ConversionError(f"no OpenCLIP name for text encoder weight {flat!r}")


def _fused_attention_inputs(flat_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP's `attn.in_proj_{weight,bias}`: q, k and v projections stacked in that order."""
    fused = {}
    layers = {m["layer"] for m in map(_OPEN_CLIP_LAYER_KEY.fullmatch, flat_sd) if m}
    for layer in sorted(layers, key=int):
        for param in ("weight", "bias"):
            parts = [flat_sd[f"encoder.layers.{layer}.self_attn.{proj}.{param}"] for proj in _OPEN_CLIP_QKV]
            fused[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(parts, dim=0)
    return fused


def _is_separate_qkv(flat: str) -> bool:
    return any(f".self_attn.{proj}." in flat for proj in _OPEN_CLIP_QKV)


def _open_clip_to_ldm(
    text_encoder_sd: Mapping[str, torch.Tensor], prefix: str = LDM_OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """OpenCLIP layout under `prefix` (SD 2.x's text encoder, SDXL's second one), the inverse of diffusers'
    `convert_open_clip_checkpoint`."""
    flat_sd = {_flat_text_encoder_key(key): tensor for key, tensor in text_encoder_sd.items()}
    converted = _fused_attention_inputs(flat_sd)
    for flat, tensor in flat_sd.items():
        if flat == _CLIP_POSITION_IDS or _is_separate_qkv(flat):
            continue
        if flat == "text_projection.weight":
            # OpenCLIP multiplies `x @ text_projection`; transformers' Linear stores the transpose.
            converted["text_projection"] = tensor.T
        else:
            converted[_open_clip_name(flat)] = tensor
    return {prefix + name: tensor for name, tensor in converted.items()}


def text_encoder_to_ldm(
    text_encoder_sd: Mapping[str, torch.Tensor], layout: TextEncoderLayout
) -> dict[str, torch.Tensor]:
    """The text encoder weights under `cond_stage_model.*` in the given layout."""
    return _open_clip_to_ldm(text_encoder_sd) if layout == "open_clip" else _clip_to_ldm(text_encoder_sd)


def diffusers_to_ldm(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any] | Any,
    text_encoder_layout: TextEncoderLayout | None = None,
) -> dict[str, torch.Tensor]:
    """One state dict in the original Stable Diffusion single-file layout.

    Tensors are not copied or cast (those that need a new shape are views or new tensors); every input
    weight gets an LDM name or a ConversionError is raised, so nothing is silently dropped.
    `text_encoder_layout` overrides the automatic choice of `text_encoder_layout_for`.
    """
    layout = text_encoder_layout_for(text_encoder_config, text_encoder_layout)
    return (
        unet_to_ldm(unet_sd, unet_config)
        | vae_to_ldm(vae_sd, vae_config)
        | text_encoder_to_ldm(text_encoder_sd, layout)
    )


def sdxl_to_ldm(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
    text_encoder_2_sd: Mapping[str, torch.Tensor],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """One state dict in the original SDXL single-file layout (Stability's generative-models: what A1111, Forge
    and ComfyUI load): the first text encoder in OpenAI CLIP layout, the second (CLIPTextModelWithProjection) in
    OpenCLIP layout with its `text_projection`. As `diffusers_to_ldm`, every weight gets a name or an error."""
    return (
        unet_to_ldm(unet_sd, unet_config)
        | vae_to_ldm(vae_sd, vae_config)
        | _clip_to_ldm(text_encoder_sd, LDM_SDXL_CLIP_PREFIX)
        | _open_clip_to_ldm(text_encoder_2_sd, LDM_SDXL_OPEN_CLIP_PREFIX)
    )


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _file_tensor(tensor: torch.Tensor, half: bool) -> torch.Tensor:
    """A private contiguous CPU copy: safetensors refuses shared storage, and the copy decouples the
    file's contents from weights that training may keep updating on the device."""
    dtype = torch.float16 if half and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _file_metadata(scheduler_config: Mapping[str, Any] | None) -> dict[str, str]:
    """`format: pt` (what loaders expect) and the prediction type, so v-prediction models reload as such."""
    metadata = {"format": "pt"}
    prediction_type = (scheduler_config or {}).get("prediction_type")
    if prediction_type:
        name = _MODELSPEC_PREDICTION_NAMES.get(prediction_type, prediction_type)
        metadata[MODELSPEC_PREDICTION_TYPE] = name
    return metadata


def write_safetensors_atomically(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write `path` so that it is either the complete new file or untouched (utils.checkpoint.atomic_path)."""
    with atomic_path(path) as temporary:
        safetensors.torch.save_file(tensors, str(temporary), metadata=metadata)


def _sdxl_markers(scheduler_config: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The weightless keys that tell ComfyUI / Forge an SDXL file is v-prediction (and has zero-terminal-SNR
    betas); an epsilon model carries none."""
    config = scheduler_config or {}
    if config.get("prediction_type") != "v_prediction":
        return {}
    markers = {SDXL_V_PREDICTION_MARKER: torch.tensor([])}
    if config.get("rescale_betas_zero_snr"):
        markers[SDXL_ZERO_SNR_MARKER] = torch.tensor([])
    return markers


def save_single_file(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    path: str | os.PathLike[str],
    half: bool = True,
    scheduler_config: Mapping[str, Any] | None = None,
    text_encoder_layout: TextEncoderLayout | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> Path:
    """Save the models as one single-file SD checkpoint (`.safetensors`), atomically.

    With `text_encoder_2` (SDXL's CLIPTextModelWithProjection) the file has the SDXL layout (`sdxl_to_ldm`;
    `text_encoder_layout` does not apply), else the SD 1.x/2.x one (`diffusers_to_ldm`).
    `half` stores floating-point weights as fp16 (the usual distribution format). Pass the
    scheduler's config so a v-prediction model is marked as one in the file's metadata
    (`modelspec.prediction_type`; SDXL files also get the `v_pred` marker key); `load_single_file_pipeline`
    reads it back.
    Pass unwrapped models (not torch.compile / DDP wrappers), whose state-dict names are diffusers'.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: single-file checkpoints are written as .safetensors only")
    if text_encoder_2 is not None:
        ldm = sdxl_to_ldm(
            unet.state_dict(),
            vae.state_dict(),
            text_encoder.state_dict(),
            text_encoder_2.state_dict(),
            unet.config,
            vae.config,
        ) | _sdxl_markers(scheduler_config)
    else:
        ldm = diffusers_to_ldm(
            unet.state_dict(),
            vae.state_dict(),
            text_encoder.state_dict(),
            unet.config,
            vae.config,
            text_encoder.config,
            text_encoder_layout,
        )
    tensors = {key: _file_tensor(tensor, half) for key, tensor in ldm.items()}
    write_safetensors_atomically(tensors, path, _file_metadata(scheduler_config))
    return path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single-file checkpoint says about itself, read without building any model."""

    path: Path
    keys: frozenset[str]
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None
    context_dim: int | None = None  # width of the text embeddings the UNet cross-attends to


def _is_safetensors(path: Path) -> bool:
    # diffusers picks the reader by extension too (`model_loading_utils.load_state_dict`).
    return path.suffix == ".safetensors"


def _inspect_safetensors(path: Path) -> CheckpointInfo:
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            keys = frozenset(reader.keys())
            context_dim = reader.get_slice(_SD2_PROBE_KEY).get_shape()[-1] if _SD2_PROBE_KEY in keys else None
            return CheckpointInfo(path, keys, dict(reader.metadata() or {}), context_dim=context_dim)
    except safetensors.SafetensorError as error:
        raise ConversionError(f"{path} is not a readable .safetensors file: {error}") from error


def load_torch_checkpoint(path: Path) -> Any:
    """A `.ckpt`/`.pt` checkpoint's top level, read with `weights_only=True`: tensors and plain
    containers only, so a file carrying pickled code is refused instead of executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch reports junk as UnpicklingError, KeyError, EOFError, RuntimeError...
        raise ConversionError(
            f"{path} could not be read as a checkpoint of plain tensors with torch.load(weights_only=True); "
            f"files holding other pickled objects are refused, never executed ({type(error).__name__})"
        ) from error


def _inspect_torch_checkpoint(path: Path) -> CheckpointInfo:
    checkpoint = load_torch_checkpoint(path)
    if not isinstance(checkpoint, dict):
        kind = type(checkpoint).__name__
        raise ConversionError(f"{path} holds a {kind}, not a Stable Diffusion state dict")
    global_step = checkpoint.get("global_step")
    state_dict = checkpoint
    while isinstance(state_dict.get("state_dict"), dict):  # the same unwrapping diffusers does
        state_dict = state_dict["state_dict"]
    probe = state_dict.get(_SD2_PROBE_KEY)
    return CheckpointInfo(
        path,
        frozenset(state_dict),
        global_step=int(global_step) if isinstance(global_step, (int, torch.Tensor)) else None,
        context_dim=probe.shape[-1] if isinstance(probe, torch.Tensor) else None,
    )


def is_sdxl_checkpoint(info: CheckpointInfo) -> bool:
    """An SDXL-family file: its text encoders sit in a `conditioner` (generative-models), not `cond_stage_model`."""
    return any(key.startswith(LDM_CONDITIONER_PREFIX) for key in info.keys)


def _expected_parts(info: CheckpointInfo) -> dict[str, str]:
    """The weights a whole checkpoint of its family has, by part, as key prefixes."""
    parts = {"UNet": LDM_UNET_PREFIX, "VAE": LDM_VAE_PREFIX}
    if is_sdxl_checkpoint(info):
        return parts | {"first text encoder": LDM_SDXL_CLIP_PREFIX, "second text encoder": LDM_SDXL_OPEN_CLIP_PREFIX}
    return parts | {"text encoder": LDM_TEXT_ENCODER_PREFIX}


def _require_stable_diffusion(info: CheckpointInfo) -> None:
    """A clear error for files that are not whole SD checkpoints (diffusers would fail obscurely, or
    silently take a missing text encoder from the config folder)."""
    if any(key.startswith(_SDXL_REFINER_PREFIX) for key in info.keys):
        raise ConversionError(
            f"{info.path} is an SDXL refiner checkpoint (one OpenCLIP text encoder under {_SDXL_REFINER_PREFIX}*). "
            f"Only SD 1.x, SD 2.x and SDXL base-architecture models can be trained."
        )
    expected = _expected_parts(info)
    missing = [
        f"{part} ({prefix}*)"
        for part, prefix in expected.items()
        if not any(key.startswith(prefix) for key in info.keys)
    ]
    if missing:
        layout = ", ".join(f"{prefix}*" for prefix in expected.values())
        raise ConversionError(
            f"{info.path} is not a Stable Diffusion single-file checkpoint: it has no "
            f"{', no '.join(missing)} weights. Expected the original "
            f"{'SDXL' if is_sdxl_checkpoint(info) else 'SD'} layout with {layout} keys."
        )


def inspect_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read a single-file checkpoint's names, metadata and shape hints; ConversionError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file")
    info = _inspect_safetensors(path) if _is_safetensors(path) else _inspect_torch_checkpoint(path)
    _require_stable_diffusion(info)
    return info


def _prediction_type_from_metadata(metadata: Mapping[str, str]) -> PredictionType | None:
    value = metadata.get(MODELSPEC_PREDICTION_TYPE, "").lower()
    if value in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    return "epsilon" if value in ("epsilon", "eps") else None


def _prediction_type_from_sidecar_yaml(path: Path) -> PredictionType | None:
    """The `<name>.yaml` A1111 reads next to a checkpoint: LDM's `parameterization` defaults to eps."""
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    try:
        params = yaml.safe_load(sidecar.read_text(encoding="utf-8"))["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _prediction_type_from_training_state(info: CheckpointInfo) -> PredictionType | None:
    """diffusers' heuristic for original SD 2.x checkpoints, used only where it is decisive: the
    2.0-base (epsilon) release stopped at global step 875000, the 768-v releases elsewhere. Without a
    global step an SD 2.x file could be either, so the config folder decides."""
    if info.context_dim != _SD2_CONTEXT_DIM or info.global_step is None:
        return None
    return "epsilon" if info.global_step == _SD2_BASE_GLOBAL_STEP else "v_prediction"


def _prediction_type_from_sdxl_marker(info: CheckpointInfo) -> PredictionType | None:
    """v-prediction SDXL models carry a `v_pred` key (read as ComfyUI reads it); without one nothing is implied."""
    if is_sdxl_checkpoint(info) and SDXL_V_PREDICTION_MARKER in info.keys:
        return "v_prediction"
    return None


def has_zero_snr_marker(info: CheckpointInfo) -> bool:
    """An SDXL file marked as trained with zero-terminal-SNR betas (`ztsnr`, next to `v_pred`)."""
    return is_sdxl_checkpoint(info) and SDXL_ZERO_SNR_MARKER in info.keys


def detect_prediction_type(info: CheckpointInfo) -> PredictionType | None:
    """The prediction type the checkpoint itself declares or implies, or None if it does not say."""
    return (
        _prediction_type_from_metadata(info.metadata)
        or _prediction_type_from_sdxl_marker(info)
        or _prediction_type_from_sidecar_yaml(info.path)
        or _prediction_type_from_training_state(info)
    )


def _require_diffusers_folder(config_dir: str | os.PathLike[str] | None, info: CheckpointInfo) -> Path:
    path = info.path
    if config_dir is None:
        # Without a local folder diffusers falls back to downloading configs from the Hub.
        raise ConversionError(
            f"loading {path} needs config_dir: a local diffusers folder of the same architecture "
            f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/); nothing is downloaded"
        )
    folder = Path(config_dir)
    if not (folder / "model_index.json").is_file():
        raise ConversionError(f"config_dir {folder} is not a diffusers folder (no model_index.json)")
    sdxl_file, sdxl_folder = is_sdxl_checkpoint(info), (folder / "text_encoder_2").is_dir()
    if sdxl_file != sdxl_folder:
        family = {True: "an SDXL", False: "an SD 1.x/2.x"}  # SDXL: a second text encoder, text_encoder_2/
        raise ConversionError(
            f"{path} is {family[sdxl_file]} checkpoint but config_dir {folder} describes {family[sdxl_folder]} "
            f"model. Give a diffusers folder of the file's own architecture."
        )
    return folder


def _with_scheduler_options(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, **options: Any) -> None:
    """The pipeline's scheduler with `options` (prediction type, zero-SNR betas) where it differs."""
    scheduler = pipe.scheduler
    if any(scheduler.config.get(name) != value for name, value in options.items()):
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **options)


def _single_file_pipeline_class(info: CheckpointInfo) -> tuple[type, dict[str, Any]]:
    """The diffusers pipeline of the file's family, and what it is built without: no safety checker for SD, no
    invisible watermark for SDXL (a training run's samples and checkpoints stay the model's own output)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_sdxl_checkpoint(info):
        return StableDiffusionXLPipeline, {"add_watermarker": False}
    no_safety_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return StableDiffusionPipeline, no_safety_checker


def load_single_file_pipeline(
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str] | None = None,
    prediction_type: PredictionType | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load a single-file checkpoint, offline: SD 1.x/2.x as a StableDiffusionPipeline, SDXL (detected from its
    keys, `is_sdxl_checkpoint`) as a StableDiffusionXLPipeline.

    `config_dir` is a local diffusers folder supplying the architecture configs, tokenizer(s) and
    scheduler (the folder the file was exported from, or one of the same architecture). The
    scheduler's prediction type is, in order: `prediction_type`, what the file declares (our
    safetensors metadata, SDXL's `v_pred` marker, an A1111 `<name>.yaml`, an SD 2.x global step), else
    `config_dir`'s; an SDXL `ztsnr` marker turns on zero-terminal-SNR betas.
    Weights come out in the models' default dtype (fp32, as training needs, even from an fp16
    file) unless `torch_dtype` says otherwise.
    """
    path = Path(path)
    info = inspect_checkpoint(path)
    folder = _require_diffusers_folder(config_dir, info)
    pipeline_class, without = _single_file_pipeline_class(info)
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **without
        )
    except (ValueError, RuntimeError, OSError) as error:
        raise ConversionError(f"{path} could not be loaded with the configs in {folder}: {error}") from error
    resolved = prediction_type or detect_prediction_type(info)
    options = ({"prediction_type": resolved} if resolved else {}) | (
        {"rescale_betas_zero_snr": True} if has_zero_snr_marker(info) else {}
    )
    if options:
        _with_scheduler_options(pipe, **options)
    return pipe
