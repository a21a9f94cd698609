#!/usr/bin/env bash
# The GPU benchmark in one go (about ten minutes on one H100/H200): oneword's training loop on random weights with
# SD 1.5's (and SDXL's) architecture, eager and compile max (CUDA graphs), beside diffusers' own textual-inversion
# script run unchanged on the same model, with peak memory and the compile warm-up timed apart. Figures go to the
# terminal and to $OUT/*.json.
#
#   bench/gpu.sh                      all parts, in order of importance, each within what is left of $BUDGET
#   bench/gpu.sh b4 k4                only those parts
#
# Parts: b4 (one concept at batch 4: eager and compile max, then 5 steps of each under torch.profiler into
# $OUT/profile: where a step's time goes, and what share of it the GPU ran kernels), ref (eager beside diffusers' script run unchanged,
# its README recipe and bf16 at batch 4; needs $REFERENCE_SCRIPT), k4 (four concepts together at batch 4: eager, compile max), b16 (one concept at batch 16, eager),
# default (compile default at batch 4), sdxl (SDXL's shape at 1024 px, eager).
#
# Environment: ONEWORD (the command, default .venv/bin/oneword), PYTHON (default .venv/bin/python), OUT (figures,
# default bench-out), WORK (the random models, default /tmp/oneword-gpu), MODEL (an SD 1.x/2.x folder to time
# instead of the SD 1.5-shaped one), MODEL_XL (an SDXL folder instead of the SDXL-shaped one), RESOLUTION (default 512; SDXL's is 1024), BUDGET (seconds for everything, default
# 560), REFERENCE_SCRIPT (examples/textual_inversion/textual_inversion.py from diffusers; docs/benchmarks.md says
# which commit).
set -uo pipefail
ONEWORD=${ONEWORD:-.venv/bin/oneword}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench-out}
WORK=${WORK:-/tmp/oneword-gpu}
BUDGET=${BUDGET:-560}
REFERENCE_SCRIPT=${REFERENCE_SCRIPT:-}
RESOLUTION=${RESOLUTION:-512}
parts=${*:-b4 ref k4 b16 default sdxl}
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"

run() {  # one figure set within its limit and what is left of the budget; a failure does not stop the others
  local name=$1 limit=$2 left=$((BUDGET - SECONDS))
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  # shellcheck disable=SC2086  # ONEWORD may be a command with arguments (python3 -m oneword)
  timeout "$limit" $ONEWORD bench "$@" --json "$OUT/$name.json" || echo "== $name: exit $? (see above)"
}

model() {  # build a random-weight model once: $1 is sd15 or sdxl; MODEL and MODEL_XL replace them
  local dir=$WORK/$1
  [[ $1 == sd15 && -n ${MODEL:-} ]] && dir=$MODEL
  [[ $1 == sdxl && -n ${MODEL_XL:-} ]] && dir=$MODEL_XL
  [[ -f $dir/model_index.json ]] || "$PYTHON" -c "
import sys; from pathlib import Path; from oneword import random_models as r
getattr(r, 'build_' + sys.argv[1] + '_shape_model')(Path(sys.argv[2]))" "$1" "$dir" >&2
  echo "$dir"
}

for part in $parts; do
  case $part in
    b4) run sd15-b4 240 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 4 --steps 100 \
          --compile --compile-modes max --no-baseline --profile "$OUT/profile" ;;
    ref) if [[ -n $REFERENCE_SCRIPT ]]; then
          run sd15-ref 200 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 4 --steps 100 \
            --no-baseline --reference-script "$REFERENCE_SCRIPT"
        else echo "== ref: skipped, REFERENCE_SCRIPT is not set"; fi ;;
    k4) run sd15-k4-eager 60 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 4 --steps 30 \
          --concepts 4 --no-sequential
        run sd15-k4-max 200 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 4 --steps 60 \
          --concepts 4 --no-sequential --compile ;;
    b16) run sd15-b16 60 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 16 --steps 20 --no-baseline ;;
    default) run sd15-b4-default 180 --base-model "$(model sd15)" --resolution "$RESOLUTION" --batch-size 4 --steps 100 \
          --compile --compile-modes default --no-baseline ;;
    sdxl) run sdxl-b4 150 --base-model "$(model sdxl)" --resolution $((RESOLUTION * 2)) --batch-size 4 --steps 10 ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
echo "== done at ${SECONDS}s"
