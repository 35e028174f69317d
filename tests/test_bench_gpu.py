"""bench/gpu_throughput.py without a GPU: the whole sweep end to end on the tiny model, the FLOP counter against
the issue's SD 1.5 figures, the memory model's arithmetic, the peak table, and the compile and time-out paths."""

import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from bench import gpu_throughput as bench
from bench.flops import FlopsPerImage, count_step_flops, flops_per_image

SD1_CONFIGS = Path(__file__).resolve().parents[1] / "trainer" / "model_configs" / "sd1"


@pytest.fixture
def one_thread():
    """The tiny model's tensors are too small to share between threads; on a busy machine OpenMP threads
    spinning against each other make every step several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_tiny_sweep_runs_end_to_end(model_cache, tmp_path, capsys, one_thread):
    report = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--cache_dir", str(model_cache)])

    saved = json.loads((tmp_path / "cpu-tiny.json").read_text())
    assert saved["settings"] == json.loads(json.dumps(report["settings"]))
    assert {"flops_per_image", "peak", "device", "parameters", "sweep", "memory_fit"} <= set(saved)
    assert saved["peak"]["tflops"] > 0 and saved["parameters"]["unet"] > 0
    planned = bench.plan_sweep(bench.TINY)
    assert [(s["group"], s["name"], s["batch_size"]) for s in saved["settings"]] == [
        (group, setting.name, setting.batch_size) for group, setting in planned
    ] + [("compile", "bf16 sdp vae adamw compile", bench.TINY.reference_batch)]
    for setting in saved["settings"]:
        if setting["status"] == "ok":
            assert setting["images_per_second"] > 0 and setting["mfu"] > 0, setting
        else:  # on a CPU only what cannot run here is skipped, and it says why
            assert setting["status"] == "skipped", setting
            assert setting["compile"] or setting["attention"] == "xformers", setting
            assert setting["reason"]
    assert {s["group"] for s in saved["settings"] if s["status"] == "ok"} == {"batch", "variant", "memory"}
    channels_last = [s for s in saved["settings"] if s["channels_last"]]
    assert [(s["group"], s["name"], s["batch_size"], s["status"]) for s in channels_last] == [
        ("variant", "bf16 sdp vae adamw channels_last", bench.TINY.reference_batch, "ok")
    ]
    assert saved["memory_fit"] == []  # no CUDA memory statistics on a CPU

    printed = capsys.readouterr().out
    assert "| group | setting | batch | images/s | peak GiB (allocated) | MFU | note |" in printed
    assert f"wrote {tmp_path / 'cpu-tiny.json'}" in printed


def test_flop_count_is_positive_and_proportional_to_the_batch(tiny_model_dir):
    one, three = (count_step_flops(tiny_model_dir, 64, batch_size=b) for b in (1, 3))
    for part, flops in one.items():
        assert flops > 0 and three[part] == 3 * flops, part
    # The backward costs about twice the forward (gradients of inputs and of weights).
    assert 2.5 * one["unet_forward"] < one["unet_forward_backward"] <= 3 * one["unet_forward"]


def test_sd15_flops_match_the_issue():
    """The issue quotes, per 512 px image: UNet forward 0.80 TFLOP, forward+backward 2.41, VAE encode 1.12.
    Counted on meta tensors: seconds and about 0.5 GB on a CPU."""
    flops = flops_per_image(SD1_CONFIGS, 512)
    assert flops.unet_forward == pytest.approx(0.80e12, rel=0.05)
    assert flops.unet_forward_backward == pytest.approx(2.41e12, rel=0.05)
    assert flops.vae_encode == pytest.approx(1.12e12, rel=0.05)
    assert flops.training_step(cached_latents=False) - flops.training_step(cached_latents=True) == flops.vae_encode


def measured(batch_size: int, peak_gib: float, **setting) -> bench.Result:
    return bench.Result("memory", bench.Setting(batch_size, **setting), "ok", measured={"peak_reserved_gib": peak_gib})


def test_memory_fit_predicts_the_largest_batch_per_card():
    results = [measured(b, 14.0 + 2.0 * b) for b in (1, 4, 16)]
    results += [measured(b, 8.0 + 0.5 * b, **bench.ALL_MEMORY_SAVERS) for b in (1, 4)]
    results.append(measured(8, 3.0, optimizer="adamw8bit"))  # one point is no fit

    fits = {fit["recipe"]: fit for fit in bench.memory_fits(results, (12, 24, 80))}

    assert set(fits) == {"default", "all three"}
    assert fits["default"]["fixed_gib"] == pytest.approx(14.0)
    assert fits["default"]["per_image_gib"] == pytest.approx(2.0)
    # 1 GiB of each card is left for the CUDA context: (24 - 1 - 14) / 2 = 4.5 -> 4.
    assert fits["default"]["largest_batch"] == {"12": 0, "24": 4, "80": 32}
    assert fits["all three"]["largest_batch"] == {"12": 6, "24": 30, "80": 142}

    plan = bench.verification_plan(list(fits.values()), device_gib=40.0)  # an 80 GB card cannot be emulated
    assert [(fit["recipe"], card, setting.batch_size) for fit, card, setting in plan] == [
        ("default", 24, 4),
        ("all three", 24, 30),
    ]
    assert plan[1][2] == bench.Setting(30, **bench.ALL_MEMORY_SAVERS)


def test_markdown_renders_every_kind_of_row():
    """The rows a GPU run produces and a CPU run cannot: compile, capped verification, memory fits."""
    timing = {
        "first_step_seconds": 95.0,
        "timed_steps": 8,
        "seconds": 2.0,
        "skipped_updates": 0,
        "peak_allocated_gib": 20.5,
        "peak_reserved_gib": 22.0,
        "images_per_second": 64.0,
        "achieved_tflops": 226.0,
        "mfu": 0.228,
    }
    results = [
        bench.Result("compile", bench.Setting(16, compile=True), "ok", measured=timing),
        bench.Result("verify", bench.Setting(4), "ok", card_gib=24, measured=timing | {"skipped_updates": 2}),
        bench.Result("variant", bench.Setting(16, attention="xformers"), "skipped", reason="xformers needs CUDA"),
    ]
    fits = bench.memory_fits([measured(b, 14.0 + 2.0 * b) for b in (1, 4, 16)], bench.CARDS_GIB)
    fits[0]["verified"]["24"] = "ok"
    report = {
        "device": {"name": "NVIDIA H200", "torch": "2.13.0"},
        "model": "sd1",
        "resolution": 512,
        "flops_per_image": FlopsPerImage(512, 0.803e12, 2.407e12, 1.117e12, 0.013e12).as_dict(),
        "peak": {"tflops": 989.4, "source": "datasheet", "matmul_tflops": 790.0},
        "sweep": asdict(bench.FULL),
        "settings": [r.as_dict() for r in results],
        "memory_fit": fits,
    }

    text = bench.markdown(report)

    assert "unet forward 0.803 TFLOP" in text and "text encoder forward 0.013 TFLOP" in text
    assert "MFU against 989.4 TFLOP/s (datasheet); a large matmul reached 790.0 TFLOP/s" in text
    assert "| compile | bf16 sdp vae adamw compile | 16 | 64.00 | 20.5 | 22.8% | compiled in 95 s |" in text
    assert (
        "| verify | bf16 sdp vae adamw | 4 | 64.00 | 20.5 | 22.8% | 2 fp16 updates skipped; capped at 24 GB |" in text
    )
    assert "| variant | bf16 xformers vae adamw | 16 | | | | skipped: xformers needs CUDA |" in text
    assert "| default | 14.0 | 2.00 | 0 | 4 (ok) | 32 |" in text


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989.4),
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Some Future GPU", None),
    ],
)
def test_peak_table_prefers_the_more_specific_name(name, tflops):
    assert bench.datasheet_peak_tflops(name) == tflops


def test_the_override_beats_the_table():
    cuda = torch.device("cuda")
    assert bench.choose_peak(cuda, "NVIDIA H200", 790.0, 700.0) == (790.0, "--peak_tflops")
    assert bench.choose_peak(cuda, "NVIDIA H200", None, 700.0)[0] == 989.4
    assert bench.choose_peak(cuda, "Some Future GPU", None, 700.0)[0] == 700.0


def test_the_full_plan_changes_one_thing_at_a_time():
    plan = bench.plan_sweep(bench.FULL)
    settings = [setting for _, setting in plan]
    assert len(settings) == len(set(settings))
    baseline = bench.Setting(bench.FULL.reference_batch)
    variants = [setting for group, setting in plan if group == "variant"]
    assert all(v.batch_size == baseline.batch_size and v != baseline for v in variants)
    assert bench.Setting(bench.FULL.reference_batch, channels_last=True) in variants
    assert [s.batch_size for group, s in plan if group == "batch"] == list(bench.FULL.batch_sizes)


@pytest.fixture(scope="module")
def tiny_bench(tiny_model_dir):
    flops = flops_per_image(tiny_model_dir, 64)
    return bench.Bench(tiny_model_dir, torch.device("cpu"), bench.TINY, flops, peak_tflops=1.0)


def test_the_compile_setting_runs_its_path(tiny_bench, monkeypatch, one_thread):
    """The compile path as a GPU run takes it, with torch.compile replaced by the identity (inductor on a CPU
    takes minutes) and the CUDA-only rule lifted."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    monkeypatch.setattr(bench, "unavailable_reason", lambda setting, device: None)

    result = bench.run_setting(tiny_bench, "compile", bench.Setting(2, compile=True), bench.Deadline(60), 1.0)

    assert result.status == "ok", result.reason
    assert len(compiled) == 1 and result.measured["first_step_seconds"] > 0


