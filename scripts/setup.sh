#!/usr/bin/env bash
# Create .venv and install i2vd with its test tools. The CPU build of torch is pinned and installed FIRST:
# an unpinned torch would pull a multi-GB CUDA build. On a GPU host set I2VD_TORCH to the CUDA wheel you want,
# e.g. I2VD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${I2VD_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options on purpose
.venv/bin/python -m pip install --quiet $TORCH_SPEC
# `cluster` brings Ray: the ray executor's tests run everywhere the suite runs.
.venv/bin/python -m pip install --quiet -e ".[test,cluster]"
echo "i2vd installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
