#!/usr/bin/env bash
# The end-to-end check of train.py on one GPU (bench/gpu_check.py; under 9 minutes on an H200):
#     scripts/gpu_check.sh OUT_DIR           SD 1.5 architecture with random weights, 512 px; needs CUDA
#     scripts/gpu_check.sh --cpu OUT_DIR     the tiny model at 64 px on the CPU
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md; exits 1 when a check failed. The project's .venv is used
# when there is one, else the python on the PATH (a bare GPU machine with the packages installed).
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[[ -x $python ]] || python=python3
exec "$python" bench/gpu_check.py "$@"
