#!/usr/bin/env bash
# The GPU check: the one command a lent device runs. Exit status 0 only when no part failed; one verdict
# table at the end (part, passed/failed/skipped, seconds). Logs (and benchmark JSON) go to OUTDIR.
#
#   bash scripts/gpu_check.sh [OUTDIR]                  (OUTDIR: default $OUT, else /tmp/gpu_check)
#   PROFILE=bench bash scripts/gpu_check.sh             (the benchmarks instead of the tests)
#   PARTS="cuda host-0.33 server" bash scripts/gpu_check.sh   (these parts only, of any profile)
#
# ComfyUI checkouts: chosen by the version in their comfyui_version.py (0.8.1, and 0.33.x), among the
# folders of .hosts/ (what a device run carries: checkouts copied into this repo's git-ignored .hosts/),
# else of $HOME/comfy-hosts. ComfyUI-GGUF and WanVideoLooper are taken from the same folder when there.
#
# Parts of PROFILE=gpu (the default; 9 minutes at most on one H100/H200, see the budget below):
#   sanity           CPU: a few core test files (config, GGUF reader, WAN detection); runs anywhere
#   cuda             tests/cuda (engine on CUDA: streams, pinned memory, slots)
#   host-V           WAN22_COMFYUI_GPU=1, use_non_blocking on where a test leaves it at its default:
#                    host_cuda, host_blockswap, host_auto, host_combined_loader, host_looper (V = 0.8.1, 0.33)
#   lowvram-V        the fp8_scaled / GGUF / LoRA tests of host_lowvram, as host-V
#   highvram-V       ComfyUI started with --highvram (WAN22_COMFYUI_FLAGS=highvram): host tests named
#                    *highvram*; "skipped" when none is found
#   server-V         a real main.py server on the GPU (0.33: its default allocator and aimdo) queueing the
#                    tiny t2v prompt with BlockSwap and with the combined loader on auto
#                    (scripts/gpu_server_check.py)
# Parts of PROFILE=bench:
#   bench            14B block shapes (20 blocks), sweep of swapped blocks, vs ComfyUI 0.8.1's offloading
#   bench2-V         the user-file mode on a simulated 12 GB card: bf16 and Q8_0 GGUF 14B-shaped files
#   loader           the combined loader's memory on a 14B-shaped 10-block file (0.8.1)
#   auto             auto_blocks_to_swap on a simulated 12 GB card, 14B-shaped 20 blocks (0.8.1)
#   tiers            host tiers: step time, copy GB/s and anonymous RSS for pinned slabs, pageable slabs and
#                    the file tier (warm and cold page cache), 14B block shapes, 32,760 and 1,560 tokens
# The whole run keeps to GPU_CHECK_BUDGET_S (default 540 s): a part that cannot start in time is "failed"
# (not run); run the bench profile's parts in two calls (PARTS="bench bench2", then "loader auto") if needed.
# A name in PARTS selects that part; a name without "-V" (host, server, bench2, ...) selects it for every
# version. Without CUDA (no nvidia-smi, or a torch without CUDA) every GPU part is reported
# "skipped: no CUDA" and the rest still runs.
# GPU_CHECK_FAIL_PART=NAME makes that part run `false` instead (to see the check fail). GPU_CHECK_CPU=1 runs
# the GPU parts in ComfyUI's CPU mode: a try of this script on a machine without a GPU, not a GPU check.
set -uo pipefail # no -e: each part's exit status is caught and recorded; the verdicts decide the exit status
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-gpu}
case "$PROFILE" in
gpu) DEFAULT_PARTS="sanity cuda host lowvram highvram server" ;;
bench) DEFAULT_PARTS="bench bench2 loader auto tiers" ;;
*)
  echo "PROFILE must be gpu or bench (got $PROFILE)" >&2
  exit 2
  ;;
