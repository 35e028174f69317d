"""Tests for utils/convert.py: diffusers <-> original Stable Diffusion single-file checkpoints.

Every reload goes through diffusers' own importer (`StableDiffusionPipeline.from_single_file`), so a
passing round trip means the export is the exact inverse of what A1111-style files look like to diffusers.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel

from utils.convert import (
    CheckpointInfo,
    ConversionError,
    detect_prediction_type,
    diffusers_to_ldm,
    inspect_checkpoint,
    load_single_file_pipeline,
    save_single_file,
    text_encoder_layout_for,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)

COMPONENTS = ("unet", "vae", "text_encoder")


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_folder(tiny_model_dir: Path) -> Path:
    """The tiny model's diffusers folder (conftest builds it once per session under tmp_path_factory)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(tiny_folder))


@pytest.fixture(scope="session")
def sd2_like_folder(tiny_pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny UNet/VAE with an SD 2.x-style (exact GELU, OpenCLIP-layout) text encoder and a
    v-prediction scheduler, saved as its own diffusers folder."""
    torch.manual_seed(2)
    config = CLIPTextConfig(**{**tiny_pipe.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    pipe = StableDiffusionPipeline(
        unet=tiny_pipe.unet,
        vae=tiny_pipe.vae,
        text_encoder=CLIPTextModel(config),
        tokenizer=tiny_pipe.tokenizer,
        scheduler=type(tiny_pipe.scheduler).from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("sd2-like") / "model"
    pipe.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def sd2_like_pipe(sd2_like_folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(sd2_like_folder))


def _export(pipe: StableDiffusionPipeline, path: Path, **kwargs) -> Path:
    return save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path, **kwargs)


@pytest.fixture(scope="session")
def fp32_file(tiny_pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_pipe, tmp_path_factory.mktemp("fp32") / "tiny.safetensors", half=False)


@pytest.fixture(scope="session")
def fp16_file(tiny_pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_pipe, tmp_path_factory.mktemp("fp16") / "tiny.safetensors")


def _diffusers_reload(path: Path, config_folder: Path) -> StableDiffusionPipeline:
    """Reload exactly as a user of diffusers would, offline."""
    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_folder), local_files_only=True)


def _assert_weights_match(
    original: StableDiffusionPipeline,
    reloaded: StableDiffusionPipeline,
    expected: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor,
) -> None:
    for name in COMPONENTS:
        before = getattr(original, name).state_dict()
        after = getattr(reloaded, name).state_dict()
        assert after.keys() == before.keys(), name
        mismatched = [key for key in before if not torch.equal(after[key], expected(before[key]))]
        assert not mismatched, f"{name}: {mismatched[:5]}"


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _file_metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as reader:
        return reader.metadata()


# --------------------------------------------------------------------------------------------------
# Round trips through diffusers' importer
# --------------------------------------------------------------------------------------------------


def test_full_precision_round_trip_is_exact(tiny_pipe, tiny_folder, fp32_file):
    _assert_weights_match(tiny_pipe, _diffusers_reload(fp32_file, tiny_folder))


def test_half_precision_file_is_fp16_and_reloads_to_the_rounded_weights(tiny_pipe, tiny_folder, fp16_file):
    assert {tensor.dtype for tensor in _file_tensors(fp16_file).values()} == {torch.float16}
    reloaded = _diffusers_reload(fp16_file, tiny_folder)
    _assert_weights_match(tiny_pipe, reloaded, expected=lambda tensor: tensor.half().float())


def test_load_single_file_pipeline_gives_fp32_models_from_an_fp16_file(tiny_pipe, tiny_folder, fp16_file):
    pipe = load_single_file_pipeline(fp16_file, tiny_folder)
    assert {getattr(pipe, name).dtype for name in COMPONENTS} == {torch.float32}
    _assert_weights_match(tiny_pipe, pipe, expected=lambda tensor: tensor.half().float())
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_open_clip_layout_round_trip(sd2_like_pipe, sd2_like_folder, tmp_path):
    path = _export(sd2_like_pipe, tmp_path / "sd2.safetensors", half=False)
    keys = set(_file_tensors(path))
    for name in (
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.positional_embedding",
        "cond_stage_model.model.ln_final.weight",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_bias",
        "cond_stage_model.model.transformer.resblocks.3.attn.out_proj.weight",
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight",
        "cond_stage_model.model.transformer.resblocks.0.ln_2.bias",
    ):
        assert name in keys, name
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    _assert_weights_match(sd2_like_pipe, _diffusers_reload(path, sd2_like_folder))


def test_text_encoder_layout_follows_the_activation_unless_overridden(tiny_pipe, sd2_like_pipe):
    assert text_encoder_layout_for(tiny_pipe.text_encoder.config) == "clip"
    assert text_encoder_layout_for(sd2_like_pipe.text_encoder.config) == "open_clip"
    assert text_encoder_layout_for({"hidden_act": "gelu"}, override="clip") == "clip"
    with pytest.raises(ConversionError, match="layout"):
        text_encoder_layout_for({"hidden_act": "gelu"}, override="t5")


# --------------------------------------------------------------------------------------------------
# Key layout
# --------------------------------------------------------------------------------------------------


def test_file_uses_the_original_sd_names(fp32_file):
    tensors = _file_tensors(fp32_file)
    for name in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.0.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # upsampler of a block without attention
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.3.block.0.conv1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.mid.block_2.conv2.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert name in tensors, name
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in tensors)
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "resnets", "time_embedding", "conv_norm_out")
    assert not [key for key in tensors if any(word in key for word in diffusers_words)]
    # The UNet's transformer blocks keep diffusers' `to_q`/`to_out.0` names in LDM too; the VAE's do not.
    vae_attention_words = ("group_norm", "to_q", "to_out")
    vae_keys = [key for key in tensors if key.startswith("first_stage_model.")]
    assert not [key for key in vae_keys if any(word in key for word in vae_attention_words)]
    # LDM's VAE attention projections are 1x1 convolutions.
    assert tensors["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    assert _file_metadata(fp32_file)["format"] == "pt"


SD15_UNET = {"cross_attention_dim": 768, "attention_head_dim": 8}
SD2_UNET = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}


@pytest.mark.parametrize(("unet_kwargs", "model_type"), [(SD15_UNET, "v1"), (SD2_UNET, "v2")], ids=["sd15", "sd2"])
def test_unet_block_mapping_is_diffusers_inverse_at_full_sd_size(unet_kwargs, model_type):
    """SD 1.5 / 2.x sized UNets (layers_per_block 2, four blocks) on the meta device: names, no memory."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kwargs)
    weights = unet.state_dict()
    ldm = unet_to_ldm(weights, unet.config)
    assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" in ldm
    assert infer_diffusers_model_type(ldm) == model_type
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert back.keys() == weights.keys()
    assert all(back[key] is weights[key] for key in weights)


def _assert_same_names_and_shapes(back: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    assert back.keys() == weights.keys()
    assert all(back[key].shape == weights[key].shape for key in weights)


def test_vae_mapping_is_diffusers_inverse_at_full_sd_size():
    with torch.device("meta"):
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
        )
    weights = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(weights, vae.config), dict(vae.config))
    _assert_same_names_and_shapes(back, weights)


