#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on an H100/H200): CUDA engine tests, host tests against
# the ComfyUI checkout(s) under .hosts/ on the GPU, and the 14B-shaped benchmark with ComfyUI's own
# offloading for comparison. Prints short tables; logs and JSON go to OUTDIR.
#   bash scripts/gpu_check.sh [OUTDIR]      (OUTDIR defaults to $OUT, else /tmp/gpu_check)
#   PARTS="cuda host" bash scripts/gpu_check.sh    (a subset of: cuda host setups bench bench2 loader auto)
set -uo pipefail
PARTS=${PARTS:-cuda host setups bench bench2 loader auto}
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

# Wheels for packages the GPU image lacks (gguf; torchsde, trampoline, av for ComfyUI), in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader | tee "$OUTDIR/gpu.txt"

if [[ " $PARTS " == *" cuda "* ]]; then
echo "== CUDA engine tests"
timeout 120 $PY -m pytest tests/cuda -q -rs -p no:cacheprovider 2>&1 | tee "$OUTDIR/cuda_tests.log" | tail -5
fi

HOST=$(ls -d .hosts/*/ 2>/dev/null | grep -v GGUF | head -1 | sed 's:/$::')
if [ -n "$HOST" ] && [[ " $PARTS " == *" host "* ]]; then
  echo "== host tests on the GPU ($HOST)"
  [ -d .hosts/ComfyUI-GGUF ] && export COMFYUI_GGUF_PATH=$PWD/.hosts/ComfyUI-GGUF
  WAN22_COMFYUI=$PWD/$HOST WAN22_COMFYUI_GPU=1 timeout 200 $PY -m pytest tests/host -q -rs -p no:cacheprovider \
    -o "python_files=host_cuda.py host_blockswap.py host_loader.py" 2>&1 | tee "$OUTDIR/host_tests.log" | tail -15
fi

if [ -n "$HOST" ] && [[ " $PARTS " == *" setups "* ]]; then
  # The setups users run on real hardware: --highvram (offload device = GPU), --async-offload on 0.3.64
  # (ComfyUI casts on its own streams), a model created on the GPU and a failing pin (CUDA tests), two
  # experts sharing the pinned budget.
  echo "== setups: highvram ($HOST)"
  WAN22_COMFYUI=$PWD/$HOST WAN22_COMFYUI_GPU=1 WAN22_COMFYUI_FLAGS=highvram timeout 150 $PY -m pytest tests/host -q -rs \
    -p no:cacheprovider -o "python_files=host_blockswap.py" 2>&1 | tee "$OUTDIR/setups_highvram.log" | tail -4
  OLD=$(ls -d .hosts/*0.3.64*/ 2>/dev/null | head -1 | sed 's:/$::')
  if [ -n "$OLD" ]; then
    echo "== setups: async offload ($OLD)"
    WAN22_COMFYUI=$PWD/$OLD WAN22_COMFYUI_GPU=1 WAN22_COMFYUI_FLAGS=async_offload timeout 150 $PY -m pytest tests/host -q \
      -rs -p no:cacheprovider -o "python_files=host_blockswap.py" 2>&1 | tee "$OUTDIR/setups_async.log" | tail -4
  fi
  echo "== setups: CUDA placement and pinning"
  timeout 120 $PY -m pytest tests/cuda -q -rs -p no:cacheprovider -k "gpu or pin" 2>&1 | tail -4
fi

if [[ " $PARTS " == *" bench "* ]]; then
echo "== benchmark: 14B block shapes (20 blocks), sweep of swapped blocks, ComfyUI native offloading"
timeout ${BENCH_TIMEOUT:-240} $PY test_performance.py --preset 14b --layers 20 --tokens 32760,1560 --test-all \
  --prefetch 1 --non-blocking --steps 3 ${HOST:+--compare-native --comfyui-path $PWD/$HOST} \
  --output "$OUTDIR/bench_14b.json" 2>&1 | tee "$OUTDIR/bench.log"
fi

# bench2 (prepared, not yet run on a GPU): the user-file mode inside ComfyUI on a simulated 12 GB card,
# 14B block shapes with 10 blocks, bf16 (and fp8 via the loader) vs 0.8.1's and 0.33's offloading (and
# 0.33's dynamic VRAM), Q8_0 GGUF vs ComfyUI-GGUF's own offloading, at 32,760 and 1,560 tokens.
FILES=${BENCH_FILES:-/tmp/wan_bench_files}

