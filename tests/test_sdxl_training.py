"""SDXL, the training side: the conditioning SDXL was trained with (both text encoders, the pooled embedding, the
size and crop ids), caption dropout, the caches, the VAE's precision, samples, validation, the LR finder, and short
tiny-sdxl runs whose checkpoints reload through diffusers' own loaders."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image, ImageOps

from data.images import ImageItem, load_image, size_and_crop
from data.loader import BucketBatches, ImageBatchDataset
from tests.conftest import DEMO_DATA, tiny_config
from trainer.diffusion import (
    HIDDEN_STATES,
    POOLED,
    TIME_IDS,
    added_conditioning,
    denoising_loss,
    encode_text,
    vae_distribution,
    vae_dtype,
)
from trainer.loop import Trainer, train
from trainer.lr_finder import find_lr
from trainer.model import load_pretrained
from trainer.tiny_model import tiny_sdxl_model_path
from utils.config import SDXL_RESOLUTION, ConfigError

CAPTIONS = ["a red circle", "a green square, bright", ""]
FAST = {"no_save_ckpt": True, "num_workers": 0, "validation_config": None}


@pytest.fixture(scope="module")
def tiny_sdxl_dir(model_cache) -> Path:
    return tiny_sdxl_model_path(model_cache)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory) -> Path:
    """Six captioned images: four square demo images and two cut from them to 3:2 and 2:5, which their 64 px
    bucket crops."""
    folder = tmp_path_factory.mktemp("sdxl-data")
    for name in ("scene01", "scene02", "scene03", "scene04"):
        shutil.copy(DEMO_DATA / f"{name}.png", folder)
        shutil.copy(DEMO_DATA / f"{name}.txt", folder)
    with Image.open(DEMO_DATA / "scene05.png") as image:
        image.convert("RGB").resize((300, 200)).save(folder / "wide.png")
        image.convert("RGB").resize((200, 500)).save(folder / "tall.png")
    (folder / "wide.txt").write_text("a wide scene", encoding="utf-8")
    (folder / "tall.txt").write_text("a tall scene", encoding="utf-8")
    return folder


def sdxl_config(model_cache, data, logdir, **overrides):
    return tiny_config(model_cache, data, logdir, **{"resume_ckpt": "tiny-sdxl", "batch_size": 2, **overrides})


def losses_of(run_dir: str) -> list[float]:
    rows = csv.DictReader(open(Path(run_dir) / "metrics.csv"))
    return [float(row["loss_train"]) for row in rows if row["loss_train"]]


# --- the conditioning ---------------------------------------------------------------------------------------


def test_add_time_ids_of_cropped_non_square_images(sdxl_data):
    """Expected by hand, as SDXL's conditioning (diffusers' StableDiffusionXLPipeline._get_add_time_ids order:
    original (h, w), crop (top, left), target (h, w)). 300x200 into 64x64: scaled to 96x64 to cover it, the
    centred crop starts 16 px from the left. 200x500 into 64x64: scaled to 64x160, 48 px cut from the top."""
    wide = ImageItem(sdxl_data / "wide.png", "a wide scene", 300, 200)
    tall = ImageItem(sdxl_data / "tall.png", "a tall scene", 200, 500)
    assert size_and_crop(wide, (64, 64)) == (200, 300, 0, 16, 64, 64)
    assert size_and_crop(tall, (64, 64)) == (500, 200, 48, 0, 64, 64)
    assert size_and_crop(tall, (64, 128)) == (500, 200, 16, 0, 128, 64)  # 64x160 over 64x128: 16 px off the top
    # The crop is the one the loader cuts (Pillow's ImageOps.fit, centred: bit for bit the same pixels).
    with Image.open(wide.path) as image:
        fitted = ImageOps.fit(image.convert("RGB"), (64, 64), method=Image.Resampling.LANCZOS)
    expected = torch.from_numpy(np.array(fitted)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(load_image(wide, (64, 64), flip=False), expected)
    # In a batch (flipped or not: a flip does not move the crop), as float32 rows of six.
    items = [wide, tall]
    batches = BucketBatches(items, batch_size=2, resolution=64)
    for flip_p in (0.0, 1.0):
        batch = ImageBatchDataset(items, batches, seed=1, epoch=0, flip_p=flip_p)[[0, 1]]
        assert batch[TIME_IDS].dtype == torch.float32
        assert batch[TIME_IDS].tolist() == [[200, 300, 0, 16, 64, 64], [500, 200, 48, 0, 64, 64]]


def test_text_conditioning_is_the_pipelines_encode_prompt(sdxl):
    """encode_text against diffusers' StableDiffusionXLPipeline.encode_prompt on the same captions (the empty one
    too): both encoders' penultimate hidden states side by side, and text_encoder_2's pooled text_embeds. The
    same operations in fp32 on the CPU: compared to 1e-6 (measured: equal)."""
    pipeline = sdxl.pipeline()
    hidden, _, pooled, _ = pipeline.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    with torch.no_grad():
        ours = encode_text(sdxl, CAPTIONS, 0, "cpu")
    widths = (sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size)
    assert ours[HIDDEN_STATES].shape == (3, 77, sum(widths)) == hidden.shape
    assert ours[POOLED].shape == (3, sdxl.text_encoder_2.config.projection_dim) == pooled.shape
    torch.testing.assert_close(ours[HIDDEN_STATES], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[POOLED], pooled, rtol=0, atol=1e-6)
    # clip_skip 0, 1 and 2 are SDXL's own penultimate; n > 2 the n-th last layer, diffusers' clip_skip n - 2.
    with torch.no_grad():
        for skip in (1, 2):
            torch.testing.assert_close(encode_text(sdxl, CAPTIONS, skip, "cpu")[HIDDEN_STATES], hidden, rtol=0, atol=0)
        third_last, _, _, _ = pipeline.encode_prompt(
            CAPTIONS, device="cpu", do_classifier_free_guidance=False, clip_skip=1
        )
        skipped = encode_text(sdxl, CAPTIONS, 3, "cpu")
    torch.testing.assert_close(skipped[HIDDEN_STATES], third_last, rtol=0, atol=1e-6)
    torch.testing.assert_close(skipped[POOLED], pooled, rtol=0, atol=0)  # the pooled output is the last layer's
    assert not torch.allclose(skipped[HIDDEN_STATES], hidden)


def test_the_unet_sees_the_pooled_embedding_and_the_size_ids(sdxl):
    """Changing the time ids or the pooled embedding changes the prediction, so both reach the UNet."""
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        text = encode_text(sdxl, CAPTIONS[:2], 0, "cpu")
        ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)

        def loss(conditioning, time_ids):
            added = added_conditioning(sdxl, conditioning, time_ids)
            return denoising_loss(sdxl, latents, conditioning[HIDDEN_STATES], noise, timesteps, added_cond=added)

        base, cropped = loss(text, ids), loss(text, ids + 32)
        swapped = loss({**text, POOLED: text[POOLED].flip(0)}, ids)
    assert torch.all(base != cropped) and torch.all(base != swapped)
    with pytest.raises(ValueError, match="add_time_ids"):
        added_conditioning(sdxl, text, None)


def test_caption_dropout_trains_the_empty_captions_embeddings_of_both_encoders(model_cache, sdxl, sdxl_data, tmp_path):
    """cond_dropout 1: every caption is "", and the cached conditioning the batch carries is the empty caption's
    encode_prompt (both encoders, the pooled one too), as diffusers' train_text_to_image_sdxl.py drops captions."""
    settings = dict(cond_dropout=1.0, cache_text_embeddings=True, disable_textenc_training=True, **FAST)
    config = sdxl_config(model_cache, sdxl_data, tmp_path, **settings)
    trainer = Trainer(config)
    batch = next(iter(trainer.feed.epoch_loader(0)))
    assert batch["captions"] == ["", ""]
    hidden, _, pooled, _ = sdxl.pipeline().encode_prompt([""] * 2, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(batch[HIDDEN_STATES], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[POOLED], pooled, rtol=0, atol=1e-6)
    trainer.close()


# --- the VAE's precision ----------------------------------------------------------------------------------


def test_sdxl_vae_never_runs_in_fp16(sdxl, tiny_model_dir):
    """fp16 overflows in SDXL's VAE: under fp16 it stays fp32 (bf16 is kept), unless its config says
    force_upcast false (the fp16-fix VAE's); SD 1.x keeps fp16."""
    assert vae_dtype(sdxl, torch.float16) == torch.float32
    assert vae_dtype(sdxl, torch.bfloat16) == torch.bfloat16
    assert vae_dtype(sdxl, torch.float32) == torch.float32
    sd = load_pretrained(str(tiny_model_dir), "tiny")
    assert vae_dtype(sd, torch.float16) == torch.float16
    sdxl.vae.register_to_config(force_upcast=False)
    try:
        assert vae_dtype(sdxl, torch.float16) == torch.float16
    finally:
        sdxl.vae.register_to_config(force_upcast=True)


def test_a_vae_kept_in_fp32_encodes_in_fp32_under_autocast(sdxl):
    """Autocast would compute an fp32 VAE's convolutions in low precision again: the encode runs outside it."""
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    plain = vae_distribution(sdxl, pixels).parameters
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = vae_distribution(sdxl, pixels).parameters
    assert autocast.dtype == torch.float32 and torch.equal(plain, autocast)


# --- configuration ------------------------------------------------------------------------------------------


def test_sdxl_trains_at_1024_unless_the_config_says_otherwise(model_cache, sdxl_data, tmp_path):
    from utils.config import load_config

    default = load_config(None, {"resume_ckpt": "tiny-sdxl", "data_root": str(sdxl_data)})
    assert default.resolution == SDXL_RESOLUTION == 1024
    assert any(note.startswith("resolution 1024: resume_ckpt is an SDXL model") for note in default.notes)
    given = load_config(None, {"resume_ckpt": "tiny-sdxl", "data_root": str(sdxl_data), "resolution": 512})
    assert given.resolution == 512 and not any(note.startswith("resolution") for note in given.notes)
    assert load_config(None, {"resume_ckpt": "tiny", "data_root": str(sdxl_data)}).resolution == 512


def test_vae_path_must_be_a_vae_folder(model_cache, sdxl_data, tmp_path):
    with pytest.raises(ConfigError, match="key 'vae_path' = .*no config.json inside"):
        sdxl_config(model_cache, sdxl_data, tmp_path, vae_path=str(sdxl_data), **FAST)


def test_vae_path_replaces_the_vae(model_cache, tiny_sdxl_dir, sdxl_data, tmp_path):
    """The replacement VAE (here tiny-sdxl's own, with one weight changed) is the one that encodes."""
    from diffusers import AutoencoderKL

    from trainer.model import load_model

    vae = AutoencoderKL.from_pretrained(str(tiny_sdxl_dir), subfolder="vae")
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.5)
    vae.save_pretrained(str(tmp_path / "vae"))
    config = sdxl_config(model_cache, sdxl_data, tmp_path / "logs", vae_path=str(tmp_path / "vae"), **FAST)
    model = load_model(config)
    assert torch.equal(model.vae.encoder.conv_in.bias, vae.encoder.conv_in.bias)


