#!/usr/bin/env bash
# gpu_checks.sh — the GPU half of the hardening checks (issue 7), in one command, for a session with a CUDA device:
#
#   bash scripts/gpu_checks.sh [LOG_DIR]        (LOG_DIR default: $OUT when set, else a new temp dir)
#
#   1. build   the extension with its CUDA kernels and line info (pip install --no-build-isolation --no-deps -e .;
#              the GPU machine has no network, so nothing else is installed)
#   2. smoke   tests/gpu/sanitizer_workload.py without a sanitizer: every CUDA and Triton kernel of both ops, forward
#              and backward, at odd shapes (1x1, T=E=m=1, stride > kernel, padding > kernel, empty batch ...), checked
#              against float64; also fills Triton's compile (and autotune) caches before the slow sanitizer runs
#   3. sanitizers: compute-sanitizer --tool memcheck, racecheck (and initcheck, synccheck unless GPU_CHECKS_QUICK=1) on the
#              same workload, one op at a time, instrumenting only our kernels (--kernel-name kns=soft_split / performer),
#              with PyTorch's caching allocator off so out-of-bounds accesses are not hidden inside pooled blocks
#   4. pytest tests/gpu: soft split with > 2^31 output elements, Performer with B*T*E > 2^31 (int64 indexing),
#              bitwise determinism run to run, no GPU memory growth, launches from several threads
#   5. pytest tests/ops tests/models tests/hardening -k "cuda or triton": the op tests and the hypothesis fuzzers on the
#              CUDA backends (the fuzzers are skipped, and said so, when hypothesis is not installed)
#
# Env: GPU_CHECKS_STEPS="build smoke sanitizers gpu-tests op-tests" (the default: all; pick some to split the run, e.g.
#      where one command may take at most 10 minutes: first "build smoke sanitizers", then "gpu-tests op-tests"),
#      GPU_CHECKS_QUICK=1 (sanitizers: memcheck + racecheck only), SANITIZER=/path/to/compute-sanitizer, PYTHON=python3,
#      GPU_CHECKS_PYTEST_ARGS="-n 8 --timeout 120" (extra pytest arguments for steps 4 and 5: pytest-xdist workers share
#      the GPU, pytest-timeout ends a hung test).
# Each step logs to LOG_DIR/<step>.log and prints its tail; the summary at the end lists every step.
# Exit status: 0 when every selected step passed, 1 otherwise. Syntax-checked on CPU CI with `bash -n`.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
LOG_DIR=${1:-${OUT:-$(mktemp -d -t t2t_gpu_checks.XXXXXX)}}
mkdir -p "$LOG_DIR"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # keep autotune results for the sanitizer runs
# one fixed tile per Triton soft-split launch: timing 9 configs at every odd test shape took minutes on an H100;
# T2T_TRITON_AUTOTUNE=1 checks every autotune config (slow)
export T2T_TRITON_AUTOTUNE=${T2T_TRITON_AUTOTUNE:-0}
unset TRITON_INTERPRET                                       # the real Triton kernels, not the CPU interpreter
QUICK=${GPU_CHECKS_QUICK:-0}
read -r -a PYTEST_ARGS <<<"${GPU_CHECKS_PYTEST_ARGS:-}"
STEPS=" ${GPU_CHECKS_STEPS:-build smoke sanitizers gpu-tests op-tests} "
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME COMMAND...: runs it, logs to LOG_DIR/NAME.log, records PASS/FAIL
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" >"$LOG_DIR/$name.log" 2>&1
  local status=$?
  tail -n 15 "$LOG_DIR/$name.log"
  if [ "$status" -eq 0 ]; then
    SUMMARY+=("PASS  $name  ($((SECONDS - start)) s)")
  else
    SUMMARY+=("FAIL  $name  (exit $status, $((SECONDS - start)) s, log $LOG_DIR/$name.log)")
    FAILED=1
  fi
  return 0
}

wants() { [[ "$STEPS" == *" $1 "* ]]; }

skip() {
  SUMMARY+=("SKIP  $1  ($2)")
  echo "=== $1: skipped ($2)"
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_checks.sh: no CUDA device visible to torch; nothing to check here" >&2
  exit 1
fi
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, \
'| CUDA', torch.version.cuda)" | tee "$LOG_DIR/device.txt"
"$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>/dev/null | tee -a "$LOG_DIR/device.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$LOG_DIR/device.txt"

# 1. build ------------------------------------------------------------------------------------------------------
if wants build; then
  step build env NVCC_FLAGS="${NVCC_FLAGS:--lineinfo}" "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .
fi
"$PYTHON" -c "import torch, t2t_kernels.ops as ops; print('extension:', ops.EXTENSION_LOADED, ops.EXTENSION_ERROR or ''); \
print('CUDA kernels: soft_split', torch._C._dispatch_has_kernel_for_dispatch_key('t2t_kernels::soft_split', 'CUDA'), \
'performer_attention', torch._C._dispatch_has_kernel_for_dispatch_key('t2t_kernels::performer_attention', 'CUDA')); \
print('backends on cuda:', ops.SOFT_SPLIT_BACKENDS.available('cuda'), ops.PERFORMER_BACKENDS.available('cuda'))" \
  | tee -a "$LOG_DIR/device.txt"

# 2. smoke run (and warm the Triton caches) ---------------------------------------------------------------------
wants smoke && step smoke "$PYTHON" tests/gpu/sanitizer_workload.py --backends cuda,triton

# 3. compute-sanitizer ------------------------------------------------------------------------------------------
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
if ! wants sanitizers; then
  :
elif [ ! -x "$SANITIZER" ]; then
  skip sanitizers "compute-sanitizer not found (set SANITIZER=...)"
  FAILED=1
else
  tools="memcheck racecheck"
  [ "$QUICK" = "1" ] || tools="$tools initcheck synccheck"
  for tool in $tools; do
    for op in soft_split performer_attention; do
      filter=$([ "$op" = soft_split ] && echo soft_split || echo performer)
      step "$tool-$op" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
        --kernel-name "kns=$filter" "$PYTHON" tests/gpu/sanitizer_workload.py --op "$op" --backends cuda,triton
    done
  done
fi

# 4. huge tensors, determinism, memory, threads -----------------------------------------------------------------
wants gpu-tests && step gpu-tests "$PYTHON" -m pytest tests/gpu -v -ra -p no:cacheprovider "${PYTEST_ARGS[@]}"

# 5. the op tests and the fuzzers on the CUDA backends ----------------------------------------------------------
if ! wants op-tests; then
  :
elif "$PYTHON" -c "import hypothesis" 2>/dev/null; then
  step cuda-op-tests "$PYTHON" -m pytest tests/ops tests/models tests/hardening -ra -q -p no:cacheprovider -k "cuda or triton" \
    "${PYTEST_ARGS[@]}"
else
  step cuda-op-tests "$PYTHON" -m pytest tests/ops tests/models -ra -q -p no:cacheprovider -k "cuda or triton" \
    "${PYTEST_ARGS[@]}"
  skip hardening-fuzz "hypothesis is not installed (pip install hypothesis, then rerun step 5)"
fi

echo
echo "=== summary (logs in $LOG_DIR)"
cat "$LOG_DIR/device.txt"
printf '%s\n' "${SUMMARY[@]:-(no step selected)}" | tee "$LOG_DIR/summary.txt"
exit "$FAILED"
