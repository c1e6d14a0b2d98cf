#!/usr/bin/env bash
# The main job on a fresh machine: make .venv (TransformerLens 4.x), install the package, and
# analyze the embedded default model on the embedded text. Extra arguments go to
# `tl-degeneracy analyze` (e.g. `bash scripts/main.sh gpt2 --tokens 100000`).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "^WARNING: Location" || true
exec .venv/bin/tl-degeneracy analyze --out runs/default "$@"
