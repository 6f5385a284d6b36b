#!/usr/bin/env bash
# Build, test, sanitize and benchmark vtattn on a GPU machine (no network; python3 is the torch one):
#   scripts/gpu_check.sh OUTDIR [all|tests|bench]
# One device command each (they are cut at 600 s; every mode stays within 540 s):
#   tests: build, `vtattn info`, every gpu-marked test (verbose, so a run cut short still shows
#          what passed), compute-sanitizer memcheck + racecheck on the CUDA-backend tests;
#   bench: build, `python -m vtattn.bench` (BENCH_ARGS adds options, e.g. "--filter e2e");
#   all:   both in one command with smaller shares (the default).
# Writes at most 8 files to OUTDIR (the device tool returns at most 8): summary.txt (GPU,
# `vtattn info`, each step's exit status), build.log, pytest_gpu.log, pytest_gpu.xml,
# sanitizer.log, bench.log, bench.json, bench.csv. Every step runs even if an earlier one failed.
# Each step has a time share; time a step leaves unused passes on.
set -u
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [all|tests|bench]}
MODE=${2:-all}
case $MODE in
    all) SHARES=(210 20 90 60 40 120) ;;   # build info pytest memcheck racecheck bench
    tests) SHARES=(210 20 220 60 30 0) ;;
    bench) SHARES=(210 20 0 0 0 310) ;;
    *) echo "unknown mode $MODE: all, tests or bench" >&2; exit 2 ;;
esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
SUMMARY=$OUT/summary.txt
START=$SECONDS
UNTIL=0

# step NAME SHARE_S LOG CMD...: run CMD under a timeout ending at the sum of the shares so far.
step() {
    local name=$1 share=$2 log=$3 t0=$SECONDS rc
    shift 3
    UNTIL=$((UNTIL + share))
    local left=$((UNTIL - (SECONDS - START)))
    ((share == 0)) && return
    if ((left < 5)); then
        echo "$name: skipped, out of time" >>"$SUMMARY"
        return
    fi
    echo "== $name: $* (limit ${left}s)" >>"$log"
    timeout -k 10 "$left" "$@" >>"$log" 2>&1
    rc=$?
    echo "$name: exit $rc in $((SECONDS - t0))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')" >>"$SUMMARY"
}

{
    echo "gpu_check $MODE $(date -u +%FT%TZ) in $PWD"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv
    echo
} >"$SUMMARY" 2>&1

# VTATTN_REQUIRE_CUDA: a build that silently drops the CUDA kernels must fail here.
step build "${SHARES[0]}" "$OUT/build.log" env VTATTN_CUDA_ARCHS=90a MAX_JOBS=16 VTATTN_REQUIRE_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e .
step info "${SHARES[1]}" "$SUMMARY.info" "$PY" -m vtattn info
step pytest_gpu "${SHARES[2]}" "$OUT/pytest_gpu.log" "$PY" -m pytest tests -m gpu -v -rfEs -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Without the caching allocator every tensor is its own allocation, so memcheck sees its bounds.
SUBSET=(-m pytest tests -m gpu -k "gpu-cuda and not slow" -x -q -p no:cacheprovider)
step memcheck "${SHARES[3]}" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SAN" --tool memcheck --error-exitcode 1 --print-limit 50 "$PY" "${SUBSET[@]}"
step racecheck "${SHARES[4]}" "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 1 --print-limit 50 \
    "$PY" "${SUBSET[@]}"

# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
step bench "${SHARES[5]}" "$OUT/bench.log" "$PY" -m vtattn.bench --json "$OUT/bench.json" --csv "$OUT/bench.csv" \
    ${BENCH_ARGS:-}

# `vtattn info` goes into the summary: one file fewer to bring back.
{
    echo
    cat "$SUMMARY.info" 2>/dev/null
    echo "total: $((SECONDS - START))s"
} >>"$SUMMARY"
rm -f "$SUMMARY.info"
! grep -q '^[a-z_]*: \(exit [1-9]\|skipped\)' "$SUMMARY"
