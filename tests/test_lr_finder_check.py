"""bench/lr_finder_check.py's summary over seeds (the bench itself trains for minutes; it runs by hand)."""

import pytest

from bench.lr_finder_check import seed_averages


def verdict(constant: dict, cyclic: float) -> dict:
    return {"constant": constant, "cyclic": cyclic}


def test_the_best_constant_over_seeds_is_the_lowest_mean_not_a_mean_of_minimums():
    # Per seed the best constants are 1e-4 (0.30) and 3e-4 (0.28); over both seeds 1e-4 averages 0.31, 3e-4 0.315.
    verdicts = [
        ("zorb", 1, verdict({1e-4: 0.30, 3e-4: 0.35}, cyclic=0.33)),
        ("zorb", 2, verdict({1e-4: 0.32, 3e-4: 0.28}, cyclic=0.29)),
        ("quib", 1, verdict({1e-4: 0.2, 3e-4: 0.1}, cyclic=0.1)),  # one seed: no average
        ("zorb", 3, None),  # no backed range: nothing to average
    ]
    averages = seed_averages(verdicts)
    assert list(averages) == ["zorb"]
    best, constant, cyclic = averages["zorb"]
    assert best == 1e-4
    assert constant == pytest.approx(0.31, abs=1e-12)
    assert cyclic == pytest.approx(0.31, abs=1e-12)


def test_a_constant_that_broke_training_in_a_seed_is_not_the_best():
    verdicts = [
        ("zorb", 1, verdict({1e-4: 0.30, 1e-2: float("nan")}, cyclic=0.3)),
        ("zorb", 2, verdict({1e-4: 0.32, 1e-2: 0.01}, cyclic=0.3)),
    ]
    assert seed_averages(verdicts)["zorb"][0] == 1e-4
