"""Single-file base models: our own export, an original-layout .ckpt, the bundled SD configs."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tests.conftest import DEMO_DATA, tiny_config
from trainer.model import load_model
from trainer.single_file import architecture_of, bundled_config_dir
from utils.config import ConfigError
from utils.convert import inspect_checkpoint, save_single_file


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir):
    return StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_single_file(
        tiny_pipeline.unet,
        tiny_pipeline.vae,
        tiny_pipeline.text_encoder,
        path,
        half=False,
        scheduler_config=dict(tiny_pipeline.scheduler.config),
    )
    return path


def assert_same_weights(model, pipeline):
    for part in ("unet", "vae", "text_encoder"):
        expected = getattr(pipeline, part).state_dict()
        for key, tensor in getattr(model, part).state_dict().items():
            assert torch.equal(tensor, expected[key]), f"{part}.{key}"


def test_our_single_file_export_trains_as_resume_ckpt(model_cache, tiny_model_dir, tiny_pipeline, exported, tmp_path):
    config = tiny_config(
        model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(exported), single_file_config=str(tiny_model_dir)
    )
    model = load_model(config)
    assert_same_weights(model, tiny_pipeline)
    assert model.prediction_type == "epsilon"
    again = load_model(config)  # converted once, then read from the cache
    assert again.source == model.source


def test_original_layout_ckpt_with_extra_keys_loads_safely(
    model_cache, tiny_model_dir, tiny_pipeline, exported, tmp_path
):
    state = load_file(exported)
    # What CompVis / A1111 checkpoints carry besides the weights.
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "original.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path)
    config = tiny_config(
        model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(path), single_file_config=str(tiny_model_dir)
    )
    assert_same_weights(load_model(config), tiny_pipeline)


def test_v_prediction_override_reaches_the_noise_scheduler(model_cache, tiny_model_dir, exported, tmp_path):
    config = tiny_config(
        model_cache,
        DEMO_DATA,
        tmp_path,
        resume_ckpt=str(exported),
        single_file_config=str(tiny_model_dir),
        prediction_type="v_prediction",
    )
    assert load_model(config).prediction_type == "v_prediction"


def test_not_a_model_is_refused_with_a_message(model_cache, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(path))
    config = tiny_config(model_cache, DEMO_DATA, tmp_path, resume_ckpt=str(path))
    with pytest.raises(ConfigError, match=r"resume_ckpt.*lora.safetensors"):
        load_model(config)


def test_sd2_layout_is_detected(tiny_pipeline, tmp_path):
    gelu_text = CLIPTextModel(CLIPTextConfig(**{**tiny_pipeline.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    path = tmp_path / "sd2ish.safetensors"
    save_single_file(tiny_pipeline.unet, tiny_pipeline.vae, gelu_text, path, half=True)
    assert architecture_of(inspect_checkpoint(path)) == "sd2"


@pytest.mark.parametrize(
    "name, cross_attention, text_width, prediction",
    [("sd1", 768, 768, "epsilon"), ("sd2_512", 1024, 1024, "epsilon"), ("sd2_768_v", 1024, 1024, "v_prediction")],
)
def test_bundled_configs_describe_the_real_architectures(tmp_path, name, cross_attention, text_width, prediction):
    folder = bundled_config_dir(name, tmp_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    expected = {"sd1": 859_520_964, "sd2_512": 865_910_724, "sd2_768_v": 865_910_724}[name]
    assert sum(p.numel() for p in unet.parameters()) == expected
    assert unet.config.cross_attention_dim == cross_attention
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"] == text_width
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction


def test_bundled_clip_tokenizer_gives_clip_ids(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(str(bundled_config_dir("sd1", tmp_path) / "tokenizer"))
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
