"""EMA as ED2 has it (ED2 doc/ADVANCED_TWEAKING.md "EMA Decay Features"; train.py update_ema, main()): the
average's arithmetic, its cadence, the decay from ema_strength_target, its own checkpoint, samples, validation,
and exact resume with the EMA in the state."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.conftest import DEMO_DATA, tiny_config
from trainer.ema import TrainedAverage, build_average, ema_decay, sampled_weights
from trainer.loop import Trainer
from utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def small_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    module[1].bias.requires_grad_(False)  # a frozen parameter inside a trained part
    return module


def nudge(module: torch.nn.Module, amount: float) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.add_(amount)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_update_is_ed2s_formula(dtype):
    """ED2 train.py update_ema: ema = ema * decay + weights * (1 - decay), from a copy of the starting weights;
    frozen parameters are copied. fp32 weights are averaged in place; others (here fp64, as bf16 weights or a GPU's)
    through fp32 copies on the EMA's device."""
    module = small_module().to(dtype)
    start = {name: p.detach().clone().float() for name, p in module.named_parameters()}
    average = TrainedAverage({"unet": module}, decay=0.9, interval=1, device=torch.device("cpu"))
    expected = dict(start)
    for amount in (0.5, -0.25, 1.0):
        nudge(module, amount)
        average.update({"unet": module})
        for name, parameter in module.named_parameters():
            weights = parameter.detach().float()
            expected[name] = expected[name] * 0.9 + weights * 0.1 if parameter.requires_grad else weights
    saved = average.weights({"unet": module})["ema_unet"]
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=0, atol=1e-6)
    assert average.updates == 3


def test_strength_target_gives_the_decay_ed2_computes():
    """ED2 train.py main(): ema_decay_rate = ema_strength_target ** (1 / (total_steps / ema_update_interval))."""
    config = load_config(None, {"data_root": str(DEMO_DATA), "ema_strength_target": 0.1, "ema_update_interval": 5})
    decay = ema_decay(config, total_steps=200)
    assert decay == pytest.approx(0.1 ** (1 / 40), rel=1e-12)
    assert decay**40 == pytest.approx(0.1, rel=1e-9)
    rated = load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 0.99})
    assert ema_decay(rated, total_steps=200) == 0.99


def test_cadence_and_defaults_follow_ed2():
    """ED2 train.py argparse: ema_update_interval 500, ema_device cpu; an update after every interval steps."""
    config = load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 0.999})
    assert (config.ema_update_interval, config.ema_device) == (500, "cpu")
    average = TrainedAverage({"unet": small_module()}, 0.9, interval=3, device=torch.device("cpu"))
    assert [step for step in range(1, 10) if average.due(step)] == [3, 6, 9]


@pytest.mark.parametrize(
    ("nonema", "ema", "expected"),
    [(False, False, ["ema"]), (True, False, ["trained"]), (False, True, ["ema"]), (True, True, ["trained", "ema"])],
)
def test_which_weights_sample(nonema, ema, expected):
    config = load_config(
        None,
        {
            "data_root": str(DEMO_DATA),
            "ema_decay_rate": 0.9,
            "ema_sample_nonema_model": nonema,
            "ema_sample_ema_model": ema,
        },
    )
    average = TrainedAverage({"unet": small_module()}, 0.9, 1, torch.device("cpu"))
    assert sampled_weights(config, average) == expected
    assert sampled_weights(config, None) == ["trained"]


def test_bad_ema_values_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match="ema_decay_rate"):
        load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 1.5})
    with pytest.raises(ConfigError, match="ema_device"):
        load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 0.9, "ema_device": "tpu"})
    with pytest.raises(ConfigError, match="ema_resume_model"):
        load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 0.9, "ema_resume_model": "/no/such"})


EMA_RUN = dict(
    max_epochs=None,
    max_steps=4,
    batch_size=2,
    ema_decay_rate=0.8,
    ema_update_interval=2,
    save_full_precision=True,
    no_save_ckpt=True,
)


def unet_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_a_run_saves_the_ema_checkpoint_of_its_updates(model_cache, tmp_path):
    """Updates after steps 2 and 4 from the base weights: the saved `<name>_ema` checkpoint holds
    0.8 * (0.8 * base + 0.2 * w2) + 0.2 * w4, and the run's own checkpoint holds w4."""
    trainer = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path, **EMA_RUN, validation_config=None))
    base = unet_weights(trainer.unwrapped_model().unet)
    seen = {}
    for agreement in trainer.steps():
        seen[trainer.progress.global_step] = unet_weights(trainer.unwrapped_model().unet)
        assert agreement is not None
    summary = trainer.finish()
    final = summary["final_checkpoint"]
    assert Path(final["ema_diffusers"]).name == Path(final["diffusers"]).name + "_ema"
    ema_unet = UNet2DConditionModel.from_pretrained(final["ema_diffusers"], subfolder="unet")
    trained_unet = UNet2DConditionModel.from_pretrained(final["diffusers"], subfolder="unet")
    for name, parameter in ema_unet.named_parameters():
        expected = 0.8 * (0.8 * base[name] + 0.2 * seen[2][name]) + 0.2 * seen[4][name]
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-6)
    moved = [name for name, p in trained_unet.named_parameters() if not torch.equal(p.detach(), seen[4][name])]
    assert not moved, "the run's own checkpoint holds the trained weights, not the EMA"
    assert any(not torch.equal(base[name], seen[4][name]) for name in base), "the run trained"