def test_open_clip_mapping_is_diffusers_inverse_at_full_sd2_size():
    config = CLIPTextConfig(  # SD 2.x: OpenCLIP ViT-H minus its last layer
        hidden_size=1024,
        intermediate_size=4096,
        num_attention_heads=16,
        num_hidden_layers=23,
        hidden_act="gelu",
    )
    with torch.device("meta"):
        text_encoder = CLIPTextModel(config)
    weights = text_encoder.state_dict()
    back = convert_open_clip_checkpoint(text_encoder, text_encoder_to_ldm(weights, "open_clip"))
    # diffusers names them for the `text_model`-wrapped CLIPTextModel of older transformers.
    _assert_same_names_and_shapes({key.removeprefix("text_model."): t for key, t in back.items()}, weights)


def test_a_weight_without_an_ldm_name_is_an_error_not_dropped(tiny_pipe):
    # A real diffusers UNet weight (encoder_hid_dim models) that the original layout has no name for.
    unet_sd = {**tiny_pipe.unet.state_dict(), "encoder_hid_proj.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="encoder_hid_proj"):
        diffusers_to_ldm(
            unet_sd,
            tiny_pipe.vae.state_dict(),
            tiny_pipe.text_encoder.state_dict(),
            tiny_pipe.unet.config,
            tiny_pipe.vae.config,
            tiny_pipe.text_encoder.config,
        )


# --------------------------------------------------------------------------------------------------
# Prediction type
# --------------------------------------------------------------------------------------------------


def test_v_prediction_is_recorded_and_wins_over_the_config_folder(tiny_pipe, tiny_folder, tmp_path):
    v_config = {**tiny_pipe.scheduler.config, "prediction_type": "v_prediction"}
    path = _export(tiny_pipe, tmp_path / "v.safetensors", scheduler_config=v_config)
    assert _file_metadata(path)["modelspec.prediction_type"] == "v"
    assert load_single_file_pipeline(path, tiny_folder).scheduler.config.prediction_type == "v_prediction"
    explicit = load_single_file_pipeline(path, tiny_folder, prediction_type="epsilon")
    assert explicit.scheduler.config.prediction_type == "epsilon"


def test_sidecar_yaml_parameterization_marks_v_prediction(fp16_file, tiny_folder, tmp_path):
    path = tmp_path / "a1111.safetensors"
    path.write_bytes(fp16_file.read_bytes())
    path.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: v\n", encoding="utf-8")
    assert load_single_file_pipeline(path, tiny_folder).scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("context_dim", "global_step", "expected"),
    [(1024, 875000, "epsilon"), (1024, 110000, "v_prediction"), (1024, None, None), (768, 110000, None)],
)
def test_original_sd2_checkpoints_are_told_apart_by_global_step(context_dim, global_step, expected, tmp_path):
    """diffusers' rule for original SD 2.x .ckpt files, applied only when a global step is present."""
    info = CheckpointInfo(tmp_path / "sd2.ckpt", frozenset(), global_step=global_step, context_dim=context_dim)
    assert detect_prediction_type(info) == expected


