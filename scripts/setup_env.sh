#!/usr/bin/env bash
# Set up (or reuse) .venv with torch 2.14.1 (CUDA 13.0 build) and the newest transformers vtattn is
# tested with (pinned: a new release is taken on deliberately), and build vtattn with its CUDA
# kernels. Run by scripts/test.sh and scripts/bench.sh; safe to run again: the dependencies are
# installed once (a stamp in the venv), and the build is reused while csrc/, setup.py, torch and
# the build options are unchanged (`python -m vtattn build-check`), else rebuilt incrementally
# (ninja, in build/env/<venv>/...: only what changed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VTATTN_VENV:-.venv}
T0=$SECONDS
phase() { echo "[setup $1/4 +$((SECONDS - T0))s] $2"; }

if [ ! -x "$VENV/bin/python" ]; then
  phase 1 "creating $VENV (~10 s)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
else
  phase 1 "using $VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

DEPS="torch==2.14.1 triton ninja numpy pytest pytest-benchmark expecttest mypy==2.4.1 tqdm matplotlib transformers==5.25.0"
if [ "$(cat "$VENV/.vtattn-deps" 2>/dev/null)" != "$DEPS" ]; then
  phase 2 "installing $DEPS (the first time ~1-3 min: torch is 5 GB)"
  python -m pip install -q --disable-pip-version-check $DEPS
  echo "$DEPS" >"$VENV/.vtattn-deps"
else
  phase 2 "dependencies already installed ($VENV/.vtattn-deps)"
fi

# torch finds CUDA through nvcc on PATH, which may be a wrapper outside the toolkit: name the
# standard toolkit when there is one (setup.py checks whatever is used: nvcc, headers, cudart).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export VTATTN_CUDA_ARCHS=${VTATTN_CUDA_ARCHS:-80;90a}
export MAX_JOBS=${MAX_JOBS:-2}
# CI must prove the CUDA kernels compile and link: never let the build skip them silently.
export VTATTN_REQUIRE_CUDA=${VTATTN_REQUIRE_CUDA:-1}

# shellcheck source=scripts/build_progress.sh
. scripts/build_progress.sh
if why=$(python -m vtattn build-check 2>&1); then
  phase 3 "$why"
else
  why=${why##*$'\n'}
  [[ $why == building:* ]] || why="building: vtattn is not installed in $VENV yet"
  log=build/logs/build-$(basename "$VENV").log
  mkdir -p build/logs
  phase 3 "${why#building: }: building vtattn._C (setup.py estimates the time below; log: $log)"
  if ! python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . 2>&1 \
      | tee "$log" | build_progress "$T0"; then
    tail -40 "$log"
    echo "setup: the build failed (full log: $log)"
    exit 1
  fi
fi
phase 4 "python -m vtattn info"
python -m vtattn info
echo "[setup done in $((SECONDS - T0))s]"
