#!/usr/bin/env bash
# Build, test, sanitize and benchmark vtattn on a GPU machine (no network; python3 is the torch one):
#   scripts/gpu_check.sh OUTDIR [all|tests|bench]
# One device command each (they are cut at 600 s; every mode stays within 570 s):
#   tests: build, `vtattn info`, every gpu-marked test (verbose, so a run cut short still shows
#          what passed; pytest-xdist workers where installed), compute-sanitizer memcheck +
#          racecheck on the CUDA-backend tests;
#   bench: build, `python -m vtattn.bench` (BENCH_ARGS adds options, e.g. "--filter e2e", or
#          "--resume PREV.json" to finish a run that ran out of time);
#   all:   both in one command (the default: a session's device time fits about one such call).
# Build: with a .prebuilt/ from `scripts/oldest_env.sh prebuild` (carried with the call) whose stamp
# matches the sources, its extension is used as is and the build share passes on to the later
# steps; otherwise the extension is built here. VTATTN_GIT_COMMIT names the commit in the
# benchmark header (the tree arrives without .git).
# Writes at most 8 files to OUTDIR (the device tool returns at most 8): summary.txt (GPU,
# `vtattn info`, each step's exit status), build.log, pytest_gpu.log, pytest_gpu.xml,
# sanitizer.log, bench.log, bench.json, bench.csv. Every step runs even if an earlier one failed.
# Each step has a time share; time a step leaves unused passes on.
set -u
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [all|tests|bench]}
MODE=${2:-all}
case $MODE in
    all) SHARES=(210 20 150 60 30 100) ;;   # build info pytest memcheck racecheck bench
    tests) SHARES=(210 20 250 60 30 0) ;;
    bench) SHARES=(210 20 0 0 0 340) ;;
    *) echo "unknown mode $MODE: all, tests or bench" >&2; exit 2 ;;
esac
# GPU_CHECK_LIMIT: the seconds this call may take when less than the shares' 570 (a second call in
# the same device session): no step runs past it.
LIMIT=${GPU_CHECK_LIMIT:-570}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=$OUT/summary.txt
START=$SECONDS
UNTIL=0

# step NAME SHARE_S LOG CMD...: run CMD under a timeout ending at the sum of the shares so far,
# so time a step leaves unused passes on. With STEP_CAP=1 the step gets its own share at most
# (the sanitizers, which would use any time given) and a timeout only means it stopped part way.
step() {
    local name=$1 share=$2 log=$3 t0=$SECONDS rc note=""
    shift 3
    UNTIL=$((UNTIL + share))
    local left=$(((UNTIL < LIMIT ? UNTIL : LIMIT) - (SECONDS - START)))
    ((share == 0)) && return
    [ "${STEP_CAP:-0}" = 1 ] && ((left > share)) && left=$share
    if ((left < 5)); then
        echo "$name: skipped, out of time" >>"$SUMMARY"
        return
    fi
    echo "== $name: $* (limit ${left}s)" >>"$log"
    timeout -k 10 "$left" "$@" >>"$log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
        note=" (timed out)"
        [ "${STEP_CAP:-0}" = 1 ] && note=" (stopped at its share: partial, no error found before)"
    fi
    echo "$name: exit $rc in $((SECONDS - t0))s$note" >>"$SUMMARY"
}

{
    echo "gpu_check $MODE $(date -u +%FT%TZ) in $PWD, commit ${VTATTN_GIT_COMMIT:-unknown: set VTATTN_GIT_COMMIT}"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv
    echo
} >"$SUMMARY" 2>&1

# The extension counts as ready when its CUDA kernels are registered with the dispatcher.
ready() { "$PY" -c 'import sys; from vtattn._ext import has_kernel; sys.exit(has_kernel("attention", "cuda"))'; }
use_prebuilt() {
    local stamp
    stamp=$(bash scripts/oldest_env.sh stamp)
    [ "$stamp" = "$(cat .prebuilt/STAMP)" ] || { echo "prebuilt stamp $(cat .prebuilt/STAMP) != sources $stamp"; return 1; }
    cp .prebuilt/_C.*.so .prebuilt/_build_info.py python/vtattn/
    # What an editable install maps: the package from python/, its Triton kernels beside it.
    ln -sfn ../../triton_kernels python/vtattn/triton_kernels
    export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
    ready
}
BUILD=1
if [ -d .prebuilt ]; then
    if use_prebuilt >>"$OUT/build.log" 2>&1; then
        echo "build: prebuilt extension used (stamp $(cat .prebuilt/STAMP))" >>"$SUMMARY"
        BUILD=0
    else
        echo "build: prebuilt extension not usable (build.log says why): building here" >>"$SUMMARY"
    fi
fi
if ((BUILD)); then
    # VTATTN_REQUIRE_CUDA: a build that silently drops the CUDA kernels must fail here.
    step build "${SHARES[0]}" "$OUT/build.log" env VTATTN_CUDA_ARCHS=90a MAX_JOBS=16 VTATTN_REQUIRE_CUDA=1 \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e .
else
    UNTIL=${SHARES[0]}  # the build's share passes on to the later steps
fi
step info "${SHARES[1]}" "$SUMMARY.info" "$PY" -m vtattn info
XDIST=()
"$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)  # Triton compiles in parallel: most of the test time
step pytest_gpu "${SHARES[2]}" "$OUT/pytest_gpu.log" "$PY" -m pytest tests -m gpu -v -rfEs -p no:cacheprovider \
    "${XDIST[@]}" --junitxml="$OUT/pytest_gpu.xml"

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
SUBSET=(-m pytest tests -m gpu -k "gpu-cuda and not slow" -x -q -p no:cacheprovider)
STEP_CAP=1 step memcheck "${SHARES[3]}" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 --print-limit 50 "$PY" "${SUBSET[@]}"
STEP_CAP=1 step racecheck "${SHARES[4]}" "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 1 \
    --print-limit 50 "$PY" "${SUBSET[@]}"

# The bench starts no case it could not finish by the share's end (by its longest case so far) and
# ends itself on the timeout's SIGTERM too: table, CSV and the unfinished cases for --resume.
END=$((UNTIL + SHARES[5] < LIMIT ? UNTIL + SHARES[5] : LIMIT))
BUDGET=$((END - (SECONDS - START) - 30))
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench "${SHARES[5]}" "$OUT/bench.log" "$PY" -m vtattn.bench --json "$OUT/bench.json" --csv "$OUT/bench.csv" \
    --time-budget "$((BUDGET > 0 ? BUDGET : 0))" ${BENCH_ARGS:-}

# `vtattn info` goes into the summary: one file fewer to bring back.
{
    echo
    cat "$SUMMARY.info" 2>/dev/null
    echo "total: $((SECONDS - START))s"
} >>"$SUMMARY"
rm -f "$SUMMARY.info"
grep '^[a-z_]*: \(exit [1-9]\|skipped\)' "$SUMMARY" | grep -qv 'partial, no error' && exit 1
exit 0
