"""cache_latents, latent_cache_dir and cache_text_embeddings (trainer/cache.py): the same training as without
them, every flip cached, a disk cache reused across runs, the config checks, and no image decoded per step."""

import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data.images
import data.loader
from data.captions import Tag
from data.images import ImageItem, ImageLoadError, load_image
from data.loader import ImageBatchDataset
from tests.conftest import DEMO_DATA, tiny_config
from trainer import cache as cache_module
from trainer.cache import (
    LatentLookup,
    TrainingCaches,
    build_latent_cache,
    latent_jobs,
    possible_captions,
    possible_flips,
    vae_identity,
)
from trainer.diffusion import sample_cached_latents, vae_distribution
from trainer.loop import Trainer
from trainer.lr_finder import find_lr
from utils.config import ConfigError

FAST = {"no_save_ckpt": True, "num_workers": 0}


def config_for(model_cache, logdir, data_root=DEMO_DATA, **overrides):
    return tiny_config(model_cache, data_root, logdir, **{**FAST, **overrides})


def trained(config) -> tuple[dict, dict]:
    """Run summary and the UNet weights at the end of the run."""
    trainer = Trainer(config)
    summary = trainer.run()
    return summary, {key: value.detach().clone() for key, value in trainer.unwrapped_model().unet.state_dict().items()}


def relative_difference(first: dict, second: dict) -> float:
    squared = sum(((first[key] - second[key]).double() ** 2).sum().item() for key in first)
    return math.sqrt(squared) / math.sqrt(sum((first[key].double() ** 2).sum().item() for key in first))


# --- (1) and (4): the same training with and without the caches ----------------------------------------------


def test_cached_latents_train_bit_identically_at_batch_size_1(model_cache, tmp_path):
    """The cache stores the latent distribution and every step samples it with the same global-RNG draw as an
    uncached encode: with one image per batch, both encode the same single image, so the run is bit-identical."""
    settings = dict(batch_size=1, max_epochs=1, flip_p=0.5, cond_dropout=0.1, validation_config=None)
    _, plain = trained(config_for(model_cache, tmp_path / "plain", **settings))
    _, cached = trained(config_for(model_cache, tmp_path / "cached", cache_latents=True, **settings))
    assert all(torch.equal(plain[key], cached[key]) for key in plain)


@pytest.fixture(scope="module")
def frozen_text_runs(model_cache, tmp_path_factory):
    """Batch 4, two epochs, flips, caption dropout and validation, with a frozen text encoder (what
    cache_text_embeddings needs): without caches, with cached latents, with cached text embeddings."""
    logdir = tmp_path_factory.mktemp("cache-runs")
    settings = dict(max_epochs=2, flip_p=0.5, cond_dropout=0.1, disable_textenc_training=True)
    return {
        name: trained(config_for(model_cache, logdir / name, **settings, **extra))
        for name, extra in (
            ("plain", {}),
            ("latents", {"cache_latents": True}),
            ("text", {"cache_text_embeddings": True}),
        )
    }


def test_cached_latents_train_like_uncached_at_batch_size_4(frozen_text_runs):
    """Not bit-identical at batch 4, and it cannot be: the uncached run encodes each step's batch of 4 in one VAE
    call, the cache encodes a bucket's images in chunks of batch_size in another composition, and the CPU
    convolutions give results that depend on the batch (measured: up to 1.1e-6 in the latent parameters).
    AdamW's normalised update turns such differences on weights whose gradient is near 0 into differences of
    up to about lr per step (measured: 1.6e-4 at most, lr 1e-4), so the weights are compared as a whole:
    measured 1.7e-5 relative (L2) after 8 steps, bound 1e-4. The validation losses agree to 1.5e-7 relative
    (bound 1e-6). At batch size 1 the two encodes are the same call and the runs are bit-identical (above)."""
    (plain_summary, plain), (cached_summary, cached) = frozen_text_runs["plain"], frozen_text_runs["latents"]
    assert relative_difference(plain, cached) < 1e-4
    plain_val = [loss for _, loss in plain_summary["val_loss"]["history"]]
    cached_val = [loss for _, loss in cached_summary["val_loss"]["history"]]
    assert len(plain_val) == len(cached_val) == 3
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(plain_val, cached_val, strict=True))


