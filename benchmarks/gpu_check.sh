#!/usr/bin/env bash
# The prepared GPU check of issue 20: one command, at most 8 minutes on one GPU.
#
#   benchmarks/gpu_check.sh          (PATHDB_WHEELS=/path/to/wheels to use another wheel folder)
#
# 1. installs the wheels in $PATHDB_WHEELS, default build/gpu-wheels when it exists (Python 3.12
#    manylinux wheels of what the GPU machine lacks: transformer-lens, duckdb, ... see DESIGN.md
#    section 6; benchmarks/gpu_wheels.sh downloads them on a machine with network) with
#    `pip install --no-index --no-deps --target $PATHDB_DEPS` (default /tmp/pathdb-deps), and puts
#    this checkout first on PYTHONPATH, then the wheels; without PATHDB_WHEELS the packages must
#    already be importable;
# 2. (first of all) exits 2 with one line when torch sees no CUDA GPU;
# 3. runs `pytest -m cuda` (whole searches on CUDA vs CPU float64 within 1e-4, path for path;
#    engine expansions of every node kind), then benchmarks/gpu_check.py (demo parity, exact
#    candidates/s at depths 0-3 on the GPT-2-small shape in float32 and bfloat16, the demo search
#    end to end) which writes benchmarks/results/gpu.json.
# Exit status: 0 when the tests and parity pass. PYTHON overrides the interpreter (python3).
# GPU_CHECK_DEVICE=cpu runs the Python part in its CPU smoke mode (no GPU needed; numbers meaningless).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEPS="${PATHDB_DEPS:-/tmp/pathdb-deps}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
cd "$ROOT" || exit 2
if [[ "$DEVICE" != "cpu" ]]; then
    why="$("$PY" -c "import torch; print('' if torch.cuda.is_available() else 'no GPU: torch.cuda.is_available() is False (run this on the GPU machine)')" 2>/dev/null)" \
        || why="no torch: $PY cannot import torch (install a CUDA build of torch; see README: GPU users)"
    if [[ -n "$why" ]]; then
        echo "gpu_check: $why" >&2
        exit 2
    fi
fi
if [[ -z "${PATHDB_WHEELS:-}" && "$DEVICE" != "cpu" && -d "$ROOT/build/gpu-wheels" ]]; then
    PATHDB_WHEELS="$ROOT/build/gpu-wheels"
fi

if [[ -n "${PATHDB_WHEELS:-}" ]]; then
    shopt -s nullglob
    wheels=("$PATHDB_WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu_check: no .whl files in PATHDB_WHEELS=$PATHDB_WHEELS" >&2
        exit 2
    fi
    pip_log="$(mktemp)"
    if ! PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --upgrade --no-index --no-deps \
            --target "$DEPS" "${wheels[@]}" >"$pip_log" 2>&1; then
        tail -n 5 "$pip_log" >&2
        echo "gpu_check: installing the wheels of $PATHDB_WHEELS into $DEPS failed" >&2
        exit 2
    fi
    rm -f "$pip_log"
    export PYTHONPATH="$ROOT:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

missing="$("$PY" - <<'PY' 2>/dev/null
import importlib.util
names = ["torch", "transformer_lens", "duckdb", "sqlalchemy", "alembic", "typer", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)" || missing="python"
if [[ -n "$missing" ]]; then
    echo "gpu_check: missing Python packages: $missing (set PATHDB_WHEELS to a directory of their wheels)" >&2
    exit 2
fi

status=0
summary="skipped (smoke mode)"
if [[ "$DEVICE" != "cpu" ]]; then
    log="$(mktemp)"
    timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$log" | tail -n 25
    (( PIPESTATUS[0] == 0 )) || status=1
    summary="$(tail -n 1 "$log")"
    rm -f "$log"
fi
timeout 210 "$PY" benchmarks/gpu_check.py --device "$DEVICE" --pytest-summary "$summary" || status=1
exit "$status"
