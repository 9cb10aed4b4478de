#!/usr/bin/env bash
# Install sam-geo with every extra (sam2, text) and everything its tests need into
# ./.venv (Python 3.10+).
# torch is pinned to the release the project is tested with; SAM 2's package ships as
# source only and needs torch at build time, so it is built against the installed torch
# (CPU build of its optional CUDA extension skipped).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 "setuptools>=70.1" wheel
SAM2_BUILD_CUDA=0 python -m pip install --quiet --no-build-isolation "sam2==1.1.0"
python -m pip install --quiet -e ".[test,sam2,text]"
echo "installed; activate with: . .venv/bin/activate"
