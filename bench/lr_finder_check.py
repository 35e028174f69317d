"""Does the LR finder's suggestion land where training works best? Two cases, on the CPU.

From scratch: the random tiny model on the demo data (configs/demo.json's data: 16 training images, 4 held out,
batch 4, AdamW, fp32, the text encoder trained too), three training seeds.
1. `--find_lr`, then short trainings of the same length at a grid of constant LRs, below, inside and above the
   suggested range, and one cyclic run over the suggested range (the config --find_lr_write would write), each
   scored by the stabilized validation loss it ends with.

Fine-tuning: `tiny-pretrained` (which draws coloured shapes) learning a concept it has never seen, as the demo does
(UNet only): "a zorb" (the demo's rings) and "a quib" (plus signs, scripts/make_demo_data.py --concept quib), each
with three training seeds.
2. The same sweep, grid and cyclic run at fine-tuning LRs, each scored by its lowest validation loss (validated
   every 2 epochs), as a user picks the best epoch.
Goal, in both cases: the best constant LR inside the suggested [lr_min, lr] in every case, and the cyclic run
within 5% of the best constant's loss.

    OMP_NUM_THREADS=1 python bench/lr_finder_check.py                  # both cases
    OMP_NUM_THREADS=1 python bench/lr_finder_check.py --case scratch   # about 4 minutes a seed
    OMP_NUM_THREADS=1 python bench/lr_finder_check.py --case finetune --quick  # one concept and seed, 3 LRs
    OMP_NUM_THREADS=1 python bench/lr_finder_check.py --case replay    # the recorded sweeps, today's rule
    OMP_NUM_THREADS=1 python bench/lr_finder_check.py --case ranges    # the recorded cases, cyclic over fixed ranges
    OMP_NUM_THREADS=1 python bench/lr_finder_check.py --case finetune --draws 2  # 40 images of each concept

Each training run takes about 20 s on one free core. One thread: with two on a 2-core machine that has anything
else running, the same sweep took 671 s instead of 17-22 s.

Results: bench/results/lr_finder_check.txt (from scratch), lr_finder_check_finetune.txt, lr_finder_check_replay.txt,
lr_finder_check_ranges.txt, and the sweeps and scores as JSON beside them (what --case replay and ranges read).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import runpy
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_third_party_output  # noqa: E402

quiet_third_party_output()  # before torch, diffusers and transformers load (as train.py does)

from trainer.loop import train  # noqa: E402
from trainer.lr_finder import find_lr, suggest_range  # noqa: E402
from utils.config import load_config  # noqa: E402

DEMO = ROOT / "configs" / "demo.json"
RESULTS = ROOT / "bench" / "results" / "lr_finder_check.txt"
RESULTS_FINETUNE = ROOT / "bench" / "results" / "lr_finder_check_finetune.txt"
RECORD_FINETUNE = ROOT / "bench" / "results" / "lr_finder_check_finetune.json"
RECORD_SCRATCH = ROOT / "bench" / "results" / "lr_finder_check_scratch.json"
RESULTS_REPLAY = ROOT / "bench" / "results" / "lr_finder_check_replay.txt"
RESULTS_RANGES = ROOT / "bench" / "results" / "lr_finder_check_ranges.txt"
STEPS = 120  # each training of the grid, and the sweep: 30 epochs of 4 steps
SWEEP = {
    "lr_find_start": 1e-5,
    "lr_find_end": 0.3,
    "lr_find_ramp": "exponential",
    "lr_find_steps": STEPS,
    "lr_find_probe_every": 4,
}
GRID = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
QUICK_GRID = (3e-5, 3e-3, 1e-1)
# Fine-tuning: the demo's base and trained part, validation every 2 epochs (the score is the lowest validation loss).
FINE_TUNE = {
    "resume_ckpt": "tiny-pretrained",
    "disable_textenc_training": True,
}
FINE_TUNE_VALIDATE_EVERY = 2  # epochs
FINE_TUNE_SWEEP = {**SWEEP, "lr_find_start": 1e-7, "lr_find_end": 0.03}
GRID_FT = (1e-5, 3e-5, 1e-4, 1.7e-4, 3e-4, 1e-3)  # 1.7e-4: the half-decade grid could not place the best LR
QUICK_GRID_FT = (1e-5, 1e-4, 1e-3)
FINE_TUNE_CONCEPTS = ("zorb", "quib")
FINE_TUNE_SEEDS = (1, 2, 3)
# --case ranges: the ranges the rule gave on the v3 sweeps (5.5 and 8.3 x wide), and two narrower ones.
PROBE_RANGES_FT = ((5.19e-5, 2.83e-4), (3.4e-5, 2.83e-4), (5.19e-5, 4.33e-4), (5.19e-5, 1.85e-4), (1e-4, 1.7e-4))
SCRATCH_SEEDS = (555, 1, 2)  # demo.json's, then two more
GOAL_RATIO = 1.05
# demo.json's own schedule keys; the grid replaces them with a constant LR.
SCHEDULE_KEYS = ("lr", "lr_min", "lr_scheduler", "lr_stepsize_epochs", "lr_cycle_start", "lr_end_at_low")


def demo_values(logdir: Path) -> dict:
    """demo.json's data, model and optimizer, no samples or periodic checkpoints, validation at start and end."""
    base = json.loads(DEMO.read_text())
    values = {key: value for key, value in base.items() if key not in SCHEDULE_KEYS}
    values.update(
        # Training from scratch: the random tiny model, text encoder too (the demo fine-tunes tiny-pretrained's UNet).
        resume_ckpt="tiny",
        disable_textenc_training=False,
        data_root=str(ROOT / base["data_root"]),
        logdir=str(logdir),
        sample_prompts=None,
        save_every_n_epochs=None,
        no_save_ckpt=True,
        max_steps=STEPS,
        validation_config={**json.loads((DEMO.parent / base["validation_config"]).read_text()), "every_n_epochs": 1000},
    )
    return values


