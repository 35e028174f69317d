"""scripts/gpu_check.sh without a GPU, so that it never rots: the --cpu check through the script, trimmed with --only
to the resume check (three train.py runs: SIGTERM, resume, the run left alone, and the resumed run's checkpoint
loaded by diffusers) and the CUDA-only runs, which must say why they are skipped. The full --cpu run (every run and
the sweep) takes several minutes on 2 cores; its output is kept in bench/results/gpu_check_cpu/."""

import json
import subprocess

import pytest

from bench import gpu_check
from tests.conftest import ROOT


def test_the_cpu_check_resumes_exactly_and_says_what_needs_cuda(model_cache, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            str(ROOT / "scripts" / "gpu_check.sh"),
            "--cpu",
            str(out),
            "--cache_dir",
            str(model_cache),
            "--only",
            "resume,compile,fp16,xformers",
            "--work_dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("CPU: torch ")  # the versions come first
    report = json.loads((out / "gpu_check.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert list(checks) == [
        "compile",
        "resume",
        "defaults",
        "fp16",
        "adamw",
        "caches",
        "checkpointing",
        "xformers",
        "sweep",
    ]
    resume = checks["resume"]
    assert resume["status"] == "ok", resume
    assert resume["details"]["bit_equal"] and 0 < resume["details"]["stopped_at_step"] < gpu_check.CPU.steps
    assert resume["details"]["from_single_file_rel_diff"] <= gpu_check.FP16_ROUNDING
    for name in ("compile", "fp16", "xformers"):
        assert checks[name]["status"] == "skipped" and checks[name]["reason"].startswith("needs CUDA ("), name
    assert {checks[name]["reason"] for name in ("defaults", "adamw", "caches", "checkpointing", "sweep")} == {
        "not selected (--only)"
    }
    assert report["passed"] and report["memory_forecast"]["status"] == "skipped"
    assert report["environment"]["torch"] and report["throughput"] is None
    table = (out / "gpu_check.md").read_text()
    assert "| check | status | seconds | details |" in table and "| torch_compile | skipped | 0 | needs CUDA" in table
    assert not list((tmp_path / "work").iterdir())  # the runs' folders are removed


def test_unknown_checks_are_refused(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["out", "--only", "resume,speed"])
    assert "--only: unknown check(s) speed" in capsys.readouterr().err


def test_variants_say_why_they_cannot_run(monkeypatch):
    xformers = next(v for v in gpu_check.VARIANTS if v.name == "xformers")
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert gpu_check.unavailable(xformers, gpu_check.CPU) == "needs CUDA (xformers runs on CUDA only)"
    assert gpu_check.unavailable(xformers, gpu_check.CUDA) == "xformers is not installed"
    assert all(not gpu_check.unavailable(v, gpu_check.CUDA) for v in gpu_check.VARIANTS if v is not xformers)


def test_the_cuda_plan_fits_nine_minutes():
    """The budget covers everything but the interpreter's start (imports: seconds) and the sweep's imports, which
    it is allowed on top of its own budget; the SIGTERM leaves steps to resume."""
    mode = gpu_check.CUDA
    assert mode.budget_s + gpu_check.SWEEP_START_S + 30 <= 9 * 60
    assert mode.model == "random:sd15" and mode.resolution == 512 and mode.sweep_s <= mode.sweep_max_s
    assert 0 < mode.sigterm_after <= mode.steps - 5
