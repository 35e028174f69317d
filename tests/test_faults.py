"""Fault injection: a real run of the tiny model meets a fault at a moment chosen by a seed, is resumed with
`--resume_from latest`, and must end exactly like the run left alone.

Moments: loading the model, the baseline validation, a training step, a later validation, a sample round, a
checkpoint write (between the diffusers folder and the single file) and a state write (inside its temporary
folder). Faults: SIGTERM, SIGINT, SIGKILL, a full disk (the logdir is a small tmpfs), and a second run started on
the same folder. Each seed picks a (moment, fault) pair and one call of the moment's seam (tests/fault_runner.py);
any 7 seeds in a row cover every moment, any 5 every fault, any 35 every pair.

After the fault, and the resume where the run did not complete, the test asserts: the final weights equal the
uninterrupted run's bit for bit (CPU, fp32); every checkpoint that was due exists, complete, and holds what the
uninterrupted run's holds (tensors bit for bit; those load with diffusers, in both formats: the reference test);
no temporary file is left under the logdir; metrics.csv holds the uninterrupted run's rows, each step once; every
process printed its reason and no traceback, and exited with the documented code (143 SIGTERM, 130 SIGINT, 1 a
failed save, 2 a config error such as a second run refused by the run-folder lock, 0 done).

20 seeds run by default. A longer soak:

    EVERYCYCLE_FAULT_SEEDS=200 .venv/bin/python -m pytest tests/test_faults.py

A failing case names its seam, call and fault; `tests/fault_runner.py` replays it by hand. Disk-full cases mount a
tmpfs (root only, as in CI); elsewhere they are skipped, with the reason. The runs are forked from a server that
imported torch and the trainer once (tests/fault_runner.py says why), one intra-op thread each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import random
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests import fault_runner
from tests.fault_runner import FIRED, KINDS
from tests.processes import write_config

SEEDS = int(os.environ.get("EVERYCYCLE_FAULT_SEEDS", "20"))

# 16 training images in batches of 4: 4 steps per epoch, 2 epochs. A checkpoint (with its state) after step 4 and
# at the end, validation at steps 0, 4 and 8, sample rounds after steps 3 and 6 and at the end.
STEPS = 8
RUN = dict(max_steps=STEPS, no_save_ckpt=False, save_every_n_epochs=1, sample_steps=3)
SAMPLES = {"cfgs": [1], "num_inference_steps": 2, "samples": [{"prompt": "a red square"}]}
TRAINED = ("unet", "text_encoder")

# moment -> (seam, which of its calls are that moment)
MOMENTS = {
    "loading": ("load_model", slice(0, 1)),
    "baseline validation": ("validation", slice(0, 1)),
    "training step": ("training_loss", slice(None)),
    "later validation": ("validation", slice(1, None)),
    "sample round": ("make_samples", slice(None)),
    "checkpoint write": ("save_single_file", slice(None)),
    "state write": ("write_tensors", slice(None)),
}
SAVES = ("write_tensors", "save_single_file")  # every save writes a state, then its checkpoint
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9, "save failed": 1, "config error": 2}
# What a killed save leaves: atomic_path's `.<name>.tmp-<pid>` / `.<name>.old-<pid>`, a single file's
# `<name>.tmp-<pid>`.
LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$|\.tmp-\d+$")
RUN_TIMEOUT = 900  # seconds for one run on a loaded 2-core machine (a quiet one needs about 5)


# --- choosing the fault ------------------------------------------------------------------------------------


def moment_and_kind(seed: int) -> tuple[str, str]:
    """Seed mod 7 picks the moment and seed mod 5 the fault: 7 and 5 being coprime, seeds 0-34 give all 35 pairs
    once, and any 20 seeds in a row every moment and every fault."""
    return list(MOMENTS)[seed % len(MOMENTS)], KINDS[seed % len(KINDS)]


@dataclass(frozen=True)
class Case:
    seed: int
    moment: str
    kind: str
    seam: str
    call: int
    # From the uninterrupted run's timeline: where the fault comes.
    steps_started: int  # training steps begun
    states_saved: int  # complete states on disk
    after: tuple[str, ...]  # the seams called after this call, in order

    def fault(self, fill: Path | None) -> dict:
        return {"seam": self.seam, "call": self.call, "kind": self.kind, "fill": str(fill) if fill else None}

    @property
    def saves_left(self) -> bool:
        """Whether a save (a state, a checkpoint) is still to come, or under way."""
        return any(seam in SAVES for seam in (self.seam, *self.after))

    def __str__(self) -> str:
        return (
            f"seed {self.seed}: {self.kind} at {self.moment} (call {self.call} of {self.seam}; "
            f"{self.steps_started} of {STEPS} steps started, {self.states_saved} states saved)"
        )


def fault_case(seed: int, timeline: list[dict]) -> Case:
    """The seed's (moment, fault), and one of the moment's calls in the uninterrupted run, chosen by the seed."""
    moment, kind = moment_and_kind(seed)
    seam, calls = MOMENTS[moment]
    event = random.Random(seed).choice([event for event in timeline if event["seam"] == seam][calls])
    index = timeline.index(event)
    # A state is complete once its files are written (one write_tensors per file, all at the state's step).
    state_steps = {earlier["steps_started"] for earlier in timeline[:index] if earlier["seam"] == "write_tensors"}
    if seam == "write_tensors":
        state_steps.discard(event["steps_started"])  # the state under way
    return Case(
        seed,
        moment,
        kind,
        seam,
        event["call"],
        event["steps_started"],
        len(state_steps),
        tuple(later["seam"] for later in timeline[index + 1 :]),
    )


def first_write_after(case: Case) -> str:
    """What the run writes first once the fault has come: where a full disk bites. (metrics.csv rows and
    TensorBoard events stay within pages the file system has already given their files, but for the first row.)"""
    if case.moment == "loading":
        return "the run folder"  # the run lock's owner line, config.json
    if case.moment == "baseline validation":
        return "metrics.csv"
    writes = {"make_samples": "a sample round", "write_tensors": "a state", "save_single_file": "a checkpoint"}
    return next((writes[seam] for seam in (case.seam, *case.after) if seam in writes), "nothing")


# --- running train.py ----------------------------------------------------------------------------------------


@dataclass
class Ended:
    name: str
    code: int
    output: str
    pid: int


@dataclass
class Launcher:
    """Runs train.py (through fault_runner) in processes forked from one server per module, which imported torch,
    diffusers and the trainer once; each run's output goes to <folder>/<name>.out."""

    context: multiprocessing.context.BaseContext
    folder: Path
    ended: list[Ended] = field(default_factory=list)

    def run(
        self,
        argv: list[str],
        name: str,
        fault: dict | None = None,
        timeline: Path | None = None,
        on_second_run: Callable[[int], None] | None = None,
    ) -> Ended:
        output = self.folder / f"{name}.out"
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=fault_runner.run_train, args=(argv, output, fault, theirs, timeline))
        process.start()
        theirs.close()
        try:
            while (request := self.next_request(ours, process, output)) is not None:
                # The run waits, its folder locked, while a second run starts on the same folder.
                on_second_run(request["pid"])
                ours.send("go on")
        finally:
            if process.is_alive():
                process.kill()
            process.join()
            ours.close()
        text = output.read_text(encoding="utf-8") if output.is_file() else f"(no output: {output} was not written)"
        ended = Ended(name, process.exitcode, text, process.pid)
        self.ended.append(ended)
        return ended

    @staticmethod
    def next_request(ours, process, output: Path) -> dict | None:
        """The run's request for a second run, or None once it has ended (its end of the pipe closes before the
        fork server reports the exit status, so an EOF on the pipe also means the end)."""
        ready = wait([ours, process.sentinel], timeout=RUN_TIMEOUT)
        if not ready:
            raise AssertionError(f"{output.stem}: still running after {RUN_TIMEOUT} s:\n{tail(output)}")
        if process.sentinel in ready:
            return None
        try:
            return ours.recv()
        except EOFError:
            return None