# loader (#12, prepared, not yet run on a GPU): the combined loader on a 14B-shaped 10-block bf16 file,
# peak VRAM during load against resident + one block, host anonymous RSS against 1.1 x (swapped + one
# block), next to WAN Model Loader + BlockSwap and UNETLoader + BlockSwap.
if [ -n "$HOST" ] && [[ " $PARTS " == *" loader "* ]]; then
  echo "== loader: combined loader memory, 14B-shaped 10 blocks ($HOST)"
  timeout ${LOADER_TIMEOUT:-240} $PY benchmarks/combined_loader_memory.py --comfyui "$PWD/$HOST" --gpu --preset 14b \
    --layers 10 --blocks-to-swap 6 --cycles 3 --json "$OUTDIR/loader_14b.json" 2>&1 | tee "$OUTDIR/loader.log" | tail -14
fi

# auto (#14, prepared, not yet run on a GPU): auto_blocks_to_swap on a simulated 12 GB card, 14B-shaped
# 20-block bf16 file, 832x480x81 (32,760 tokens) and 1280x720x81, against the fixed sweep.
if [ -n "$HOST" ] && [[ " $PARTS " == *" auto "* ]]; then
  $PY scripts/make_bench_files.py "$FILES" --preset 14b --layers 20 2>&1 | tail -1
  F=$(ls "$FILES"/wan_14b_20blocks_bf16.safetensors 2>/dev/null | head -1)
  echo "== auto: 14B-shaped 20 blocks, --vram-limit 12 ($HOST)"
  [ -n "$F" ] && timeout ${AUTO_TIMEOUT:-300} $PY test_performance.py --comfyui "$PWD/$HOST" --model-path "$F" \
    --vram-limit 12 --auto --test-all --resolution 832x480 --frames 81 --prefetch 1 --non-blocking --steps 2 \
    --output "$OUTDIR/auto_14b.json" 2>&1 | tee "$OUTDIR/auto.log" | tail -8
fi

[[ " $PARTS " == *" bench2 "* ]] || exit 0
$PY scripts/make_bench_files.py "$FILES" --preset 14b --layers 10 2>&1 | tail -1
[ -d .hosts/ComfyUI-GGUF ] && export COMFYUI_GGUF_PATH=$PWD/.hosts/ComfyUI-GGUF
for H in $(ls -d .hosts/*0.8.1*/ .hosts/*0.33*/ 2>/dev/null | sed 's:/$::'); do
  V=$(basename "$H")
  for F in "$FILES"/wan_14b_10blocks_bf16.safetensors "$FILES"/wan_14b_10blocks_Q8_0.gguf; do
    echo "== bench2: $V $(basename "$F")"
    timeout ${BENCH2_TIMEOUT:-150} $PY test_performance.py --comfyui "$PWD/$H" --model-path "$F" --vram-limit 12 \
      --tokens 32760,1560 --test-all --prefetch 1 --non-blocking --steps 2 \
      --chart "$OUTDIR/bench2_${V}_$(basename "$F").png" --output "$OUTDIR/bench2_${V}_$(basename "$F").json" \
      2>&1 | tee "$OUTDIR/bench2_${V}_$(basename "$F").log" | tail -12
  done
done

# ---- host tiers (issue 21; a separate block, merged into the bench profile by whoever rewrites this
# script): step time, copy GB/s and anonymous RSS per host tier (pinned slabs, pageable slabs, the file
# tier with a warm and a cold page cache), 14B block shapes, 6 blocks all swapped, 32,760 and 1,560 tokens.
if [[ " ${PARTS_TIERS:-tiers} " == *" tiers "* ]]; then
  echo "== host tiers: 14B blocks, file / file-cold / pageable / pinned"
  timeout ${TIERS_TIMEOUT:-300} $PY test_performance.py --preset 14b --layers 6 --blocks-to-swap 6 \
    --tokens 32760,1560 --prefetch 1 --non-blocking --steps 2 --host-tiers \
    --output "$OUTDIR/bench_host_tiers.json" 2>&1 | tee "$OUTDIR/bench_host_tiers.log" | tail -14
fi
