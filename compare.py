"""Compare training runs the way the cyclical-LR post does: LR graphs, validation-loss graphs, a table, and
sample images side by side.

    python compare.py RUN_DIR [RUN_DIR ...] -o OUT_DIR [--steps min 400 final]

Writes to OUT_DIR: lr.png (the LR of every run), val_loss.png (their validation losses on one step axis,
each run's minimum starred and its LR peaks marked along the top, so bumps at the peaks show), summary.csv
(the table), samples_<k>.png (prompt k: a row per run, a column per chosen step: 'min' is each run's
validation minimum) and report.html, one self-contained page with all of it (images embedded; opens offline).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from trainer.sample_index import read_index  # noqa: E402
from utils.metrics import read_metrics  # noqa: E402

FINAL = "final"
AT_MINIMUM = "min"  # --steps min: each run's samples nearest to its validation minimum
# Config keys that name where a run went, not how it trained: left out of "settings that differ".
LOCAL_KEYS = {
    "data_root",
    "logdir",
    "project_name",
    "save_ckpt_dir",
    "model_cache_dir",
    "sample_prompts",
    "resume_from",
}


@dataclass
class Run:
    name: str
    path: Path
    metrics: dict[str, list[tuple[int, float]]]
    summary: dict  # run_summary.json; empty while the run is still going (or if it died)
    config: dict
    samples: dict[int, dict[int, dict]]  # step -> prompt index -> samples/index.json entry

    @property
    def steps(self) -> int:
        if "steps" in self.summary:
            return self.summary["steps"]
        return max((step for series in self.metrics.values() for step, _ in series), default=0)

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return self.metrics.get("loss_val", [])

    @property
    def val_minimum(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest validation loss; None without validation."""
        return min(self.val_losses, key=lambda item: item[1]) if self.val_losses else None


class CompareError(Exception):
    """A run folder that cannot be compared; the message says why."""


# ---------------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------------


def load_runs(paths: list[Path]) -> list[Run]:
    runs = [_load_run(path) for path in paths]
    for run, name in zip(runs, run_names(runs), strict=True):
        run.name = name
    return runs


def _load_run(path: Path) -> Run:
    if not (path / "metrics.csv").is_file():
        raise CompareError(
            f"'{path}' is not a run folder: it has no metrics.csv (give the folder a training "
            f"run wrote, e.g. logs/<project>-<timestamp>)"
        )
    return Run(
        name=path.name,
        path=path,
        metrics=read_metrics(path / "metrics.csv"),
        summary=_read_json(path / "run_summary.json"),
        config=_read_json(path / "config.json"),
        samples=read_index(path / "samples"),
    )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def run_names(runs: list[Run]) -> list[str]:
    """Short names for the graphs: the project names when they tell the runs apart, else the folder names
    (with their parent folder where two are the same)."""
    projects = [run.config.get("project_name") for run in runs]
    if all(projects) and len(set(projects)) == len(projects):
        return projects
    folders = [run.path.name for run in runs]
    return [
        f"{run.path.parent.name}/{run.path.name}" if folders.count(run.path.name) > 1 else run.path.name for run in runs
    ]


# ---------------------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------------------


def plot_lr_curves(runs: list[Run], path: Path) -> Path:
    """One panel per run, stacked on a shared step axis: fifty cycles drawn over ten would hide both."""
    figure, axes = plt.subplots(
        len(runs), 1, sharex=True, sharey=True, squeeze=False, figsize=(10, 0.6 + 1.5 * len(runs))
    )
    colors = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])  # endless: zip stops at the runs
    for run, axis, color in zip(runs, axes[:, 0], colors, strict=False):
        series = run.metrics.get("lr_unet", [])
        if series:
            axis.plot(*zip(*series, strict=True), color=color, linewidth=1.1)
        axis.set_title(run.name if series else f"{run.name}: no LR logged", loc="right", fontsize=8, pad=3)
        axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        axis.grid(alpha=0.3)
    figure.suptitle("Learning rate (UNet)", fontsize=11)
    axes[-1, 0].set_xlabel("optimizer step")
    return _save(figure, path)