def tail(path: Path, lines: int = 40) -> str:
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[-lines:]) if path.is_file() else ""


@pytest.fixture(scope="module")
def fork_server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["train", "trainer.loop", "tests.fault_runner"])
    return context


def config_argv(folder: Path, model_cache: Path, logdir: Path) -> list[str]:
    prompts = folder / "samples.json"
    prompts.write_text(json.dumps(SAMPLES), encoding="utf-8")
    config = write_config(folder, model_cache, logdir=str(logdir), sample_prompts=str(prompts), **RUN)
    return ["--config", str(config)]


# --- what a run folder holds ---------------------------------------------------------------------------------


def run_dirs(logdir: Path) -> list[Path]:
    return sorted(path for path in logdir.iterdir() if path.is_dir()) if logdir.is_dir() else []


def final_state(run_dir: Path) -> Path:
    return run_dir / "state" / f"state-gs{STEPS:05d}"


def state_weights(state: Path) -> dict[str, torch.Tensor]:
    return {
        f"{model}.{key}": tensor
        for model in TRAINED
        for key, tensor in load_file(state / f"{model}.safetensors").items()
    }


def metrics_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the timing column, which differs between runs."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as handle:
        return [
            {key: value for key, value in row.items() if key != "images_per_second"} for row in csv.DictReader(handle)
        ]


