#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on an H100/H200): CUDA tests, host tests against the
# ComfyUI checkouts under .hosts/ (if any), and the 14B-shaped benchmark. Prints a short table.
#   bash scripts/gpu_check.sh [OUTDIR]      (OUTDIR defaults to $OUT, else /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# Wheels for packages the GPU image lacks (gguf), carried in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader | tee "$OUTDIR/gpu.txt"

echo "== CUDA tests"
timeout 240 $PY -m pytest tests/cuda -q -rs -p no:cacheprovider 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -25

if compgen -G ".hosts/*/comfy" >/dev/null; then
  hosts=$(ls -d .hosts/*/ | grep -v ComfyUI-GGUF | sed 's:/$::' | paste -sd: -)
  echo "== host tests on the GPU ($hosts)"
  COMFYUI_PATH=$hosts timeout 240 $PY -m pytest tests/host -q -rs -p no:cacheprovider -x 2>&1 \
    | tee "$OUTDIR/host_tests.log" | tail -25
fi

echo "== benchmark: 14B block shapes, every block swapped"
timeout ${BENCH_TIMEOUT:-300} $PY test_performance.py --preset 14b --tokens 32760,1560 --blocks-to-swap 40 \
  --prefetch 1 2 --non-blocking --steps 3 ${BENCH_ARGS:-} --output "$OUTDIR/bench_14b.json" 2>&1 \
  | tee "$OUTDIR/bench.log"