PEAK_ROW_TOP, PEAK_ROW_STEP = 0.97, 0.035  # the LR-peak marks' rows, in axis heights from the bottom
ZOOM_FROM = 0.2  # the zoomed panel starts at this share of the longest run: after the first steep fall


def plot_val_losses(runs: list[Run], path: Path) -> Path:
    """Every run's stabilized validation loss against the optimizer step, its minimum starred (and given in the
    legend): the whole run on the left, zoomed past the first steep fall on the right, where runs differ."""
    figure, (whole, zoomed) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 1.4]})
    peaks_of = {run.name: lr_peaks(run.metrics.get("lr_unet", [])) for run in runs}
    for index, run in enumerate(runs):
        if not run.val_losses:
            zoomed.plot([], [], " ", label=f"{run.name}: no validation")
            continue
        best_step, best = run.val_minimum
        peaks = peaks_of[run.name]
        for axis in (whole, zoomed):
            (line,) = axis.plot(
                *zip(*run.val_losses, strict=True),
                "o-",
                markersize=2,
                linewidth=1.1,
                label=f"{run.name} (min {best:.4f} @ {best_step})",
            )
            axis.plot([best_step], [best], "*", color=line.get_color(), markersize=13, markeredgecolor="black")
            # Along the top edge (x in steps, y in axis units), a row per run so that no run's marks hide another's;
            # a bump at an LR peak sits below its mark.
            row = [PEAK_ROW_TOP - PEAK_ROW_STEP * index] * len(peaks)
            axis.plot(peaks, row, "v", color=line.get_color(), markersize=5, transform=axis.get_xaxis_transform())
    if any(peaks_of.values()):
        zoomed.plot([], [], "v", color="gray", label="LR peaks (each run's colour)")
    _zoom_past_the_start(zoomed, runs)
    whole.set(xlabel="optimizer step", ylabel="validation loss", title="Validation loss (stabilized)")
    whole.grid(alpha=0.3)
    zoomed.set(xlabel="optimizer step", title=f"from step {int(zoomed.get_xlim()[0])}")
    return _finish(figure, zoomed, path)


def lr_peaks(series: list[tuple[int, float]]) -> list[int]:
    """The steps where a logged LR series peaks: higher than the next value and not lower than the one before (a
    run that starts high peaks at its first step). A constant or only falling or rising LR has none."""
    values = [value for _, value in series]
    peaks = []
    for index, (step, value) in enumerate(series):  # the last value is never one: nothing after it is lower
        before = values[index - 1] if index else -np.inf
        after = values[index + 1] if index + 1 < len(values) else np.inf
        if value >= before and value > after:
            peaks.append(step)
    return peaks if min(values, default=0) < max(values, default=0) else []


def _zoom_past_the_start(axis, runs: list[Run]) -> None:
    start = ZOOM_FROM * max((run.steps for run in runs), default=0)
    later = [loss for run in runs for step, loss in run.val_losses if step >= start]
    if not later:
        return
    low, high = min(later), max(later)
    margin = (high - low) * 0.08 or abs(high) * 0.05 or 0.05
    axis.set_xlim(left=start)
    axis.set_ylim(low - margin, high + margin)


def _finish(figure, axis, path: Path) -> Path:
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("run", "steps", "epochs", "min val loss", "at step", "final val loss", "lr range", "time")


def summary_row(run: Run) -> dict:
    val = run.val_losses
    best = run.val_minimum
    lrs = [value for _, value in run.metrics.get("lr_unet", [])]
    seconds = run.summary.get("seconds")
    return {
        "run": run.name,
        "steps": run.steps,
        "epochs": _format_number(run.summary.get("epochs")),
        "min val loss": f"{best[1]:.5f}" if best else "",
        "at step": best[0] if best else "",
        "final val loss": f"{val[-1][1]:.5f}" if val else "",
        "lr range": f"{min(lrs):.3g} – {max(lrs):.3g}" if lrs else "",
        "time": _format_duration(seconds) if seconds is not None else "unfinished",
    }


def _format_number(value) -> str:
    return "" if value is None else f"{value:g}"


