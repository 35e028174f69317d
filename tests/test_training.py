"""End to end: real training runs of the tiny model on the demo images, on the CPU."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from data.plan import plan_run
from data.prepare import prepare_data
from tests.conftest import DEMO_DATA, tiny_config
from trainer.loop import train


@pytest.fixture(scope="module")
def short_run(model_cache, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    config = tiny_config(model_cache, DEMO_DATA, logdir, save_full_precision=True, max_epochs=2)
    return config, train(config)


def state_dicts(pipeline):
    return {name: getattr(pipeline, name).state_dict() for name in ("unet", "vae", "text_encoder")}


def test_short_run_trains_and_validates(short_run):
    config, summary = short_run
    assert summary["finite"] and math.isfinite(summary["final_train_loss"])
    assert summary["steps"] == 2 * summary["steps_per_epoch"]
    val_steps = [step for step, _ in summary["val_loss"]["history"]]
    assert val_steps == [0, summary["steps_per_epoch"], 2 * summary["steps_per_epoch"]]
    assert all(math.isfinite(loss) for _, loss in summary["val_loss"]["history"])


def test_run_folder_has_config_metrics_plots(short_run):
    config, summary = short_run
    run_dir = Path(summary["run_dir"])
    effective = json.loads((run_dir / "config.json").read_text())
    assert effective["lr_warmup_steps"] is None and effective["batch_size"] == 4  # every default written
    assert set(effective) >= {"lr", "flip_p", "clip_skip", "validation_config"}
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert {"step", "epoch", "lr_unet", "lr_text_encoder", "loss_train", "loss_val"} <= set(rows[0])
    assert any(row["loss_val"] for row in rows) and any(row["loss_train"] for row in rows)
    assert (run_dir / "plots" / "lr.png").stat().st_size > 0
    assert (run_dir / "plots" / "loss.png").stat().st_size > 0
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "run_summary.json").read_text())["steps"] == summary["steps"]


def test_checkpoints_load_with_equal_weights(short_run, tiny_model_dir):
    _, summary = short_run
    final = summary["final_checkpoint"]
    from_folder = StableDiffusionPipeline.from_pretrained(final["diffusers"])
    from_file = StableDiffusionPipeline.from_single_file(
        final["single_file"], config=str(tiny_model_dir), local_files_only=True
    )
    base = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir))
    folder_sd, file_sd, base_sd = state_dicts(from_folder), state_dicts(from_file), state_dicts(base)
    for part in folder_sd:
        for key, tensor in folder_sd[part].items():
            assert torch.equal(tensor, file_sd[part][key]), f"{part}.{key} differs between the two formats"
    changed = any(not torch.equal(folder_sd["unet"][k], base_sd["unet"][k]) for k in base_sd["unet"])
    assert changed, "training did not change the UNet"


def test_steps_per_epoch_follow_split_and_batch(model_cache, tmp_path):
    with_val = tiny_config(model_cache, DEMO_DATA, tmp_path)
    data = prepare_data(with_val)
    assert (data.found, len(data.train), len(data.val)) == (20, 16, 4)
    assert plan_run(data.batches.num_batches, 1, 200, None).steps_per_epoch == 4
    without_val = tiny_config(model_cache, DEMO_DATA, tmp_path, validation_config=None)
    data = prepare_data(without_val)
    assert (len(data.train), len(data.val)) == (20, 0)
    assert plan_run(data.batches.num_batches, 1, 200, None).steps_per_epoch == 5
    assert plan_run(data.batches.num_batches, 2, 200, None).steps_per_epoch == 3


def test_corrupt_image_is_skipped_and_reported(model_cache, demo_copy, tmp_path):
    (demo_copy / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (demo_copy / "broken.txt").write_text("a broken image")
    config = tiny_config(
        model_cache, demo_copy, tmp_path / "runs", max_epochs=1, validation_config=None, no_save_ckpt=True
    )
    summary = train(config)
    assert summary["images"] == {"found": 20, "skipped": 1, "train": 20, "validation": 0}
    report = (tmp_path / "runs").glob("*/skipped_images.txt")
    assert "broken.jpg" in next(report).read_text()


def test_validation_does_not_change_the_training_trajectory(model_cache, tmp_path):
    """Validating every half epoch or only at the start and end gives bit-identical weights."""
    results = []
    for every in (0.5, 100):
        config = tiny_config(
            model_cache,
            DEMO_DATA,
            tmp_path / f"v{every}",
            max_epochs=1,
            no_save_ckpt=True,
            flip_p=0.5,
            cond_dropout=0.1,
            validation_config={"auto_split_proportion": 0.2, "every_n_epochs": every, "timesteps": 2},
        )
        summary = train(config)
        results.append(summary)
    assert len(results[0]["val_loss"]["history"]) > len(results[1]["val_loss"]["history"])
    first, second = (
        UNet2DConditionModel.from_pretrained(r["final_checkpoint"]["diffusers"], subfolder="unet").state_dict()
        for r in results
    )
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_extra_validation_sets_and_stabilized_train_loss_are_measured(model_cache, demo_copy, tmp_path):
    """ED2's extra_manual_datasets (loss/<name>) and stabilize_training_loss (loss/stabilize-train)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = tmp_path / "extra"
    extra.mkdir()
    for image in sorted(demo_copy.glob("scene0*.png"))[:3]:
        image.rename(extra / image.name)
    config = tiny_config(
        model_cache,
        demo_copy,
        tmp_path / "runs",
        max_epochs=1,
        no_save_ckpt=True,
        validation_config={
            "auto_split_proportion": 0.2,
            "timesteps": 2,
            "stabilize_training_loss": True,
            "extra_manual_datasets": {"holdout": str(extra)},
        },
    )
    summary = train(config)
    events = EventAccumulator(summary["run_dir"]).Reload()
    for tag in ("loss/holdout", "loss/stabilize-train", "loss/val"):
        values = [event.value for event in events.Scalars(tag)]
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag


def test_clip_skip_and_a_partly_frozen_text_encoder_use_the_transformers_5_layout(tiny_model_dir):
    """transformers 5 flattened CLIPTextModel (no .text_model): clip_skip reads the second-last layer through the
    final norm, and unfreezing the last layer leaves the embeddings and the first layers frozen."""
    from trainer.model import encode_prompts, freeze_text_encoder_front, load_pretrained

    model = load_pretrained(str(tiny_model_dir), "tiny")
    with torch.no_grad():
        last, second_last = (encode_prompts(model, ["a photo"], skip, "cpu") for skip in (1, 2))
        ids = model.tokenizer(
            ["a photo"], padding="max_length", max_length=model.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(second_last, model.text_encoder.final_layer_norm(hidden))
    assert not torch.equal(last, second_last)
    freeze_text_encoder_front(model.text_encoder, 1)
    trainable = {
        name.split(".")[0] + "." + name.split(".")[2] if name.startswith("encoder.") else name.split(".")[0]
        for name, p in model.text_encoder.named_parameters()
        if p.requires_grad
    }
    assert trainable == {f"encoder.{len(model.text_encoder.encoder.layers) - 1}", "final_layer_norm"}
