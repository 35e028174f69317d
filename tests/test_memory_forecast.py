"""The memory forecast (trainer/memory_forecast.py): its counters against modules counted by hand, its weights and
optimizer states against the real tensors, and its SD 1.5 / SDXL numbers against what is known of those models."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from optimizer.optimizers import build_optimizer, model_param_groups
from tests.conftest import DEMO_DATA, ROOT
from trainer.memory_forecast import (
    CARD_SIZES_GB,
    CheckpointRecorder,
    ForecastLine,
    ForecastUnavailable,
    LivePeak,
    MemoryForecast,
    MetaAutocast,
    SavedTensorCounter,
    build_meta_model,
    forecast_for_model,
    forecast_memory,
    forecast_report,
    format_forecast,
    model_config_folder,
    recipe_of,
    run_start_report,
    storage_key,
)
from trainer.single_file import BUNDLED
from utils.config import TrainConfig
from utils.convert import save_single_file
from utils.disk import GIGABYTE

SD15_UNET_PARAMETERS = 859_520_964  # diffusers' SD 1.5 UNet (docs/performance.md: 859.5M)
SDXL_UNET_PARAMETERS = 2_567_463_684  # diffusers' SDXL base 1.0 UNet ("2.6B")


def config_of(**values) -> TrainConfig:
    return TrainConfig(data_root=str(DEMO_DATA), **values)


def weight_keys(module: torch.nn.Module) -> set[int]:
    return {storage_key(parameter) for parameter in module.parameters()}


# --- the counters, against small modules counted by hand ------------------------------------------------------


def test_saved_tensors_of_a_linear_relu_chain_are_counted_by_hand():
    """Linear(4, 8) -> ReLU -> Linear(8, 2) on a batch of 3, fp32: the first Linear saves its input x (3x4: its
    weight's gradient is x^T @ grad), ReLU saves its output (3x8: the mask of its backward), and the second Linear
    saves its input, that same tensor, which is counted once. The weights are left out (a line of their own)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to("meta")
    counter = SavedTensorCounter((weight_keys(model),))
    with counter.counting():
        model(torch.empty(3, 4, device="meta"))
    assert counter.bytes == 3 * 4 * 4 + 3 * 8 * 4


def test_a_checkpointed_block_keeps_its_input_and_is_recomputed_whole():
    """The same chain as one checkpointed block: the forward keeps only its input (3x4 fp32); the recompute in the
    backward holds what the block saves (the 144 bytes above) while it runs."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to("meta")
    kept = SavedTensorCounter((weight_keys(model),))
    recorder = CheckpointRecorder(kept)
    with kept.counting():
        recorder(model, torch.empty(3, 4, device="meta"))
    assert (kept.bytes, recorder.largest_block) == (3 * 4 * 4, 3 * 4 * 4 + 3 * 8 * 4)


def test_autocast_on_meta_saves_the_cast_copies_and_caches_the_weight_copies():
    """Linear(4, 8) -> LayerNorm(8) under bf16 autocast, batch 3. Linear is on CUDA autocast's lower-precision list:
    it saves the bf16 copy of x (3x4x2 = 24 bytes) and uses bf16 copies of its fp32 weight and bias (cached, 8x4x2 +
    8x2 = 80 bytes: the autocast copies). layer_norm is on the fp32 list: it saves the fp32 copy of its bf16 input
    (3x8x4 = 96) and its mean and rstd (3x1x4 each)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)).to("meta")
    autocast = MetaAutocast(torch.bfloat16)
    counter = SavedTensorCounter((weight_keys(model), autocast.copy_storages))
    with autocast, counter.counting():
        output = model(torch.empty(3, 4, device="meta"))
    assert output.dtype == torch.float32
    assert counter.bytes == 24 + 96 + 12 + 12
    assert autocast.copies_bytes == 80


def test_the_live_peak_without_gradients_is_an_input_and_two_outputs():
    """Four Linear(100, 100) on a batch of 5 (2000 bytes a tensor in fp32), under no_grad: x stays referenced, and
    while a layer runs its input (the previous output) and its output are alive: 3 tensors at most, 2 at the end."""
    chain = torch.nn.Sequential(*[torch.nn.Linear(100, 100) for _ in range(4)]).to("meta")
    with torch.no_grad(), LivePeak() as live:
        x = torch.empty(5, 100, device="meta")
        output = chain(x)
    assert (live.peak, live.live) == (3 * 2000, 2 * 2000)
    del x, output


