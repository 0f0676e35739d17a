#!/usr/bin/env bash
# Set up .venv for internvl-serve: torch first, then the package (editable).
#
#   scripts/install.sh          runtime only (what `make serve` needs)
#   scripts/install.sh --test   plus the test extra (what `make test` needs)
#
# torch: when the venv has none, installs torch==2.13.0, which resolves to the CPU wheel shipped on
# this project's machines; a plain `pip install torch` would pull a multi-GB CUDA build. On a GPU box
# set TORCH_SPEC to what pip should install, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/install.sh
# TORCH_SPEC is always applied when set (pip leaves a satisfied requirement alone).
# Other knobs: VENV (default .venv), PYTHON (the interpreter that creates it, default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=""
case "${1:-}" in
  "") ;;
  --test) extra="[test]" ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

venv="${VENV:-.venv}"
python="$venv/bin/python"

if [[ ! -x "$python" ]]; then
  echo "install: creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi

pip=("$python" -m pip --quiet --disable-pip-version-check)

if [[ -n "${TORCH_SPEC:-}" ]]; then
  echo "install: torch from TORCH_SPEC=$TORCH_SPEC"
  # Word splitting on purpose: TORCH_SPEC may carry pip options such as --index-url.
  # shellcheck disable=SC2086
  "${pip[@]}" install $TORCH_SPEC
elif ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
  echo "install: torch==2.13.0 (CPU)"
  "${pip[@]}" install "torch==2.13.0"
fi

echo "install: internvl-serve${extra} (editable)"
"${pip[@]}" install -e ".${extra}"
