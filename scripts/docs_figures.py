"""The pictures the README and docs/tiny-models.md show, made again from a demo run or a tiny-pretrained folder.

    python scripts/docs_figures.py demo runs/demo-<stamp>             # docs/demo_run/samples.png and loss.png
    python scripts/docs_figures.py prompts models/tiny-pretrained      # docs/tiny_pretrained_prompts.png

`demo`: the run's sample grids, a row per sampling step (the first row is step 0, before training), a column per
prompt, and the run's own plots/loss.png. `prompts`: the 30 samples the prompt-accuracy test reads (the 15 prompts
"a <colour> <shape>" with seeds 0 and 1), each with what the measure reads in it, green when right.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.quiet import quiet_third_party_output  # noqa: E402

quiet_third_party_output()  # before diffusers and transformers load (as train.py does)

DEMO_FIGURES = ROOT / "docs" / "demo_run"
PROMPTS_FIGURE = ROOT / "docs" / "tiny_pretrained_prompts.png"
ZOOM = 2  # 64 px samples are too small to judge on a page


def sample_sheet(samples: Path) -> np.ndarray:
    """A row per sampling step (files gsSSSSS-pK.png), the prompts K in order along it."""
    steps = sorted({path.name.split("-")[0] for path in samples.glob("gs*-p*.png")})
    if not steps:
        raise SystemExit(f"error: {samples} holds no sample grids (gsSSSSS-pK.png); give a run folder with samples")
    rows = [
        np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in sorted(samples.glob(f"{step}-p*.png"))], 1)
        for step in steps
    ]
    return np.concatenate(rows, 0)


def write_demo_figures(run: Path, out: Path = DEMO_FIGURES) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sheet = sample_sheet(run / "samples")
    zoomed = Image.fromarray(sheet).resize((sheet.shape[1] * ZOOM, sheet.shape[0] * ZOOM), Image.NEAREST)
    zoomed.save(out / "samples.png")
    shutil.copyfile(run / "plots" / "loss.png", out / "loss.png")
    print(f"wrote {out / 'samples.png'} and {out / 'loss.png'}")


def write_prompt_figure(model: Path, out: Path = PROMPTS_FIGURE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scripts.pretrain_tiny import EVAL_SEEDS, prompt_samples, sample_record, sampling_pipeline
    from trainer.model import load_pretrained

    samples = prompt_samples(sampling_pipeline(load_pretrained(str(model), str(model))))
    columns = len(samples) // len(EVAL_SEEDS)
    figure, axes = plt.subplots(len(EVAL_SEEDS), columns, figsize=(1.1 * columns, 1.8 * len(EVAL_SEEDS)))
    right = 0
    for axis, (prompt, seed, image) in zip(axes.ravel(), samples, strict=True):
        record = sample_record(prompt, seed, image)
        right += record["right"]
        axis.imshow(image, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(prompt.removeprefix("a "), fontsize=6.5)
        seen = " ".join(word or "-" for word in record["seen"])
        axis.set_xlabel(seen, fontsize=6.5, color="green" if record["right"] else "red")
    figure.suptitle(f"{model.name}: asked (above) and read (below), seeds {EVAL_SEEDS}: {right}/{len(samples)}")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}: {right} of {len(samples)} read as asked")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=("demo", "prompts"))
    parser.add_argument("folder", type=Path, help="demo: a run folder; prompts: a tiny-pretrained model folder")
    args = parser.parse_args()
    if args.figure == "demo":
        write_demo_figures(args.folder)
    else:
        write_prompt_figure(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
