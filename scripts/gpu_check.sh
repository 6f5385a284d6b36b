#!/usr/bin/env bash
# The first call on a lent GPU (H100 / H200, no network): one command of at most 10 minutes that
# tests every kernel before it benchmarks any (docs/gpu-status.md has the whole plan).
#   scripts/gpu_check.sh --prep          here, before the call: .prebuilt/ (the extension for the
#                                        device's torch and sm_90a) and .triton-cache/ (the Triton
#                                        kernels of scripts/gpu_kernels.py compiled for the device's
#                                        triton and sm_90); carry both: run carry=[".prebuilt", ".triton-cache"]
#   scripts/gpu_check.sh OUTDIR [run]    on the device, in this order:
#     1 extension  .prebuilt's when its stamp matches csrc/ (else built here), `vtattn info`
#     2 cuda       every CUDA kernel once on edge shapes vs the reference (scripts/gpu_kernels.py),
#                  then the CUDA-backend pytest cases (-k "gpu-cuda or gpu-aten": no Triton compile;
#                  xdist workers, a per-test timeout)
#       triton     every Triton kernel once, one config each, from .triton-cache (TRITON_CACHE_DIR)
#       models     the other CUDA pytest cases: CUDA-graph replays, patched tiny models, options
#     3 sanitize   compute-sanitizer memcheck, racecheck, synccheck on `gpu_kernels.py --backend cuda`
#                  (a sandbox that refuses the sanitizer is reported, and the call goes on)
#     4 bench      fixed configs (VTATTN_TRITON_AUTOTUNE=0): aten / CUDA rows, then Triton rows, then
#                  the end-to-end rows, each pass ending itself before the call's end
#     5 summary    summary.txt: per kernel passed / failed / not reached (scripts/gpu_summary.py)
#   scripts/gpu_check.sh OUTDIR dry-run  the same on a machine without a GPU (CI): every step runs, the
#                                        GPU steps skip with their reason (the cases and references are
#                                        still built, pytest collects), the bench times one CPU case
#   scripts/gpu_check.sh OUTDIR bench    the bench passes alone (a later call; BENCH_ARGS="--filter ...")
# Each step has a time share (seconds); what a step leaves unused passes on. GPU_CHECK_LIMIT (default
# 560) caps the whole call. VTATTN_GIT_COMMIT names the commit (the tree arrives without .git).
# OUTDIR gets at most 8 files (what the device returns): summary.txt, kernels.jsonl, tests.log,
# pytest_cuda.xml, sanitizer.log, bench.log, bench.json, build.log.
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

if [ "${1:-}" = --prep ]; then  # on the CPU machine, with the device's torch / triton in .venv-oldest
  set -e
  bash scripts/oldest_env.sh prebuild
  rm -rf .triton-cache
  ln -sfn ../../triton_kernels python/vtattn/triton_kernels  # what an editable install maps
  PYTHONPATH=$PWD/python .venv-oldest/bin/python scripts/gpu_kernels.py --precompile .triton-cache
  rm -f python/vtattn/triton_kernels
  du -sh .prebuilt .triton-cache
  total=$(du -scm .prebuilt .triton-cache | tail -1 | cut -f1)
  ((total < 56)) || { echo "prep: ${total} MiB with the tree is over the 64 MiB a call carries"; exit 1; }
  exit 0
fi

OUT=${1:?usage: scripts/gpu_check.sh OUTDIR [run|dry-run|bench] | --prep}
MODE=${2:-run}
case $MODE in run | dry-run | bench) ;; *) echo "unknown mode $MODE: run, dry-run or bench" >&2; exit 2 ;; esac
DRY=0
[ "$MODE" = dry-run ] && DRY=1
LIMIT=${GPU_CHECK_LIMIT:-560}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
SUMMARY=$OUT/summary.txt
START=$SECONDS
UNTIL=0

