"""SDXL, the model side: the bundled SDXL base 1.0 configs, `tiny-sdxl`, loading a diffusers folder or an
original-layout single file, and writing both formats back. Every reload goes through diffusers' own loaders
(`StableDiffusionXLPipeline.from_pretrained` / `.from_single_file`, offline) and through our `load_model`; weights
are compared exactly."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import trainer.single_file as single_file
import trainer.tiny_model as tiny_model
from tests.conftest import DEMO_DATA, tiny_config
from trainer.model import configure_for_training, load_model
from trainer.single_file import architecture_of, bundled_config_dir
from utils.checkpoint import save_checkpoint
from utils.config import ConfigError, holds_path
from utils.convert import ConversionError, inspect_checkpoint, load_single_file_pipeline, save_single_file, sdxl_to_ldm

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_sdxl_dir(model_cache) -> Path:
    return tiny_model.tiny_sdxl_model_path(model_cache)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_dir) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False)


def save_sdxl_file(pipe: StableDiffusionXLPipeline, path: Path, **options) -> Path:
    return save_single_file(pipe.unet, pipe.vae, pipe.text_encoder, path, text_encoder_2=pipe.text_encoder_2, **options)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sdxl-single") / "tiny-sdxl.safetensors"
    return save_sdxl_file(tiny_sdxl, path, half=False, scheduler_config=dict(tiny_sdxl.scheduler.config))


def assert_same_weights(loaded, reference, cast=None) -> None:
    """Every weight of every part equal, exactly (after `cast`, for a file written in fp16)."""
    for part in PARTS:
        expected = getattr(reference, part).state_dict()
        weights = getattr(loaded, part).state_dict()
        assert weights.keys() == expected.keys(), part
        for key, tensor in expected.items():
            wanted = cast(tensor) if cast else tensor
            assert torch.equal(weights[key], wanted), f"{part}.{key}"


# --------------------------------------------------------------------------------------------------
# The bundled SDXL base 1.0 configs
# --------------------------------------------------------------------------------------------------

# Stability-AI/generative-models configs/inference/sd_xl_base.yaml: the UNet (network_config) and the VAE
# (first_stage_config) of SDXL base, as released; diffusers derives its configs from this file.
SD_XL_BASE_YAML = """
model:
  params:
    scale_factor: 0.13025
    network_config:
      params:
        adm_in_channels: 2816
        num_classes: sequential
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
    first_stage_config:
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
"""


def test_bundled_unet_and_vae_are_what_diffusers_derives_from_the_original_sdxl_config(tmp_path):
    """diffusers' create_unet_diffusers_config_from_ldm / create_vae_diffusers_config_from_ldm read the released
    sd_xl_base.yaml; the models built from theirs and from ours have the same full config."""
    folder = bundled_config_dir("sdxl", tmp_path)
    original = yaml.safe_load(SD_XL_BASE_YAML)
    # The image size (1024 px) diffusers reads off the checkpoint: this key makes it an SDXL base one.
    checkpoint = {CHECKPOINT_KEY_NAMES["xl_base"]: torch.empty(0)}
    derived = {
        "unet": (UNet2DConditionModel, create_unet_diffusers_config_from_ldm(original, checkpoint)),
        "vae": (AutoencoderKL, create_vae_diffusers_config_from_ldm(original, checkpoint)),
    }
    for part, (model_class, config) in derived.items():
        with torch.device("meta"):
            theirs = model_class.from_config(config).config
            ours = model_class.from_config(model_class.load_config(folder / part)).config
        keys = {key for key in theirs.keys() | ours.keys() if not key.startswith("_")}  # "_": bookkeeping
        differing = {key for key in keys if theirs.get(key) != ours.get(key)}
        # diffusers' derivation writes upcast_attention False; the released config.json holds null (also off).
        assert differing <= {"upcast_attention"}, (part, differing)
        assert not ours.get("upcast_attention")


def test_bundled_text_encoders_are_clip_vit_l_and_openclip_vit_big_g(tmp_path):
    """Widths from the conditioner of sd_xl_base.yaml: FrozenCLIPEmbedder (openai/clip-vit-large-patch14, 768 wide,
    12 layers) and FrozenOpenCLIPEmbedder2 ViT-bigG-14 (open_clip's model_configs/ViT-bigG-14.json text_cfg:
    width 1280, heads 20, layers 32; embed_dim 1280). The UNet cross-attends to both side by side (768 + 1280 =
    context_dim 2048) and takes the pooled 1280 plus six 256-wide size/crop embeddings (adm_in_channels 2816)."""
    folder = bundled_config_dir("sdxl", tmp_path)
    first = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    second = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    assert (first.hidden_size, first.num_hidden_layers, first.num_attention_heads, first.hidden_act) == (
        768,
        12,
        12,
        "quick_gelu",
    )
    assert (second.hidden_size, second.num_hidden_layers, second.num_attention_heads, second.hidden_act) == (
        1280,
        32,
        20,
        "gelu",
    )
    assert second.projection_dim == 1280
    unet = UNet2DConditionModel.load_config(folder / "unet")
    assert unet["cross_attention_dim"] == first.hidden_size + second.hidden_size == 2048
    assert unet["projection_class_embeddings_input_dim"] == second.projection_dim + 6 * unet["addition_time_embed_dim"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]


def test_bundled_tokenizers_share_clip_bpe_and_the_second_pads_with_an_exclamation_mark(tmp_path):
    folder = bundled_config_dir("sdxl", tmp_path)
    first = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    second = CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"))
    caption = "a photo of a cat"
    # CLIP's ids for the caption (as tests/test_single_file.py checks for the SD 1.x tokenizer).
    assert first(caption).input_ids == second(caption).input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (first.pad_token, second.pad_token, second.pad_token_id) == ("<|endoftext|>", "!", 0)
    padded = second(caption, padding="max_length", max_length=10).input_ids
    assert padded[-3:] == [0, 0, 0]


def test_full_size_sdxl_names_are_the_inverse_of_diffusers_importers_and_read_as_xl_base(tmp_path):
    """The SDXL base architecture on the meta device (names and shapes, no memory): our export names are what
    diffusers' importers turn back into exactly the same weights, and diffusers' own model-type detection calls
    the result SDXL base."""
    folder = bundled_config_dir("sdxl", tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    models = (unet, vae, text_encoder, text_encoder_2)
    weights = {part: model.state_dict() for part, model in zip(PARTS, models, strict=True)}
    ldm = sdxl_to_ldm(*weights.values(), unet.config, vae.config)

    assert infer_diffusers_model_type(ldm) == "xl_base"
    for probe in ("clip_sdxl", "open_clip_sdxl", "xl_base"):
        assert CHECKPOINT_KEY_NAMES[probe] in ldm
    for name, shape in {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    }.items():
        assert ldm[name].shape == shape, name

    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, dict(unet.config)),
        "vae": convert_ldm_vae_checkpoint(ldm, dict(vae.config)),
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); CLIPTextModelWithProjection still wraps.
        "text_encoder": {k.removeprefix("text_model."): t for k, t in convert_ldm_clip_checkpoint(ldm).items()},
        "text_encoder_2": convert_open_clip_checkpoint(text_encoder_2, ldm, prefix="conditioner.embedders.1.model."),
    }
    for part in PARTS:
        assert back[part].keys() == weights[part].keys(), part
        assert all(back[part][key].shape == weights[part][key].shape for key in weights[part]), part


# --------------------------------------------------------------------------------------------------
# tiny-sdxl
# --------------------------------------------------------------------------------------------------


def test_tiny_sdxl_is_deterministic_and_leaves_the_callers_generators_alone(tmp_path):
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first = tiny_model.build_tiny_sdxl_pipeline(tmp_path / "first")
    assert torch.equal(torch.rand(3), expected_draw)
    second = tiny_model.build_tiny_sdxl_pipeline(tmp_path / "second")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        files = sorted(p.relative_to(first) for p in (first / name).glob("*.safetensors"))
        assert files, name
        for file in files:
            one, other = load_file(str(first / file)), load_file(str(second / file))
            assert one.keys() == other.keys()
            assert all(torch.equal(tensor, other[key]) for key, tensor in one.items()), file


def test_tiny_sdxl_has_the_sdxl_architecture_and_its_conditioning_fits(tiny_sdxl):
    unet, first, second = tiny_sdxl.unet, tiny_sdxl.text_encoder, tiny_sdxl.text_encoder_2
    assert isinstance(second, CLIPTextModelWithProjection) and not isinstance(first, CLIPTextModelWithProjection)
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == first.config.hidden_size + second.config.hidden_size
    time_ids = 6  # original size, crop top-left, target size (pipeline_stable_diffusion_xl._get_add_time_ids)
    pooled = second.config.projection_dim
    assert unet.config.projection_class_embeddings_input_dim == pooled + time_ids * unet.config.addition_time_embed_dim
    assert first.config.hidden_size != second.config.hidden_size  # diffusers tells them apart in a file by width
    assert (tiny_sdxl.tokenizer.pad_token, tiny_sdxl.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert tiny_sdxl.vae.config.scaling_factor == 0.13025
    # One UNet call with SDXL's added conditioning: the shapes above are the ones it needs.
    latents = torch.zeros(1, 4, 8, 8)
    hidden = torch.zeros(1, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        out = unet(latents, 10, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert out.shape == latents.shape


def test_tiny_sdxl_is_a_name_and_loads_as_an_sdxl_model(model_cache, tiny_sdxl_dir, tiny_sdxl, tmp_path, monkeypatch):
    assert not holds_path("resume_ckpt", "tiny-sdxl")
    built = []
    monkeypatch.setattr(tiny_model, "build_tiny_sdxl_pipeline", built.append)  # must not run: already built
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt="tiny-sdxl")
    model = load_model(config)
    assert built == []
    assert model.is_sdxl and model.source == str(tiny_sdxl_dir)
    assert isinstance(model.text_encoder_2, CLIPTextModelWithProjection)
    assert model.tokenizer_2.pad_token == "!"
    assert model.prediction_type == "epsilon"
    assert_same_weights(model, tiny_sdxl)
    configure_for_training(model, config)
    assert not any(p.requires_grad for p in model.text_encoder_2.parameters())
    assert not model.text_encoder_2.training


def test_sd_models_keep_no_second_text_encoder(model_cache, tmp_path):
    model = load_model(tiny_config(model_cache, DEMO_DATA, tmp_path))
    assert not model.is_sdxl and model.text_encoder_2 is None and model.tokenizer_2 is None
    assert type(model.pipeline()).__name__ == "StableDiffusionPipeline"


# --------------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------------


def test_single_file_has_the_original_sdxl_layout(sdxl_file):
    with safe_open(str(sdxl_file), framework="pt") as reader:
        keys, metadata = set(reader.keys()), reader.metadata()
    prefixes = (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    )
    assert all(key.startswith(prefixes) for key in keys)
    assert all(any(key.startswith(prefix) for key in keys) for prefix in prefixes)
    assert {"model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.text_projection"} <= keys
    assert not [key for key in keys if "add_embedding" in key or "cond_stage_model" in key]
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert "v_pred" not in keys
    assert architecture_of(inspect_checkpoint(sdxl_file)) == "sdxl"


def test_single_file_round_trips_exactly_through_diffusers_from_single_file(sdxl_file, tiny_sdxl_dir, tiny_sdxl):
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(sdxl_file), config=str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False
    )
    assert_same_weights(loaded, tiny_sdxl)


def test_single_file_round_trips_exactly_through_our_loader(model_cache, sdxl_file, tiny_sdxl_dir, tiny_sdxl, tmp_path):
    config = tiny_config(
        model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(sdxl_file), single_file_config=str(tiny_sdxl_dir)
    )
    model = load_model(config)
    assert model.is_sdxl and model.prediction_type == "epsilon"
    assert (model.tokenizer.pad_token, model.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
    assert_same_weights(model, tiny_sdxl)
    assert load_model(config).source == model.source  # converted once, then read from the cache


def test_half_precision_file_reloads_to_the_rounded_weights(tiny_sdxl, tiny_sdxl_dir, tmp_path):
    path = save_sdxl_file(tiny_sdxl, tmp_path / "half.safetensors", half=True)
    assert {tensor.dtype for tensor in load_file(str(path)).values()} == {torch.float16}
    loaded = load_single_file_pipeline(path, config_dir=tiny_sdxl_dir)
    assert_same_weights(loaded, tiny_sdxl, cast=lambda tensor: tensor.half().float())


def test_a_single_file_without_a_config_uses_the_bundled_sdxl_folder(
    model_cache, sdxl_file, tiny_sdxl_dir, tmp_path, monkeypatch
):
    """The full-size bundled folder cannot hold the tiny weights; what is checked is that it is the one chosen."""
    chosen = []
    monkeypatch.setattr(single_file, "bundled_config_dir", lambda name, cache: chosen.append(name) or tiny_sdxl_dir)
    model = load_model(tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(sdxl_file)))
    assert chosen == ["sdxl"] and model.is_sdxl


def test_v_prediction_sdxl_is_marked_as_comfyui_reads_it_and_read_back(tiny_sdxl, tiny_sdxl_dir, tmp_path):
    """ComfyUI (comfy/supported_models.py, SDXL.model_type) takes a `v_pred` key for v-prediction and `ztsnr` for
    zero-terminal-SNR betas; our file carries both, and our loader reads them (also without our metadata)."""
    scheduler_config = {**tiny_sdxl.scheduler.config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    path = save_sdxl_file(tiny_sdxl, tmp_path / "v.safetensors", half=False, scheduler_config=scheduler_config)
    tensors = load_file(str(path))
    assert {"v_pred", "ztsnr"} <= tensors.keys()
    markers_only = tmp_path / "markers-only.safetensors"
    save_file(tensors, str(markers_only))  # no modelspec metadata
    for file in (path, markers_only):
        scheduler = load_single_file_pipeline(file, config_dir=tiny_sdxl_dir).scheduler.config
        assert (scheduler.prediction_type, scheduler.rescale_betas_zero_snr) == ("v_prediction", True)


def test_an_sdxl_file_with_an_sd_config_folder_is_a_clear_error(model_cache, sdxl_file, tiny_model_dir, tmp_path):
    config = tiny_config(
        model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(sdxl_file), single_file_config=str(tiny_model_dir)
    )
    with pytest.raises(ConfigError, match=r"resume_ckpt.*is an SDXL checkpoint but config_dir .* SD 1.x/2.x model"):
        load_model(config)


def test_an_sdxl_file_without_its_second_text_encoder_names_the_missing_part(sdxl_file, tmp_path):
    tensors = {k: v for k, v in load_file(str(sdxl_file)).items() if not k.startswith("conditioner.embedders.1.")}
    path = tmp_path / "no-second.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConversionError, match=r"no second text encoder \(conditioner\.embedders\.1\.model\.\*\)"):
        inspect_checkpoint(path)


def test_an_sdxl_refiner_is_refused_with_a_message(tmp_path):
    path = tmp_path / "refiner.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(1),
            "conditioner.embedders.0.model.text_projection": torch.zeros(1),
        },
        str(path),
    )
    with pytest.raises(ConversionError, match="SDXL refiner"):
        inspect_checkpoint(path)


# --------------------------------------------------------------------------------------------------
# Diffusers folders
# --------------------------------------------------------------------------------------------------


def test_checkpoint_save_writes_an_sdxl_folder_and_file_that_reload_exactly(model_cache, tiny_sdxl, tmp_path):
    """What trainer/saving.py's write_checkpoint does with a loaded SDXL model: save_checkpoint(model.pipeline())."""
    model = load_model(tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt="tiny-sdxl"))
    paths = save_checkpoint(model.pipeline(), tmp_path / "ckpts", "t-ep000-gs00001", half=False, single_file=True)
    folder = Path(paths["diffusers"])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]

    from_folder = StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True)
    assert_same_weights(from_folder, tiny_sdxl)
    assert from_folder.tokenizer_2.pad_token == "!" and from_folder.tokenizer_2.model_max_length == 77
    assert_same_weights(load_model(tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(folder))), tiny_sdxl)
    from_file = StableDiffusionXLPipeline.from_single_file(
        paths["single_file"], config=str(folder), local_files_only=True, add_watermarker=False
    )
    assert_same_weights(from_file, tiny_sdxl)