def checkpoint_contents(run_dir: Path) -> dict[str, dict[str, str]]:
    """Checkpoint name -> {file relative to ckpts/: digest of its content}; the single file counts under the
    checkpoint's name."""
    checkpoints: dict[str, dict[str, str]] = {}
    for path in sorted((run_dir / "ckpts").rglob("*")):
        if path.is_file():
            relative = path.relative_to(run_dir / "ckpts")
            name = relative.parts[0].removesuffix(".safetensors")
            checkpoints.setdefault(name, {})[relative.as_posix()] = content_digest(path)
    return checkpoints


def content_digest(path: Path) -> str:
    """What a file holds, not its bytes where those may differ for equal content: a .safetensors file by its
    tensors and metadata (its header lists the metadata in an order that differs between processes), a JSON
    file by its data (a tokenizer.json without the truncation and padding its tokenizer was last called with:
    a checkpoint written right after a resume precedes any call), any other file by its bytes."""
    digest = hashlib.sha256()
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as tensors:
            digest.update(json.dumps(tensors.metadata(), sort_keys=True).encode())
            for key in sorted(tensors.keys()):
                tensor = tensors.get_tensor(key)
                digest.update(f"{key} {tensor.dtype} {list(tensor.shape)}".encode())
                digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if path.name == "tokenizer.json":
            data = {key: value for key, value in data.items() if key not in ("truncation", "padding")}
        digest.update(json.dumps(data, sort_keys=True).encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def leftovers(logdir: Path) -> list[str]:
    return [str(path) for path in logdir.rglob("*") if LEFTOVER.search(path.name)]


# --- the run left alone ----------------------------------------------------------------------------------------


@dataclass
class Reference:
    run_dir: Path
    timeline: list[dict]
    weights: dict[str, torch.Tensor]
    rows: list[dict]
    checkpoints: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def reference(fork_server, model_cache, tmp_path_factory) -> Reference:
    """The uninterrupted run, once per module, through the same runner (no fault): the timeline of its seam calls
    is what the seeds choose from."""
    folder = tmp_path_factory.mktemp("reference")
    timeline = folder / "timeline.jsonl"
    ended = Launcher(fork_server, folder).run(
        config_argv(folder, model_cache, folder / "logs"), "reference", timeline=timeline
    )
    assert ended.code == 0, ended.output
    (run_dir,) = run_dirs(folder / "logs")
    events = [json.loads(line) for line in timeline.read_text(encoding="utf-8").splitlines()]
    return Reference(
        run_dir, events, state_weights(final_state(run_dir)), metrics_rows(run_dir), checkpoint_contents(run_dir)
    )


def test_the_reference_run_has_every_moment_and_its_checkpoints_load_with_diffusers(reference, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    calls = {seam: sum(1 for event in reference.timeline if event["seam"] == seam) for seam, _ in MOMENTS.values()}
    # 8 steps; validation before step 1 and after steps 4 and 8; samples after 3 and 6 and at the end;
    # two checkpoints; two states of 4 files (unet, text encoder, optimizer, random generators).
    assert calls == {
        "load_model": 1,
        "validation": 3,
        "training_loss": 8,
        "make_samples": 3,
        "save_single_file": 2,
        "write_tensors": 8,
    }
    assert sorted(reference.checkpoints) == ["sig-ep000-gs00004", "sig-ep001-gs00008"]
    for name in reference.checkpoints:
        folder = reference.run_dir / "ckpts" / name
        from_folder = StableDiffusionPipeline.from_pretrained(str(folder))
        from_file = StableDiffusionPipeline.from_single_file(
            f"{folder}.safetensors", config=str(tiny_model_dir), local_files_only=True
        )
        for part in ("unet", "text_encoder", "vae"):
            expected = getattr(from_folder, part).state_dict()
            for key, tensor in getattr(from_file, part).state_dict().items():
                # the single file holds fp16 weights (save_full_precision off)
                assert torch.equal(tensor, expected[key].half().float()), f"{name}: {part}.{key}"
    final = StableDiffusionPipeline.from_pretrained(str(reference.run_dir / "ckpts" / "sig-ep001-gs00008"))
    trained = {
        f"{model}.{key}": tensor for model in TRAINED for key, tensor in getattr(final, model).state_dict().items()
    }
    assert all(torch.equal(trained[key], tensor) for key, tensor in reference.weights.items())


# --- a small disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs for the logdir (a whole run holds 34 MB at its end, about 45 MB while its last state is
    written beside the two it keeps); unmounted after the test."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"a full disk is simulated with a tmpfs, and mounting one failed (CI runs as root): "
            f"{mounted.stderr.strip()}"
        )
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