# step NAME SHARE LOG CMD...: CMD under a timeout at the end of the shares so far (time a step
# leaves passes on); with CAP=1 at most its own share (the sanitizers use whatever they are given,
# and a timeout then only means "stopped part way").
step() {
  local name=$1 share=$2 log=$3 t0=$SECONDS rc note=""
  shift 3
  UNTIL=$((UNTIL + share))
  local left=$(((UNTIL < LIMIT ? UNTIL : LIMIT) - (SECONDS - START)))
  [ "${CAP:-0}" = 1 ] && ((left > share)) && left=$share
  if ((left < 5)); then
    echo "$name: not reached (out of time)" >>"$SUMMARY"
    return
  fi
  echo "== $name: $* (limit ${left}s)" >>"$log"
  timeout -k 10 "$left" "$@" >>"$log" 2>&1
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note=" (cut at its limit: what follows it in its log was not reached)"
    [ "${CAP:-0}" = 1 ] && note=" (stopped at its share: partial)"
  fi
  echo "$name: exit $rc in $((SECONDS - t0))s$note" >>"$SUMMARY"
}
skip() { echo "$1: skipped ($2)" >>"$SUMMARY"; }

{
  echo "gpu_check $MODE $(date -u +%FT%TZ), commit ${VTATTN_GIT_COMMIT:-unknown (set VTATTN_GIT_COMMIT)}"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  echo
} >"$SUMMARY"
GPU=0
((DRY)) || ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null || GPU=1
((DRY || GPU)) || echo "no CUDA device visible: the GPU steps will fail" >>"$SUMMARY"

# ---- 1. the extension ----
# Ready when its CUDA kernels are registered with the dispatcher.
ready() { "$PY" -c 'import sys; from vtattn._ext import has_kernel; sys.exit(has_kernel("attention", "cuda"))'; }
use_prebuilt() {
  local stamp
  stamp=$(bash scripts/oldest_env.sh stamp)
  [ "$stamp" = "$(cat .prebuilt/STAMP)" ] || {
    echo "prebuilt stamp $(cat .prebuilt/STAMP) != sources $stamp"
    return 1
  }
  cp .prebuilt/_C.*.so python/vtattn/  # its build facts are compiled in; the loader checks them
  ln -sfn ../../triton_kernels python/vtattn/triton_kernels  # what an editable install maps
  export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
  ready
}
if ((DRY)); then
  if [ -d .prebuilt ]; then
    [ "$(bash scripts/oldest_env.sh stamp)" = "$(cat .prebuilt/STAMP 2>/dev/null)" ] && s="matches" || s="is stale"
    skip build "dry run: the installed vtattn is used; .prebuilt's stamp $s the sources"
  else
    skip build "dry run: the installed vtattn is used; no .prebuilt (scripts/gpu_check.sh --prep makes it)"
  fi
  UNTIL=240
elif [ -d .prebuilt ] && use_prebuilt >>"$OUT/build.log" 2>&1; then
  echo "build: the prebuilt extension (stamp $(cat .prebuilt/STAMP))" >>"$SUMMARY"
  UNTIL=240  # the build's share passes on
else
  echo "build: no usable .prebuilt (build.log says why): building here" >>"$SUMMARY"
  # VTATTN_REQUIRE_CUDA: a build that silently drops the CUDA kernels must fail here.
  step build 240 "$OUT/build.log" env VTATTN_CUDA_ARCHS=90a MAX_JOBS=16 VTATTN_REQUIRE_CUDA=1 \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
fi
step info 20 "$SUMMARY.info" "$PY" -m vtattn info