def test_cached_text_embeddings_train_bit_identically(frozen_text_runs):
    """CLIP's forward on the CPU gives the same hidden states for a caption alone or in a batch (checked), so a
    run with cached embeddings, "" from caption dropout included, has the very losses and weights of one without."""
    (plain_summary, plain), (text_summary, text) = frozen_text_runs["plain"], frozen_text_runs["text"]
    assert all(torch.equal(plain[key], text[key]) for key in plain)
    assert plain_summary["final_train_loss"] == text_summary["final_train_loss"]
    assert plain_summary["val_loss"]["history"] == text_summary["val_loss"]["history"]


def test_sampling_cached_parameters_is_the_vaes_own_sample(model_cache, tmp_path):
    """sample_cached_latents draws exactly what latent_dist.sample() draws from the same RNG state."""
    trainer = Trainer(config_for(model_cache, tmp_path, validation_config=None))
    model = trainer.unwrapped_model()
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        dist = model.vae.encode(pixels).latent_dist
    torch.manual_seed(7)
    expected = dist.sample().float() * model.vae_scale
    torch.manual_seed(7)
    assert torch.equal(sample_cached_latents(dist.parameters, model.vae_scale, "cpu"), expected)


# --- (2) flips ------------------------------------------------------------------------------------------------


def item(name: str, **settings) -> ImageItem:
    return ImageItem(Path(name), name, 64, 64, **settings)


def test_the_flips_that_can_occur_are_cached():
    assert possible_flips(item("a"), 0.0) == (False,)
    assert possible_flips(item("a"), 1.0) == (True,)
    assert possible_flips(item("a"), 0.5) == (False, True)
    assert possible_flips(item("a", flip_p=0.0), 0.5) == (False,)  # the image's own value wins
    assert possible_flips(item("a", flip_p=1.0), 0.0) == (True,)
    items = [item("a"), item("b", flip_p=1.0), item("c", multiply=0.0)]  # multiply 0: never trained, not cached
    keys = {job.key for job in latent_jobs(items, [(64, 64)] * 3, 0.5)}
    assert keys == {("a", (64, 64), False), ("a", (64, 64), True), ("b", (64, 64), True)}


def test_a_flipped_sample_gets_the_flipped_latent(model_cache, demo_copy, tmp_path):
    (demo_copy / "scene02.yaml").write_text("flip_p: 1\n")
    (demo_copy / "scene03.yaml").write_text("flip_p: 0\n")
    trainer = Trainer(
        config_for(
            model_cache, tmp_path, demo_copy, batch_size=1, flip_p=0.5, cache_latents=True, validation_config=None
        )
    )
    lookup, model = trainer.caches.latents, trainer.unwrapped_model()
    flips = {}
    for path, _, flip in lookup.entries:
        flips.setdefault(Path(path).name, set()).add(flip)
    assert len(flips) == 20 and lookup.encoded == len(lookup) == 38
    assert flips["scene02.png"] == {True} and flips["scene03.png"] == {False} and flips["scene04.png"] == {False, True}

    dataset = ImageBatchDataset(
        trainer.data.train, trainer.data.batches, seed=trainer.seed, epoch=0, flip_p=0.5, latents=lookup
    )
    index = next(i for i, it in enumerate(trainer.data.train) if it.path.name == "scene04.png")
    size = trainer.data.batches.item_buckets[index]
    copies = [index + copy * len(dataset.items) for copy in range(50)]  # samples of scene04: its copies
    flipped = next(sample for sample in copies if dataset.should_flip(sample))
    unflipped = next(sample for sample in copies if not dataset.should_flip(sample))
    item04 = trainer.data.train[index]
    with torch.no_grad():
        expected = {
            flip: vae_distribution(model, load_image(item04, size, flip)[None]).parameters[0] for flip in (False, True)
        }
    assert torch.equal(dataset[[flipped]]["latents"][0], expected[True])
    assert torch.equal(dataset[[unflipped]]["latents"][0], expected[False])
    assert not torch.equal(expected[True], expected[False])


# --- (3) the disk cache -------------------------------------------------------------------------------------


