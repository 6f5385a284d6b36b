#!/usr/bin/env bash
# Set up (or reuse) .venv with torch 2.14.1 (CUDA 13.0 build) and the newest transformers vtattn is
# tested with (pinned: a new release is taken on deliberately), and build vtattn with its CUDA
# kernels. Sourced by scripts/test.sh and scripts/bench.sh; safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VTATTN_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
python -m pip install -q --disable-pip-version-check torch==2.14.1 triton ninja numpy \
  pytest pytest-benchmark expecttest tqdm matplotlib transformers==5.25.0

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# ATen's CUDA headers need cublas/cusparse headers that only torch's pip deps ship (ENV.md).
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
export VTATTN_CUDA_ARCHS=${VTATTN_CUDA_ARCHS:-80;90a}
export MAX_JOBS=${MAX_JOBS:-2}
# CI must prove the CUDA kernels compile and link: never let the build skip them silently.
export VTATTN_REQUIRE_CUDA=${VTATTN_REQUIRE_CUDA:-1}
python -m pip install -q --disable-pip-version-check --no-build-isolation -e .
python -m vtattn info