# --- weights and optimizer states, against the real tiny model ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir):
    return StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))


def real_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    return sum(tensor.numel() * dtype.itemsize for tensor in module.state_dict().values())


def tiny_forecast(model_cache, **values):
    config = config_of(resume_ckpt="tiny", model_cache_dir=str(model_cache), resolution=64, **values)
    return forecast_memory(config, mixed_precision="bf16"), config


def test_weights_are_the_real_parts_in_their_dtypes(model_cache, tiny_pipeline):
    """Trained parts in their weight dtype (fp32 here), frozen parts in the mixed-precision dtype (bf16)."""
    forecast, _ = tiny_forecast(model_cache)
    assert forecast.line("weights: unet (trained, fp32)") == real_bytes(tiny_pipeline.unet, torch.float32)
    assert forecast.line("weights: text_encoder (trained, fp32)") == real_bytes(
        tiny_pipeline.text_encoder, torch.float32
    )
    assert forecast.line("weights: vae (frozen, bf16)") == real_bytes(tiny_pipeline.vae, torch.bfloat16)
    trained = [*tiny_pipeline.unet.parameters(), *tiny_pipeline.text_encoder.parameters()]
    assert forecast.line("gradients") == sum(p.numel() * 4 for p in trained)


def real_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of every per-parameter state tensor after a step (from state_dict, which the per-parameter
    optimizer of stochastic rounding gives in the single optimizer's layout): step counters (0-dim) and
    bitsandbytes' two quantization maps (256 fp32 values each, shared by the parameters) left out, as the forecast
    leaves them out."""
    return sum(tensor_bytes(state) for state in optimizer.state_dict()["state"].values())


def tensor_bytes(state: dict) -> int:
    """bitsandbytes nests its quantized states in a dict of their own (Optimizer8bit.state_dict)."""
    return sum(
        tensor_bytes(value)
        if isinstance(value, dict)
        else value.numel() * value.element_size()
        if isinstance(value, torch.Tensor) and value.dim() > 0 and not key.startswith("qmap")
        else 0
        for key, value in state.items()
    )


def one_real_step(config: TrainConfig, tiny_model_dir, dtype: torch.dtype) -> torch.optim.Optimizer:
    """The project's optimizer over the real tiny UNet and text encoder (CPU), one step on random gradients.
    Weights are drawn anew so that none is all zeros (prodigy keeps a 0-dim p0 for an all-zero parameter)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").to(dtype)
    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").to(dtype)
    with torch.no_grad():
        for parameter in [*unet.parameters(), *text_encoder.parameters()]:
            parameter.normal_(0, 0.02)
            parameter.grad = torch.randn_like(parameter)
    optimizer = build_optimizer(config, model_param_groups(config, unet, text_encoder), seed=1)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "values",
    [
        {"optimizer": "adamw"},
        {"optimizer": "adamw8bit"},
        {"optimizer": "lion"},
        {"optimizer": "lion8bit"},
        {"optimizer": "adafactor"},
        {"optimizer": "adafactor", "optimizer_args": {"beta1": 0.9}},
        {"optimizer": "prodigy"},
        {"optimizer": "dadapt_adam"},
        # bf16 weights stepped on an fp32 copy: the states are fp32 (optimizer/stochastic_rounding.py)
        {"optimizer": "adamw", "weight_dtype": "bf16", "stochastic_rounding": True, "mixed_precision": "bf16"},
        {"optimizer": "adafactor", "weight_dtype": "bf16", "stochastic_rounding": True, "mixed_precision": "bf16"},
    ],
    ids=lambda values: "-".join(str(value) for value in values.values()),
)
def test_optimizer_states_are_those_of_a_real_step(model_cache, tiny_model_dir, values):
    forecast, config = tiny_forecast(model_cache, **values)
    dtype = torch.bfloat16 if values.get("weight_dtype") == "bf16" else torch.float32
    real = real_state_bytes(one_real_step(config, tiny_model_dir, dtype))
    assert forecast.line("optimizer states") == real