# --- runs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_run(model_cache, sdxl_data, tmp_path_factory):
    """Four steps of tiny-sdxl with its first text encoder training, validation, and samples of a plain and a
    compel-weighted prompt (before the first step and after the last)."""
    logdir = tmp_path_factory.mktemp("sdxl-runs")
    prompts = logdir / "samples.json"
    prompts.write_text(
        json.dumps(
            {
                "num_inference_steps": 2,
                "cfgs": [1.0, 4.0],
                "generate_pretrain_samples": True,
                "samples": [{"prompt": "a red circle"}, {"prompt": "a (red)1.4 circle", "negative_prompt": "blue--"}],
            }
        ),
        encoding="utf-8",
    )
    config = sdxl_config(
        model_cache,
        sdxl_data,
        logdir,
        max_steps=4,
        save_full_precision=True,
        sample_prompts=str(prompts),
        validation_config={"auto_split_proportion": 0.34, "every_n_epochs": 1, "timesteps": 2},
    )
    return config, train(config)


def test_short_sdxl_run_trains_validates_and_samples(sdxl_run):
    _, summary = sdxl_run
    assert summary["finite"] and math.isfinite(summary["final_train_loss"]) and summary["steps"] == 4
    run_dir = Path(summary["run_dir"])
    assert len(losses_of(run_dir)) == 4 and all(math.isfinite(loss) for loss in losses_of(run_dir))
    assert all(math.isfinite(loss) for _, loss in summary["val_loss"]["history"])
    grids = sorted(path.name for path in (run_dir / "samples").glob("*.png"))
    assert grids == ["gs00000-p0.png", "gs00000-p1.png", "gs00004-p0.png", "gs00004-p1.png"]
    plain, weighted = (Image.open(run_dir / "samples" / f"gs00004-p{i}.png") for i in (0, 1))
    assert plain.size == weighted.size == (128, 64)  # two guidance scales side by side
    assert plain.tobytes() != weighted.tobytes()