def quietly(function, *args):
    """Run without the progress bars and per-run chatter (kept out of the results file)."""
    with redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
        return function(*args)


def train_at(values: dict, score: str, **schedule) -> tuple[float, float]:
    """(validation loss `score`: "final" or "min", seconds) of one training run."""
    started = time.monotonic()
    summary = quietly(train, load_config(None, {**values, **schedule}))
    return summary["val_loss"][score], time.monotonic() - started


def where(lr: float, low: float, high: float) -> str:
    return "below" if lr < low else "above" if lr > high else "inside"


def write_results(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def sweep_and_grid(values: dict, sweep: dict, grid, score: str, say) -> dict | None:
    """The LR finder's suggestion, then constant runs on `grid` and a cyclic run over the suggestion, each scored by
    the summary's validation loss `score` ("final" or "min"). None when the finder backs no range."""
    result = quietly(find_lr, load_config(None, {**values, **sweep}))
    suggestion, log = result.suggestion, result.log
    say(
        f"  sweep: {log.rows[-1]['step']} steps in {log.seconds:.0f} s, {log.probe_count} probes "
        f"({result.probe_source}) took {log.probe_seconds:.0f} s = {100 * log.probe_seconds / log.seconds:.0f}%"
        + (f"; stopped early: {log.stopped_early}" if log.stopped_early else "")
    )
    say(f"  {suggestion.status}: {suggestion.reason}")
    if not suggestion.backed:
        say("  no backed range, so no grid to compare it with")
        return None
    low, high = suggestion.lr_min, suggestion.lr
    say(f"  suggested: lr_min {low:.3g}, lr {high:.3g}, steepest {suggestion.lr_steepest:.3g}")
    before = log.rows[0]["probe_loss"]
    say(f"  {'lr':>9}  {'where':>6}  {score + ' val':>9}  {'seconds':>7}   (before training: {before:.4f})")
    scores = {}
    for lr in grid:
        scores[lr], seconds = train_at(values, score, lr=lr, lr_scheduler="constant")
        say(f"  {lr:9.3g}  {where(lr, low, high):>6}  {scores[lr]:9.4f}  {seconds:7.0f}")
    cyclic = cyclic_run(values, score, low, high, say)
    sweep = [(row["lr"], row["probe_loss"]) for row in log.rows if row["probe_loss"] is not None]
    return verdict_of(low, high, scores, cyclic, sweep, say)


def cyclic_score(values: dict, score: str, low: float, high: float) -> tuple[float, float]:
    # Three whole cycles fill the run exactly and end on a low point, as the paper advises.
    return train_at(values, score, lr_scheduler="cyclic", lr_min=low, lr=high, lr_cycles=3)


def cyclic_run(values: dict, score: str, low: float, high: float, say) -> float:
    cyclic, seconds = cyclic_score(values, score, low, high)
    say(f"  cyclic {low:.3g} to {high:.3g}, 3 cycles: {cyclic:.4f} ({seconds:.0f} s)")
    return cyclic


def verdict_of(low: float, high: float, scores: dict, cyclic: float, sweep: list, say) -> dict:
    """Where the best constant LR lies against the range, and the cyclic run's score over the best constant's."""
    finite = {lr: value for lr, value in scores.items() if math.isfinite(value)}
    best = min(finite, key=finite.get)
    verdict = {
        "low": low,
        "high": high,
        "best": best,
        "inside": low <= best <= high,
        "ratio": cyclic / finite[best],
        "constant": scores,
        "cyclic": cyclic,
        "sweep": sweep,
    }
    say(
        f"  best constant: {best:g} ({finite[best]:.4f}), {where(best, low, high)} the range; cyclic / best "
        f"constant: {verdict['ratio']:.3f}"
    )
    return verdict


def from_scratch(quick: bool, logdir: Path, say) -> bool:
    """Every seed (the first only with --quick): sweep, grid and cyclic run; whether all meet the goal."""
    verdicts = []
    say(f"LR finder on the demo data, the random tiny model: {json.dumps(SWEEP)}")
    for seed in SCRATCH_SEEDS[:1] if quick else SCRATCH_SEEDS:
        say()
        say(f"seed {seed}:")
        values = {**demo_values(logdir), "seed": seed}
        verdict = sweep_and_grid(values, SWEEP, QUICK_GRID if quick else GRID, "final", say)
        verdicts.append(("scratch", seed, verdict))
    RECORD_SCRATCH.write_text(json.dumps([{"concept": c, "seed": s, **(v or {})} for c, s, v in verdicts]) + "\n")
    return summarise(verdicts, say)


def concept_data(concept: str, folder: Path, draws: int = 1) -> Path:
    """The 20 images of `concept` (scripts/make_demo_data.py), each scene drawn `draws` times, written into
    `folder`."""
    generator = runpy.run_path(str(ROOT / "scripts" / "make_demo_data.py"), run_name="make_demo_data")
    generator["write_demo_data"](folder, concept, draws)
    return folder


def fine_tune_values(logdir: Path, concept: str, seed: int, draws: int = 1) -> dict:
    data = logdir / f"data-{concept}-x{draws}"
    if not data.is_dir():
        concept_data(concept, data, draws)
    values = {**demo_values(logdir), **FINE_TUNE, "data_root": str(data), "seed": seed}
    # An epoch grows with the draws: validate every 8 steps all the same, which lands on every cycle's low end.
    every = FINE_TUNE_VALIDATE_EVERY / draws
    values["validation_config"] = {**values["validation_config"], "every_n_epochs": every}
    return values


def fine_tuning(quick: bool, logdir: Path, say, draws: int = 1) -> bool:
    """Every concept x seed: sweep, grid and cyclic run; whether all meet the goal."""
    verdicts = []
    say(f"LR finder on fine-tuning tiny-pretrained (UNet only): {json.dumps(FINE_TUNE_SWEEP)}")
    if draws > 1:
        say(f"each concept's 20 scenes drawn {draws} times: {20 * draws} images")
    for concept in FINE_TUNE_CONCEPTS[:1] if quick else FINE_TUNE_CONCEPTS:
        for seed in FINE_TUNE_SEEDS[:1] if quick else FINE_TUNE_SEEDS:
            say()
            say(f"a {concept}, seed {seed}:")
            values = fine_tune_values(logdir, concept, seed, draws)
            verdict = sweep_and_grid(values, FINE_TUNE_SWEEP, QUICK_GRID_FT if quick else GRID_FT, "min", say)
            verdicts.append((concept, seed, verdict))
    # The sweeps' probe points and every run's score, to try a change of suggest_range on them without training.
    record = [{"concept": c, "seed": s, **(v or {})} for c, s, v in verdicts]
    finetune_paths(draws)[1].write_text(json.dumps(record) + "\n")
    return summarise(verdicts, say)


def finetune_paths(draws: int) -> tuple[Path, Path]:
    """(results, record) of the fine-tuning case; --draws > 1 writes beside the demo-size ones."""
    if draws == 1:
        return RESULTS_FINETUNE, RECORD_FINETUNE
    return tuple(path.with_stem(f"{path.stem}_x{draws}") for path in (RESULTS_FINETUNE, RECORD_FINETUNE))


def replay(quick: bool, logdir: Path, say) -> bool:
    """The recorded sweeps (fine-tuning, and from scratch when recorded) read by today's suggest_range, a cyclic run
    over each range it gives, against the recorded constant runs: a change of the rule checked without sweeping and
    training the grid again. The sweep does not depend on the rule; the same seed gives the same cyclic run."""
    verdicts = []
    records = [RECORD_FINETUNE] + [RECORD_SCRATCH] * RECORD_SCRATCH.is_file()
    say(f"Replay of {', '.join(r.name for r in records)}: the recorded sweeps through today's suggest_range")
    for case in [case for record in records for case in json.loads(record.read_text())]:
        say()
        scratch = case["concept"] == "scratch"
        say(f"from scratch, seed {case['seed']}:" if scratch else f"a {case['concept']}, seed {case['seed']}:")
        points = [(lr, loss) for lr, loss in case["sweep"] if lr > 0]  # SweepLog.probe_points: after an update
        suggestion = suggest_range([lr for lr, _ in points], [loss for _, loss in points], "exponential")
        say(f"  {suggestion.status}: {suggestion.reason}")
        if not suggestion.backed:
            verdicts.append((case["concept"], case["seed"], None))
            continue
        low, high = suggestion.lr_min, suggestion.lr
        if scratch:
            cyclic = cyclic_run({**demo_values(logdir), "seed": case["seed"]}, "final", low, high, say)
        else:
            cyclic = cyclic_run(fine_tune_values(logdir, case["concept"], case["seed"]), "min", low, high, say)
        scores = {float(lr): value for lr, value in case["constant"].items()}  # JSON keys are strings
        verdicts.append((case["concept"], case["seed"], verdict_of(low, high, scores, cyclic, case["sweep"], say)))
    return summarise(verdicts, say)


def range_sensitivity(quick: bool, logdir: Path, say) -> bool:
    """Each recorded fine-tuning case's cyclic run over the same fixed ranges, against its recorded best constant:
    does the cyclic run's ratio follow the range the rule gives, or the seed? An analysis, not a goal."""
    cases = json.loads(RECORD_FINETUNE.read_text())
    say(f"Cyclic runs (3 cycles) over fixed ranges on the cases of {RECORD_FINETUNE.name}; cyclic / best constant:")
    labels = [f"{low:.3g}-{high:.3g}" for low, high in PROBE_RANGES_FT]
    say(f"  {'concept':7}  {'seed':>4}  " + "  ".join(labels))
    for case in cases[:1] if quick else cases:
        values = fine_tune_values(logdir, case["concept"], case["seed"])
        best = min(value for value in case["constant"].values() if math.isfinite(value))
        ratios = [cyclic_score(values, "min", low, high)[0] / best for low, high in PROBE_RANGES_FT]
        say(
            f"  {case['concept']:7}  {case['seed']:4}  "
            + "  ".join(f"{ratio:{len(label)}.3f}" for ratio, label in zip(ratios, labels, strict=True))
        )
    return True


def seed_averages(verdicts: list) -> dict[str, tuple[float, float, float]]:
    """Per concept with more than one seed: (the constant LR with the lowest mean score over the seeds, that mean,
    the cyclic runs' mean score). A mean over seeds is not a minimum over noisy runs: the per-seed best constant is
    the lowest of several scores, each a few % off by chance, so it sits below what that LR gives on average."""
    by_concept: dict[str, list[dict]] = {}
    for concept, _seed, verdict in verdicts:
        if verdict is not None:
            by_concept.setdefault(concept, []).append(verdict)
    averages = {}
    for concept, runs in by_concept.items():
        if len(runs) < 2:
            continue
        mean_of = {lr: statistics.fmean(run["constant"][lr] for run in runs) for lr in runs[0]["constant"]}
        best = min((lr for lr in mean_of if math.isfinite(mean_of[lr])), key=mean_of.get)
        averages[concept] = (best, mean_of[best], statistics.fmean(run["cyclic"] for run in runs))
    return averages


def summarise(verdicts: list, say) -> bool:
    say()
    say("summary: concept  seed  suggested range        best constant  inside  cyclic / best")
    for concept, seed, verdict in verdicts:
        if verdict is None:
            say(f"         {concept:7}  {seed:4}  (no backed range)")
            continue
        say(
            f"         {concept:7}  {seed:4}  {verdict['low']:.3g} to {verdict['high']:<9.3g}  {verdict['best']:<13g}  "
            f"{'yes' if verdict['inside'] else 'NO':6}  {verdict['ratio']:.3f}"
        )
    for concept, (best, constant, cyclic) in seed_averages(verdicts).items():
        say(
            f"         {concept:7}  mean over seeds: cyclic {cyclic:.4f}, best constant {best:g} {constant:.4f}, "
            f"cyclic / best {cyclic / constant:.3f}"
        )
    met = all(v is not None and v["inside"] and v["ratio"] <= GOAL_RATIO for _, _, v in verdicts)
    say(
        f"goal (best constant inside the range, cyclic within {GOAL_RATIO - 1:.0%} of it) in every case: "
        f"{'met' if met else 'NOT met'}"
    )
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three grid points (and one concept and seed) only")
    parser.add_argument("--case", choices=("all", "scratch", "finetune", "replay", "ranges"), default="all")
    parser.add_argument(
        "--draws", type=int, default=1, help="fine-tuning: draw each concept's 20 scenes this many times (a larger set)"
    )
    args = parser.parse_args()
    ok = True
    cases = (
        ("scratch", from_scratch, RESULTS),
        ("finetune", partial(fine_tuning, draws=args.draws), finetune_paths(args.draws)[0]),
        ("replay", replay, RESULTS_REPLAY),
        ("ranges", range_sensitivity, RESULTS_RANGES),
    )
    for case, run, results in cases:
        if args.case != case and not (args.case == "all" and case in ("scratch", "finetune")):
            continue
        lines: list[str] = []

        def say(line: str = "", lines=lines) -> None:
            print(line, flush=True)
            lines.append(line)

        started = time.monotonic()
        with tempfile.TemporaryDirectory() as logdir:
            ok = run(args.quick, Path(logdir), say) and ok
        say(f"total {time.monotonic() - started:.0f} s")
        write_results(results, lines)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