def _format_duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def write_summary_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def differing_settings(runs: list[Run]) -> list[str]:
    """Config keys whose values differ between the runs (what the comparison is about)."""
    keys = sorted({key for run in runs for key in run.config} - LOCAL_KEYS)
    return [key for key in keys if len({json.dumps(run.config.get(key), sort_keys=True) for run in runs}) > 1]


# ---------------------------------------------------------------------------------------------------------
# Samples side by side
# ---------------------------------------------------------------------------------------------------------


def prompt_key(entry: dict) -> tuple:
    """Samples are comparable when prompt, negative prompt, seed, size and guidance scales all match."""
    return (
        entry["prompt"],
        entry.get("negative_prompt", ""),
        entry["seed"],
        tuple(entry["size"]),
        tuple(entry.get("cfgs", ())),
    )


def comparable_prompts(runs: list[Run]) -> list[tuple]:
    """Every prompt key found in any run, in order of first appearance."""
    keys: dict[tuple, None] = {}
    for run in runs:
        for step in sorted(run.samples):
            for index in sorted(run.samples[step]):
                keys.setdefault(prompt_key(run.samples[step][index]), None)
    return list(keys)


def sample_step(run: Run, wanted: str | int, key: tuple) -> int | None:
    """The step of the run's samples of `key` shown for `wanted`: its last one for 'final', else the one nearest
    to the wanted step, or to its validation minimum for 'min' (the runs may have sampled at different steps).
    None when the run has no such samples (or, for 'min', no validation)."""
    steps = [step for step, entries in run.samples.items() if any(prompt_key(e) == key for e in entries.values())]
    if wanted == AT_MINIMUM:
        wanted = run.val_minimum[0] if run.val_minimum else None
    if not steps or wanted is None:
        return None
    if wanted == FINAL:
        return max(steps)
    return min(steps, key=lambda step: (abs(step - int(wanted)), step))


def sample_file(run: Run, step: int, key: tuple) -> Path:
    entry = next(e for e in run.samples[step].values() if prompt_key(e) == key)
    return run.path / "samples" / entry["file"]


def plot_sample_comparison(runs: list[Run], key: tuple, wanted_steps: list, path: Path) -> Path:
    """A row per run, a column per wanted step; each cell is the run's grid (a column per guidance scale)."""
    cells = [[sample_step(run, wanted, key) for wanted in wanted_steps] for run in runs]
    width, height = key[3]
    columns = len(key[4]) or 1
    cell_inches = (max(2.4, min(width * columns / 110, 9.0)), max(1.2, min(height / 110, 3.0)))
    figure, axes = plt.subplots(
        len(runs),
        len(wanted_steps),
        squeeze=False,
        figsize=(cell_inches[0] * len(wanted_steps) + 1.6, cell_inches[1] * len(runs) + 0.9),
    )
    for row, run in enumerate(runs):
        for column, step in enumerate(cells[row]):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            wanted = wanted_steps[column]
            if step is None:
                missing = "no validation" if wanted == AT_MINIMUM and not run.val_minimum else "no samples"
                axis.text(0.5, 0.5, missing, ha="center", va="center", transform=axis.transAxes, color="gray")
            else:
                axis.imshow(np.asarray(Image.open(sample_file(run, step, key)).convert("RGB")), interpolation="nearest")
                at_minimum = f" (val min @ {run.val_minimum[0]})" if wanted == AT_MINIMUM else ""
                axis.set_title(f"step {step}{at_minimum}", fontsize=8)
                axis.set_xticks(
                    [(i + 0.5) * width for i in range(len(key[4]))], [f"cfg {scale:g}" for scale in key[4]], fontsize=7
                )
            if column == 0:
                axis.set_ylabel(run.name, fontsize=8, rotation=0, ha="right", va="center")
    prompt, negative, seed = key[0], key[1], key[2]
    cfgs = ", ".join(f"{scale:g}" for scale in key[4])
    title = f'"{prompt}"' + (f'  (negative: "{negative}")' if negative else "") + f"   seed {seed}, cfg {cfgs}"
    figure.suptitle(_shorten(title, 140), fontsize=9)
    return _save(figure, path)


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# ---------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------

