#!/usr/bin/env bash
# The main job: set up .venv and build vtattn (reused while its sources, torch and options are
# unchanged), then run the benchmark suite on whatever device is here (CPU: scaled-down shapes).
# Extra arguments go to `python -m vtattn.bench`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
. "${VTATTN_VENV:-.venv}/bin/activate"
# Results (run.json, run.csv, summary.md, PNG plots when matplotlib is installed) go to a dated
# folder bench-out/<device>-<date>-<time>/ (git-ignored), named at the end; an --out DIR given
# to this script wins.
python -m vtattn.bench --out auto "$@"
