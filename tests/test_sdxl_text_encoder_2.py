"""SDXL's second text encoder trained (train_text_encoder_2): its own param group, LR bounds and schedule (the same
phase as the UNet's cyclic schedule, or its own ED2 schedule), optimizer.json's text_encoder_2_* sections, gradients
for every one of its weights, exact resume (with EMA), checkpoints that carry it, the memory forecast, and the
refusals (an SD 1.x/2.x model, the text-embedding cache)."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import train
from optimizer.lr import plan_schedule
from optimizer.optimizers import build_optimizer, model_param_groups
from optimizer.preview import preview_schedule
from optimizer.schedules import ScheduleSpec, build_schedule
from tests.conftest import DEMO_DATA, tiny_config
from trainer.diffusion import HIDDEN_STATES, added_conditioning, denoising_loss, encode_text
from trainer.loop import Trainer
from trainer.lr_finder import Sweep, ramp_functions, ramp_lr
from trainer.memory_forecast import forecast_memory
from trainer.model import configure_for_training, load_pretrained
from trainer.tiny_model import tiny_sdxl_model_path
from utils.config import ConfigError, load_config, text_encoder_key

# Four 64 px images in batches of two: two steps an epoch. A cyclic schedule of stepsize 2, in which each text
# encoder has bounds of its own.
STEPS_PER_EPOCH = 2
CYCLIC = dict(lr_scheduler="cyclic", lr_decay_steps=2, lr=1e-4, lr_min=1e-5)
TEXT_ENCODER_LRS = dict(
    text_encoder_lr=5e-5, text_encoder_lr_min=4e-6, text_encoder_2_lr=3e-4, text_encoder_2_lr_min=2e-5
)
FAST = dict(validation_config=None, num_workers=0, batch_size=2)
LR_TOLERANCE = 1e-7  # relative: metrics.csv writes 8 significant digits


@pytest.fixture(scope="module")
def tiny_sdxl_dir(model_cache) -> Path:
    return tiny_sdxl_model_path(model_cache)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("te2-data")
    for name in ("scene01", "scene02", "scene03", "scene04"):
        shutil.copy(DEMO_DATA / f"{name}.png", folder)
        shutil.copy(DEMO_DATA / f"{name}.txt", folder)
    return folder


def te2_config(model_cache, data, logdir, **overrides):
    values = {"resume_ckpt": "tiny-sdxl", "train_text_encoder_2": True, **FAST, **overrides}
    return tiny_config(model_cache, data, logdir, **values)


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().clone() for key, tensor in module.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def metrics_rows(run_dir: str) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_follows(rows: list[dict], column: str, schedule) -> None:
    """Row of step k (1-based) logs the LR step k trained with: the schedule at k - 1."""
    logged = [float(row[column]) for row in rows if row["loss_train"]]
    expected = [schedule(step) for step in range(len(logged))]
    assert logged == pytest.approx(expected, rel=LR_TOLERANCE)


@pytest.fixture(scope="module")
def base(tiny_sdxl_dir):
    model = load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl")
    return {name: weights(getattr(model, name)) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


# --- a run with both text encoders trained ---------------------------------------------------------------


@pytest.fixture(scope="module")
def both_encoders_run(model_cache, data, tmp_path_factory):
    """Four steps of the cyclic schedule with each text encoder on bounds of its own, saved as a diffusers folder
    and a full-precision single file."""
    logdir = tmp_path_factory.mktemp("te2-run")
    config = te2_config(model_cache, data, logdir, max_steps=4, save_full_precision=True, **CYCLIC, **TEXT_ENCODER_LRS)
    trainer = Trainer(config)
    summary = trainer.run()
    return config, trainer, summary


def test_each_text_encoder_follows_its_own_bounds_in_the_unets_phase(both_encoders_run):
    """The pure cyclic function (optimizer/schedules.py) with each encoder's bounds gives the LR of its param group
    at every step, as logged in metrics.csv (lr_text_encoder_2 is the second encoder's column)."""
    config, _, summary = both_encoders_run
    rows = metrics_rows(summary["run_dir"])
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]

    def cyclic(lr: float, lr_min: float):
        spec = ScheduleSpec("cyclic", lr, 4, STEPS_PER_EPOCH, lr_min=lr_min, decay_steps=config.lr_decay_steps)
        return build_schedule(spec)

    assert_follows(rows, "lr_unet", cyclic(1e-4, 1e-5))
    assert_follows(rows, "lr_text_encoder", cyclic(5e-5, 4e-6))
    assert_follows(rows, "lr_text_encoder_2", cyclic(3e-4, 2e-5))