# --------------------------------------------------------------------------------------------------
# .ckpt files
# --------------------------------------------------------------------------------------------------


def test_ckpt_is_loaded_with_weights_only(tiny_pipe, tiny_folder, fp32_file, tmp_path, monkeypatch):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": _file_tensors(fp32_file), "global_step": 1000}, path)
    real_load = torch.load
    weights_only_flags = []

    def recording_load(*args, **kwargs):
        weights_only_flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    pipe = load_single_file_pipeline(path, tiny_folder)
    assert len(weights_only_flags) >= 2  # our inspection and diffusers' own read
    assert all(flag is True for flag in weights_only_flags)
    _assert_weights_match(tiny_pipe, pipe)


class _CreatesAFile:
    """Unpickling this runs `Path.touch(marker)`: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_ckpt_with_a_pickled_object_is_refused_not_executed(fp32_file, tiny_folder, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": _file_tensors(fp32_file), "payload": _CreatesAFile(marker)}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        load_single_file_pipeline(path, tiny_folder)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _failing_save(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a file")
    raise OSError("disk full")


def _leftover_temporaries(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if ".tmp-" in entry.name]


def test_successful_save_leaves_no_temporary_file(fp32_file):
    assert _leftover_temporaries(fp32_file.parent) == []


def test_failed_save_leaves_no_file_and_no_temporary(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save)
    path = tmp_path / "model.safetensors"
    with pytest.raises(OSError, match="disk full"):
        _export(tiny_pipe, path)
    assert not path.exists()
    assert _leftover_temporaries(tmp_path) == []


def test_failed_save_keeps_the_previous_file_intact(tiny_pipe, fp16_file, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(fp16_file.read_bytes())
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        _export(tiny_pipe, path, half=False)
    assert path.read_bytes() == fp16_file.read_bytes()
    assert _leftover_temporaries(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Files that are not SD checkpoints
# --------------------------------------------------------------------------------------------------


def test_a_safetensors_file_without_sd_weights_is_a_conversion_error(tiny_folder, tmp_path):
    path = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_down.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConversionError, match=r"lora\.safetensors.*model\.diffusion_model\."):
        load_single_file_pipeline(path, tiny_folder)


@pytest.mark.parametrize("name", ["notes.safetensors", "notes.ckpt"])
def test_a_file_that_is_not_a_checkpoint_at_all_is_a_conversion_error(name, tmp_path):
    path = tmp_path / name
    path.write_text("just some text", encoding="utf-8")
    with pytest.raises(ConversionError, match=name):
        inspect_checkpoint(path)


def test_a_checkpoint_without_a_text_encoder_is_a_conversion_error(fp32_file, tmp_path):
    path = tmp_path / "unet_and_vae.safetensors"
    tensors = {k: v for k, v in _file_tensors(fp32_file).items() if not k.startswith("cond_stage_model.")}
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ConversionError, match="no text encoder"):
        inspect_checkpoint(path)


def test_loading_needs_a_local_diffusers_folder(fp32_file, tmp_path):
    with pytest.raises(ConversionError, match="config_dir"):
        load_single_file_pipeline(fp32_file)
    with pytest.raises(ConversionError, match="model_index.json"):
        load_single_file_pipeline(fp32_file, tmp_path)
