"""Does the LR finder's suggestion land where training works best? The random tiny model on the demo data, on the CPU.

1. `--find_lr` on the demo data (configs/demo.json: 16 training images, 4 held out, batch 4, AdamW, fp32).
2. Short trainings of the same length at a grid of constant LRs, below, inside and above the suggested range,
   and one cyclic run over the suggested range (the config --find_lr_write would write), each scored by the
   stabilized validation loss it reaches.

    python bench/lr_finder_check.py            # about 4-5 minutes on 2 idle CPU cores
    python bench/lr_finder_check.py --quick    # a smaller grid, for a smoke test

The output is also written to bench/results/lr_finder_check.txt.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.loop import train  # noqa: E402
from trainer.lr_finder import find_lr  # noqa: E402
from utils.config import load_config  # noqa: E402

DEMO = ROOT / "configs" / "demo.json"
RESULTS = ROOT / "bench" / "results" / "lr_finder_check.txt"
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


def train_at(values: dict, **schedule) -> tuple[float, float]:
    """(final validation loss, seconds) of one training run."""
    started = time.monotonic()
    summary = quietly(train, load_config(None, {**values, **schedule}))
    return summary["val_loss"]["final"], time.monotonic() - started


def where(lr: float, low: float, high: float) -> str:
    return "below" if lr < low else "above" if lr > high else "inside"


def write_results(lines: list[str]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three grid points only")
    args = parser.parse_args()
    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as logdir:
        values = demo_values(Path(logdir))
        result = quietly(find_lr, load_config(None, {**values, **SWEEP}))
        suggestion, log = result.suggestion, result.log
        say(f"LR finder on the demo data: {json.dumps(SWEEP)}")
        say(
            f"  {log.rows[-1]['step']} steps in {log.seconds:.0f} s, {log.probe_count} probes "
            f"({result.probe_source}) took {log.probe_seconds:.0f} s = {100 * log.probe_seconds / log.seconds:.0f}%"
            + (f"; stopped early: {log.stopped_early}" if log.stopped_early else "")
        )
        say(f"  {suggestion.status}: {suggestion.reason}")
        if not suggestion.backed:
            say("  no backed range, so no grid to compare it with")
            write_results(lines)
            return 1
        low, high = suggestion.lr_min, suggestion.lr
        say(f"  suggested: lr_min {low:.3g}, lr {high:.3g}, steepest {suggestion.lr_steepest:.3g}")
        say()
        say(f"Constant LR, {STEPS} steps each (validation loss before training: {log.rows[0]['probe_loss']:.4f}):")
        say(f"  {'lr':>9}  {'where':>6}  {'val loss':>9}  {'seconds':>7}")
        scores = {}
        for lr in QUICK_GRID if args.quick else GRID:
            loss, seconds = train_at(values, lr=lr, lr_scheduler="constant")
            scores[lr] = loss
            say(f"  {lr:9.3g}  {where(lr, low, high):>6}  {loss:9.4f}  {seconds:7.0f}")
        # Three whole cycles fill the run exactly and end on a low point, as the paper advises.
        loss, seconds = train_at(values, lr_scheduler="cyclic", lr_min=low, lr=high, lr_cycles=3)
        say(f"  cyclic {low:.3g} to {high:.3g}, 3 cycles: val loss {loss:.4f} ({seconds:.0f} s)")
        finite = {lr: value for lr, value in scores.items() if math.isfinite(value)}
        best = min(finite, key=finite.get)
        say()
        say(
            f"best constant LR of the grid: {best:g} (val loss {finite[best]:.4f}), {where(best, low, high)} the "
            f"suggested range {low:.3g} to {high:.3g}; the cyclic run over the range: {loss:.4f}"
        )
    say(f"total {time.monotonic() - started:.0f} s")
    write_results(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
