#!/usr/bin/env bash
# Reproduce the cyclical-LR post's runs (configs/post_*.json) on a data set, then compare them with compare.py.
#
#   scripts/reproduce_post.sh DATA_DIR [OUT_DIR] [options] [--key value ...]
#
# Options:
#   --demo            the built-in tiny-pretrained model at 64 px on the CPU, its UNet only, LRs x195 for
#                     it (1.13e-6 -> 2.2e-4), no intermediate checkpoints, one run per
#                     CPU core at a time: docs/samples-and-compare.md's figures come from `--demo` on
#                     demo/data
#   --jobs N          train N runs at a time (default 1; --demo: the CPU cores); each run then gets
#                     OMP_NUM_THREADS=1 unless it is set, so that the runs do not fight over the cores
#   --lr_scale F      multiply every LR of the configs (lr, lr_min, the stages' peaks) by F
#   --shorten N       divide run lengths and stepsizes by N, keeping every run's number of cycles
#                     (N=2 halves the demo's time; lengths must divide exactly)
#   --runs "A B"      which runs, of: constant cyclic_x10 cyclic_x2 cyclic_5_5 staged (default: all five)
#   --steps "S ..."   steps whose samples compare.py puts side by side (default: "min 400 final": each
#                     run's validation minimum, step 400, where the post's runs had theirs, and each
#                     run's end)
#   --key value       any config key, for every run, after the configs' own values (e.g. --resume_ckpt
#                     path/to/model, --max_epochs 50, --sample_prompts my_prompts.txt)
# Environment: PYTHON (default: .venv/bin/python when present, else python3).
#
# OUT_DIR (default out/reproduce_post) receives configs/ (the configs as run), runs/<run>/<run folder>,
# logs/<run>.log and compare/ (report.html and the PNGs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ALL_RUNS="constant cyclic_x10 cyclic_x2 cyclic_5_5 staged"
# The post's 1.13e-6 peak becomes 2.2e-4, inside the LR finder's range for the demo concept (configs/demo.json:
# 3.87e-5 to 3.11e-4); its constant 5.65e-7 becomes 1.1e-4, next to the best constant LR for fine-tuning
# tiny-pretrained (1e-4 or 1.7e-4, bench/lr_finder_check.py).
DEMO_LR_SCALE=195
# UNet only, as the demo: training tiny-pretrained's text encoder on 20 images collapses its prompts (README).
DEMO_OVERRIDES=(--resume_ckpt tiny-pretrained --disable_textenc_training true --resolution 64 --optimizer adamw
                --mixed_precision no --save_every_n_epochs null --no_save_ckpt true)

usage() { sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 2; }

[[ $# -ge 1 && "$1" != -* ]] || usage
DATA_DIR="$(cd "$1" && pwd)"; shift
OUT_DIR="out/reproduce_post"
if [[ $# -ge 1 && "$1" != -* ]]; then OUT_DIR="$1"; shift; fi
mkdir -p "$OUT_DIR"; OUT_DIR="$(cd "$OUT_DIR" && pwd)"

LR_SCALE=1
SHORTEN=1
JOBS=1
RUNS="$ALL_RUNS"
STEPS=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --demo) LR_SCALE=$DEMO_LR_SCALE; JOBS=$(nproc); EXTRA=("${DEMO_OVERRIDES[@]}" "${EXTRA[@]}"); shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --lr_scale) LR_SCALE="$2"; shift 2 ;;
    --shorten) SHORTEN="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

# Samples of four training captions every 200 steps (of the post's lengths), the same in every run, so the
# runs can be compared by eye at the same steps.
SAMPLE_OVERRIDES=(--sample_prompts "$ROOT/configs/post_samples.json" --sample_steps $((200 / SHORTEN)))
STEPS="${STEPS:-min $((400 / SHORTEN)) final}"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# Write each config as it will run: LRs scaled, lengths shortened, relative file paths made absolute (the
# copy lives elsewhere).
scaled_config() {  # name
  local source="$ROOT/configs/post_$1.json" target="$OUT_DIR/configs/post_$1.json"
  [[ -f "$source" ]] || { echo "error: no run '$1' (no $source); runs are: $ALL_RUNS" >&2; exit 2; }
  mkdir -p "$OUT_DIR/configs"
  "$PYTHON" - "$source" "$target" "$LR_SCALE" "$SHORTEN" <<'EOF'
import json, sys
from pathlib import Path

source, target, scale, shorten = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
config = json.loads(source.read_text())


def scaled(lr):  # 3 significant digits: 1.13e-6 x 885 is 1e-3, not 1.00005e-3
    return float(f"{lr * scale:.3g}")


for key in ("lr", "lr_min", "text_encoder_lr", "text_encoder_lr_min"):
    if config.get(key) is not None:
        config[key] = scaled(config[key])
for stage in config.get("lr_cycle_stages") or []:
    stage["lr"] = scaled(stage["lr"])
# Lengths and stepsizes shrink together, so every run keeps its number of cycles and ends where it ended.
for key in ("max_epochs", "max_steps", "lr_decay_steps", "lr_stepsize_epochs", "save_every_n_epochs"):
    if config.get(key) is not None:
        if key != "lr_stepsize_epochs" and config[key] % shorten:
            sys.exit(f"error: --shorten {shorten}: {key} {config[key]} of {source.name} is not a multiple of it")
        config[key] = config[key] / shorten if key == "lr_stepsize_epochs" else config[key] // shorten
if isinstance(config.get("validation_config"), str):
    config["validation_config"] = str((source.parent / config["validation_config"]).resolve())
target.write_text(json.dumps(config, indent=2) + "\n")
EOF
}

# Every config is written (and checked) before the first run starts.
mkdir -p "$OUT_DIR/logs"
for name in $RUNS; do scaled_config "$name"; done
if (( JOBS > 1 )); then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

train_run() {  # name; our sample settings go first, so that the caller's --key value pairs override them
  "$PYTHON" "$ROOT/train.py" --config "$OUT_DIR/configs/post_$1.json" --data_root "$DATA_DIR" \
    --logdir "$OUT_DIR/runs/$1" "${SAMPLE_OVERRIDES[@]}" "${EXTRA[@]}" >"$OUT_DIR/logs/$1.log" 2>&1
  echo "   $1 done after $(( $(date +%s) - START )) s"
}

trap 'kill $(jobs -pr) 2>/dev/null || true' EXIT  # an interrupted script leaves no training behind
START=$(date +%s)
declare -A PIDS
for name in $RUNS; do
  while (( $(jobs -pr | wc -l) >= JOBS )); do wait -n || true; done  # statuses are collected below
  echo "== $name: training (log: $OUT_DIR/logs/$name.log)"
  train_run "$name" &
  PIDS[$name]=$!
done
FAILED=0
for name in $RUNS; do
  if ! wait "${PIDS[$name]}"; then
    echo "error: run '$name' failed; the end of its log:" >&2
    tail -n 20 "$OUT_DIR/logs/$name.log" >&2
    FAILED=1
  fi
done
(( FAILED == 0 )) || exit 1

RUN_DIRS=()
for name in $RUNS; do RUN_DIRS+=("$(ls -d "$OUT_DIR/runs/$name"/*/ | sort | tail -n 1)"); done
echo "== comparing ${#RUN_DIRS[@]} runs"
# shellcheck disable=SC2086  # STEPS is a list of words on purpose
"$PYTHON" "$ROOT/compare.py" "${RUN_DIRS[@]}" -o "$OUT_DIR/compare" --steps $STEPS
echo "all done in $(( $(date +%s) - START )) s; open $OUT_DIR/compare/report.html"
