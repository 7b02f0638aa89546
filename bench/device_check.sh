#!/usr/bin/env bash
# The one-call GPU check: bash bench/device_check.sh OUTDIR
#
# On a GPU machine with torch, triton and nvcc but no network: installs resnet_fused against that machine's torch,
# runs the GPU tests, the headline throughput comparison (ResNet-20, 28x28, batch 512, fp32 and bf16, train and
# inference, eager vs torch.compile vs FusedResNet) and a short time-to-accuracy run (STAGES=...,accuracy adds the
# reference ResNet-20 default-recipe training run). Everything lands in OUTDIR (at most 8 files): device_check.log (all stages),
# throughput.json/.png, time_to_accuracy.json, train_metrics.json/.csv, train_curves.png. Each stage has its own
# time limit so that a stuck stage cannot eat the others' time; the limits add up to 470 s (140 install: the first
# build of the C++/CUDA extension there, sm_90 only; 100 + 50 tests; 130 throughput; 50 time-to-accuracy with the
# fused row first: the reference's was measured in run 1), under 8 minutes even if every stage runs out.
# Set RESNET_FUSED_GIT_COMMIT=<sha> in the environment: the device copy has no .git.
#
# Data: $RESNET_FUSED_DATA if set, else the MNIST .gz files in .data/MNIST/raw (carried by the caller), unpacked
# to a temporary folder.
set -u
OUT=${1:?usage: bash bench/device_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 RESNET_FUSED_BUILD_CUDA=${RESNET_FUSED_BUILD_CUDA:-auto}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-4}  # this machine's chip only: faster build
: > "$LOG"
T0=$(date +%s)

if [ -z "${RESNET_FUSED_DATA:-}" ] && [ -d .data/MNIST/raw ]; then
  DATA=$(mktemp -d)/data
  mkdir -p "$DATA/MNIST/raw"
  for f in .data/MNIST/raw/*.gz; do
    cp "$f" "$DATA/MNIST/raw/" && gunzip -c "$f" > "$DATA/MNIST/raw/$(basename "$f" .gz)"
  done
  export RESNET_FUSED_DATA="$DATA"
fi

SUMMARY=""
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "===== $name (limit ${limit}s, at $(( t - T0 ))s)" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  local line="$name: rc=$rc in $(( $(date +%s) - t ))s"
  echo "===== $line" >> "$LOG"
  SUMMARY="$SUMMARY$line"$'\n'
  echo "$line"
  return $rc
}

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; } >> "$LOG" 2>&1
# STAGES selects stages (default: all); THROUGHPUT_IMPLS overrides the throughput rows.
STAGES=${STAGES:-install,tests,throughput,tta}  # add ",accuracy" for the 15-epoch ResNet-20 run (~2.5 min)
has() { case ",$STAGES," in *",$1,"*) return 0;; esac; return 1; }
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"  # Triton compiles every kernel variant: spread it over cores

# if the extension does not build here, install the Python package alone so that everything else still runs
# (the log keeps the compiler's error; the CUDA extension's tests then skip)
has install && { stage install ${INSTALL_LIMIT:-140} $PY -m pip install --no-build-isolation --no-deps -e . ||
  stage install-without-extension 30 env RESNET_FUSED_BUILD_EXT=0 $PY -m pip install --no-build-isolation --no-deps -e .; }
# GPU tests in two stages, the GPU-only ones first (low precision, CUDA graphs, 50-step MNIST parity, the CUDA
# extension's kernels: few Triton variants to compile), then the op/model suites on CUDA (many shapes: compile-bound)
PYTEST="$PY -m pytest -v -rs -p no:benchmark -p no:cacheprovider --durations=15"
has tests && stage gpu-tests ${TESTS_LIMIT:-100} $PYTEST $XDIST -m gpu tests/test_gpu.py tests/test_ext.py
has tests && stage gpu-op-tests ${OP_TESTS_LIMIT:-50} $PYTEST $XDIST tests/test_ops.py tests/test_fused_model.py
# the headline rows first (the JSON is written after every row); torch.compile only in bf16, where the targets are
IMPLS=${THROUGHPUT_IMPLS:-fused-triton-graph,eager,fused-triton,fused-cuda,fused-cuda-graph,compile@bf16,compile-reduce-overhead@bf16}
has throughput && stage throughput ${THROUGHPUT_LIMIT:-130} $PY bench/throughput.py --models resnet20 \
  --batch-sizes 512 --precisions fp32,bf16 --modes train,inference --impls "$IMPLS" --iters 20 --repeats 5 \
  --json "$OUT/throughput.json" --png "$OUT/throughput.png" --no-progress
if has accuracy; then
  TRAIN=$(mktemp -d)
  stage accuracy 150 $PY -m resnet_fused.train --model resnet20 --out "$TRAIN" --no-progress
  cp "$TRAIN/metrics.json" "$OUT/train_metrics.json" 2>/dev/null
  cp "$TRAIN/metrics.csv" "$OUT/train_metrics.csv" 2>/dev/null
  cp "$TRAIN/curves.png" "$OUT/train_curves.png" 2>/dev/null
fi
has tta && stage time-to-accuracy ${TTA_LIMIT:-50} $PY bench/time_to_accuracy.py --impls fused,reference --epochs 4 \
  --json "$OUT/time_to_accuracy.json"
echo "===== summary (total $(( $(date +%s) - T0 ))s)" >> "$LOG"
printf "%s" "$SUMMARY" >> "$LOG"
tail -n 60 "$LOG" | grep -v "^=====" | tail -n 45
printf "%s" "$SUMMARY"
