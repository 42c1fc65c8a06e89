#!/usr/bin/env bash
# ONE device call for the GPU numbers of issues 5 and 8, in order of value, each step skipped when it
# would pass the deadline (DEADLINE_S, default 300 s from the start). Everything lands in $OUT:
# measure.log (every command and its output) and measure.tar.gz (the JSON files).
#   1. training-step cost of the correspondence losses (stcn, stcn-s; it/s and ops per step)
#   2. inference FPS of the four models at 480p, 1 and 3 objects, fp32 and bf16 (random weights)
#   3. xmem peak GPU memory over a 10,000-frame video vs its value at 1,000 frames
# Usage: OUT=... bash scripts/gpu_measure.sh   (needs no carried data)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
PY=${PYTHON:-python3}
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-300} ))
JSON=$(mktemp -d)
LOG="$OUT/measure.log"

step() {  # step SECONDS_NEEDED NAME CMD...: run CMD unless fewer than SECONDS_NEEDED seconds are left
    local need=$1 name=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if [ "$left" -lt "$need" ]; then
        echo "## skipped $name: ${left}s left, needs ~${need}s" | tee -a "$LOG"
        return
    fi
    echo "## $name: $*" | tee -a "$LOG"
    local t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout "$left" "$@" 2>&1 | grep -v "^USDT\|gpuGetDeviceCount" | tee -a "$LOG"
    echo "## $name took $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

{ echo "host: $(nproc) cores; $($PY -c 'import torch; print("torch", torch.__version__)')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } | tee "$LOG"

step 120 "issue 5: training-step cost" $PY -m experiments.speed --models stcn stcn-s --batch 8 --crop 384 \
    --iters 20 --warmup 5 --repeats 2 --json "$JSON/train_speed.json"
step 40 "issue 5: ops per training step" $PY -m experiments.speed --count-ops --models stcn stcn-s --batch 8 \
    --crop 384 --json "$JSON/train_ops.json"
for model in stcn-s stcn xmem-s xmem; do
    for objects in 1 3; do
        for precision in fp32 bf16; do
            step 25 "issue 8: $model $objects object(s) $precision" $PY -m corrvos.bench --model "$model" --frames 100 \
                --objects "$objects" --resolution 480 --precision "$precision" --stages \
                --json "$JSON/bench_${model}_${objects}_${precision}.json"
        done
    done
done
step 150 "issue 8: xmem memory over 10,000 frames" $PY -m corrvos.bench --model xmem --resolution 480 --objects 1 \
    --long 10000 --long-points 10 --json "$JSON/bench_xmem_long10000.json"

tar -czf "$OUT/measure.tar.gz" -C "$JSON" . && echo "wrote $OUT/measure.tar.gz ($(ls "$JSON" | wc -l) JSON files)" | tee -a "$LOG"
