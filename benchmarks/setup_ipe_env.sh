#!/usr/bin/env bash
# Create benchmarks/.venv-ipe: one environment holding both pathdb (editable) and the reference
# `ipe` package from PyPI, so benchmarks/compare_ipe.py can run both tools in one process.
#
#   bash benchmarks/setup_ipe_env.sh            # create or update
#   IPE_WHEEL=/path/ipe-0.0.1-py3-none-any.whl bash benchmarks/setup_ipe_env.sh   # offline wheel
#
# Notes: torch is pinned (an unpinned torch pulls a multi-GB CUDA build); ipe 0.0.1 declares
# Python >= 3.12 but works on 3.11, hence --ignore-requires-python --no-deps plus its runtime deps.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/benchmarks/.venv-ipe"
PY="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
IPE_SPEC="${IPE_WHEEL:-ipe==0.0.1}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# Reuse the exact versions of the project's dev environment when it exists (fast, reproducible).
CONSTRAINTS=()
if [ -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable 2>/dev/null \
        | grep -v -E '^(-e |pathdb|ipe)' > "$VENV/constraints.txt" || true
    CONSTRAINTS=(-c "$VENV/constraints.txt")
fi

"${PIP[@]}" install "$TORCH_PIN"
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e "$ROOT"
"${PIP[@]}" install "${CONSTRAINTS[@]}" einops tqdm matplotlib plotly numpy
"${PIP[@]}" install --ignore-requires-python --no-deps "$IPE_SPEC"

"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
for dist in ("torch", "transformer-lens", "ipe", "pathdb"):
    print(f"{dist}=={md.version(dist)}")
PY
echo "ready: $VENV/bin/python benchmarks/compare_ipe.py --help"
