#!/usr/bin/env bash
# The GPU benchmark in one go (about ten minutes on one H100/H200): oneword's training loop on random weights with
# SD 1.5's and SDXL's architectures, eager, compiled and compile max (CUDA graphs), with peak memory and the
# compile warm-up timed apart. Figures go to the terminal and to $OUT/*.json.
#
#   bench/gpu.sh              (after `make install`; or ONEWORD=/path/to/oneword bench/gpu.sh)
set -uo pipefail
ONEWORD=${ONEWORD:-.venv/bin/oneword}
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

run() {  # one figure set; a failure or an overrun is reported and the next one still runs
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$ONEWORD" bench "$@" --json "$OUT/$name.json" || echo "== $name: exit $? (see above)"
}

run sd15-b4 240 --sd15-shape --resolution 512 --batch-size 4 --steps 100 --compile
run sd15-b16 150 --sd15-shape --resolution 512 --batch-size 16 --steps 40 --compile --no-baseline
run sd15-k4 120 --sd15-shape --resolution 512 --batch-size 4 --steps 40 --concepts 1,4
run sdxl-b4 120 --sdxl-shape --resolution 1024 --batch-size 4 --steps 20
