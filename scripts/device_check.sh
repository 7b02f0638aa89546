#!/usr/bin/env bash
# The one-call GPU check (v3): bash scripts/device_check.sh OUTDIR
#
# Stages in order, each given min(its own limit, the time left before the deadline less a reserve for the summary);
# a stage with too little time left is recorded as skipped, never started. The stages' own limits add up to at most
# LIMITS_MAX_S (420 s) by construction: the script refuses to start when they (with any *_LIMIT overrides) add up
# to more, and the dry run in CI checks the sum. The deadline (DEVICE_CHECK_DEADLINE_S, default 440 s) leaves the
# reserve and bash's own start; the caller's timeout should allow ~20 s more.
#   build        the C++/CUDA extension (pip install -e ., sm_90 only), first and alone: nothing imports _C while it
#                builds; if it fails, everything else runs from the source tree (the extension's tests skip)
#   precompile   scripts/precompile.py: the Triton kernels of the headline workloads and of the test stages' own
#                specialisations (tests/test_ops.py and tests/test_gpu.py run compile-only, in shards) compiled in
#                parallel processes into one TRITON_CACHE_DIR that every later stage reads -> precompile.json
#   op-tests     tests/test_ops.py on CUDA (every op against PyTorch autograd, every shipped config, opcheck)
#                -> junit-ops.xml
#   gpu-tests    what CI cannot cover: tests/test_gpu.py (low precision, TF32, CUDA graphs, parity against float64
#                and the perturbed-reference band) and the extension's CUDA operators (test_ext.py, test_ext_lowp.py
#                -m gpu) -> junit.xml
#   throughput   the headline rows in priority order (ResNet-20, batch 512, train and inference, fp32 and bf16),
#                JSON after every row (`python bench/throughput.py --plot-only throughput.json --png F` draws it);
#                then, in what is left of the stage's limit, torchvision's ResNet-50 and ResNet-18 at 224x224
#                (bf16, batch 128: the CUDA extension (auto's choice), channels_last eager, the Triton kernels,
#                torch.compile) -> throughput-tv.json
#   time-to-accuracy  bench/time_to_accuracy.py, the fused row first
#   summary      summary.json: every stage's exit status, seconds, limit and wanted limit; the log's tail on stdout
# Timed-out stages get SIGINT first (pytest still writes its junit XML and summary), SIGKILL 5 s later.
# OUTDIR holds at most 8 files, no folders: device_check.log, summary.json, precompile.json, junit-ops.xml,
# junit.xml, throughput.json, throughput-tv.json, time_to_accuracy.json.
#
# DEVICE_CHECK_DRY_RUN=1: the same schedule on a CPU with tiny workloads (Triton interpreter), deadline default
# 300 s: tests/test_device_check.py runs it in CI. RESNET_FUSED_GIT_COMMIT=<sha>: the device copy has no .git.
# Data: $RESNET_FUSED_DATA, else .data (carried by the caller; MNIST/raw/*.gz is enough).
set -u
OUT=${1:?usage: bash scripts/device_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then DEFAULT_DEADLINE=300; else DEFAULT_DEADLINE=440; fi
DEADLINE=${DEVICE_CHECK_DEADLINE_S:-$DEFAULT_DEADLINE}
RESERVE=${DEVICE_CHECK_RESERVE_S:-10}  # seconds kept for the summary (and a killed stage's 5 s grace)
MIN_STAGE=${DEVICE_CHECK_MIN_STAGE_S:-5}
LOG="$OUT/device_check.log"
: > "$LOG"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 RESNET_FUSED_BUILD_CUDA=${RESNET_FUSED_BUILD_CUDA:-auto}
# every stage imports resnet_fused from this tree, whether the build stage installed it or not
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d)/triton-cache}
if [ "$DRY" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
if [ -z "${RESNET_FUSED_DATA:-}" ] && [ -d .data/MNIST/raw ]; then export RESNET_FUSED_DATA=$PWD/.data; fi

# each stage's own limit (seconds): their sum is checked against LIMITS_MAX_S before anything starts
LIMITS_MAX_S=420
# (the build: two CUDA translation units and the C++ operators, ~60-100 s on 16 cores; cut, the rest runs from the
# source tree and the extension's tests skip)
declare -A WANT=([build]=${BUILD_LIMIT:-120} [precompile]=${PRECOMPILE_LIMIT:-45} [op-tests]=${OP_TESTS_LIMIT:-70}
                 [gpu-tests]=${TESTS_LIMIT:-100} [throughput]=${THROUGHPUT_LIMIT:-55}
                 [time-to-accuracy]=${TTA_LIMIT:-30})
LIMITS_SUM=0
for s in "${WANT[@]}"; do LIMITS_SUM=$(( LIMITS_SUM + s )); done
if [ "$LIMITS_SUM" -gt "$LIMITS_MAX_S" ]; then
  echo "device_check: the stages' limits add up to ${LIMITS_SUM}s, more than ${LIMITS_MAX_S}s: lower a *_LIMIT" | tee -a "$LOG"
  exit 2
fi

now() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - RESERVE - $(now) )); }
STAGES=""
record() {  # record NAME RC SECONDS LIMIT STATUS
  STAGES="$STAGES${STAGES:+,}{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3, \"limit_s\": $4, \"wanted_s\": ${WANT[$1]}, \"status\": \"$5\"}"
  echo "===== $1: $5 (rc=$2, ${3}s of ${4}s, at $(now)s)" | tee -a "$LOG"
}
stage() {  # stage NAME CMD...: runs CMD under min(its wanted limit, time left), or records it as skipped
  local name=$1; shift
  local want=${WANT[$name]}
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
  PRECOMPILE=(--dry-run --jobs 2 --tests tests/test_gpu.py)
  OP_TESTS=(tests/test_ops.py -k "bn_scale_shift")
  GPU_TESTS=(tests/test_reliability.py tests/test_ext.py -k "keep_nan or bad_operands")
  THROUGHPUT=(--device cpu --models resnet8 --batch-sizes 4 --modes train,inference --precisions fp32
              --impls eager,fused-cpu,eager-graph --iters 1 --repeats 2 --no-isolate --no-launches)
  THROUGHPUT_TV=(--device cpu --models tv-resnet18 --tv-size 64 --batch-sizes 1 --modes inference --precisions fp32
                 --impls eager-channels-last,fused-cpu --iters 1 --repeats 1 --no-isolate --no-launches)
  TTA=(--device cpu --model resnet8 --impls reference --subset 256 --epochs 1 --batch-size 64 --amp off)
else
  BUILD=($PY -m pip install --no-build-isolation --no-deps -e .)
  PRECOMPILE=(--jobs 12 --tests tests/test_ops.py tests/test_gpu.py)
  OP_TESTS=($XDIST tests/test_ops.py)
  GPU_TESTS=($XDIST -m gpu tests/test_gpu.py tests/test_ext.py tests/test_ext_lowp.py)
  IMPLS=${THROUGHPUT_IMPLS:-fused-triton-graph,eager,eager-graph,fused-triton,fused-cuda-graph,compile@bf16,compile-max-autotune@bf16,fused-triton-net,eager-channels-last,compile-reduce-overhead@bf16}
  THROUGHPUT=(--models resnet20 --batch-sizes 512 --precisions fp32,bf16 --modes train,inference
              --impls "$IMPLS" --iters 20 --repeats 5)
  THROUGHPUT_TV=(--models tv-resnet50,tv-resnet18 --tv-size 224 --batch-sizes 128 --precisions bf16
                 --modes inference,train --impls "${THROUGHPUT_TV_IMPLS:-fused-cuda,eager-channels-last,fused-triton,compile}"
                 --iters 10 --repeats 3)
  TTA=(--impls fused,reference,reference-compile --amp bf16)  # the fast recipe (2 epochs)
fi

# build first and alone: the later stages import the extension it installs
stage build "${BUILD[@]}" || echo "build failed: the rest runs from the source tree" >> "$LOG"
stage precompile $PY scripts/precompile.py "${PRECOMPILE[@]}" --json "$OUT/precompile.json"
stage op-tests $PYTEST --junitxml="$OUT/junit-ops.xml" "${OP_TESTS[@]}"
stage gpu-tests $PYTEST --junitxml="$OUT/junit.xml" "${GPU_TESTS[@]}"
# ResNet-20's rows first; torchvision's in whatever the stage's limit leaves (the stage's status is the first's)
TP_R20=$(printf '%q ' $PY bench/throughput.py "${THROUGHPUT[@]}" --json "$OUT/throughput.json" --png "" --no-progress)
TP_TV=$(printf '%q ' $PY bench/throughput.py "${THROUGHPUT_TV[@]}" --json "$OUT/throughput-tv.json" --png "" \
        --no-progress)
stage throughput bash -c "$TP_R20; rc=\$?; $TP_TV; exit \$rc"
stage time-to-accuracy $PY bench/time_to_accuracy.py "${TTA[@]}" --json "$OUT/time_to_accuracy.json"

TOTAL=$(now)
COMMIT=${RESNET_FUSED_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
cat > "$OUT/summary.json" <<JSON
{"version": 3, "deadline_s": $DEADLINE, "limits_sum_s": $LIMITS_SUM, "limits_max_s": $LIMITS_MAX_S, "total_s": $TOTAL, "dry_run": $([ "$DRY" = 1 ] && echo true || echo false), "git_commit": "$COMMIT",
 "stages": [$STAGES]}
JSON
echo "===== summary: ${TOTAL}s of the ${DEADLINE}s deadline" >> "$LOG"
grep -v "^=====" "$LOG" | tail -n 40
grep "^===== .*: " "$LOG"
