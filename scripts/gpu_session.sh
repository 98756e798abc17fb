#!/usr/bin/env bash
# gpu_session.sh — what a short GPU lease should run, most valuable first, each step under its own time limit, so the
# whole fits one 10-minute device command (the device machine starts bare: build included):
#
#   bash scripts/gpu_session.sh [OUT_DIR]      (default: $OUT when set, else a new temp dir)
#
#   1. build        the extension with its CUDA kernels for sm_90 only (~60 s on 16 cores)
#   2. checks       the GPU checks of the newest code first: the Performer at the model's shapes in every dtype
#                   and its split products of bf16 rows against those of the rows widened to fp32 (the zero lo
#                   part's product skipped since 2026-11-27, late: bitwise the same in the interpreter, not yet run
#                   on a GPU), the C++ LayerNorm/GELU -> Linear pair ops
#                   against the Python Function (on CUDA, bf16 tokens into an fp32 LayerNorm must fail as eager
#                   does), the whole model against float64 (uncompiled, and torch.compile(fullgraph=True) of it:
#                   the compiled ones had not finished after 155 s beside the others on 12 xdist workers on
#                   2026-11-27); pytest-xdist workers where installed
#   3. bench        T2T-ViT-14's whole-model train step with every provider, then timm's ViT-S train step: every GPU
#                   target of issue 5 in one run, the compile providers with GPU_SESSION_COMPILE_MODE (default
#                   reduce-overhead: CUDA graphs, since without them both compiled steps wait on the host) (bench/);
#                   the steps' AdamW fused since 2026-11-28 (foreach before: its launches were 2.7-4.0 ms per step
#                   in the 2026-11-27 profiles, the same for every provider)
#   4. profile      scripts/profile_step.py on the train step, GPU_SESSION_PROFILE_PROVIDERS (default
#                   compile-eager,compile-fused): which kernels make the gap (83 s for both on 2026-11-27; the last
#                   profile predates the Performer's 64-row tiles)
#   5. tune         scripts/tune_performer.py: the Triton Performer's tiles (rows, warps) timed against its default
#                   at the model's shapes by wall and kernel time (tune/tune_performer.json; split-bf16 tuned
#                   twice on 2026-11-27: the forward's tile by wall time, then the backward's by kernel time)
#   (variants)      not by default: compile-eager and compile-fused under each of GPU_SESSION_VARIANTS' switch sets
#                   (bench-variant-N/), each in its own process; by default the Performer's tile before 2026-11-27
#                   in both passes (T2T_PERFORMER_TILE=32,8: 25.1 ms vs 24.3 at the 64-row default, two leases of
#                   2026-11-27). No gain on 2026-11-27 either: T2T_RECOMPUTE_PAIRS=0 (no lean pairs),
#                   T2T_EAGER_OPS=soft_split (the plain soft split as inductor's code). ~50 s a set
#   (ops)           not by default: the soft split + LayerNorm and Performer op cases with torch.compile of the eager
#                   formula beside the Triton kernels (bench-ops/)
#   (op-tests)      not by default: the CUDA/Triton op and model tests (pytest-xdist, fixed Triton tiles)
#   (gpu-tests)     not by default: tests/gpu (the whole model against float64, huge tensors, determinism, memory,
#                   threads)
#   (graphs)        not by default: the train step's compile providers with --compile-mode reduce-overhead and
#                   eager, into bench-graphs/
#   (performer-ab)  not by default: the Performer op cases (no compile) with bf16's products on the FMA path and
#                   split into bf16 parts on the tensor cores (T2T_PERFORMER_SPLIT_BF16=0/1), into bench-performer-*/
#   (train)         not by default: the train step, eager and fused only (no compile, no checkpointing), into
#                   bench-train/
#
# Env: GPU_SESSION_STEPS="build checks bench profile tune" (the default; add "variants", "ops", "op-tests", ...,
#      or drop steps a second call does not need: the build is needed on every fresh machine),
#      GPU_SESSION_LIMITS="build=75 checks=200 bench=150 profile=85 tune=50" (seconds per step, these the
#      defaults: 560 in all; on an H100 (2026-11-27) the build took 60 s, the bench 139 s, the profile 83 s, the
#      tune 40 s; the checks' compiled-model tests passed 155 s), GPU_SESSION_GPU_TESTS (the
#      gpu-tests step's pytest arguments; default tests/gpu without what the checks step ran), GPU_SESSION_VARIANTS
#      (switch sets separated by ';', each of space-separated NAME=VALUE), GPU_SESSION_COMPILE_MODE ("default" for
#      torch's), GPU_SESSION_PROFILE_PROVIDERS.
# A step past its limit is interrupted (pytest prints what it has, the bench keeps the cases it finished) and the
# next runs. Logs and results are packed into OUT_DIR/session.tgz after every step (a lent machine returns at most
# 8 files from $OUT, and what a killed command wrote).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT_DIR=${1:-${OUT:-$(mktemp -d -t t2t_gpu_session.XXXXXX)}}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} T2T_CUDA_ARCH_LIST=${T2T_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} T2T_TRITON_AUTOTUNE=${T2T_TRITON_AUTOTUNE:-0}
declare -A LIMIT=([build]=75 [checks]=200 [bench]=150 [variants]=110 [tune]=50 [profile]=85 [ops]=110
                  [op-tests]=80 [gpu-tests]=80 [graphs]=240 [performer-ab]=60 [train]=60)