def test_trained_second_text_encoder_changes_and_its_checkpoints_carry_it(both_encoders_run, base, tiny_sdxl_dir):
    """The diffusers folder and the single file (fp32) hold the second text encoder as it ended training, bit for
    bit, and it moved away from the base model's; the VAE did not."""
    _, trainer, summary = both_encoders_run
    trained = trainer.trained_models()
    assert list(trained) == ["unet", "text_encoder", "text_encoder_2"]
    final = weights(trained["text_encoder_2"])
    assert not equal(final, base["text_encoder_2"])
    checkpoint = summary["final_checkpoint"]
    folder = StableDiffusionXLPipeline.from_pretrained(checkpoint["diffusers"], add_watermarker=False)
    single = StableDiffusionXLPipeline.from_single_file(
        checkpoint["single_file"], config=str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False
    )
    for loaded in (folder, single):
        assert equal(weights(loaded.text_encoder_2), final)
        assert equal(weights(loaded.text_encoder), weights(trained["text_encoder"]))
        assert equal(weights(loaded.vae), base["vae"])


def test_second_text_encoder_stays_frozen_unless_asked(model_cache, data, base, tmp_path):
    """Without train_text_encoder_2 (the default) it has no param group and its weights stay the base model's."""
    trainer = Trainer(
        te2_config(model_cache, data, tmp_path, train_text_encoder_2=False, max_steps=1, no_save_ckpt=True)
    )
    trainer.run()
    assert [group["name"] for group in trainer.optimizer.param_groups] == ["unet", "text_encoder"]
    assert equal(weights(trainer.unwrapped_model().text_encoder_2), base["text_encoder_2"])


def test_second_text_encoder_can_train_alone(model_cache, data, base, tmp_path):
    """With the UNet and the first text encoder frozen, only the second trains (and the run logs its LR)."""
    config = te2_config(
        model_cache,
        data,
        tmp_path,
        disable_unet_training=True,
        disable_textenc_training=True,
        max_steps=1,
        no_save_ckpt=True,
    )
    trainer = Trainer(config)
    summary = trainer.run()
    model = trainer.unwrapped_model()
    assert list(trainer.trained_models()) == ["text_encoder_2"]
    assert equal(weights(model.unet), base["unet"]) and equal(weights(model.text_encoder), base["text_encoder"])
    assert not equal(weights(model.text_encoder_2), base["text_encoder_2"])
    assert float(metrics_rows(summary["run_dir"])[0]["lr_text_encoder_2"]) == pytest.approx(config.lr, rel=LR_TOLERANCE)


@pytest.mark.parametrize("clip_skip", [0, 3])
def test_every_weight_of_the_second_text_encoder_gets_a_gradient(tiny_sdxl_dir, clip_skip):
    """Its last layer, final norm and projection make the pooled embedding, so unlike the first encoder (whose
    layers after the hidden state it gives stay frozen) nothing of it is unused: data-parallel training would
    wait forever for a gradient that never comes."""
    model = load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl")
    settings = {"resume_ckpt": "tiny-sdxl", "data_root": str(DEMO_DATA), "clip_skip": clip_skip}
    configure_for_training(model, load_config(None, {**settings, "train_text_encoder_2": True}))
    text = encode_text(model, ["a red circle", ""], clip_skip, "cpu")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    added = added_conditioning(model, text, time_ids)
    timesteps = torch.tensor([10, 500])
    denoising_loss(
        model, latents, text[HIDDEN_STATES], torch.randn_like(latents), timesteps, added_cond=added
    ).mean().backward()
    trainable = {name: p for name, p in model.text_encoder_2.named_parameters() if p.requires_grad}
    assert len(trainable) == len(list(model.text_encoder_2.parameters()))
    assert [name for name, p in trainable.items() if p.grad is None or not p.grad.any()] == []
    assert not any(p.requires_grad for p in model.text_encoder.final_layer_norm.parameters())  # as before


# --- exact resume ------------------------------------------------------------------------------------------