PAGE_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #bbb; padding: 4px 10px; text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0; }
code { background: #f3f3f3; padding: 1px 4px; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render_report(runs: list[Run], rows: list[dict], figures: dict[str, Path], sample_figures: list[tuple]) -> str:
    """One HTML page, every image inline as a data URI: no file or network access once written."""
    head = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>EveryCycle: {len(runs)} runs compared"
        f"</title><style>{PAGE_STYLE}</style></head><body><h1>{len(runs)} runs compared</h1>"
    )
    sections = [_runs_section(runs), _settings_section(runs), _summary_section(rows)]
    sections += [f"<h2>{html.escape(title)}</h2>{_image(png, title)}" for title, png in figures.items()]
    sections.append(_samples_section(sample_figures))
    return "\n".join([head, *sections, "</body></html>"])


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    """A table of already-escaped cells."""
    lines = ["<table><tr>" + "".join(f"<th>{cell}</th>" for cell in header) + "</tr>"]
    lines += ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join(lines) + "</table>"


def _runs_section(runs: list[Run]) -> str:
    rows = [[html.escape(run.name), html.escape(str(run.path.resolve()))] for run in runs]
    return "<h2>Runs</h2>" + _html_table(["run", "folder"], rows)


def _settings_section(runs: list[Run]) -> str:
    differing = differing_settings(runs)
    if not differing:
        return ""
    rows = [
        [f"<code>{html.escape(key)}</code>", *(html.escape(json.dumps(run.config.get(key))) for run in runs)]
        for key in differing
    ]
    return "<h2>Settings that differ</h2>" + _html_table(["key", *(html.escape(run.name) for run in runs)], rows)


def _summary_section(rows: list[dict]) -> str:
    cells = [[html.escape(str(row[column])) for column in TABLE_COLUMNS] for row in rows]
    return "<h2>Summary</h2>" + _html_table([html.escape(c) for c in TABLE_COLUMNS], cells)


def _samples_section(sample_figures: list[tuple]) -> str:
    if not sample_figures:
        return "<h2>Samples</h2><p>No run made samples (set <code>sample_prompts</code> to get some).</p>"
    parts = [
        "<h2>Samples</h2><p>The same prompt and seed in every run; each image is one grid with a column per "
        "guidance scale.</p>"
    ]
    for key, png in sample_figures:
        prompt, negative, seed, (width, height) = key[0], key[1], key[2], key[3]
        details = f"seed {seed}, {width}x{height}" + (f", negative prompt: {html.escape(negative)}" if negative else "")
        parts.append(f"<h3>{html.escape(prompt)}</h3><p>{details}</p>{_image(png, 'samples: ' + prompt)}")
    return "\n".join(parts)


def _image(png: Path, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='{data_uri(png)}'>"


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def parse_steps(values: list[str]) -> list:
    steps = []
    for value in values:
        if value in (FINAL, AT_MINIMUM):
            steps.append(value)
        elif value.isdigit():
            steps.append(int(value))
        else:
            raise CompareError(f"--steps: '{value}' is neither a step number, 'min' nor 'final'")
    return steps


def compare(run_dirs: list[Path], out_dir: Path, wanted_steps: list) -> Path:
    """Write the figures, the table and report.html for `run_dirs` into `out_dir`; returns the report's path."""
    runs = load_runs(run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(run) for run in runs]
    write_summary_csv(rows, out_dir / "summary.csv")
    figures = {
        "Learning rate": plot_lr_curves(runs, out_dir / "lr.png"),
        "Validation loss": plot_val_losses(runs, out_dir / "val_loss.png"),
    }
    sample_figures = [
        (key, plot_sample_comparison(runs, key, wanted_steps, out_dir / f"samples_{k}.png"))
        for k, key in enumerate(comparable_prompts(runs))
    ]
    report = out_dir / "report.html"
    report.write_text(render_report(runs, rows, figures, sample_figures), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders to compare")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="OUT_DIR", help="where to write")
    parser.add_argument(
        "--steps",
        nargs="+",
        default=[FINAL],
        metavar="STEP",
        help="steps whose samples to show side by side ('final': each run's last samples; 'min': each run's "
        "samples nearest to its validation minimum; a number: each run's samples nearest to it). Default: final",
    )
    args = parser.parse_args(argv)
    try:
        report = compare(args.runs, args.out, parse_steps(args.steps))
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
