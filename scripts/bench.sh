#!/usr/bin/env bash
# The main job: set up .venv and build vtattn, then run the benchmark suite on whatever device
# is here (CPU: scaled-down shapes). Extra arguments go to `python -m vtattn.bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. "${VTATTN_VENV:-.venv}/bin/activate"
python -m vtattn.bench "$@"