def test_resumed_run_continues_the_ema_exactly(model_cache, tmp_path):
    """A run stopped at step 3 (between EMA updates) and resumed ends with the EMA of the run left alone."""
    run = dict(EMA_RUN, ema_update_interval=1, ema_validate=True)
    alone = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "alone", **run))
    alone.run()
    expected = alone.ema.weights(alone.trained_models())
    stopped = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "cut", **run), stop_at_step=3).run()
    assert stopped["steps"] == 3
    resumed = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "cut", **run, resume_from="latest"))
    resumed.run()
    actual = resumed.ema.weights(resumed.trained_models())
    assert resumed.ema.updates == alone.ema.updates == 4
    for part, weights in expected.items():
        for name, tensor in weights.items():
            assert torch.equal(tensor, actual[part][name]), f"{part}.{name} differs after resume"


def test_ema_validation_and_samples(model_cache, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n", encoding="utf-8")
    config = tiny_config(
        model_cache,
        DEMO_DATA,
        tmp_path,
        **dict(EMA_RUN, max_steps=2, ema_update_interval=1),
        ema_validate=True,
        ema_sample_nonema_model=True,
        ema_sample_ema_model=True,
        sample_prompts=str(prompts),
        sample_steps=2,
    )
    summary = Trainer(config).run()
    out = capsys.readouterr().out
    assert "the samples are the EMA's" not in out  # both sample keys set: no note
    assert "EMA: decay 0.8, updated every 1 steps (2 updates in the run), kept on cpu, starting from the base" in out
    assert "val_ema loss" in out
    run_dir = Path(summary["run_dir"])
    assert sorted(path.name for path in (run_dir / "samples").glob("gs*.png"))
    assert sorted(path.name for path in (run_dir / "samples" / "ema").glob("gs*.png"))
    index = json.loads((run_dir / "samples" / "ema" / "index.json").read_text())
    assert index


def test_ema_resume_model_starts_the_average_from_that_checkpoint(model_cache, tmp_path):
    first = Trainer(tiny_config(model_cache, DEMO_DATA, tmp_path / "a", **EMA_RUN, validation_config=None)).run()
    ema_checkpoint = first["final_checkpoint"]["ema_diffusers"]
    config = tiny_config(
        model_cache,
        DEMO_DATA,
        tmp_path / "a",
        **dict(EMA_RUN, max_steps=1),
        validation_config=None,
        ema_resume_model="findlast",
    )
    assert config.ema_resume_model == ema_checkpoint
    trainer = Trainer(config)
    saved = UNet2DConditionModel.from_pretrained(ema_checkpoint, subfolder="unet")
    started = trainer.ema.weights(trainer.trained_models())["ema_unet"]
    for name, parameter in saved.named_parameters():
        assert torch.equal(started[name], parameter.detach())
    trainer.close()


def test_ed2_train_json_with_ema_set_is_read_without_notes(tmp_path):
    """ED2's shipped train.json (the fixture keeps its structure) with ema_decay_rate set: the EMA keys are read
    as settings, and its nulls (ema_update_interval, ema_device) take ED2's defaults."""
    source = json.loads((ROOT / "tests" / "fixtures" / "ed2_repo" / "train.json").read_text())
    source.update({"ema_decay_rate": 0.995, "data_root": str(DEMO_DATA), "resume_ckpt": "tiny"})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(source), encoding="utf-8")
    for named in ("optimizer.json", "sample_prompts.txt", "validation_default.json"):  # train.json names them
        shutil.copy(ROOT / "tests" / "fixtures" / "ed2_repo" / named, tmp_path)
    config = load_config(path, {})
    assert (config.ema_decay_rate, config.ema_update_interval, config.ema_device) == (0.995, 500, "cpu")
    assert not [note for note in config.notes if "'ema_" in note]  # a note names its key in quotes


def test_the_sample_default_that_differs_from_ed2s_code_is_said(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n", encoding="utf-8")
    config = load_config(None, {"data_root": str(DEMO_DATA), "ema_decay_rate": 0.9, "sample_prompts": str(prompts)})
    said = []
    build_average(config, {"unet": small_module()}, 100, torch.device("cpu"), said.append)
    assert any("the samples are the EMA's, as ED2's doc says (ED2's code would draw none)" in line for line in said)
    assert any(line.startswith("EMA: decay 0.9, updated every 500 steps (0 updates in the run)") for line in said)