def test_stopped_and_resumed_run_equals_the_run_left_alone(model_cache, data, tmp_path):
    """Both text encoders trained, with EMA (updated every step): a run stopped after step 1 and resumed ends with
    the very weights and EMA weights of the run left alone (CPU, fp32, bit for bit)."""
    settings = dict(max_steps=4, save_every_n_epochs=1, no_save_ckpt=True, ema_decay_rate=0.9, ema_update_interval=1)
    settings.update(CYCLIC, **TEXT_ENCODER_LRS, flip_p=0.5, cond_dropout=0.2)

    def finished(trainer: Trainer) -> dict[str, torch.Tensor]:
        trained = trainer.trained_models()
        named = {f"{name}.{key}": t for name, module in trained.items() for key, t in weights(module).items()}
        averages = trainer.ema.weights(trained)
        return named | {f"{name}.{key}": t for name, part in averages.items() for key, t in part.items()}

    reference = Trainer(te2_config(model_cache, data, tmp_path / "reference", **settings))
    reference.run()
    stopped = Trainer(te2_config(model_cache, data, tmp_path / "stopped", **settings), stop_at_step=1).run()
    assert (stopped["stopped"], stopped["steps"]) == ("stop_at_step", 1)
    resumed = Trainer(te2_config(model_cache, data, tmp_path / "stopped", resume_from="latest", **settings))
    summary = resumed.run()
    assert summary["steps"] == 4 and summary["resumed_from"] == stopped["last_state"]
    expected, actual = finished(reference), finished(resumed)
    assert any(key.startswith("ema_text_encoder_2.") for key in expected)
    assert expected.keys() == actual.keys()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_resume_refuses_turning_the_second_text_encoder_on(model_cache, data, tmp_path):
    settings = dict(max_steps=2, no_save_ckpt=True, train_text_encoder_2=False)
    Trainer(te2_config(model_cache, data, tmp_path, **settings), stop_at_step=1).run()
    settings.update(train_text_encoder_2=True, resume_from="latest")
    with pytest.raises(ConfigError, match="train_text_encoder_2.*which parameters train changed"):
        Trainer(te2_config(model_cache, data, tmp_path, **settings))


# --- the schedule and the optimizer settings ----------------------------------------------------------------


def test_second_text_encoder_takes_the_first_ones_settings_where_its_own_are_null(model_cache, data, tmp_path):
    """No text_encoder_2_* key: the same schedule, bounds and hyperparameters as the first encoder."""
    config = te2_config(
        model_cache, data, tmp_path, max_steps=6, **CYCLIC, text_encoder_lr=5e-5, text_encoder_weight_decay=0.3
    )
    _, schedules, _ = plan_schedule(config, 2)
    assert [schedules.lr["text_encoder_2"](k) for k in range(6)] == [schedules.lr["text_encoder"](k) for k in range(6)]
    assert text_encoder_key(config, "text_encoder_2", "weight_decay") == "text_encoder_weight_decay"
    assert (
        text_encoder_key(config, "text_encoder_2", "unfreeze_last_n_layers") == "text_encoder_2_unfreeze_last_n_layers"
    )
    # Its own scale alone gives it its own bounds (lr x scale), not the first's explicit LRs.
    scaled = te2_config(
        model_cache, data, tmp_path, max_steps=6, **CYCLIC, text_encoder_lr=5e-5, text_encoder_2_lr_scale=2
    )
    _, schedules, _ = plan_schedule(scaled, 2)
    cyclic = build_schedule(ScheduleSpec("cyclic", 2e-4, 6, STEPS_PER_EPOCH, lr_min=2e-5, decay_steps=2))
    assert [schedules.lr["text_encoder_2"](k) for k in range(6)] == [cyclic(k) for k in range(6)]


def test_optimizer_json_overrides_apply_to_the_second_text_encoder(model_cache, data, tiny_sdxl_dir, tmp_path):
    """text_encoder_2_overrides and text_encoder_2_freezing, sections of the form of ED2's text_encoder_overrides and
    text_encoder_freezing: its own ED2 schedule (cosine beside the UNet's constant), LR, betas, epsilon, weight decay,
    and only its last layer (with the final norm and the projection) trained."""
    optimizer_json = tmp_path / "optimizer.json"
    optimizer_json.write_text(
        json.dumps(
            {
                "base": {"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": "constant"},
                "text_encoder_overrides": {"lr": 5e-5},
                "text_encoder_2_overrides": {
                    "lr": 3e-4,
                    "lr_scheduler": "cosine",
                    "lr_warmup_steps": 2,
                    "lr_decay_steps": 10,
                    "betas": [0.8, 0.95],
                    "epsilon": 1e-6,
                    "weight_decay": 0.05,
                },
                "text_encoder_2_freezing": {"unfreeze_last_n_layers": 1},
            }
        ),
        encoding="utf-8",
    )
    config = te2_config(model_cache, data, tmp_path, max_steps=8, optimizer_config=str(optimizer_json))
    config_values = {key: getattr(config, key) for key in ("text_encoder_2_lr", "text_encoder_2_lr_scheduler")}
    assert config_values == {"text_encoder_2_lr": 3e-4, "text_encoder_2_lr_scheduler": "cosine"}

    _, schedules, _ = plan_schedule(config, 2)
    cosine = build_schedule(ScheduleSpec("cosine", 3e-4, 8, STEPS_PER_EPOCH, warmup_steps=2, decay_steps=10))
    assert [schedules.lr["text_encoder_2"](k) for k in range(8)] == [cosine(k) for k in range(8)]
    assert {schedules.lr["text_encoder"](k) for k in range(8)} == {5e-5}

    model = load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl")
    configure_for_training(model, config)
    groups = model_param_groups(config, model.unet, model.text_encoder, model.text_encoder_2)
    group = {g["name"]: g for g in build_optimizer(config, groups).param_groups}["text_encoder_2"]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    last_layer = model.text_encoder_2.text_model.encoder.layers[-1]
    expected = [
        *last_layer.parameters(),
        *model.text_encoder_2.text_model.final_layer_norm.parameters(),
        *model.text_encoder_2.text_projection.parameters(),
    ]
    assert {id(p) for p in group["params"]} == {id(p) for p in expected}