STEPS=" ${GPU_SESSION_STEPS:-build checks bench profile tune} "
VARIANTS=${GPU_SESSION_VARIANTS:-"T2T_PERFORMER_TILE=32,8"}
COMPILE_MODE=${GPU_SESSION_COMPILE_MODE:-reduce-overhead}
MODE_ARGS=()
[[ "$COMPILE_MODE" != default ]] && MODE_ARGS=(--compile-mode "$COMPILE_MODE")
for kv in ${GPU_SESSION_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done

run() {  # run STEP COMMAND...: under the step's limit, logged; prints the log's tail (selected steps only)
  local name=$1; shift
  [[ "$STEPS" == *" $name "* ]] || return 0
  echo "=== $name (limit ${LIMIT[$name]} s): $*"
  local start=$SECONDS
  timeout -s INT -k 5 "${LIMIT[$name]}" "$@" >"$WORK/$name.log" 2>&1  # (5 s grace: the defaults' 560 s + 5 x 5 fit 600)
  echo "exit $? after $((SECONDS - start)) s" | tee -a "$WORK/$name.log"
  tail -n 25 "$WORK/$name.log"
  tar czf "$OUT_DIR/session.tgz" -C "$WORK" .
}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_session.sh: no CUDA device visible to torch; nothing to run here" >&2
  exit 1
fi
WORK=$(mktemp -d -t t2t_gpu_session.XXXXXX)
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$WORK/device.txt"
run build "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
CHECKS=(tests/ops/test_performer_attention.py::test_cuda_model_shapes
        tests/ops/test_performer_attention.py::test_triton_split_products_of_bf16_rows_skip_only_zero_terms
        tests/models/test_recompute.py::test_cpp_pairs_equal_the_python_function_bitwise
        tests/gpu/test_gpu_model.py)
# pytest-xdist workers and a per-test timeout where the plugins are there (the device image has both)
PARALLEL=() TIMEOUT=() CHECK_TIMEOUT=()
"$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n 12)
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && TIMEOUT=(--timeout 60) CHECK_TIMEOUT=(--timeout 190)
run checks "$PYTHON" -m pytest "${CHECKS[@]}" "${PARALLEL[@]}" "${CHECK_TIMEOUT[@]}" -q -rfE -p no:cacheprovider
# the gpu-tests step skips what the checks ran (unless told what to run)
GPU_TESTS=(tests/gpu)
if [[ "$STEPS" == *" checks "* ]]; then
  for t in "${CHECKS[@]}"; do [[ $t == tests/gpu/* ]] && GPU_TESTS+=(--deselect "$t"); done
fi
# the Performer op cases with each kind of bf16 products, one run after the other (same machine, minutes apart)
run performer-ab env PYTHON="$PYTHON" WORK="$WORK" bash -c 'for split in 0 1; do
  T2T_PERFORMER_SPLIT_BF16=$split "$PYTHON" -m t2t_kernels bench --no-model --ops performer_attention --no-compile \
    --no-progress --out "$WORK/bench-performer-split$split" || exit; done'
run train env T2T_TRITON_AUTOTUNE=1 "$PYTHON" -m t2t_kernels bench --model t2t_vit_14 --no-ops --no-timm --no-compile \
  --no-checkpointing --cases "t2t_vit_14/train step" --no-progress --out "$WORK/bench-train"
# the bench keeps its own autotuning (timings): T2T_TRITON_AUTOTUNE applies to the checks only
# the train step first (every issue-5 GPU target is in it; results.json is rewritten after each case), then timm's
run bench env T2T_TRITON_AUTOTUNE=1 "$PYTHON" -m t2t_kernels bench --model t2t_vit_14 --no-ops --timm \
  "${MODE_ARGS[@]}" \
  --cases "t2t_vit_14/train step,timm.vit_small_patch16_224/train step" --no-progress --out "$WORK/bench"
# each switch set in its own process (the switches are read when a graph is traced), with compile-eager beside
run variants env PYTHON="$PYTHON" WORK="$WORK" VARIANTS="$VARIANTS" MODE="${MODE_ARGS[*]}" bash -c 'i=0
  IFS=";" read -ra sets <<<"$VARIANTS"
  for set in "${sets[@]}"; do i=$((i + 1)); echo "--- variant $i: $set"
    env T2T_TRITON_AUTOTUNE=1 $set "$PYTHON" -m t2t_kernels bench --model t2t_vit_14 --no-ops --no-timm $MODE \
      --cases "t2t_vit_14/train step" --providers compile-eager,compile-fused --no-progress \
      --out "$WORK/bench-variant-$i" || exit
  done'
run profile "$PYTHON" scripts/profile_step.py --case "t2t_vit_14/train step" \
  --providers "${GPU_SESSION_PROFILE_PROVIDERS:-compile-eager,compile-fused}" --rows 45
run ops env T2T_TRITON_AUTOTUNE=1 "$PYTHON" -m t2t_kernels bench --no-model \
  --ops soft_split+layer_norm,performer_attention --no-progress --out "$WORK/bench-ops"
# test_triton_aot compiles for GPUs without one (CI runs it); here its minutes would only crowd out the GPU tests
run op-tests "$PYTHON" -m pytest tests/ops tests/models -k "(cuda or triton) and not triton_aot" "${PARALLEL[@]}" \
  "${TIMEOUT[@]}" -q -rfE -p no:cacheprovider
[[ -n "${GPU_SESSION_GPU_TESTS:-}" ]] && read -ra GPU_TESTS <<<"$GPU_SESSION_GPU_TESTS"
run gpu-tests "$PYTHON" -m pytest "${GPU_TESTS[@]}" "${TIMEOUT[@]}" -q -rfE -p no:cacheprovider
run graphs env T2T_TRITON_AUTOTUNE=1 "$PYTHON" -m t2t_kernels bench --model t2t_vit_14 --no-ops --no-timm \
  --no-checkpointing --compile-mode reduce-overhead --cases "t2t_vit_14/train step" \
  --providers eager,compile-eager,compile-fused --no-progress \
  --out "$WORK/bench-graphs"
run tune "$PYTHON" scripts/tune_performer.py --min-time 0.3 --out "$WORK/tune"