esac
PARTS=${PARTS:-$DEFAULT_PARTS}
OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STARTED=$SECONDS
# A lent device runs one command for at most 10 minutes: parts start only while this budget lasts, and each
# part's limit is cut to what is left, so the verdict table is always printed.
BUDGET=${GPU_CHECK_BUDGET_S:-540}

# Wheels for packages the GPU image lacks (gguf; torchsde, trampoline, av for ComfyUI), in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# --- CUDA present? ---------------------------------------------------------------------------------------
NO_CUDA=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  NO_CUDA="no nvidia-smi"
elif ! nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader | tee "$OUTDIR/gpu.txt"; then
  NO_CUDA="nvidia-smi failed"
elif ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  NO_CUDA="torch has no CUDA"
fi
GPU_FLAG=1
SERVER_CPU=()
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then
  # Trying the script itself without a GPU: the GPU parts run in ComfyUI's CPU mode (CUDA-only tests skip).
  NO_CUDA=""
  GPU_FLAG=0
  SERVER_CPU=(--cpu)
  echo "GPU_CHECK_CPU=1: the GPU parts run on the CPU (a try of this script, not a GPU check)."
fi
[ -n "$NO_CUDA" ] && echo "No CUDA ($NO_CUDA): the GPU parts are skipped."

# --- ComfyUI checkouts by version --------------------------------------------------------------------------
if [ -d .hosts ]; then HOSTS_DIR=$PWD/.hosts; else HOSTS_DIR=$HOME/comfy-hosts; fi

