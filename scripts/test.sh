#!/usr/bin/env bash
# The test command: set up .venv, build vtattn (CUDA kernels included), then run the CPU tests,
# the Triton interpreter tests (own process), the benchmark smoke test and the sm_90 compile of the
# Triton kernels (scripts/compile_triton.py); then all of it again on the oldest supported torch /
# triton / transformers (scripts/oldest_env.sh; skip with VTATTN_TEST_OLDEST=0).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh || { echo "setup/build failed"; exit 1; }
. "${VTATTN_VENV:-.venv}/bin/activate"

status=0
run() {  # pytest exits 5 when it collects nothing: that is not a failure of the suite
  "$@"; local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=$rc; echo "FAILED: $*"; fi
}
run python -m pytest tests -q -p no:cacheprovider
run env TRITON_INTERPRET=1 python -m pytest tests/interpreter -q -p no:cacheprovider
run python -m pytest benchmarks -q --benchmark-disable -p no:cacheprovider
run python scripts/compile_triton.py --all-configs  # the Triton kernels lower for sm_90 (no GPU needed)
[ "${VTATTN_TEST_OLDEST:-1}" = 0 ] || run bash scripts/oldest_env.sh test
exit $status
