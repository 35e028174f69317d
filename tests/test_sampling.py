"""Samples: the prompt files (.txt and ED2's .json), when rounds happen, the grids and their index, and the
guarantee that sampling never changes what training does."""

import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from data.prepare import prepare_data
from tests.conftest import DEMO_DATA, ROOT, tiny_config
from trainer.loop import train
from trainer.model import load_pretrained
from trainer.sample_index import read_index
from trainer.sampling import (
    SamplePrompts,
    SampleRequest,
    SampleSettings,
    build_scheduler,
    make_samples,
    read_prompts,
    samples_due,
    size_for_aspect_ratio,
)
from utils.config import ConfigError, load_config
from utils.ed2_compat import SAMPLE_SCHEDULERS

CAPTIONS = ["a blue circle", "a green square", "a red circle", "a red square", "a yellow star", "an orange moon"]
TRAIN_ITEMS = [SimpleNamespace(caption=caption) for caption in CAPTIONS * 2]  # duplicates count once


def write(tmp_path: Path, name: str, content) -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


# --- prompt files ----------------------------------------------------------------------------------------


def test_txt_gives_one_prompt_a_line(tmp_path):
    settings = read_prompts(write(tmp_path, "p.txt", "a cat\n\n  a dog  \n"), TRAIN_ITEMS)
    assert [r.prompt for r in settings.requests] == ["a cat", "a dog"]
    assert all(r.seed is None and r.size is None for r in settings.requests)  # the run's seed and resolution
    assert settings.cfgs == (7.0, 4.0, 1.0) and settings.scheduler == "ddim"


def test_empty_file_samples_a_few_training_captions_the_same_every_time(tmp_path):
    settings = read_prompts(write(tmp_path, "empty.txt", ""), TRAIN_ITEMS)
    prompts = [r.prompt for r in settings.requests]
    assert len(prompts) == 4 and len(set(prompts)) == 4 and set(prompts) <= set(CAPTIONS)
    assert prompts == [r.prompt for r in read_prompts(write(tmp_path, "e2.txt", "\n"), TRAIN_ITEMS).requests]


def test_ed2_json_keys(tmp_path):
    path = write(
        tmp_path,
        "s.json",
        {
            "batch_size": 3,
            "seed": 99,
            "cfgs": [7.5, 1],
            "scheduler": "euler_a",
            "num_inference_steps": 12,
            "show_progress_bars": False,
            "generate_pretrain_samples": False,
            "generate_samples_every_n_steps": 40,
            "resolution": 128,
            "samples": [
                {"prompt": "a cat", "negative_prompt": "blurry", "seed": 7, "size": [64, 128]},
                {"prompt": "a dog"},
                {"prompt": "a wide dog", "aspect_ratio": 2.0},
                {"random_caption": True},
            ],
        },
    )
    settings = read_prompts(path, TRAIN_ITEMS)
    assert (settings.batch_size, settings.cfgs, settings.scheduler) == (3, (7.5, 1.0), "euler_a")
    assert (settings.num_inference_steps, settings.every_n_steps, settings.resolution) == (12, 40, 128)
    cat, dog, wide, random_caption = settings.requests
    assert cat == SampleRequest("a cat", "blurry", 7, (64, 128))
    assert dog == SampleRequest("a dog", "", 99, None)  # the file's seed is every sample's default
    assert wide.aspect_ratio == 2.0 and size_for_aspect_ratio(2.0, 512) == (704, 384)
    assert random_caption == SampleRequest("", seed=99, random_caption=True)  # a caption drawn every round
    assert settings.captions == tuple(sorted(CAPTIONS))


def test_the_post_sample_file_samples_the_same_four_training_captions_every_round(tiny_model, tmp_path):
    """The same prompts at every step, so compare.py can put a run's samples at its minimum beside its end."""
    settings = read_prompts(str(ROOT / "configs" / "post_samples.json"), TRAIN_ITEMS)
    settings = replace(settings, num_inference_steps=1, cfgs=(1.0,))
    for step in (10, 20):
        make_samples(tiny_model, settings, tmp_path, step, 64, torch.device("cpu"), seed=555)
    index = read_index(tmp_path)
    prompts = [entry["prompt"] for entry in index[10].values()]
    assert len(set(prompts)) == 4 and set(prompts) <= set(CAPTIONS) and settings.batch_size == 4
    assert [entry["prompt"] for entry in index[20].values()] == prompts


