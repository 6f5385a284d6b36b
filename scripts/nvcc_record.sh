#!/usr/bin/env bash
# nvcc for setup.py's build (PYTORCH_NVCC): compiles exactly as nvcc would and records ptxas's
# resource report (-Xptxas -v: registers, static shared memory, spills of every kernel for every
# target) of each object X.o in $VTATTN_PTXAS_DIR/X.txt (default: build/ptxas of this checkout),
# which `python -m vtattn.check_launches` checks against the launch plans. The report's lines are
# kept out of the build log; everything else nvcc prints passes through.
set -u
real=${VTATTN_NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
obj="" prev=""
for a in "$@"; do
  [ "$prev" = -o ] && obj=$a
  prev=$a
done
case $obj in *.o) ;; *) exec "$real" "$@" ;; esac  # not a compile to an object: nothing to record
dir=${VTATTN_PTXAS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/build/ptxas}
log=$(mktemp)
"$real" "$@" -Xptxas -v 2>"$log"
rc=$?
report='^ptxas info|^ +[0-9]+ bytes stack frame'
if [ "$rc" = 0 ] && mkdir -p "$dir"; then
  name=$(basename "$obj" .o)
  grep -E "$report" "$log" >"$dir/$name.txt.$$" && mv -f "$dir/$name.txt.$$" "$dir/$name.txt"
  rm -f "$dir/$name.txt.$$"
fi
grep -vE "$report" "$log" >&2
rm -f "$log"
exit "$rc"