def test_a_setting_sets_up_the_model_as_the_trainer_does(tiny_bench, monkeypatch, one_thread):
    """TF32 from the config's allow_tf32 before configure_for_training, which applies channels_last."""
    calls = []
    configure = bench.configure_for_training
    monkeypatch.setattr(bench, "use_tf32", lambda device, allowed: calls.append(("use_tf32", device.type, allowed)))

    def configured(model, config):
        configure(model, config)
        convs = [m.weight for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
        calls.append(
            ("configure", config.channels_last, all(w.is_contiguous(memory_format=torch.channels_last) for w in convs))
        )

    monkeypatch.setattr(bench, "configure_for_training", configured)

    result = bench.run_setting(tiny_bench, "variant", bench.Setting(2, channels_last=True), bench.Deadline(60), 1.0)

    assert result.status == "ok", result.reason
    assert calls == [("use_tf32", "cpu", True), ("configure", True, True)]


def test_a_setting_past_the_deadline_is_stopped_or_skipped(tiny_bench):
    stopped = bench.run_setting(tiny_bench, "batch", bench.Setting(2), bench.Deadline(0.05), needs_seconds=0)
    assert stopped.status == "timeout" and "time budget" in stopped.reason, stopped.reason
    assert torch.is_grad_enabled()  # even when the interrupt landed inside a torch.no_grad() switch
    skipped = bench.run_setting(tiny_bench, "compile", bench.Setting(2), bench.Deadline(30), needs_seconds=180)
    assert skipped.status == "skipped" and skipped.reason.startswith("time budget: needs 180 s")


def test_an_interrupt_a_library_turns_into_another_error_is_still_a_timeout(tiny_bench, monkeypatch):
    """A library can catch the interrupt mid-call and raise its own error instead; the setting still ran out of
    time, and one that fails by itself is still an error."""

    def wrapping_measure(setting, size):
        try:
            time.sleep(5)
        except BaseException as interrupt:
            raise RuntimeError("a library's own message") from interrupt

    monkeypatch.setattr(tiny_bench, "measure", wrapping_measure)
    stopped = bench.run_setting(tiny_bench, "batch", bench.Setting(2), bench.Deadline(0.05), needs_seconds=0)
    assert (stopped.status, stopped.reason) == ("timeout", "stopped at the sweep's time budget (0 s were left)")

    monkeypatch.setattr(tiny_bench, "measure", lambda setting, size: 1 / 0)
    broken = bench.run_setting(tiny_bench, "batch", bench.Setting(2), bench.Deadline(30), needs_seconds=0)
    assert (broken.status, broken.reason) == ("error", "ZeroDivisionError: division by zero")