def test_json_without_samples_uses_training_captions(tmp_path):
    settings = read_prompts(write(tmp_path, "s.json", {"seed": 5}), TRAIN_ITEMS)
    assert len(settings.requests) == 4 and all(r.seed == 5 for r in settings.requests)


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"cfgs": "7"}, "key 'cfgs'"),
        ({"cfgs": [7, -1]}, "key 'cfgs'"),
        ({"scheduler": "eulr_a"}, "did you mean 'euler_a'"),
        ({"num_inference_steps": 0}, "key 'num_inference_steps'"),
        ({"batchsize": 2}, "unknown key 'batchsize' (did you mean 'batch_size'?)"),
        ({"samples": [{"promt": "x"}]}, "unknown key 'samples[0].promt' (did you mean 'prompt'?)"),
        ({"samples": [{"prompt": "x"}, {"prompt": "y", "size": [500, 512]}]}, "key 'samples[1].size'"),
        ({"samples": [{"negative_prompt": "x"}]}, "give a prompt, or random_caption: true"),
        ({"samples": [{"prompt": "x", "size": [64, 64], "aspect_ratio": 1}]}, "not both"),
        ({"samples": [{"prompt": "x", "seed": -2}]}, "key 'samples[0].seed'"),
        ({"samples": [{"prompt": "x", "cfgs": []}]}, "key 'samples[0].cfgs'"),
        ({"scheduler": "dpm++", "generate_pretrain_samples": "sometimes"}, "key 'generate_pretrain_samples'"),
        ('{"cfgs": [7, 4,]}', "not valid JSON"),
        ([{"prompt": "x"}], "must hold a JSON object"),
    ],
)
def test_json_errors_name_the_key(tmp_path, content, expected):
    with pytest.raises(ConfigError) as error:
        read_prompts(write(tmp_path, "bad.json", content), TRAIN_ITEMS)
    assert expected in str(error.value) and "bad.json" in str(error.value)


def test_other_file_types_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="key 'sample_prompts'.*.txt.*.json"):
        read_prompts(write(tmp_path, "p.yaml", "prompt: x"), TRAIN_ITEMS)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is not None, reason="scipy is installed: lms works")
def test_scheduler_with_a_missing_package_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match='key .scheduler. = "lms": needs the scipy package'):
        read_prompts(write(tmp_path, "s.json", {"scheduler": "lms"}), TRAIN_ITEMS)


def test_every_ed2_scheduler_name_builds(tiny_model):
    optional = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}
    for name, (class_name, _) in SAMPLE_SCHEDULERS.items():
        if class_name in optional and importlib.util.find_spec(optional[class_name]) is None:
            continue
        scheduler = build_scheduler(name, tiny_model.noise_scheduler.config)
        assert type(scheduler).__name__ == class_name
        assert scheduler.config.num_train_timesteps == tiny_model.noise_scheduler.config.num_train_timesteps


# --- when ------------------------------------------------------------------------------------------------


def test_samples_due_every_n_steps_or_epochs_and_never_on_the_last_step():
    plan = SimpleNamespace(steps_per_epoch=4, total_steps=20)
    txt = SampleSettings(requests=())

    def due(sample_steps, every_n_epochs=None, settings=txt):
        config = SimpleNamespace(sample_steps=sample_steps, sample_every_n_epochs=every_n_epochs)
        return [step for step in range(1, 21) if samples_due(step, plan, config, settings)]

    assert due(5) == [5, 10, 15]  # 20 is the last step: the end of the run samples it
    assert due(5, every_n_epochs=2) == [8, 16]
    assert due(5, every_n_epochs=0.5) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert due(5, settings=SampleSettings(requests=(), every_n_steps=6)) == [6, 12, 18]  # ED2's file key


# --- making samples --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return load_pretrained(str(tiny_model_dir), "tiny")


def fast_settings(*requests, **options):
    return SampleSettings(requests=tuple(requests), **{"num_inference_steps": 3, **options})


