"""What the trainer adds to a training step, measured on the CPU with the tiny demo model.

    python bench/step_overhead.py [--rounds 40] [--steps 5] [--warmup 10] [--threads 1]
                                  [--save bench/results/step_overhead_cpu.txt]

One process holds four runners and times them in alternating blocks of --steps steps (the order rotates every
round), after --warmup steps each, so that other jobs on the machine slow all of them alike:

  trainer          trainer.loop.Trainer's own loop (Trainer.steps -> train_step): the epoch's DataLoader, the
                   NaN check, the LR schedule, metrics.csv every step and TensorBoard every log_step, the tqdm bar;
                   configs/demo.json (tiny model, demo/data, 64 px, batch 4, AdamW, cyclic LR, text encoder
                   trained) without validation, samples or checkpoints, which are not per-step costs
  bare (loader)    the same model and optimizer objects in a plain loop over the same loader:
                   loss = training_loss(...); loss.backward(); optimizer.step(); optimizer.zero_grad()
  bare (preloaded) the same plain loop over one epoch of batches held in memory: what data loading costs
  trainer cached   the trainer with cache_latents true (another Trainer; the latents are encoded at set-up)

Each block is timed twice: wall clock, and the CPU time of the thread that trains (time.thread_time). With one
torch thread (the default here) all of a step's work runs on that thread, so its CPU time is the work done, which
other jobs on a shared machine do not inflate; the wall clock is printed beside it. A ratio is the median over
the rounds of the two runners' blocks of that round. The trainer's blocks are taken from its own step generator,
so they include everything its loop does between steps, epoch boundaries too; TensorBoard's own writer thread is
not counted (it writes in the background). Printed last:
`overhead_ratio=<trainer / bare (loader), CPU time>`; the goal is <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import count
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/step_overhead.py` puts bench/, not the repo root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import trainer.loop as loop  # noqa: E402
from trainer.diffusion import training_loss  # noqa: E402
from utils.config import TrainConfig, load_config  # noqa: E402

GOAL = 1.05


class Report:
    """Prints as it goes and keeps the lines for --save."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


# --- the runners --------------------------------------------------------------------------------------------
class TrainerBlocks:
    """A Trainer whose real loop (Trainer.steps, the generator Trainer.train runs through) is taken in blocks of
    steps, always on the same thread of its own (see BareBlocks)."""

    def __init__(self, name: str, config: TrainConfig, run_dir: Path):
        self.name = name
        started = time.perf_counter()
        self.trainer = loop.Trainer(config, run_dir)
        self.setup_seconds = time.perf_counter() - started
        self._steps = self.trainer.steps()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, steps: int) -> dict[str, float]:
        """Seconds of the block: wall clock, CPU time of the training thread, and of that CPU time the part inside
        optimizer_step (forward, backward, optimizer step)."""
        return self._thread.submit(self._run, steps).result()

    def _run(self, steps: int) -> dict[str, float]:
        thread = threading.current_thread()
        model_before = getattr(thread, "model_seconds", 0.0)
        started, started_cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            if next(self._steps, None) is None:
                raise RuntimeError(f"{self.name}: the training loop ended before the benchmark did")
        return {
            "wall": time.perf_counter() - started,
            "cpu": time.thread_time() - started_cpu,
            "model_cpu": getattr(thread, "model_seconds", 0.0) - model_before,
        }

    def close(self) -> None:
        self._thread.submit(self._steps.close).result()  # the loop's own clean-up (its progress bar) on its thread
        self._thread.shutdown()
        self.trainer.logger.close()