def test_sdxl_checkpoint_reloads_through_diffusers(sdxl_run, tiny_sdxl_dir):
    """The diffusers folder and the single file hold the same weights; the UNet and the first text encoder
    trained, the second text encoder stayed as it was."""
    _, summary = sdxl_run
    final = summary["final_checkpoint"]
    folder = StableDiffusionXLPipeline.from_pretrained(final["diffusers"], add_watermarker=False)
    single = StableDiffusionXLPipeline.from_single_file(
        final["single_file"], config=str(tiny_sdxl_dir), local_files_only=True, add_watermarker=False
    )
    base = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir), add_watermarker=False)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        weights, expected = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        assert all(torch.equal(weights[key], tensor) for key, tensor in expected.items()), part

    def changed(part):
        now, before = getattr(folder, part).state_dict(), getattr(base, part).state_dict()
        return any(not torch.equal(now[key], before[key]) for key in before)

    assert changed("unet") and changed("text_encoder") and not changed("text_encoder_2") and not changed("vae")


def test_cached_and_uncached_sdxl_runs_have_the_same_losses(model_cache, sdxl_data, tmp_path):
    """With both caches (latents, and both encoders' embeddings with the pooled one) a batch-size-1 run has the very
    losses and weights of one without: the cache keeps the latent distribution and samples it with the same draw
    (trainer/cache.py), and CLIP gives a caption the same states alone or in a batch."""
    settings = dict(batch_size=1, max_steps=4, flip_p=0.5, cond_dropout=0.3, disable_textenc_training=True, **FAST)
    summaries = [
        train(sdxl_config(model_cache, sdxl_data, tmp_path / name, **settings, **extra))
        for name, extra in (("plain", {}), ("cached", {"cache_latents": True, "cache_text_embeddings": True}))
    ]
    plain, cached = (losses_of(summary["run_dir"]) for summary in summaries)
    assert len(plain) == 4 and plain == cached