def test_grids_index_and_fixed_seeds(tiny_model, tmp_path):
    settings = fast_settings(SampleRequest("a red circle"), SampleRequest("a tall square", "red", 7, (64, 128)))
    results = make_samples(tiny_model, settings, tmp_path, 40, 64, torch.device("cpu"), seed=555)
    assert [path.name for path, _ in results] == ["gs00040-p0.png", "gs00040-p1.png"]
    assert [grid.shape for _, grid in results] == [(64, 64 * 3, 3), (128, 64 * 3, 3)]  # a column per cfg
    index = read_index(tmp_path)
    assert list(index) == [40] and index[40][1] == {
        "file": "gs00040-p1.png",
        "prompt": "a tall square",
        "negative_prompt": "red",
        "seed": 7,
        "size": [64, 128],
        "cfgs": [7.0, 4.0, 1.0],
        "scheduler": "ddim",
        "num_inference_steps": 3,
    }
    assert index[40][0]["seed"] == 555  # the run's seed when the file gives none

    again = make_samples(tiny_model, settings, tmp_path, 80, 64, torch.device("cpu"), seed=555)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(results, again, strict=True))  # same prompt, same seed
    assert sorted(read_index(tmp_path)) == [40, 80]  # rounds accumulate


def test_sampling_leaves_every_rng_and_training_mode_alone(tiny_model, tmp_path):
    tiny_model.unet.train()
    tiny_model.text_encoder.train()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    expected = torch.rand(3), np.random.rand(3), random.random()
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    make_samples(tiny_model, fast_settings(SampleRequest("x", seed=-1)), tmp_path, 1, 64, torch.device("cpu"), 3)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert tiny_model.unet.training and tiny_model.text_encoder.training


def test_batching_does_not_change_the_images(tiny_model, tmp_path):
    requests = [SampleRequest("a red circle", seed=1), SampleRequest("a green square", seed=2)]
    one = make_samples(tiny_model, fast_settings(*requests), tmp_path / "one", 1, 64, torch.device("cpu"), 0)
    two = make_samples(
        tiny_model, fast_settings(*requests, batch_size=2), tmp_path / "two", 1, 64, torch.device("cpu"), 0
    )
    for (_, alone), (_, batched) in zip(one, two, strict=True):
        assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 2  # float noise of a bigger batch only


def test_a_samples_own_cfgs_are_its_columns(tiny_model, tmp_path):
    """ED2's shipped sample_prompts.json gives its third sample "cfgs": [1, 11]: that sample gets those two columns,
    the others the file's."""
    settings = fast_settings(
        SampleRequest("a red circle", seed=1),
        SampleRequest("a blue square", seed=1, cfgs=(1.0, 11.0, 3.0)),
        cfgs=(7.0,),
    )
    results = make_samples(tiny_model, settings, tmp_path, 5, 64, torch.device("cpu"), seed=0)
    assert [grid.shape[1] for _, grid in results] == [64, 64 * 3]
    assert [entry["cfgs"] for entry in read_index(tmp_path)[5].values()] == [[7.0], [1.0, 11.0, 3.0]]


def test_seed_minus_one_draws_a_new_seed_every_round_and_the_index_says_so(tiny_model, tmp_path):
    settings = fast_settings(
        SampleRequest("a red circle", seed=-1),
        SampleRequest("a blue square", seed=4),
        cfgs=(1.0,),
        num_inference_steps=1,
    )
    for step in (1, 2):
        make_samples(tiny_model, settings, tmp_path, step, 64, torch.device("cpu"), seed=0)
    index = read_index(tmp_path)
    assert index[1][0]["random_seed"] is True and index[1][0]["seed"] != index[2][0]["seed"]
    assert "random_seed" not in index[1][1] and index[1][1]["seed"] == index[2][1]["seed"] == 4


def test_weighted_prompts_are_encoded_by_compel(tiny_model, tmp_path):
    """ED2 utils/sample_generator.py generate_samples builds the prompt embeddings with compel: "red++" weighs the
    word up, so the picture changes; A1111's "(red:1.21)" is read as compel's "(red)1.21", the same weight."""
    pytest.importorskip("compel")
    prompts = ["a red circle", "a red++ circle", "a (red:1.21) circle", "a (red)1.21 circle"]
    settings = fast_settings(*(SampleRequest(prompt, seed=3) for prompt in prompts), cfgs=(7.0,))
    plain, weighted, a1111, compel_syntax = (
        grid for _, grid in make_samples(tiny_model, settings, tmp_path, 1, 64, torch.device("cpu"), seed=0)
    )
    assert not np.array_equal(plain, weighted)
    assert np.array_equal(weighted, a1111) and np.array_equal(a1111, compel_syntax)  # 1.1 ** 2 = 1.21
    alone = make_samples(
        tiny_model,
        fast_settings(SampleRequest("a red circle", seed=3), cfgs=(7.0,)),
        tmp_path / "b",
        1,
        64,
        torch.device("cpu"),
        seed=0,
    )
    assert np.array_equal(alone[0][1], plain)  # plain prompts keep the pipeline's own encoding


