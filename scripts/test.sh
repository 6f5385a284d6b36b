#!/usr/bin/env bash
# The test command: set up .venv, build vtattn (CUDA kernels included; the build is reused while its
# sources, torch and options are unchanged), then run the CPU tests, the Triton interpreter tests (own
# process), the benchmark smoke test, mypy --strict of the public API and the sm_90 compile of the
# Triton kernels (scripts/compile_triton.py), the vLLM plugin's suite (tests/vllm, in scripts/vllm_env.sh's
# environment); then the main suites again, mypy aside, on the oldest supported
# torch / triton / transformers (scripts/oldest_env.sh; skip with VTATTN_TEST_OLDEST=0).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh || { echo "setup/build failed"; exit 1; }
. "${VTATTN_VENV:-.venv}/bin/activate"
# The build above had to include the CUDA kernels: tests/test_build.py checks that they are in _C.
export VTATTN_REQUIRE_CUDA=${VTATTN_REQUIRE_CUDA:-1}

T0=$SECONDS
status=0
run() {  # pytest exits 5 when it collects nothing: that is not a failure of the suite
  echo "[test +$((SECONDS - T0))s] $*"
  "$@"; local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=$rc; echo "FAILED: $*"; fi
}
# The Triton kernels lower for sm_90 and sm_80 (~8 min on 2 cores, one core busy) on the second core while
# the suites run on the first: their log is shown and their status counted where check_launches needs them.
mkdir -p build/logs
compile_log=build/logs/compile_triton.log
(set -o pipefail
 python scripts/compile_triton.py --all-configs --record build/triton_launches.json &&
   python scripts/compile_triton.py --all-configs --arch 80 --record build/triton_launches.json) >"$compile_log" 2>&1 &
compile_pid=$!
run python -m pytest tests -q -p no:cacheprovider
run env TRITON_INTERPRET=1 python -m pytest tests/interpreter -q -p no:cacheprovider
run python -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider
run python -m mypy  # the public API, --strict (pyproject.toml's [tool.mypy] says what and why)
echo "[test +$((SECONDS - T0))s] python scripts/compile_triton.py --all-configs (sm_90, then --arch 80), since +0s"
wait "$compile_pid"; compile_rc=$?
cat "$compile_log"
[ $compile_rc -eq 0 ] || { status=$compile_rc; echo "FAILED: scripts/compile_triton.py (log: $compile_log)"; }
run python -m vtattn.check_launches  # every CUDA / Triton launch fits sm_80..sm_90 (ptxas reports of the build)
run bash scripts/gpu_check.sh build/gpu-check-dry-run dry-run  # the first GPU call, rehearsed without a GPU
if [ "${VTATTN_TEST_VLLM:-1}" != 0 ]; then  # the vLLM plugin's suite, in its own env (skip: VTATTN_TEST_VLLM=0)
  run bash scripts/vllm_env.sh  # CPU kernels only there: no CUDA build to require
  run env -u VIRTUAL_ENV VTATTN_REQUIRE_CUDA=0 "${VTATTN_VLLM_VENV:-.venv-vllm}/bin/python" -m pytest tests/vllm -q \
    -p no:cacheprovider -W ignore::DeprecationWarning
fi
[ "${VTATTN_TEST_OLDEST:-1}" = 0 ] || run bash scripts/oldest_env.sh test
echo "[test done in $((SECONDS - T0))s]"
exit $status
