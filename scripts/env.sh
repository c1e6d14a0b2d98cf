# Sourced by main.sh and test.sh: make_env DIR EXTRAS [PIP_SPEC...] builds a virtual environment
# with the CPU torch wheel and this package, and skips the installs when nothing that decides
# them (pyproject.toml, the torch spec, the extra specs) changed since the last build.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU wheel on this kind of machine
PY="${PYTHON:-python3}"

make_env() {  # make_env DIR EXTRAS [EXTRA_PIP_SPEC...]
  local dir="$1" extras="$2"; shift 2
  local stamp="$dir/.tl_degeneracy_stamp"
  local want
  want="$( (cat pyproject.toml; echo "$TORCH_SPEC $extras $*") | sha256sum | cut -c1-16)"
  if [ -x "$dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  if [ ! -x "$dir/bin/python" ]; then
    "$PY" -m venv "$dir"
  fi
  "$dir/bin/pip" install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/pip" install -q --disable-pip-version-check -e ".$extras" "$@" 2>&1 | grep -v "^WARNING: Location" || true
  "$dir/bin/python" -c "import tl_degeneracy, transformer_lens" >/dev/null
  echo "$want" > "$stamp"
}