def sample_config(**values):
    return load_config(None, {"data_root": str(DEMO_DATA), **values})


def test_the_file_is_read_again_before_every_round_and_a_broken_edit_keeps_the_last_prompts(tmp_path):
    """ED2 utils/sample_generator.py SampleGenerator.reload_config runs before every round; on an error it warns and
    keeps the sample requests it had. (ED2 also switches to a new generate_samples_every_n_steps; here the interval
    of the start stays, so that every GPU process samples at the same steps: docs/ed2.md.)"""
    path = write(tmp_path, "s.json", {"samples": [{"prompt": "a cat"}]})
    said = []
    prompts = SamplePrompts(path, TRAIN_ITEMS, sample_config(), said.append)
    write(tmp_path, "s.json", {"generate_samples_every_n_steps": 50, "samples": [{"prompt": "a dog"}]})
    assert [r.prompt for r in prompts.reread().requests] == ["a dog"]
    assert prompts.settings.every_n_steps is None  # every process keeps sampling at the same steps
    assert any("changed in the file; this run keeps the interval it started with" in line for line in said)
    write(tmp_path, "s.json", '{"samples": [{"prompt": "a bird",}]}')
    assert [r.prompt for r in prompts.reread().requests] == ["a dog"]
    assert any(
        line.startswith("warning: sample_prompts file")
        and "not valid JSON" in line
        and "previous sample prompts are kept" in line
        for line in said
    )


def test_an_ed2_configs_sample_interval_is_counted_in_batches(tmp_path):
    """ED2 train.py: samples when (global_step + 1) % sample_steps == 0, global_step counting batches; the file's
    generate_samples_every_n_steps replaces sample_steps (SampleGenerator._reload_config_json). At grad_accum 4,
    100 batches are 25 optimizer steps."""
    path = write(tmp_path, "s.json", {"generate_samples_every_n_steps": 100, "samples": [{"prompt": "a cat"}]})
    ed2 = load_config(write_config(tmp_path, {"data_root": str(DEMO_DATA), "grad_accum": 4, "gpuid": 0}))
    said = []
    assert SamplePrompts(path, TRAIN_ITEMS, ed2, said.append).settings.every_n_steps == 25
    assert any("counted in batches in ED2" in line for line in said)
    assert SamplePrompts(path, TRAIN_ITEMS, sample_config(grad_accum=4), said.append).settings.every_n_steps == 100


def write_config(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


# --- during training -------------------------------------------------------------------------------------


def test_training_with_samples_trains_exactly_like_without(model_cache, tmp_path):
    sample_file = write(
        tmp_path,
        "samples.json",
        {
            "num_inference_steps": 2,
            "cfgs": [4, 1],
            "generate_pretrain_samples": True,
            "samples": [{"prompt": "a red circle on a blue background"}, {"random_caption": True, "seed": 3}],
        },
    )
    summaries = {}
    for name, samples in (("with", {"sample_prompts": sample_file, "sample_steps": 3}), ("without", {})):
        config = tiny_config(
            model_cache,
            DEMO_DATA,
            tmp_path / name,
            max_epochs=2,
            no_save_ckpt=True,
            flip_p=0.5,
            cond_dropout=0.2,
            **samples,
        )
        summaries[name] = train(config)
    weights = {
        name: UNet2DConditionModel.from_pretrained(
            summary["final_checkpoint"]["diffusers"], subfolder="unet"
        ).state_dict()
        for name, summary in summaries.items()
    }
    assert all(torch.equal(weights["with"][key], weights["without"][key]) for key in weights["with"])

    run_dir = Path(summaries["with"]["run_dir"])
    assert summaries["with"]["steps"] == 8
    index = read_index(run_dir / "samples")
    assert sorted(index) == [0, 3, 6, 8]  # before the first step (generate_pretrain_samples), every 3, the end
    all_images = prepare_data(tiny_config(model_cache, DEMO_DATA, tmp_path, validation_config=None)).train
    drawn = [index[step][1]["prompt"] for step in sorted(index)]
    assert set(drawn) <= {item.caption for item in all_images}  # validation images' captions count too
    assert len(set(drawn)) > 1 and all(index[step][1]["random_caption"] for step in index)
    assert all((run_dir / "samples" / entry["file"]).is_file() for step in index.values() for entry in step.values())
    assert not (Path(summaries["without"]["run_dir"]) / "samples").exists()
    assert image_tags(run_dir) == {"samples/prompt_0", "samples/prompt_1"}


def image_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return set(events.Tags()["images"])