def test_disk_cache_is_reused_and_a_changed_image_is_encoded_again(model_cache, demo_copy, tmp_path, capsys):
    cache_dir = tmp_path / "latents"
    config = config_for(
        model_cache,
        tmp_path / "runs",
        demo_copy,
        max_steps=2,
        flip_p=0.5,
        validation_config=None,
        cache_latents=True,
        latent_cache_dir=str(cache_dir),
    )
    first = Trainer(config)
    assert first.run()["steps"] == 2
    assert (first.caches.latents.encoded, first.caches.latents.reused) == (40, 0)
    files = sorted(cache_dir.rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 40
    assert not [f for f in files if f.name.startswith(".")]  # atomic writes leave no temporary file

    capsys.readouterr()
    second = Trainer(config)
    assert (second.caches.latents.encoded, second.caches.latents.reused) == (0, 40)
    assert "40 reused, 0 encoded" in capsys.readouterr().out
    # What the files hold is what the memory cache holds.
    memory = build_latent_cache(
        second.unwrapped_model(),
        second.data.train,
        second.data.batches.item_buckets,
        config.model_copy(update={"latent_cache_dir": None}),
        second.accelerator,
        print,
    )
    for key, value in memory.entries.items():
        assert torch.equal(load_file(second.caches.latents.entries[key])["parameters"], value)

    with Image.open(demo_copy / "scene03.png") as image:
        changed = image.convert("RGB")
    changed.putpixel((0, 0), (255, 0, 255))
    changed.save(demo_copy / "scene03.png")
    third = Trainer(config)
    assert (third.caches.latents.encoded, third.caches.latents.reused) == (2, 38)  # its two flips


def test_another_vae_gets_another_identity(model_cache, tmp_path):
    trainer = Trainer(config_for(model_cache, tmp_path, validation_config=None))
    vae = trainer.unwrapped_model().vae
    before = vae_identity(vae, "no")
    assert vae_identity(vae, "no") == before and vae_identity(vae, "fp16") != before
    with torch.no_grad():
        next(vae.parameters()).view(-1)[0] += 1.0
    assert vae_identity(vae, "no") != before


# --- (5) the config checks ------------------------------------------------------------------------------------


def test_text_cache_is_refused_when_the_text_encoder_trains_or_captions_are_shuffled(model_cache, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"key 'cache_text_embeddings': the text encoder trains "
        r"\(disable_textenc_training is false\)",
    ):
        config_for(model_cache, tmp_path, cache_text_embeddings=True)
    with pytest.raises(ConfigError, match=r"key 'cache_text_embeddings': shuffle_tags is on"):
        config_for(model_cache, tmp_path, cache_text_embeddings=True, disable_textenc_training=True, shuffle_tags=True)
    with pytest.raises(ConfigError, match=r"key 'latent_cache_dir': it is used only with cache_latents true"):
        config_for(model_cache, tmp_path, latent_cache_dir=str(tmp_path / "latents"))


def test_text_cache_is_refused_when_an_images_own_settings_shuffle_its_tags(model_cache, demo_copy, tmp_path):
    config = config_for(
        model_cache, tmp_path, cache_text_embeddings=True, disable_textenc_training=True, validation_config=None
    )
    tags = tuple(Tag(text) for text in ("red", "round", "small"))
    assert possible_captions([item("a", tags=tags[:1], shuffle_tags=True)], config) == ["a, red"]  # nothing to shuffle
    assert possible_captions([item("a", tags=tags, shuffle_tags=True, keep_tags=2)], config) == ["a, red, round, small"]
    assert possible_captions([item("a", cond_dropout=0.1), item("b")], config) == ["", "a", "b"]
    (demo_copy / "scene05.yaml").write_text("caption: a scene, red, round, small\nshuffle_tags: true\n")
    with pytest.raises(ConfigError, match=r"key 'cache_text_embeddings': 1 image\(s\) shuffle their tags .*scene05"):
        Trainer(config.model_copy(update={"data_root": str(demo_copy)}))


# --- (6) no image is decoded with cached latents --------------------------------------------------------------


def test_training_on_cached_latents_decodes_no_image(model_cache, tmp_path, monkeypatch):
    trainer = Trainer(
        config_for(
            model_cache,
            tmp_path,
            max_steps=3,
            cache_latents=True,
            cache_text_embeddings=True,
            disable_textenc_training=True,
            cond_dropout=0.1,
        )
    )

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded during training")

    monkeypatch.setattr(data.loader, "load_image", no_decoding)
    monkeypatch.setattr(data.images, "load_image", no_decoding)
    batch = next(iter(trainer.feed.epoch_loader(0)))
    assert "pixel_values" not in batch and set(batch) >= {
        "latents",
        "encoder_hidden_states",
        "captions",
        "paths",
        "loss_scales",
        "failed",
    }
    assert batch["latents"].shape == (len(batch["captions"]), 8, 8, 8)  # mean and logvar of 4 latent channels
    assert batch["encoder_hidden_states"].shape[0] == len(batch["captions"])
    trainer.train()
    assert trainer.progress.global_step == 3 and not trainer.progress.failed_images
    assert trainer.validate() is not None


def test_an_image_that_failed_in_the_pass_is_left_out_of_its_steps():
    items = [item("good.png"), item("bad.png")]
    lookup = LatentLookup(
        {("good.png", (64, 64), False): torch.zeros(8, 8, 8)}, {"bad.png": "cannot load bad.png: truncated"}
    )
    dataset = ImageBatchDataset(items, SimpleNamespace(item_buckets=[(64, 64)] * 2), seed=0, epoch=0, latents=lookup)
    batch = dataset[[0, 1]]
    assert batch["paths"] == ["good.png"] and [entry.reason for entry in batch["failed"]] == [
        "cannot load bad.png: truncated"
    ]
    with pytest.raises(ImageLoadError, match="no image in the batch"):
        dataset[[1]]


# --- the LR finder, several processes, the device bookkeeping --------------------------------------------------


def test_lr_finder_runs_with_both_caches(model_cache, tmp_path):
    config = config_for(
        model_cache,
        tmp_path,
        validation_config=None,
        lr_find_steps=4,
        lr_find_probe_every=2,
        lr_find_probe_images=3,
        cache_latents=True,
        cache_text_embeddings=True,
        disable_textenc_training=True,
    )
    result = find_lr(config)
    assert len(result.log.rows) == 5 and all(math.isfinite(row["train_loss"]) for row in result.log.rows[1:])


class FakeProcess:
    """Process `index` of `count`, on the CPU: what build_latent_cache asks of an accelerator."""

    def __init__(self, index: int, count: int, accelerator):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0
        self.device, self.mixed_precision, self.autocast = accelerator.device, "no", contextlib.nullcontext

    def wait_for_everyone(self):
        pass


def test_each_process_encodes_its_share_and_the_shares_make_the_whole(model_cache, tmp_path, monkeypatch):
    config = config_for(model_cache, tmp_path, validation_config=None, cache_latents=True, flip_p=0.5, batch_size=1)
    trainer = Trainer(config)
    model, items, buckets = trainer.unwrapped_model(), trainer.data.train, trainer.data.batches.item_buckets
    whole = trainer.caches.latents
    monkeypatch.setattr(cache_module, "gather_object", lambda shares: shares)  # each process alone: its own share
    shares = [
        build_latent_cache(model, items, buckets, config, FakeProcess(rank, 2, trainer.accelerator), print)
        for rank in (0, 1)
    ]
    assert shares[0].encoded + shares[1].encoded == whole.encoded == 40
    assert not set(shares[0].entries) & set(shares[1].entries)
    assert set(shares[0].entries) | set(shares[1].entries) == set(whole.entries)
    for share in shares:
        assert all(torch.equal(value, whole.entries[key]) for key, value in share.entries.items())


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(str(args[0]))
        return self


def test_cached_parts_leave_the_device_and_come_back_for_validation_and_samples():
    model = SimpleNamespace(vae=Recorder(), text_encoder=Recorder())
    lookup = LatentLookup({}, {})
    caches = TrainingCaches(latents=lookup, model=model, device=torch.device("cuda"))
    caches.offload()
    assert caches.offloaded == ("vae",) and model.vae.moves == ["cpu"] and model.text_encoder.moves == []
    with caches.parts_on_device("vae", "text_encoder"):
        assert model.vae.moves == ["cpu", "cuda"] and model.text_encoder.moves == []
    assert model.vae.moves == ["cpu", "cuda", "cpu"]
    on_cpu = TrainingCaches(latents=lookup, model=SimpleNamespace(vae=Recorder()), device=torch.device("cpu"))
    on_cpu.offload()
    assert on_cpu.offloaded == () and on_cpu.model.vae.moves == []
