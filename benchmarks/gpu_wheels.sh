#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs on the GPU machine (it has no network; it
# lacks these packages, DESIGN.md section 6): Python 3.12 manylinux x86_64 wheels, dependencies not
# resolved, versions as in this project's tested environment.
#
#   benchmarks/gpu_wheels.sh [DIR]   # default DIR: build/gpu-wheels (git-ignored, ~33 MiB)
#   benchmarks/gpu_check.sh          # on the GPU machine: uses build/gpu-wheels when present
# (with the session's device tool, carry "build/gpu-wheels": ignored paths travel only when named)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/build/gpu-wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PKGS=(
    transformer-lens==3.9.0 duckdb==2.0.1 sqlalchemy==2.0.44 duckdb-engine==0.17.0
    alembic==1.20.1 mako==1.4.3 greenlet==3.5.6 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    beartype==0.23.1 better-abc==0.0.3 fancy-einsum==0.0.3 typeguard==4.6.1 xxhash==4.1.0
)
mkdir -p "$DIR"
"$PY" -m pip download --quiet --dest "$DIR" --no-deps --only-binary=:all: --implementation cp \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any "${PKGS[@]}"
du -sh "$DIR"