# --- what checkpointing and the recipe keys change ------------------------------------------------------------


def sd15_recipe(**values):
    return recipe_of(config_of(resume_ckpt="random:sd15", resolution=512, batch_size=1, **values), None, "bf16")


@pytest.fixture(scope="module")
def sd15():
    """SD 1.5 at 512 px, batch 1, bf16: the default recipe (8-bit AdamW, text encoder trained), with and without
    gradient checkpointing."""
    return {
        checkpointing: forecast_for_model(
            build_meta_model(BUNDLED / "sd1"), sd15_recipe(gradient_checkpointing=checkpointing), "sd15"
        )
        for checkpointing in (False, True)
    }


def activations(forecast: MemoryForecast) -> int:
    return forecast.line("activations")


def test_sd15_at_512_batch_1_is_in_a_plausible_range(sd15):
    """The exact lines: the UNet's 859,520,964 fp32 weights and as many fp32 gradients; 8-bit AdamW's two bytes
    per weight; autocast's bf16 copies of the weights it multiplies (all but the norms and embeddings: between 85%
    and 100% of half the trained weights).

    The activations: a 4x64x64 latent; the UNet saves, per image, the inputs of about 70 convolutions and 16
    transformer blocks at 64x64 to 8x8 with 320-1280 channels (a 320x64x64 map is 2.5 MiB in bf16, and GroupNorm
    and SiLU keep fp32 copies under autocast), which is several hundred MiB to a few GiB, never more:
    docs/performance.md's estimate was 1.5-2.5 GiB, from the same kind of count. With checkpointing only the blocks'
    inputs stay (one feature map per block), a few hundred MiB."""
    plain, checkpointed = sd15[False], sd15[True]
    assert plain.line("weights: unet (trained, fp32)") == SD15_UNET_PARAMETERS * 4
    assert plain.line("gradients") > SD15_UNET_PARAMETERS * 4
    trained_weights = plain.line("weights: unet") + plain.line("weights: text_encoder")
    assert trained_weights / 4 * 2 == pytest.approx(plain.line("optimizer states"), rel=0.02)
    assert 0.85 * trained_weights / 2 < plain.line("autocast copies") <= trained_weights / 2
    assert 0.5 * GIGABYTE < plain.line("activations: unet") < 3 * GIGABYTE
    assert 0.05 * GIGABYTE < activations(checkpointed) < 0.7 * GIGABYTE
    # 12 GB is too small for this recipe, 16 GB holds it: its weights, gradients, 8-bit states and autocast copies
    # alone are 11.1 GiB, 12.6 with the CUDA allowance
    assert plain.fits == (16, 24, 40, 48, 80, 141)


def test_gradient_checkpointing_forecasts_less_activation_memory(sd15):
    plain, checkpointed = sd15[False], sd15[True]
    assert activations(checkpointed) < activations(plain) / 3
    assert checkpointed.line("activations: recomputed block") > 0
    assert plain.line("activations: recomputed block") == 0
    assert plain.line("weights") == checkpointed.line("weights")


def test_a_larger_bucket_and_batch_need_more_activations(model_cache):
    small, _ = tiny_forecast(model_cache, batch_size=1)
    config = config_of(resume_ckpt="tiny", model_cache_dir=str(model_cache), resolution=64, batch_size=4)
    large = forecast_memory(config, bucket=(128, 128), mixed_precision="bf16")
    # 4x the images alone make 4x every activation (text encoder included); 4x the pixels add to the UNet's
    assert activations(large) > 4 * activations(small)
    assert large.line("weights") == small.line("weights")


# --- SDXL: the 24 GB recipe -------------------------------------------------------------------------------------

SDXL_24GB_RECIPE = {
    "resolution": 1024,
    "batch_size": 1,
    "mixed_precision": "bf16",
    "weight_dtype": "bf16",
    "stochastic_rounding": True,
    "fused_backward_pass": True,
    "gradient_checkpointing": True,
    "cache_latents": True,
    "cache_text_embeddings": True,
    "disable_textenc_training": True,
}