# --- the test ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed",
    range(SEEDS),
    ids=lambda seed: "{}-{}-at-{}".format(seed, *reversed(moment_and_kind(seed))).replace(" ", "-"),
)
def test_after_a_fault_the_resumed_run_ends_like_the_run_left_alone(
    seed, reference, fork_server, model_cache, tmp_path, request
):
    case = fault_case(seed, reference.timeline)
    disk = request.getfixturevalue("small_disk") if case.kind == "disk full" else None
    logdir = (disk or tmp_path) / "logs"
    filler = disk / "filler" if disk else None
    argv = config_argv(tmp_path, model_cache, logdir)
    launcher = Launcher(fork_server, tmp_path)
    second_runs: list[tuple[Ended, int]] = []

    def start_a_second_run(first_pid: int) -> None:
        second_runs.append((launcher.run(argv + ["--resume_from", "latest"], "second"), first_pid))

    faulted = launcher.run(argv, "faulted", fault=case.fault(filler), on_second_run=start_a_second_run)
    assert f"{FIRED} {case.kind} at call {case.call} of {case.seam}" in faulted.output, f"{case}\n{faulted.output}"
    check_the_faulted_run(case, faulted, logdir)
    for second, first_pid in second_runs:
        check_the_second_run(case, second, first_pid, logdir)

    if faulted.code != 0:
        if filler:
            filler.unlink()  # space freed, as the message asks
        resumed = launcher.run(argv + ["--resume_from", "latest"], "resumed")
        assert resumed.code == 0, f"{case}\n{resumed.output}"

    for ended in launcher.ended:
        assert "Traceback" not in ended.output, f"{case}: a traceback in the {ended.name} run\n{ended.output}"
    started_its_own_run = any(second.code == 0 for second, _ in second_runs)
    check_the_logdir(case, logdir, reference, finished_runs=2 if started_its_own_run else 1)