def test_lr_finder_sweeps_tiny_sdxl(model_cache, sdxl_data, tmp_path):
    """A short sweep, its probe on a training subset (validation off): finite probe and training losses."""
    config = sdxl_config(
        model_cache,
        sdxl_data,
        tmp_path,
        validation_config=None,
        lr_find_start=1e-5,
        lr_find_end=1e-3,
        lr_find_steps=4,
        lr_find_probe_every=2,
    )
    rows = find_lr(config).log.rows
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["step"] for row in rows if row["probe_loss"] is not None] == [0, 2, 4]
    losses = [row["probe_loss"] for row in rows if row["probe_loss"] is not None]
    losses += [row["train_loss"] for row in rows if row["train_loss"] is not None]
    assert len(losses) == 7 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize(("clip_skip", "frozen_layers"), [(0, 1), (2, 1), (3, 2)])
def test_text_encoder_parts_the_conditioning_skips_are_frozen(tiny_sdxl_dir, clip_skip, frozen_layers):
    """SDXL takes the penultimate hidden state (or an earlier one with clip_skip), without the final norm: those
    parts get no gradient, so they are frozen (data-parallel training would wait for their gradients)."""
    from trainer.model import configure_for_training
    from utils.config import load_config

    model = load_pretrained(str(tiny_sdxl_dir), "tiny-sdxl")
    configure_for_training(model, load_config(None, {"data_root": str(DEMO_DATA), "clip_skip": clip_skip}))
    layers = model.text_encoder.encoder.layers
    trains = [any(p.requires_grad for p in layer.parameters()) for layer in layers]
    assert trains == [True] * (len(layers) - frozen_layers) + [False] * frozen_layers
    assert not any(p.requires_grad for p in model.text_encoder.final_layer_norm.parameters())
