"""Rated data sets (ED2's rated_dataset): each epoch's size as ED2's code computes it, picks by rating, every
epoch's batches counted in the RunPlan, and the same picks for the same (seed, epoch)."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from data.images import ImageItem, scan_images
from data.loader import BucketBatches
from data.plan import plan_run
from data.prepare import prepare_data
from data.rated import RatedEpochs, draw_by_rating, picks_per_group
from data.sidecars import RATING_ZERO_NOTE, DataSettingsError
from optimizer.lr import plan_schedule
from optimizer.preview import epoch_steps_text, preview_schedule
from tests.conftest import DEMO_DATA
from utils.config import ConfigError, load_config
from utils.ed2_compat import NOTED_KEYS


def squares(ratings: list[float], **settings) -> list[ImageItem]:
    """One square image per rating, all in one aspect bucket."""
    return [ImageItem(Path(f"/fake/{n}.png"), "c", 64, 64, rating=r, **settings) for n, r in enumerate(ratings)]


def images_per_epoch(batches: BucketBatches, epochs: int, seed: int = 1) -> list[int]:
    return [sum(map(len, batches.epoch_batches(epoch, seed))) for epoch in range(epochs)]


# --- ED2's epoch sizes ------------------------------------------------------------------------------------------

# Each list is what ED2's own loader trains, epoch by epoch (one bucket, batch size 1, ratings 1 to 4): train.py
# sets rated_dataset_dropout_target = 1 - percent / 100 and calls EveryDreamBatch.shuffle(epoch_n=epoch, max_epochs)
# after every epoch but the last; data/every_dream.py EveryDreamBatch.shuffle gives dropout_fraction
# (max_epochs - epoch_n x target) / max_epochs (the first epoch is built with 1.0 in __init__); data/data_loader.py
# DataLoaderMultiAspect.get_shuffled_image_buckets takes __pick_multiplied_set for a fraction >= 1 and
# __pick_random_subset, ceil(images x fraction) images each once, below it. The numbers were taken by running
# those functions of EveryDream2trainer (commit 5098db8).
ED2_EPOCH_SIZES = [
    # (images, multiply, max_epochs, percent, images trained in each epoch)
    (20, 1.0, 10, 50, [20, 20, 19, 18, 17, 16, 15, 14, 13, 12]),
    (10, 1.0, 10, 50, [10, 10, 10, 9, 9, 8, 8, 7, 7, 6]),
    (7, 1.0, 5, 20, [7, 7, 6, 5, 4]),
    (10, 1.0, 4, 0, [10, 10, 8, 5]),
    (10, 1.0, 6, 100, [10] * 6),  # target 100%: no fall
    (10, 2.0, 10, 50, [20, 20, 10, 9, 9, 8, 8, 7, 7, 6]),  # the rated epochs make no multiplied copies
]


@pytest.mark.parametrize(("images", "multiply", "max_epochs", "percent", "sizes"), ED2_EPOCH_SIZES)
def test_each_epoch_trains_as_many_images_as_in_ed2(images, multiply, max_epochs, percent, sizes):
    items = squares([1.0 + n % 4 for n in range(images)], multiply=multiply)
    batches = BucketBatches(items, 1, 64, RatedEpochs(max_epochs, percent))
    assert [batches.samples_in_epoch(epoch) for epoch in range(max_epochs)] == sizes
    assert images_per_epoch(batches, max_epochs) == sizes


def test_the_share_follows_ed2s_formula():
    """data/every_dream.py EveryDreamBatch.shuffle: (max_epochs - epoch_n x target) / max_epochs, target = 1 - 50/100;
    epoch e is shuffled for with epoch_n = e - 1 (train.py); the P% target is reached only at epoch max_epochs + 1."""
    rated = RatedEpochs(max_epochs=10, target_dropout_percent=50)
    assert [rated.share(epoch) for epoch in range(10)] == [1.0, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6]
    assert rated.share(14) == rated.share(9)  # a run lengthened past max_epochs keeps the last epoch's share
    assert rated.picked_count(1, 20) is None and rated.picked_count(2, 20) == 19


# --- the picks ---------------------------------------------------------------------------------------------------


def test_a_higher_rating_is_picked_as_often_as_in_ed2():
    """data/data_loader.py DataLoaderMultiAspect.__pick_random_subset draws one image at a time, at a point uniform
    over the summed ratings of the images not drawn yet. Ratings 1, 1, 1, 3, two picks: the image rated 3 comes
    first with chance 3/6, and second with chance 1/2 x 3/5, so it is picked with chance 0.8; each 1 with 0.4."""
    counts = Counter()
    draws = 4000
    rng = random.Random(7)
    for _ in range(draws):
        picks = draw_by_rating([1.0, 1.0, 1.0, 3.0], 2, rng)
        assert len(set(picks)) == 2
        counts.update(picks)
    assert counts[3] / draws == pytest.approx(0.8, abs=0.03)  # 4000 draws: standard error 0.006
    assert [counts[index] / draws for index in range(3)] == pytest.approx([0.4] * 3, abs=0.03)


def test_ratings_steer_the_picks_of_a_rated_epoch():
    batches = BucketBatches(squares([4.0] * 5 + [1.0] * 15), 1, 64, RatedEpochs(40, target_dropout_percent=0))
    picked = Counter(sample for epoch in range(2, 40) for batch in batches.epoch_batches(epoch, 3) for sample in batch)
    high, low = sum(picked[index] for index in range(5)) / 5, sum(picked[index] for index in range(5, 20)) / 15
    assert high > low  # rated 4 against 1: picked more often in the shrinking epochs


def test_an_image_with_multiply_0_is_never_picked():
    left_out = ImageItem(Path("/fake/left-out.png"), "x", 64, 64, multiply=0.0)
    batches = BucketBatches([left_out, *squares([1.0] * 10)], 1, 64, RatedEpochs(8, target_dropout_percent=0))
    assert batches.rated_images == 10  # the N of ceil(N x share): images that train at all
    for epoch in range(8):
        assert 0 not in {sample for batch in batches.epoch_batches(epoch, 2) for sample in batch}


def test_each_bucket_gets_a_fixed_share_of_the_picks():
    """Three images rated 1 in one bucket and one rated 3 in another, two picks: each image's chance in proportion
    to its rating, capped at 1 (3 x 2/6 = 1; the others 1/3 each), so each bucket gets one pick every epoch."""
    assert picks_per_group([[1.0, 1.0, 1.0], [3.0]], 2) == [1, 1]
    assert picks_per_group([[1.0, 1.0], [1.0, 1.0]], 3) == [2, 1]  # 1.5 and 1.5: the odd pick to the first
    assert picks_per_group([[0.0, 0.0], [1.0]], 1) == [0, 1]  # rating 0 (multiply 0): never picked


# --- every epoch counted in the plan ---------------------------------------------------------------------------


def mixed_items() -> list[ImageItem]:
    """Squares, tall images and a batch_id group, with ratings and multipliers: several groups to share picks."""
    items = [ImageItem(Path(f"/fake/s{n}.png"), "s", 64, 64, rating=1.0 + n % 3) for n in range(13)]
    items += [ImageItem(Path(f"/fake/t{n}.png"), "t", 64, 128, multiply=1.5, rating=2.0) for n in range(7)]
    items += [ImageItem(Path(f"/fake/b{n}.png"), "b", 64, 64, batch_id="b", rating=0.5) for n in range(5)]
    return items


@pytest.mark.parametrize(("grad_accum", "world_size"), [(1, 1), (2, 1), (3, 2)])
def test_the_plan_counts_every_epochs_steps_as_the_data_deals_them(grad_accum, world_size):
    max_epochs = 12
    batches = BucketBatches(mixed_items(), 2, 128, RatedEpochs(max_epochs, target_dropout_percent=30))
    plan = plan_run(batches.batches_per_rank_by_epoch(world_size), grad_accum, max_epochs, None)
    assert plan.varies
    total = 0
    for epoch in range(max_epochs):
        assert plan.first_step_of(epoch) == total
        counts = {len(batches.epoch_batches(epoch, 9, rank, world_size)) for rank in range(world_size)}
        assert counts == {plan.batches_in_epoch(epoch)}  # every process the same number of batches
        assert plan.steps_in_epoch(epoch) == math.ceil(plan.batches_in_epoch(epoch) / grad_accum)
        for step_in_epoch in range(plan.steps_in_epoch(epoch)):
            assert plan.epoch_of(total + step_in_epoch) == epoch
        total += plan.steps_in_epoch(epoch)
    assert plan.total_steps == total and plan.epochs == max_epochs
    last_step = plan.steps_in_epoch(max_epochs - 1) - 1
    micro = plan.micro_batches_of(last_step, max_epochs - 1)  # the last step of a shorter epoch: its own batches
    assert micro.stop == plan.batches_in_epoch(max_epochs - 1) and len(micro) >= 1


def test_a_plan_lengthened_past_max_epochs_repeats_the_last_epoch():
    plan = plan_run((10, 10, 9, 8), 1, 4, None).with_total_steps(37 + 16)  # lr_end_at_low may lengthen a run
    assert plan.total_steps == 53 and plan.epochs == 6
    assert [plan.steps_in_epoch(epoch) for epoch in range(6)] == [10, 10, 9, 8, 8, 8]
    assert (plan.epoch_of(44), plan.epoch_of(45), plan.first_step_of(5)) == (4, 5, 45)
    assert (plan.epochs_at(33), plan.epochs_at(41)) == pytest.approx((3.5, 4.5))  # epochs 4 and 5 start at 29, 37


def test_a_uniform_plan_is_as_before():
    plan = plan_run(9, 2, 3, None)
    assert (plan.steps_per_epoch, plan.total_steps, plan.epochs, plan.varies) == (5, 15, 3, False)
    assert (plan.epoch_of(14), plan.first_step_of(2), plan.micro_batches_of(4)) == (2, 10, range(8, 9))


# --- the same picks for the same (seed, epoch): a resumed run sees what the interrupted one would have ------------


def test_the_picks_are_a_function_of_seed_and_epoch():
    def rebuilt() -> BucketBatches:  # what a resumed run builds again from the same data and config
        return BucketBatches(mixed_items(), 2, 128, RatedEpochs(10, target_dropout_percent=40))

    first, again = rebuilt(), rebuilt()
    for epoch in range(10):
        assert first.epoch_batches(epoch, 555) == again.epoch_batches(epoch, 555)
        assert first.epoch_batches(epoch, 555)[3:] == again.epoch_batches(epoch, 555)[3:]  # resumed mid-epoch
    shrinking = range(2, 10)
    assert len({frozenset(map(tuple, first.epoch_batches(epoch, 555))) for epoch in shrinking}) == len(shrinking)
    assert first.epoch_batches(5, 555) != first.epoch_batches(5, 556)


# --- ratings from the data's files ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_rating_is_read_from_yaml_files_nearest_first(demo_copy):
    write(demo_copy / "global.yaml", "rating: 2\n")
    write(demo_copy / "scene01.yaml", "rating: 0.25\n")
    write(demo_copy / "scene02.yaml", "rating: 0\n")
    result = scan_images(demo_copy)
    ratings = {item.path.name: item.rating for item in result.items}
    assert (ratings["scene01.png"], ratings["scene03.png"]) == (0.25, 2.0)
    assert ratings["scene02.png"] == 1.0  # 0 reads as 1, as in ED2 (data/dataset.py: `config.rating or 1.0`)
    assert any(line.startswith(RATING_ZERO_NOTE) and "scene02.yaml" in line for line in result.warnings)
    assert not any("'rating'" in line for line in result.warnings)  # a key in use, not an unknown one


@pytest.mark.parametrize("value", ["-1", "'high'", "true"])
def test_a_bad_rating_stops_the_scan_naming_file_and_key(demo_copy, value):
    write(demo_copy / "scene01.yaml", f"rating: {value}\n")
    with pytest.raises(DataSettingsError, match=r"scene01\.yaml: rating = .* is not valid; expected a"):
        scan_images(demo_copy)


# --- config keys -------------------------------------------------------------------------------------------------


def config(tmp_path: Path, **values):
    settings = {"data_root": str(DEMO_DATA), "logdir": str(tmp_path), "resolution": 64, "batch_size": 2}
    return load_config(None, {**settings, "validation_config": None, **values})


def test_the_keys_are_checked(tmp_path):
    assert config(tmp_path).rated_dataset is False and config(tmp_path).rated_dataset_target_dropout_percent == 50
    with pytest.raises(ConfigError, match="rated_dataset_target_dropout_percent"):
        config(tmp_path, rated_dataset=True, rated_dataset_target_dropout_percent=150)
    with pytest.raises(ConfigError, match="key 'rated_dataset'.*max_epochs must be given"):
        config(tmp_path, rated_dataset=True, max_steps=50)
    assert config(tmp_path, rated_dataset=True, max_epochs=5, max_steps=50).max_steps == 50
    assert "rated_dataset" not in NOTED_KEYS and "rated_dataset_target_dropout_percent" not in NOTED_KEYS


def test_plan_schedule_refuses_one_count_for_a_rated_data_set(tmp_path):
    with pytest.raises(ValueError, match="each epoch's batch count"):
        plan_schedule(config(tmp_path, rated_dataset=True, max_epochs=4), 10)


# --- the preview ---------------------------------------------------------------------------------------------------


def test_the_preview_counts_every_rated_epoch(tmp_path, capsys):
    """The demo's 20 images at batch size 2, 10 epochs at 50%: ED2's 20, 20, 19, ..., 12 images an epoch
    (ED2_EPOCH_SIZES) make 10, 10, 10, 9, 9, 8, 8, 7, 7, 6 batches, 84 steps."""
    settings = config(tmp_path, rated_dataset=True, max_epochs=10)
    result = preview_schedule(settings, tmp_path / "preview")
    plan = result["plan"]
    assert [plan.steps_in_epoch(epoch) for epoch in range(10)] == [10, 10, 10, 9, 9, 8, 8, 7, 7, 6]
    assert plan.total_steps == 84 and plan.total_epochs_exact == 10
    out = capsys.readouterr().out
    assert "steps per epoch: 10 (epochs 1-3), 9 (epochs 4-5), 8 (epochs 6-7), 7 (epochs 8-9), 6 (epoch 10)" in out
    assert "total steps: 84" in out
    assert "the last, epoch 10, trains 12 in 6 batches" in out
    rows = (tmp_path / "preview" / "lr_schedule.csv").read_text().splitlines()
    assert len(rows) == 1 + 84  # every step of the exact run


def test_the_preview_and_the_data_agree_with_grad_accum(tmp_path):
    settings = config(tmp_path, rated_dataset=True, max_epochs=6, grad_accum=3, rated_dataset_target_dropout_percent=10)
    data = prepare_data(settings)
    plan, _, _ = plan_schedule(settings, data.epoch_batches_per_process(1))
    for epoch in range(6):
        assert plan.steps_in_epoch(epoch) == math.ceil(len(data.batches.epoch_batches(epoch, settings.seed)) / 3)
    assert plan.total_steps == sum(plan.steps_in_epoch(epoch) for epoch in range(6))


def test_epoch_steps_text_shortens_long_lists():
    plan = plan_run(tuple(range(30, 10, -1)), 1, 20, None)
    text = epoch_steps_text(plan)
    assert text.startswith("30 (epoch 1), 29 (epoch 2), 28 (epoch 3), 27 (epoch 4), ..., ")
    assert text.endswith("14 (epoch 17), 13 (epoch 18), 12 (epoch 19), 11 (epoch 20)")
