#!/usr/bin/env bash
# ONE device call that trains the four shipped arms (stcn-s / xmem-s x baseline / corr) with
# experiments.recipe and writes <arm>.safetensors, summary.json and logs.tar.gz to $OUT.
# Needs the carried data folder .carry/d16train (python -m experiments.recipe pack ...);
# continues from .carry/resume/<arm>.safetensors when that folder was carried too.
# Extra arguments go to `recipe run` (e.g. --models stcn-s, --iters stcn-s=300,800, --budget-s 500).
# See docs/training.md, "Training the shipped checkpoints".
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
PY=${PYTHON:-python3}
DATA=${DATA:-.carry/d16train}
RESUME=${RESUME:-.carry/resume}

echo "host: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; $($PY -c 'import torch, cv2; print("torch", torch.__version__, "cv2", cv2.__version__)')"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
# Loader workers hand batches over through /dev/shm (an XMem batch is ~320 MB): a container's
# default 64 MB would kill the workers, so enlarge it when it is small and we may.
shm_gib=$(df -BG --output=size /dev/shm 2>/dev/null | tail -1 | tr -dc 0-9)
if [ "${shm_gib:-0}" -lt 16 ]; then
    mount -o remount,size=48G /dev/shm 2>/dev/null && echo "/dev/shm enlarged to 48G" \
        || echo "warning: /dev/shm is only ${shm_gib:-?} GiB and could not be enlarged"
fi
[ -d "$DATA/videos" ] || { echo "error: $DATA is missing: carry .carry/d16train"; exit 2; }

# From-scratch settings of the CPU runs that worked (docs/training.md, items 3-8): lr 1e-3 (the presets'
# 5e-5 is meant for ImageNet-initialised encoders on long schedules and was never tried from scratch here),
# plain CE, learned BN statistics, and clipping of the rare huge gradients that derailed run 4.
# Later arguments ("$@") override these.
args=(--data "$DATA" --out "$OUT" --budget-s "${BUDGET_S:-540}" --lr 1e-3 --bn train --bootstrap-p 1.0 --grad-clip 20)
if [ -d "$RESUME" ]; then args+=(--resume-from "$RESUME"); fi
PYTHONUNBUFFERED=1 exec "$PY" -m experiments.recipe run "${args[@]}" "$@"