host_of() { # host_of VERSION: the checkout whose comfyui_version.py says VERSION (or VERSION.x)
  local dir version
  for dir in "$HOSTS_DIR"/*/; do
    [ -f "$dir/comfyui_version.py" ] || continue
    version=$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$dir/comfyui_version.py")
    if [ "$version" = "$1" ] || [[ "$version" == "$1".* ]]; then
      echo "${dir%/}"
      return 0
    fi
  done
  return 1
}
VERSIONS="0.8.1 0.33"
declare -A HOST=()
for v in $VERSIONS; do
  HOST[$v]=$(host_of "$v") || HOST[$v]=""
  echo "ComfyUI $v: ${HOST[$v]:-not found under $HOSTS_DIR}"
done
[ -d "$HOSTS_DIR/ComfyUI-GGUF" ] && export COMFYUI_GGUF_PATH=$HOSTS_DIR/ComfyUI-GGUF
[ -d "$HOSTS_DIR/WanVideoLooper" ] && export WANVIDEOLOOPER_PATH=$HOSTS_DIR/WanVideoLooper

# --- running parts -----------------------------------------------------------------------------------------
ROWS=()
FAILED=0

selected() { # selected NAME: in PARTS, by its full name or its name without the version
  [[ " $PARTS " == *" $1 "* ]] || [[ " $PARTS " == *" ${1%%-[0-9]*} "* ]]
}

record() { # record NAME VERDICT SECONDS NOTE
  ROWS+=("$(printf '%-16s %-8s %6s  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = failed ] && FAILED=1
  return 0
}

# part NAME KIND LIMIT_S [pytest] -- COMMAND...
#   KIND: cpu, or gpu (skipped without CUDA). "pytest": the command is a pytest run whose summary is read:
#   no test passed is "failed", unless no test was selected at all (exit 5) and the part allows that
#   (ALLOW_EMPTY=1), which is "skipped".
part() {
  local name=$1 kind=$2 limit=$3 is_pytest=0
  shift 3
  [ "$1" = pytest ] && is_pytest=1 && shift
  [ "$1" = -- ] && shift
  selected "$name" || return 0
  if [ "$kind" = gpu ] && [ -n "$NO_CUDA" ]; then
    record "$name" skipped 0 "no CUDA ($NO_CUDA)"
    return 0
  fi
  if [ "${GPU_CHECK_FAIL_PART:-}" = "$name" ]; then
    set -- false
    is_pytest=0
  fi
  local left=$((BUDGET - (SECONDS - STARTED)))
  if [ "$left" -lt 20 ]; then
    record "$name" failed 0 "not run: the ${BUDGET} s budget (GPU_CHECK_BUDGET_S) is spent"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  local log="$OUTDIR/$name.log" start=$SECONDS rc
  echo "== $name (limit ${limit} s): $*"
  if declare -F "$1" >/dev/null; then
    set -- bash -c '"$@"' "$1" "$@" # a function of this script: timeout runs programs (it is exported)
  fi
  timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$log" | tail -n 15
  rc=${PIPESTATUS[0]}
  local seconds=$((SECONDS - start)) summary passed
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" failed "$seconds" "timed out after ${limit} s"
  elif [ "$is_pytest" = 1 ]; then
    summary=$(grep -E '^=*.* in [0-9.]+s' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    [ -n "$summary" ] || summary=$(grep -v '^ *$' "$log" | tail -n 1 | cut -c1-100)
    passed=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
    if [ "$rc" = 5 ] && [ "${ALLOW_EMPTY:-0}" = 1 ]; then
      record "$name" skipped "$seconds" "no tests selected"
    elif [ "$rc" != 0 ]; then
      record "$name" failed "$seconds" "pytest exit $rc: $summary"
    elif [ -z "$passed" ]; then
      record "$name" failed "$seconds" "no test passed: $summary"
    else
      record "$name" passed "$seconds" "$summary"
    fi
  elif [ "$rc" = 0 ]; then
    record "$name" passed "$seconds" ""
  else
    record "$name" failed "$seconds" "exit $rc"
  fi
}

needs_host() { # needs_host NAME VERSION: record a failure when the checkout is missing (and say so)
  if [ -z "${HOST[$2]}" ] && selected "$1"; then
    if [ -n "$NO_CUDA" ]; then
      record "$1" skipped 0 "no CUDA ($NO_CUDA)"
    else
      record "$1" failed 0 "no ComfyUI $2 checkout under $HOSTS_DIR"
    fi
    return 1
  fi
  return 0
}

PYTEST=($PY -m pytest -q -rs -p no:cacheprovider)
HOST_FILES="host_cuda.py host_blockswap.py host_auto.py host_combined_loader.py host_looper.py"

# --- PROFILE=gpu -------------------------------------------------------------------------------------------
part sanity cpu 120 pytest -- "${PYTEST[@]}" tests/core/test_config.py tests/core/test_gguf_loader.py \
  tests/core/test_wan_detect.py

part cuda gpu 90 pytest -- "${PYTEST[@]}" tests/cuda

for v in $VERSIONS; do
  H=${HOST[$v]}
  GPU_ENV=(env WAN22_COMFYUI="$H" WAN22_COMFYUI_GPU=$GPU_FLAG WAN22_NON_BLOCKING=1)
  if needs_host "host-$v" "$v"; then
    part "host-$v" gpu 180 pytest -- "${GPU_ENV[@]}" "${PYTEST[@]}" tests/host -o "python_files=$HOST_FILES"
  fi
  if needs_host "lowvram-$v" "$v"; then
    part "lowvram-$v" gpu 90 pytest -- "${GPU_ENV[@]}" "${PYTEST[@]}" tests/host -o "python_files=host_lowvram.py" \
      -k "fp8_scaled or gguf or lora"
  fi
  if needs_host "highvram-$v" "$v"; then
    ALLOW_EMPTY=1 part "highvram-$v" gpu 60 pytest -- "${GPU_ENV[@]}" WAN22_COMFYUI_FLAGS=highvram \
      "${PYTEST[@]}" tests/host -o "python_files=host_*.py" -k highvram
  fi
  if needs_host "server-$v" "$v"; then
    part "server-$v" gpu 100 -- $PY scripts/gpu_server_check.py "$H" --log-dir "$OUTDIR" "${SERVER_CPU[@]}"
  fi
done

# --- PROFILE=bench -----------------------------------------------------------------------------------------
FILES=${BENCH_FILES:-/tmp/wan_bench_files}
H=${HOST[0.8.1]}
if needs_host bench 0.8.1; then
  part bench gpu "${BENCH_TIMEOUT:-240}" -- $PY test_performance.py --preset 14b --layers 20 --tokens 32760,1560 \
    --test-all --prefetch 1 --non-blocking --steps 3 --compare-native --comfyui "$H" --output "$OUTDIR/bench_14b.json"
fi

# bench2: the user-file mode inside ComfyUI on a simulated 12 GB card, 14B block shapes with 10 blocks, bf16
# vs ComfyUI's offloading (and 0.33's dynamic VRAM), Q8_0 GGUF vs ComfyUI-GGUF's own offloading.
bench2() { # bench2 CHECKOUT TAG
  local f
  $PY scripts/make_bench_files.py "$FILES" --preset 14b --layers 10 | tail -n 1 || return 1
  for f in "$FILES"/wan_14b_10blocks_bf16.safetensors "$FILES"/wan_14b_10blocks_Q8_0.gguf; do
    echo "-- $(basename "$f")"
    $PY test_performance.py --comfyui "$1" --model-path "$f" --vram-limit 12 --tokens 32760,1560 --test-all \
      --prefetch 1 --non-blocking --steps 2 --chart "$OUTDIR/bench2_$2_$(basename "$f").png" \
      --output "$OUTDIR/bench2_$2_$(basename "$f").json" || return 1
  done
}
export -f bench2
export PY FILES OUTDIR
for v in $VERSIONS; do
  if needs_host "bench2-$v" "$v"; then
    part "bench2-$v" gpu "${BENCH2_TIMEOUT:-300}" -- bench2 "${HOST[$v]}" "$v"
  fi
done

# loader: peak VRAM during load against resident + one block, host anonymous RSS against 1.1 x (swapped +
# one block), next to WAN Model Loader + BlockSwap and UNETLoader + BlockSwap.
if needs_host loader 0.8.1; then
  part loader gpu "${LOADER_TIMEOUT:-240}" -- $PY benchmarks/combined_loader_memory.py --comfyui "$H" --gpu \
    --preset 14b --layers 10 --blocks-to-swap 6 --cycles 3 --json "$OUTDIR/loader_14b.json"
fi

# auto: auto_blocks_to_swap on a simulated 12 GB card, 14B-shaped 20 blocks, 832x480x81, vs the fixed sweep.
auto_bench() {
  $PY scripts/make_bench_files.py "$FILES" --preset 14b --layers 20 | tail -n 1 || return 1
  $PY test_performance.py --comfyui "$1" --model-path "$FILES/wan_14b_20blocks_bf16.safetensors" --vram-limit 12 \
    --auto --test-all --resolution 832x480 --frames 81 --prefetch 1 --non-blocking --steps 2 \
    --output "$OUTDIR/auto_14b.json"
}
export -f auto_bench
if needs_host auto 0.8.1; then
  part auto gpu "${AUTO_TIMEOUT:-300}" -- auto_bench "$H"
fi

# tiers: where swapped blocks wait between runs (issue 21), 14B block shapes, 6 blocks all swapped.
part tiers gpu "${TIERS_TIMEOUT:-300}" -- $PY test_performance.py --preset 14b --layers 6 --blocks-to-swap 6 \
  --tokens 32760,1560 --prefetch 1 --non-blocking --steps 2 --host-tiers --output "$OUTDIR/bench_host_tiers.json"

# --- verdict -----------------------------------------------------------------------------------------------
echo
echo "GPU check ($PROFILE profile, PARTS=\"$PARTS\"), $((SECONDS - STARTED)) s in all; logs in $OUTDIR"
printf '%-16s %-8s %6s  %s\n' part verdict seconds note
for row in "${ROWS[@]}"; do echo "$row"; done
[ "${#ROWS[@]}" -gt 0 ] || echo "(no part matched PARTS=\"$PARTS\")"
exit $FAILED