class BareBlocks:
    """The plain loop, on the trainer's own model and optimizer objects. It too runs in a thread of its own (the
    same one every block): a thread allocates from its own malloc arena, which the main thread does not share, and
    on this machine that alone made the same step a few percent faster in a thread than in the main thread."""

    def __init__(self, name: str, trainer: loop.Trainer, preloaded: bool):
        self.name = name
        self.model, self.config, self.device = trainer.model, trainer.config, trainer.accelerator.device
        self.optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
        if preloaded:
            epoch = list(trainer.feed.epoch_loader(0))
            self.batches = (epoch[k % len(epoch)] for k in count())
        else:  # the trainer's loader factory: the same dataset, batch order and DataLoader settings
            self.batches = (batch for epoch in count() for batch in trainer.feed.epoch_loader(epoch))
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, steps: int) -> dict[str, float]:
        return self._thread.submit(self._run, steps).result()

    def _run(self, steps: int) -> dict[str, float]:
        started, started_cpu = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            batch = next(self.batches)
            loss = training_loss(self.model, batch, self.config, self.device)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {
            "wall": time.perf_counter() - started,
            "cpu": time.thread_time() - started_cpu,
            "model_cpu": float("nan"),
        }

    def close(self) -> None:
        self._thread.shutdown()


@contextmanager
def optimizer_steps_timed():
    """Count the CPU time each trainer thread spends in trainer.loop.optimizer_step (the model's work)."""
    original = loop.optimizer_step

    def timed(*args, **kwargs):
        started = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            thread = threading.current_thread()
            thread.model_seconds = getattr(thread, "model_seconds", 0.0) + time.thread_time() - started

    loop.optimizer_step = timed
    try:
        yield
    finally:
        loop.optimizer_step = original