# ---- 2. correctness: CUDA kernels first, then Triton from the precompiled cache ----
KERNELS=(scripts/gpu_kernels.py --json "$OUT/kernels.jsonl")
COMPILED=compiled_decode_step_replays  # the pytest cases of step pytest_compiled
if [ "$MODE" != bench ]; then
  step cuda_kernels 40 "$OUT/tests.log" "$PY" "${KERNELS[@]}" --backend cuda
  # the CUDA / aten cases of every op, select_tokens around its shared-memory opt-in, the reference
  # fallback's warning; nothing that compiles a Triton kernel
  PYTEST=(-m pytest tests -m gpu -k "(gpu-cuda or gpu-aten or on_the_device or no_kernel_takes) and not triton"
    -rfEs -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml")
  "$PY" -c 'import xdist' 2>/dev/null && PYTEST+=(-n 4)
  "$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout 60)
  step pytest_cuda 150 "$OUT/tests.log" "$PY" "${PYTEST[@]}"
  if [ -d .triton-cache ]; then
    export TRITON_CACHE_DIR=$PWD/.triton-cache
    before=$(find .triton-cache -mindepth 1 -maxdepth 1 | wc -l)
  else
    echo "triton: no .triton-cache (scripts/gpu_check.sh --prep makes it): the kernels compile here" >>"$SUMMARY"
  fi
  step triton_kernels 60 "$OUT/tests.log" env VTATTN_TRITON_AUTOTUNE=0 "$PY" "${KERNELS[@]}" --backend triton
  [ -d .triton-cache ] && echo "triton: $(($(find .triton-cache -mindepth 1 -maxdepth 1 | wc -l) - before))" \
    "kernels compiled on the device (0: all came from .triton-cache)" >>"$SUMMARY"
  # the other CUDA pytest cases: CUDA-graph replays (a static compressed decode step), the patched tiny models
  # on CUDA, the attention options, opchecks; a Triton kernel they reach may compile here (gpu_summary.py merges
  # their results into pytest_cuda.xml)
  OTHERS="cuda and not (gpu-cuda or gpu-aten or on_the_device or no_kernel_takes) and not triton and not gpu-torch"
  PYTEST=(-m pytest tests -m gpu -k "$OTHERS and not $COMPILED" -rfEs -p no:cacheprovider
    --junitxml="$OUT/pytest_models.xml")
  "$PY" -c 'import xdist' 2>/dev/null && PYTEST+=(-n 4)
  "$PY" -c 'import pytest_timeout' 2>/dev/null && PYTEST+=(--timeout 90)
  step pytest_models 60 "$OUT/tests.log" env VTATTN_TRITON_AUTOTUNE=0 "$PY" "${PYTEST[@]}"
  # compiled decode steps in CUDA graphs (torch.compile mode="reduce-overhead", and generate's own compile of
  # the patched model): inductor compiles the model's own Triton kernels first (tens of seconds each), so
  # they run alone, their share their own
  step pytest_compiled 90 "$OUT/tests.log" env VTATTN_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -m gpu -k "$COMPILED" \
    -rfEs -p no:cacheprovider --junitxml="$OUT/pytest_compiled.xml"

  # ---- 3. compute-sanitizer on one launch of each CUDA kernel ----
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  if ((DRY || !GPU)); then
    skip sanitizers "no CUDA device$([ -x "$SAN" ] || echo ', no compute-sanitizer')"
  elif [ ! -x "$SAN" ]; then
    skip sanitizers "compute-sanitizer not found"
  else
    for tool in memcheck:40 racecheck:60 synccheck:30; do
      # Without the caching allocator every tensor is its own allocation: memcheck sees its bounds.
      CAP=1 step "${tool%:*}" "${tool#*:}" "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool "${tool%:*}" --error-exitcode 3 --print-limit 30 "$PY" scripts/gpu_kernels.py --backend cuda \
        --dtype bf16
      if grep -q "Device not supported\|Error: Target application\|error 999" "$OUT/sanitizer.log"; then
        echo "sanitizers: the device refuses compute-sanitizer (a sandbox?): $(grep -m1 'Device not supported\|Error:' \
          "$OUT/sanitizer.log")" >>"$SUMMARY"
        break
      fi
    done
  fi
fi

# ---- 4. the benchmark: fixed configs, aten / CUDA rows first, Triton next, end to end last ----
export VTATTN_TRITON_AUTOTUNE=0
bench_pass() {  # NAME SHARE ARGS...: one pass, into bench_NAME.json, ending itself in time
  local name=$1 share=$2 end budget
  shift 2
  end=$((UNTIL + share < LIMIT ? UNTIL + share : LIMIT))
  budget=$((end - (SECONDS - START) - 25))
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  step "bench_$name" "$share" "$OUT/bench.log" "$PY" -m vtattn.bench --json "$OUT/bench_$name.json" \
    --time-budget "$((budget > 0 ? budget : 0))" "$@" ${BENCH_ARGS:-}
}
if ((DRY)); then
  bench_pass ops 60 --device cpu --quick --filter '^select_tokens/clip-l336:keep-0\.1$'  # one case
else
  bench_pass ops 100 --backend auto,aten,cuda --filter '^(?!e2e|vision_tower)'
  bench_pass triton 60 --backend triton --filter '^(?!e2e|vision_tower)'
  bench_pass e2e 1000 --backend auto --filter '^(e2e|vision_tower)'
fi

# ---- 5. summary ----
{
  echo
  "$PY" scripts/gpu_summary.py "$OUT" --limit "$LIMIT" 2>&1
  echo
  cat "$SUMMARY.info" 2>/dev/null
  echo "total: $((SECONDS - START))s"
} >>"$SUMMARY"
rm -f "$SUMMARY.info"
grep -q '^[a-z_]*: exit [1-9]' "$SUMMARY" && exit 1
exit 0