def test_schedule_preview_has_a_column_for_the_second_text_encoder(model_cache, data, tmp_path):
    config = te2_config(model_cache, data, tmp_path, max_steps=4, **CYCLIC, **TEXT_ENCODER_LRS)
    preview_schedule(config, tmp_path / "preview")
    with open(tmp_path / "preview" / "lr_schedule.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "lr", "lr_text_encoder", "lr_text_encoder_2"]
    cyclic = build_schedule(ScheduleSpec("cyclic", 3e-4, 4, STEPS_PER_EPOCH, lr_min=2e-5, decay_steps=2))
    assert [float(row[3]) for row in rows[1:]] == pytest.approx([cyclic(k) for k in range(4)], rel=1e-9)


def test_lr_finder_ramps_the_second_text_encoder_at_its_ratio(model_cache, data, tmp_path):
    config = te2_config(model_cache, data, tmp_path, lr=1e-4, text_encoder_2_lr=3e-4)
    sweep = Sweep(1e-6, 1e-3, "exponential", 10, 2, 3.0)
    functions = ramp_functions(config, sweep, ["unet", "text_encoder", "text_encoder_2"])
    ramp = ramp_lr(1e-6, 1e-3, 10, "exponential")
    assert [functions["text_encoder_2"](k) for k in range(10)] == pytest.approx([3 * ramp(k) for k in range(10)])
    assert [functions["text_encoder"](k) for k in range(10)] == [ramp(k) for k in range(10)]


# --- memory, refusals ---------------------------------------------------------------------------------------


def test_memory_forecast_counts_the_trained_second_text_encoder(model_cache, data, tiny_sdxl_dir, tmp_path):
    """AdamW on fp32 weights: its gradients (4 bytes a weight) and two optimizer states (8 bytes) join the
    forecast, and its weights are counted as trained fp32 instead of frozen bf16."""
    numel = sum(p.numel() for p in load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl").text_encoder_2.parameters())
    frozen, trained = (
        forecast_memory(te2_config(model_cache, data, tmp_path, train_text_encoder_2=on), None, "bf16")
        for on in (False, True)
    )
    assert trained.line("gradients") - frozen.line("gradients") == 4 * numel
    assert trained.line("optimizer states") - frozen.line("optimizer states") == 8 * numel
    assert trained.line("weights: text_encoder_2 (trained, fp32)") == 2 * frozen.line("weights: text_encoder_2 (frozen")
    assert "trained text_encoder and text_encoder_2" in trained.title


def test_an_sd_model_refuses_train_text_encoder_2(model_cache, data, tiny_model_dir, tmp_path, capsys):
    """Named by the key, at load time (the CLI exits 2 without a traceback) and when a model is configured."""
    arguments = ["--resume_ckpt", "tiny", "--train_text_encoder_2", "--data_root", str(data)]
    assert train.main([*arguments, "--model_cache_dir", str(model_cache), "--logdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "key 'train_text_encoder_2' = true" in err and "SD 1.x/2.x model" in err and "Traceback" not in err
    config = load_config(None, {"data_root": str(data)}).model_copy(update={"train_text_encoder_2": True})
    with pytest.raises(ConfigError, match="key 'train_text_encoder_2'"):
        configure_for_training(load_pretrained(str(tiny_model_dir), "tiny"), config)


def test_a_trained_second_text_encoder_cannot_use_the_text_embedding_cache(model_cache, data, tmp_path):
    with pytest.raises(ConfigError, match="key 'cache_text_embeddings'.*train_text_encoder_2 is true"):
        te2_config(model_cache, data, tmp_path, disable_textenc_training=True, cache_text_embeddings=True)
