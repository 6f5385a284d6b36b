#!/usr/bin/env bash
# The oldest versions vtattn supports, which are also the lent GPU machine's:
# Python 3.12, torch 2.11.0 (CUDA 13.0 build), triton 3.6.0, transformers 5.17.0, in .venv-oldest.
#   scripts/oldest_env.sh test      CPU-only build there, then the CPU, interpreter and
#                                   benchmark-smoke suites and the Triton sm_90 compile
#                                   (scripts/test.sh runs it: CI checks the lower bounds of the
#                                   supported versions)
#   scripts/oldest_env.sh prebuild  build the extension for sm_90a there into .prebuilt/ (ignored),
#                                   with a stamp of its sources: carried to the GPU machine
#                                   (run carry=[".prebuilt"]), it spares scripts/gpu_check.sh the
#                                   build minutes of a short device session
#   scripts/oldest_env.sh stamp     print that stamp (gpu_check.sh compares it with its sources)
# Each mode builds in its own copy of the tree under build/ (prebuild and test build differently);
# a build whose sources, torch and options are unchanged is reused (`python -m vtattn build-check`),
# and ninja recompiles only what changed (in that copy's build/env/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv-oldest
MODE=${1:?usage: scripts/oldest_env.sh test|prebuild|stamp}

stamp() {  # the compiled part's sources, found without git (the tree reaches the device without .git)
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}
[ "$MODE" = stamp ] && { stamp; exit 0; }
case $MODE in
  test) TREE=$ROOT/build/oldest-cpu; BUILD_ENV=(VTATTN_SKIP_CUDA=1 VTATTN_REQUIRE_CUDA=0) ;;
  prebuild) TREE=$ROOT/build/oldest-cuda; BUILD_ENV=(VTATTN_SKIP_CUDA=0 VTATTN_CUDA_ARCHS=90a VTATTN_REQUIRE_CUDA=1) ;;
  *) echo "unknown mode $MODE: test, prebuild or stamp" >&2; exit 2 ;;
esac

T0=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  echo "[oldest 1/3] creating $VENV (Python 3.12 if there is one)"
  # Python 3.12 as on the device: pyenv's if it has one, else any on PATH, else python3.
  PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep -m1 '^3\.12' || true)
  export PYENV_VERSION
  for py in python3.12 python3; do
    if "$py" -c '' 2>/dev/null; then
      "$py" -m venv "$VENV"
      break
    fi
  done
  unset PYENV_VERSION
fi
# numpy < 2.3: triton 3.6's interpreter fails under newer numpy (its bug; the GPU path is unaffected).
DEPS=(torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.3" setuptools wheel ninja pytest pytest-benchmark
      expecttest tqdm matplotlib)
if [ "$(cat "$VENV/.vtattn-deps" 2>/dev/null)" != "${DEPS[*]}" ]; then
  echo "[oldest 2/3] installing ${DEPS[*]} (the first time ~1-3 min)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${DEPS[@]}"
  echo "${DEPS[*]}" >"$VENV/.vtattn-deps"
fi

if [ "$MODE" = prebuild ]; then  # the device loads only a build for its Python and torch
  "$VENV/bin/python" -c 'import sys, torch
sys.exit(None if sys.version_info[:2] == (3, 12) and torch.__version__ == "2.11.0+cu130" else
         f"prebuild needs Python 3.12 and torch 2.11.0+cu130 (the GPU machine), got {sys.version.split()[0]} "
         f"and {torch.__version__}: remove .venv-oldest and provide a Python 3.12")'
fi

mkdir -p "$TREE"
rm -rf "$TREE/csrc" "$TREE/python" "$TREE/triton_kernels" "$TREE/tests" "$TREE/benchmarks"
# cp -p keeps the sources' times: ninja recompiles only what changed since the last build here.
git ls-files -co --exclude-standard -z | xargs -0 cp -p --parents -t "$TREE"
ln -sfn ../../triton_kernels "$TREE/python/vtattn/triton_kernels"  # what an editable install maps
log=$TREE/build.log
built_from=$(cd "$TREE" && stamp)  # the copy that is compiled, whatever the checkout does meanwhile
# The standard toolkit rather than torch's guess from nvcc on PATH (see scripts/setup_env.sh).
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
export "${BUILD_ENV[@]}"
export PYTHONPATH=$TREE/python
if why=$(cd "$TREE" && "$VENV/bin/python" -m vtattn build-check 2>&1); then
  echo "[oldest 3/3 +$((SECONDS - T0))s] $why"
else
  why=${why##*$'\n'}
  echo "[oldest 3/3 +$((SECONDS - T0))s] ${why#building: }: building in $TREE (log: $log)"
  # shellcheck source=scripts/build_progress.sh
  . scripts/build_progress.sh
  if ! (cd "$TREE" && MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace 2>&1) \
      | tee "$log" | build_progress "$T0"; then
    tail -40 "$log"
    echo "oldest_env $MODE: build failed"
    exit 1
  fi
fi

if [ "$MODE" = prebuild ]; then
  rm -rf .prebuilt && mkdir .prebuilt
  so=$(cd "$TREE" && "$VENV/bin/python" -c 'from vtattn import _ext; print(_ext.location()[0])')
  # Host debug info is half the file and nothing on the device reads it; the kernels' line info stays.
  # Its build facts are compiled in: the device's loader checks them.
  strip --strip-debug -o ".prebuilt/$(basename "$so")" "$so"
  echo "$built_from" >.prebuilt/STAMP
  echo "prebuilt: $(ls .prebuilt | tr '\n' ' ')($(du -sh .prebuilt | cut -f1)), stamp $(cat .prebuilt/STAMP)"
  exit 0
fi

cd "$TREE"
"$VENV/bin/python" -m vtattn info >info.txt && head -12 info.txt
status=0
# The Triton kernels lower for sm_90 with the device's triton on the second core while the suites run.
"$VENV/bin/python" scripts/compile_triton.py --all-configs >compile_triton.log 2>&1 &
compile_pid=$!
# The slow two-environment build test runs in the main suite (scripts/test.sh) only.
"$VENV/bin/python" -m pytest tests -q -p no:cacheprovider -m "not slow" || status=1
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest tests/interpreter -q -p no:cacheprovider || status=1
"$VENV/bin/python" -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider || status=1
wait "$compile_pid" || { status=1; echo "oldest_env test: scripts/compile_triton.py failed"; }
cat compile_triton.log
exit $status
