"""How long saving a resumable state of SD 1.5 takes, on this machine's CPU and disk.

Builds the SD 1.5 UNet and CLIP ViT-L/14 text encoder (and the VAE, for the checkpoint) from their configs on
the CPU, with placeholder weights (nothing is downloaded; the values do not change write or hash times), gives
AdamW its full state (two fp32 moments per trained parameter, as after the first step) and times, with the
trainer's own functions:

  (a) a state only: utils.state.write_state (weights, optimizer, RNG, JSON, sha256 manifest, atomic rename),
      then verify_state (what `resume_from` does before it trusts a state) and read_state
  (b) a state + a checkpoint, as every checkpoint save writes them: the state of (a), then the diffusers
      folder and the single-file .safetensors (fp16), written right after it

    python bench/state_save_time.py [--dir /fast/disk/tmp] [--out bench/results/state_save_time_cpu.txt]

Needs up to 16 GB of memory and 18 GB of free disk in --dir (removed afterwards); a few minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import save_checkpoint  # noqa: E402
from utils.state import TrainingState, capture_rng, read_state, verify_state, write_state  # noqa: E402

GIGABYTE = 1024**3


def build_sd15_parts():
    """UNet, VAE, text encoder of SD 1.5 (architecture only), a tokenizer and the DDPM noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):  # allocate without the slow random init, then fill cheaply
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_hidden_layers=12,
                projection_dim=768,
                vocab_size=49408,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
    for index, module in enumerate((unet, vae, text_encoder)):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for number, tensor in enumerate(module.state_dict().values()):
                tensor.fill_(0.001 * (index + 1) + 1e-6 * number)
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        clip_sample=False,
    )
    return unet, vae, text_encoder, scheduler


def tokenizer_in(folder: Path):
    from transformers import CLIPTokenizer

    from trainer.tiny_model import write_tokenizer_files

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder))


def adamw_with_state(modules) -> torch.optim.AdamW:
    groups = [{"name": name, "params": list(module.parameters()), "lr": 1e-6} for name, module in modules.items()]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            # Uninitialised moments: on a training machine these pages are resident already; filling them here
            # would time this VM's first-touch page faults (minutes), not the save. The bytes written are the same.
            optimizer.state[parameter] = {
                "step": torch.tensor(1.0),
                "exp_avg": torch.empty_like(parameter),
                "exp_avg_sq": torch.empty_like(parameter),
            }
    return optimizer


def timed(function):
    started = time.monotonic()
    result = function()
    return result, time.monotonic() - started


def quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "state_save_time_cpu.txt")
    args = parser.parse_args()
    quiet_libraries()
    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    report(
        f"state save time, SD 1.5 architecture, CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    (unet, vae, text_encoder, scheduler), seconds = timed(build_sd15_parts)
    trained = {"unet": unet, "text_encoder": text_encoder}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in {**trained, "vae": vae}.items()}
    report(
        f"parameters: UNet {counts['unet']:,}, text encoder {counts['text_encoder']:,}, VAE {counts['vae']:,} "
        f"(built in {seconds:.1f} s)"
    )
    optimizer, seconds = timed(lambda: adamw_with_state(trained))
    report(
        f"AdamW state: 2 fp32 moments x {counts['unet'] + counts['text_encoder']:,} trained parameters "
        f"(allocated in {seconds:.1f} s)"
    )

    work = Path(tempfile.mkdtemp(prefix="state-bench-", dir=args.dir))
    try:
        report(f"writing to {work} ({shutil.disk_usage(work).free / GIGABYTE:.0f} GB free)")

        def state(step: int) -> TrainingState:
            weights = {name: module.state_dict() for name, module in trained.items()}
            info = {
                "epoch": 0,
                "step_in_epoch": step,
                "seed": 555,
                "lr_scheduler": {"step": step},
                "next_lrs": {"unet": 1e-6},
                "grad_scaler": None,
                "progress": {"global_step": step},
                "fingerprint": {},
                "config": {},
            }
            return TrainingState(step, info, weights, optimizer.state_dict(), capture_rng())

        saved, state_seconds = timed(lambda: write_state(state(1), work / "state"))
        report(
            f"(a) state only: {saved.bytes / GIGABYTE:.2f} GB in {state_seconds:.1f} s "
            f"({saved.bytes / GIGABYTE / state_seconds:.2f} GB/s; sha256 of every file and fsync included)"
        )
        _, seconds = timed(lambda: verify_state(saved.path))
        report(f"    verify (sizes + sha256, what resume_from does before trusting it): {seconds:.1f} s")

        def restore() -> None:
            loaded = read_state(saved.path, verify=False)
            for name, module in trained.items():
                module.load_state_dict(loaded.weights[name])
            optimizer.load_state_dict(loaded.optimizer)

        _, seconds = timed(restore)
        report(
            f"    restore into the UNet, text encoder and AdamW: {seconds:.1f} s (safetensors maps the files; "
            f"the optimizer state is read as training touches it)"
        )

        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer_in(work / "tokenizer"),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        paths, checkpoint_seconds = timed(
            lambda: save_checkpoint(pipeline, work / "ckpts", "bench-ep000-gs00001", half=True, single_file=True)
        )
        folder = sum(p.stat().st_size for p in Path(paths["diffusers"]).rglob("*") if p.is_file())
        single = Path(paths["single_file"]).stat().st_size
        report(
            f"    checkpoint: diffusers folder {folder / GIGABYTE:.2f} GB + single file (fp16) "
            f"{single / GIGABYTE:.2f} GB in {checkpoint_seconds:.1f} s"
        )
        report(
            f"(b) state + checkpoint (what every checkpoint save writes, the state first): "
            f"{(saved.bytes + folder + single) / GIGABYTE:.2f} GB in {state_seconds + checkpoint_seconds:.1f} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("$ python bench/state_save_time.py\n" + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