@pytest.mark.skipif(not (BUNDLED / "sdxl" / "unet").is_dir(), reason="the SDXL configs are not bundled yet")
def test_sdxl_full_fine_tune_at_1024_is_forecast_under_22_gb():
    """The issue's goal: SDXL full fine-tune at 1024 px, batch 1, fused backward pass, bf16 weights with stochastic
    rounding, Adafactor or 8-bit AdamW, checkpointing, cached latents and embeddings, frozen text encoders."""
    model = build_meta_model(BUNDLED / "sdxl")
    for optimizer in ("adafactor", "adamw8bit"):
        config = config_of(
            resume_ckpt="stabilityai/stable-diffusion-xl-base-1.0", optimizer=optimizer, **SDXL_24GB_RECIPE
        )
        forecast = forecast_for_model(model, recipe_of(config), optimizer)
        assert forecast.line("weights: unet (trained, bf16)") == SDXL_UNET_PARAMETERS * 2
        assert forecast.line("weights: vae") == 0 and forecast.line("weights: text_encoder") == 0  # cached: off the GPU
        assert forecast.total < 22e9, format_forecast(forecast)
        assert 24 in forecast.fits


# --- the model's configs, the report, the wiring ----------------------------------------------------------------


def test_the_configs_come_from_where_the_model_would(model_cache, tiny_model_dir, tiny_pipeline, tmp_path):
    def folder(resume_ckpt, **values):
        return model_config_folder(config_of(resume_ckpt=resume_ckpt, model_cache_dir=str(model_cache), **values))

    assert folder("random:sd21") == BUNDLED / "sd2_768_v"
    assert folder("tiny") == tiny_model_dir
    assert folder(str(tiny_model_dir)) == tiny_model_dir
    assert folder("stable-diffusion-v1-5/stable-diffusion-v1-5") == BUNDLED / "sd1"  # not downloaded: bundled
    single = tmp_path / "tiny.safetensors"
    save_single_file(tiny_pipeline.unet, tiny_pipeline.vae, tiny_pipeline.text_encoder, single, half=True)
    assert folder(str(single)) == BUNDLED / "sd1"  # its keys are SD 1.x's
    with pytest.raises(ForecastUnavailable, match="not downloaded yet"):
        folder("someone/some-model")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)  # a diffusers folder by its layout, without configs
    report = forecast_report(config_of(resume_ckpt=str(broken)))
    assert len(report) == 1 and report[0].startswith(f"memory forecast: none (the model configs in {broken} cannot")


def test_the_table_says_the_total_and_the_cards_it_fits():
    forecast = MemoryForecast("example", (ForecastLine("weights", 10 * GIGABYTE), ForecastLine("other", 6 * GIGABYTE)))
    assert forecast.total == 16 * GIGABYTE
    assert forecast.fits == tuple(size for size in CARD_SIZES_GB if size >= 16)  # 16 GiB fits a 16 GB card exactly
    table = format_forecast(forecast)
    assert "total" in table and "16.00 GiB" in table
    assert table.endswith("fits cards of 16, 24, 40, 48, 80, 141 GB (not 12 GB)")


def test_the_run_start_forecasts_on_cuda_only(model_cache):
    config = config_of(resume_ckpt="tiny", model_cache_dir=str(model_cache), resolution=64)
    buckets = [(64, 64), (64, 64)]
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, mixed_precision="no")
    assert run_start_report(config, buckets, cpu) == []
    gpu = SimpleNamespace(device=torch.device("cuda"), is_main_process=True, mixed_precision="bf16")
    report = run_start_report(config, buckets, gpu)
    assert report[0].startswith("memory forecast: tiny (64x64, batch 2, bf16 autocast")
    assert any(line.strip().startswith("fits cards of") for line in report)
    assert run_start_report(config, buckets, SimpleNamespace(**{**vars(gpu), "is_main_process": False})) == []


def test_plot_schedule_prints_the_forecast(model_cache, tmp_path, capsys):
    import train as train_cli

    arguments = ["--config", str(ROOT / "configs" / "demo.json"), "--data_root", str(DEMO_DATA)]
    arguments += ["--model_cache_dir", str(model_cache), "--plot_schedule", str(tmp_path)]
    assert train_cli.main(arguments) == 0
    output = capsys.readouterr().out
    assert "memory forecast: tiny" in output and "fits cards of" in output
    assert (tmp_path / "lr_schedule.csv").is_file()
