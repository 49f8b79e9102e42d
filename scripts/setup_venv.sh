#!/usr/bin/env bash
# Create (or reuse) the project virtual environment .venv with the CPU build of
# torch pinned, then the package with the given extras. Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PY" -m venv "$ROOT/.venv"
fi
VPY="$ROOT/.venv/bin/python"
# torch first and pinned: 2.13.0 is the CPU build available locally; an open range
# would pull a multi-GB CUDA build. The package itself only asks for a range.
"$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$VPY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