@pytest.mark.skipif(
    os.environ.get("EVERYCYCLE_SLOW_TESTS") != "1",
    reason="writes and reads a 7 GB full-size SDXL file (a few minutes); EVERYCYCLE_SLOW_TESTS=1 runs it",
)
def test_full_size_sdxl_file_loads_offline_with_the_bundled_configs(tmp_path):
    """diffusers' from_single_file with the bundled SDXL folder as its only config, nothing downloaded: a file of
    SDXL base's full names and shapes (seeded random fp16 values, written straight from the meta model's names)
    loads, and every weight comes back where it was written."""
    folder = bundled_config_dir("sdxl", tmp_path)
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
        }
    names = sdxl_to_ldm(*(part.state_dict() for part in parts.values()), parts["unet"].config, parts["vae"].config)
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "sdxl-base-shaped.safetensors"
    save_file({name: torch.randn(t.shape, generator=generator).half() for name, t in names.items()}, str(path))
    del names, parts

    loaded = load_single_file_pipeline(path, config_dir=folder, torch_dtype=torch.float16)

    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    back = sdxl_to_ldm(*(getattr(loaded, part).state_dict() for part in PARTS), loaded.unet.config, loaded.vae.config)
    with safe_open(str(path), framework="pt") as written:  # one tensor at a time: the file is 7 GB
        assert back.keys() == set(written.keys())
        assert all(torch.equal(back[name], written.get_tensor(name)) for name in back)
