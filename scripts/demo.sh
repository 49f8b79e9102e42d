#!/usr/bin/env bash
# Set up .venv (first run) and run the demo on the bundled data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_venv.sh" "examples"
export PYKEOPS_VERBOSE=0 KEOPS_VERBOSE=0
exec "$ROOT/.venv/bin/python" -m pyro_dkm.demo "$@"