# --- the benchmark ------------------------------------------------------------------------------------------
def bench_config(logdir: Path, max_steps: int, **overrides) -> TrainConfig:
    return load_config(
        ROOT / "configs" / "demo.json",
        {
            # The model and parts the benchmark's figures were measured on (the demo fine-tunes another, UNet only).
            "resume_ckpt": "tiny",
            "disable_textenc_training": False,
            "data_root": str(ROOT / "demo" / "data"),
            "logdir": str(logdir),
            "validation_config": None,  # validation, samples and checkpoints are not per-step costs
            "sample_prompts": None,
            "save_every_n_epochs": None,
            "max_steps": max_steps,
            "lr_end_at_low": False,  # would move the end of the run
            **overrides,
        },
    )


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (each runner takes one block per round)")
    parser.add_argument(
        "--steps",
        type=int,
        default=5,
        help="steps per block (short blocks, many rounds: the load of other jobs comes in bursts)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each runner first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: steadier on a small machine shared with other jobs)",
    )
    parser.add_argument("--no_cache", action="store_true", help="leave out the cache_latents runner")
    parser.add_argument("--save", type=Path, help="also write the report to this file (command and date included)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    report = Report()
    report(f"# python bench/step_overhead.py {shlex.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    report(
        f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.2f}), torch {torch.__version__}, "
        f"{args.threads} thread(s), python {platform.python_version()}"
    )
    has_cache = "cache_latents" in TrainConfig.model_fields and not args.no_cache
    max_steps = 2 * (args.warmup + args.rounds * args.steps) + 10  # never reached: the loops stay paused
    runners = []
    with tempfile.TemporaryDirectory(prefix="step_overhead-") as tmp, optimizer_steps_timed():
        try:
            trainer = TrainerBlocks("trainer", bench_config(Path(tmp), max_steps), Path(tmp) / "trainer")
            runners.append(trainer)
            config = trainer.trainer.config
            run = trainer.trainer
            report(
                f"model tiny, {config.data_root}: {len(run.data.train)} images, {config.resolution} px, "
                f"batch {config.batch_size}, optimizer {config.optimizer}, LR {config.lr_scheduler}, text encoder "
                f"{'trained' if config.train_text_encoder else 'frozen'}, log_step {config.log_step}, "
                f"{run.plan.steps_per_epoch} steps per epoch, num_workers {run.feed.num_workers}"
            )
            runners.append(BareBlocks("bare (loader)", trainer.trainer, preloaded=False))
            runners.append(BareBlocks("bare (preloaded)", trainer.trainer, preloaded=True))
            if has_cache:
                runners.append(
                    TrainerBlocks(
                        "trainer cached", bench_config(Path(tmp), max_steps, cache_latents=True), Path(tmp) / "cached"
                    )
                )
            setups = ", ".join(f"{r.name} {r.setup_seconds:.1f} s" for r in runners if isinstance(r, TrainerBlocks))
            report(f"set-up: {setups}" + (" (the cached one encodes every image once)" if has_cache else ""))
            if not has_cache:
                report(
                    "cache_latents: "
                    + ("left out (--no_cache)" if args.no_cache else "pending: the key is not in utils/config.py yet")
                )

            for runner in runners:
                runner.run(args.warmup)
            report(
                f"warm-up: {args.warmup} steps each; then {args.rounds} rounds of {args.steps} steps per runner, "
                f"ms per step, wall clock (CPU time of the training thread):"
            )
            times = {runner.name: [] for runner in runners}  # per round: {"wall", "cpu", "model_cpu"} per step
            for round_index in range(args.rounds):
                order = runners[round_index % len(runners) :] + runners[: round_index % len(runners)]
                for runner in order:
                    times[runner.name].append(
                        {key: value / args.steps for key, value in runner.run(args.steps).items()}
                    )
                report(
                    f"  round {round_index + 1}: "
                    + " | ".join(
                        f"{name} {1000 * rounds[-1]['wall']:.1f} ({1000 * rounds[-1]['cpu']:.1f})"
                        for name, rounds in times.items()
                    )
                )
        finally:
            for runner in runners:
                runner.close()

    def median(name: str, key: str) -> float:
        return median_ms([entry[key] for entry in times[name]])

    def paired(name: str, other: str, key: str) -> float:
        """The median over rounds of name / other, each ratio from the two runners' blocks of one round."""
        return statistics.median(a[key] / b[key] for a, b in zip(times[name], times[other], strict=True))

    def paired_ms(name: str, other: str, key: str) -> float:
        """The median over rounds of name - other, in ms per step."""
        return median_ms([a[key] - b[key] for a, b in zip(times[name], times[other], strict=True)])

    for key, what in (("wall", "wall clock"), ("cpu", "CPU time of the training thread")):
        report(f"median ms per step, {what}: " + " | ".join(f"{name} {median(name, key):.2f}" for name in times))
    trainer_cpu, bare_cpu = median("trainer", "cpu"), median("bare (loader)", "cpu")
    outside = median_ms([entry["cpu"] - entry["model_cpu"] for entry in times["trainer"]])
    report(
        f"trainer: {outside:.2f} ms CPU per step outside optimizer_step (data loading, LR schedule, logs, bar); "
        f"data loading in the main process costs {paired_ms('bare (loader)', 'bare (preloaded)', 'cpu'):.2f} ms "
        f"(bare: loader - preloaded)"
    )
    ratio = paired("trainer", "bare (loader)", "cpu")
    report(
        f"trainer vs bare loop over the same loader: {ratio:.3f} in CPU time "
        f"({paired_ms('trainer', 'bare (loader)', 'cpu'):+.2f} ms "
        f"per step; ratio of the medians {trainer_cpu / bare_cpu:.3f}), "
        f"{paired('trainer', 'bare (loader)', 'wall'):.3f} in wall clock"
    )
    report(
        f"trainer vs bare loop over preloaded batches (data loading counted as overhead): "
        f"{paired('trainer', 'bare (preloaded)', 'cpu'):.3f} in CPU time"
    )
    if has_cache:
        gain = paired("trainer", "trainer cached", "cpu")
        report(
            f"cache_latents: {gain:.2f}x the steps per second of the same trainer without it in CPU time, "
            f"{paired('trainer', 'trainer cached', 'wall'):.2f}x in wall clock (medians of the per-round "
            f"ratios; the VAE encode and the image decoding leave the step)"
        )
    report(f"goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")
    report(f"overhead_ratio={ratio:.3f}")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text("\n".join(report.lines) + "\n", encoding="utf-8")
    return ratio


if __name__ == "__main__":
    main()
