#!/usr/bin/env bash
# The main job on a fresh machine: make .venv (TransformerLens 4.x), install the package with
# its report extra (skipped when nothing changed), and analyze the embedded default model on the
# embedded text. Extra arguments go to `tl-degeneracy analyze` (e.g. `bash scripts/main.sh gpt2 --tokens 100000`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
make_env .venv "[report]"
exec .venv/bin/tl-degeneracy analyze --out runs/default "$@"
