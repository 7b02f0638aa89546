#!/usr/bin/env bash
# The one-call GPU check (v2): bash bench/device_check.sh OUTDIR
#
# One global deadline (DEVICE_CHECK_DEADLINE_S, default 470 s; the caller's timeout should allow ~20 s more), stages
# in priority order, each given min(its own limit, the time left before the deadline less a reserve for the
# summary); a stage with too little time left is recorded as skipped, never started:
#   build        the C++/CUDA extension (pip install -e ., sm_90 only), in the background from the first second;
#                if it fails, everything else runs from the source tree (the extension's tests skip)
#   precompile   bench/precompile.py: the Triton kernels of the headline workloads compiled in parallel processes
#                into one TRITON_CACHE_DIR that every later stage reads
#   gpu-tests    what CI cannot cover, on the GPU: tests/test_gpu.py (bf16/fp16, CUDA graphs, the 50-step MNIST
#                parity) -> junit.xml
#   ext-tests    after the build: the CUDA extension's operators (tests/test_ext.py and test_ext_lowp.py -m gpu,
#                the `cuda` backend under a CUDA graph, bn_finalize's device check) -> junit-ext.xml
#   throughput   the headline rows in priority order (ResNet-20, batch 512, train and inference, fp32 and bf16;
#                fused, eager, eager-graph, then the torch.compile modes in bf16), JSON after every row (no PNG:
#                `python bench/throughput.py --plot-only throughput.json --png F` draws it afterwards)
#   ext-ops      bench/ext_ops.py: the extension's BatchNorm operators at ResNet-20's shapes, GB/s and time against a
#                copy of the same bytes (needs the build)
#   host-profile bench/host_profile.py: the top operators by host time of one un-graphed fused training step,
#                and per Triton kernel its device time, TFLOP/s and GB/s against the measured peaks
#   time-to-accuracy  bench/time_to_accuracy.py, the fused row first
#   summary      summary.json: every stage's exit status, seconds and limit; the log's tail on stdout
# Timed-out stages get SIGINT first (pytest still writes its junit XML and summary), SIGKILL 5 s later.
# OUTDIR holds at most 8 files, no folders: device_check.log, summary.json, junit.xml, junit-ext.xml,
# throughput.json, ext_ops.json, host_profile.json, time_to_accuracy.json.
#
# DEVICE_CHECK_DRY_RUN=1: the same schedule on a CPU with tiny workloads (Triton interpreter), deadline default
# 300 s: tests/test_device_check.py runs it in CI. RESNET_FUSED_GIT_COMMIT=<sha>: the device copy has no .git.
# Data: $RESNET_FUSED_DATA, else .data (carried by the caller; MNIST/raw/*.gz is enough).
set -u
OUT=${1:?usage: bash bench/device_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then DEFAULT_DEADLINE=300; else DEFAULT_DEADLINE=470; fi
DEADLINE=${DEVICE_CHECK_DEADLINE_S:-$DEFAULT_DEADLINE}
RESERVE=${DEVICE_CHECK_RESERVE_S:-10}  # seconds kept for the summary (and a killed stage's 5 s grace)
MIN_STAGE=${DEVICE_CHECK_MIN_STAGE_S:-5}
LOG="$OUT/device_check.log"
: > "$LOG"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 RESNET_FUSED_BUILD_CUDA=${RESNET_FUSED_BUILD_CUDA:-auto}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-4}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d)/triton-cache}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
if [ -z "${RESNET_FUSED_DATA:-}" ] && [ -d .data/MNIST/raw ]; then export RESNET_FUSED_DATA=$PWD/.data; fi

now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - RESERVE - $(now) )); }
STAGES=""
record() {  # record NAME RC SECONDS LIMIT STATUS
  STAGES="$STAGES${STAGES:+,}{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3, \"limit_s\": $4, \"status\": \"$5\"}"
  echo "===== $1: $5 (rc=$2, ${3}s of ${4}s, at $(now)s)" | tee -a "$LOG"
}
stage() {  # stage NAME WANTED_LIMIT_S CMD...: runs CMD under min(WANTED, time left), or records it as skipped
  local name=$1 want=$2; shift 2
  local l; l=$(left)
  local limit=$(( want < l ? want : l ))
  if [ "$limit" -lt "$MIN_STAGE" ]; then
    record "$name" -1 0 0 "skipped: deadline"
    return 125
  fi
  local t; t=$(date +%s)
  echo "===== $name (limit ${limit}s, at $(now)s)" >> "$LOG"
  timeout --signal=INT --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local status=done
  [ $rc -ne 0 ] && status=failed
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="cut at its limit"
  record "$name" $rc $(( $(date +%s) - t )) "$limit" "$status"
  return $rc
}

{ nvidia-smi 2>/dev/null || echo "no nvidia-smi (dry run: ${DRY})"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "deadline ${DEADLINE}s, Triton cache $TRITON_CACHE_DIR, data ${RESNET_FUSED_DATA:-none}"; } >> "$LOG" 2>&1

