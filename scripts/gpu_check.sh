#!/usr/bin/env bash
# The GPU checks, for the first time a GPU machine is at hand (issue 11): the `gpu` tests, then
# the engine benchmarks on an InternVL3-1B-shaped random model in bf16. About 6 minutes on one
# H100-class GPU; every step is time-boxed so the whole stays under 8. Figures go to $OUT (or
# ./gpu-check) as text files, for the README.
#
#   bash scripts/gpu_check.sh            # in a checkout with .venv installed (make install-test)
#   PYTHON=python3 bash scripts/gpu_check.sh   # with an existing environment (torch + transformers)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

run() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.txt"
  echo "== $name: exit $rc"
  echo "$name $rc" >>"$OUT/status.txt"
}

: >"$OUT/status.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch, transformers; print(torch.__version__, torch.version.cuda, transformers.__version__)" \
  >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
run pytest-gpu 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/
run throughput 150 "$PYTHON" benchmarks/throughput.py --size 1b --device cuda --dtype bfloat16 \
  --concurrency 1 16 64 --workloads decode --repeats 2
run engine-goals 120 "$PYTHON" benchmarks/engine_goals.py --size 1b --device cuda --dtype bfloat16 --repeats 2
run structured 60 "$PYTHON" benchmarks/structured.py --size 1b --device cuda --dtype bfloat16 \
  --concurrency 64 --repeats 2
echo "figures in $OUT/"