def check_the_faulted_run(case: Case, ended: Ended, logdir: Path) -> None:
    described = f"{case}\n{ended.output}"
    if case.kind in ("SIGTERM", "SIGINT"):
        assert f"{case.kind}: finishing the current step" in ended.output, described
        if case.steps_started == STEPS:  # the signal came during the last step or after it: nothing is left
            assert ended.code == 0 and f"done: {STEPS} steps" in ended.output, described
            return
        assert ended.code == EXIT_CODES[case.kind], described
        if case.moment == "loading":
            assert "nothing was trained and no run folder was written" in ended.output, described
            assert not run_dirs(logdir), described
        elif case.steps_started == 0:  # the baseline validation
            assert "before the first step: nothing was trained or saved, and the new run folder" in ended.output
            assert not run_dirs(logdir), described
        else:
            assert f"stopped ({case.kind}) after step {case.steps_started} of {STEPS}" in ended.output, described
    elif case.kind == "SIGKILL":
        assert ended.code == EXIT_CODES["SIGKILL"], described
    elif case.kind == "disk full":
        assert "No space left on device" in ended.output, described
        if first_write_after(case) in ("a state", "a checkpoint"):
            assert "the disk is full" in ended.output, described
        if case.saves_left:
            assert ended.code == EXIT_CODES["save failed"], described
        else:
            assert ended.code == 0, f"every save was done: only the last samples are lost\n{described}"
    else:  # a second run was started: this one goes on as if nothing happened
        assert ended.code == 0, described


def check_the_second_run(case: Case, second: Ended, first_pid: int, logdir: Path) -> None:
    """`latest` takes the first run's newest state, and the lock on its folder refuses the second run; with no
    state yet, the second run starts a run of its own, in a folder of its own."""
    described = f"{case}\nthe second run:\n{second.output}"
    if case.states_saved == 0:
        assert second.code == 0, described
    else:  # also after the final save: the first run has not written its end yet, so the lock refuses
        assert second.code == EXIT_CODES["config error"], described
        (run_dir,) = [run_dir for run_dir in run_dirs(logdir) if (run_dir / "state").is_dir()]
        assert f"the run folder '{run_dir}' is in use by another run (pid {first_pid} " in second.output, described


def check_the_logdir(case: Case, logdir: Path, reference: Reference, finished_runs: int) -> None:
    assert not leftovers(logdir), f"{case}: temporary files left: {leftovers(logdir)}"
    finished = [run_dir for run_dir in run_dirs(logdir) if final_state(run_dir).is_dir()]
    assert len(finished) == finished_runs, f"{case}: run folders {run_dirs(logdir)}"
    for run_dir in finished:
        actual = state_weights(final_state(run_dir))
        different = [key for key in reference.weights if not torch.equal(reference.weights[key], actual[key])]
        assert not different, f"{case}: {len(different)} tensors differ from the run left alone, e.g. {different[:3]}"
        checkpoints = checkpoint_contents(run_dir)
        for name, files in reference.checkpoints.items():
            assert checkpoints.get(name) == files, f"{case}: checkpoint {name} is not the uninterrupted run's"
        for name, files in checkpoints.items():  # one more where a stopped run saved: complete too
            assert {f"{name}/model_index.json", f"{name}.safetensors"} <= set(files), f"{case}: {name}: {files}"
        assert metrics_rows(run_dir) == reference.rows, f"{case}: metrics.csv differs from the run left alone"