# per-stage settings: the real workloads, or tiny ones on the CPU for the dry run
XDIST=""
$PY -c "import xdist" 2>/dev/null && [ "$DRY" != 1 ] && XDIST="-n 8"
PYTEST="$PY -m pytest -v -rs -p no:cacheprovider --durations=10"
if [ "$DRY" = 1 ]; then
  BUILD=($PY -c "import resnet_fused.ext as e; print('extension built:', e.available())")
  PRECOMPILE=(--dry-run --jobs 2)
  GPU_TESTS=(tests/test_reliability.py -k "keep_nan")
  EXT_TESTS=(tests/test_ext.py -k "bad_operands")
  THROUGHPUT=(--device cpu --models resnet8 --batch-sizes 4 --modes train,inference --precisions fp32
              --impls eager,fused-cpu,eager-graph --iters 1 --repeats 2 --no-isolate --no-launches)
  HOST=(--dry-run)
  EXT_OPS=(--device cpu --dry-run)
  HOST_LIMIT=${HOST_LIMIT:-120}  # five fused steps through the Triton interpreter: ~25 s alone, more on a busy CI box
  TTA=(--device cpu --model resnet8 --impls reference --subset 256 --epochs 1 --batch-size 64 --amp off)
else
  BUILD=($PY -m pip install --no-build-isolation --no-deps -e .)
  PRECOMPILE=(--jobs 8)
  GPU_TESTS=($XDIST -m gpu tests/test_gpu.py)
  EXT_TESTS=(-m gpu tests/test_ext.py tests/test_ext_lowp.py tests/test_gpu.py::test_cuda_graph_capture
             tests/test_gpu.py::test_bn_finalize_refuses_operands_on_another_device)
  IMPLS=${THROUGHPUT_IMPLS:-fused-triton-graph,eager,eager-graph,fused-triton,fused-triton-no-cudagraphs,fused-triton-net,eager-channels-last,fused-cuda,fused-cuda-graph,compile@bf16,compile-reduce-overhead@bf16,compile-max-autotune-no-cudagraphs@bf16,compile-max-autotune@bf16,fused-triton-per-element-graph}
  THROUGHPUT=(--models resnet20 --batch-sizes 512 --precisions fp32,bf16 --modes train,inference
              --impls "$IMPLS" --iters 20 --repeats 5)
  HOST=()
  EXT_OPS=(--device cuda)
  TTA=(--impls fused,reference,reference-compile --amp bf16)  # the fast recipe (2 epochs)
fi

# build: in the background from the first second (its output joins the log when it ends)
BUILD_LOG=$(mktemp)
BUILD_LIMIT=$(( ${BUILD_LIMIT:-150} < $(left) ? ${BUILD_LIMIT:-150} : $(left) ))
BUILD_T=$(date +%s)
( timeout --signal=INT --kill-after=5 "$BUILD_LIMIT" "${BUILD[@]}" > "$BUILD_LOG" 2>&1; echo $? > "$BUILD_LOG.rc"
  date +%s > "$BUILD_LOG.end" ) &
BUILD_PID=$!
wait_build() {
  while kill -0 "$BUILD_PID" 2>/dev/null && [ "$(left)" -gt 0 ]; do sleep 1; done
  kill -0 "$BUILD_PID" 2>/dev/null && kill -INT "$BUILD_PID" 2>/dev/null
  wait "$BUILD_PID" 2>/dev/null
  local rc; rc=$(cat "$BUILD_LOG.rc" 2>/dev/null || echo 124)
  { echo "===== build (background, limit ${BUILD_LIMIT}s)"; tail -n 40 "$BUILD_LOG"; } >> "$LOG"
  local status=done
  [ "$rc" -ne 0 ] && status="failed: the rest runs from the source tree"
  [ "$rc" -eq 124 ] && status="cut at its limit: the rest runs from the source tree"
  record build "$rc" $(( $(cat "$BUILD_LOG.end" 2>/dev/null || date +%s) - BUILD_T )) "$BUILD_LIMIT" "$status"
}

stage precompile ${PRECOMPILE_LIMIT:-90} $PY bench/precompile.py "${PRECOMPILE[@]}"
stage gpu-tests ${TESTS_LIMIT:-100} $PYTEST --junitxml="$OUT/junit.xml" "${GPU_TESTS[@]}"
wait_build
stage ext-tests ${EXT_TESTS_LIMIT:-40} $PYTEST --junitxml="$OUT/junit-ext.xml" "${EXT_TESTS[@]}"
stage throughput ${THROUGHPUT_LIMIT:-150} $PY bench/throughput.py "${THROUGHPUT[@]}" --json "$OUT/throughput.json" \
  --png "" --no-progress
stage ext-ops ${EXT_OPS_LIMIT:-30} $PY bench/ext_ops.py "${EXT_OPS[@]}" --json "$OUT/ext_ops.json"
stage host-profile ${HOST_LIMIT:-40} $PY bench/host_profile.py "${HOST[@]}" --json "$OUT/host_profile.json"
stage time-to-accuracy ${TTA_LIMIT:-50} $PY bench/time_to_accuracy.py "${TTA[@]}" --json "$OUT/time_to_accuracy.json"

TOTAL=$(now)
COMMIT=${RESNET_FUSED_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
cat > "$OUT/summary.json" <<JSON
{"deadline_s": $DEADLINE, "total_s": $TOTAL, "dry_run": $([ "$DRY" = 1 ] && echo true || echo false), "git_commit": "$COMMIT",
 "stages": [$STAGES]}
JSON
echo "===== summary: ${TOTAL}s of the ${DEADLINE}s deadline" >> "$LOG"
grep -v "^=====" "$LOG" | tail -n 40
grep "^===== .*: " "$LOG"
