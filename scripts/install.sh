#!/usr/bin/env bash
# Set up .venv for internvl-serve: torch first, then the package (editable).
#
#   scripts/install.sh              runtime only (what `make serve` needs)
#   scripts/install.sh --test       plus the test extra (what `make test` needs)
#   scripts/install.sh --examples   plus what examples/ import (what `make examples` needs)
#
# torch, when the venv has none (a plain `pip install torch` pulls a multi-GB CUDA build on Linux,
# GPU or not):
#   - pip configured with a mirror (index-url, extra-index-url or find-links, as on this project's
#     machines): torch==2.13.0 from it, which there is the CPU wheel;
#   - a GPU machine (nvidia-smi lists a GPU): torch==2.13.0 from PyPI, the CUDA build;
#   - any other Linux machine: the CPU wheel, from https://download.pytorch.org/whl/cpu;
#   - macOS: PyPI's torch (CPU and Apple GPU).
# TORCH_SPEC overrides all of that, and is always applied when set (pip leaves a satisfied
# requirement alone), e.g. a chosen CUDA build:
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" scripts/install.sh
# Other knobs: VENV (default .venv), PYTHON (the interpreter that creates it, default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extra=""
case "${1:-}" in
  "") ;;
  --test) extra="[test]" ;;
  --examples) extra="[examples]" ;;
  *) echo "usage: $0 [--test | --examples]" >&2; exit 2 ;;
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
  torch_spec="torch==2.13.0"
  gpu=""
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    gpu="yes"
  fi
  # `config list` prints nothing under --quiet. Read whole before grep: `grep -q` closing the pipe
  # early would fail pip with SIGPIPE, and under pipefail the mirror would go unseen.
  pip_config="$("$python" -m pip config list 2>/dev/null || true)"
  if grep -Eq '(index-url|find-links)=' <<<"$pip_config"; then
    echo "install: $torch_spec from the configured pip mirror"
    # Without a GPU, the CPU wheel when the mirror has it (2.13.0+cpu), else what it resolves to.
    if [[ -n "$gpu" ]] || ! "${pip[@]}" install "$torch_spec+cpu" 2>/dev/null; then
      "${pip[@]}" install "$torch_spec"
    fi
  elif [[ -n "$gpu" ]]; then
    echo "install: $torch_spec, CUDA build (nvidia-smi lists a GPU)"
    "${pip[@]}" install "$torch_spec"
  elif [[ "$(uname -s)" == Linux ]]; then
    echo "install: $torch_spec, CPU build (no GPU found; TORCH_SPEC chooses another)"
    "${pip[@]}" install "$torch_spec" --index-url https://download.pytorch.org/whl/cpu
  else
    echo "install: $torch_spec"
    "${pip[@]}" install "$torch_spec"
  fi
fi

echo "install: internvl-serve${extra} (editable)"
"${pip[@]}" install -e ".${extra}"
