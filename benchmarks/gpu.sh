#!/usr/bin/env bash
# The GPU benchmark: one command on a CUDA machine (aimed at < 8 minutes on one H200; untimed so far).
#
#   benchmarks/gpu.sh                       # CUDA, bf16, channels_last, batch 64, 224 px
#   benchmarks/gpu.sh --device cpu --tiny   # the same runs on CPU at toy sizes (the test suite)
#
# For each model: `sdsurgery bench` eager and compiled (torch.compile), each run timing the
# original, an A/A copy of it (noise), the converted model at p=0 and at linear 0.5 (block
# mode), and timm's own drop_path_rate=0.5 side by side in one process; then
# benchmarks/table.py writes OUT/gpu.md from the JSON files. Each run's table is written as
# soon as it ends, so a run cut short keeps what it measured.
#
# Environment: MODELS (default: resnet152 vit_base_patch16_224 convnext_tiny), HOWS (default:
# "eager compiled"), OUT (default: benchmarks/out), STEPS (20), BATCH, SIZE, DTYPE,
# COMPILE_BACKEND (inductor). Compiling is most of the time (each variant compiles on its own;
# inductor's graph cache makes repeats cheap): with little time, HOWS=compiled MODELS=resnet152.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n "2,16p" "$0"; exit 0 ;;
    *) echo "benchmarks/gpu.sh: unknown argument '$1' (use --device DEV, --tiny)" >&2; exit 2 ;;
  esac
done

if [ "$TINY" = 1 ]; then
  : "${MODELS:=resnet18}" "${BATCH:=2}" "${SIZE:=32}" "${STEPS:=2}" "${DTYPE:=fp32}" "${COMPILE_BACKEND:=eager}"
else
  : "${MODELS:=resnet152 vit_base_patch16_224 convnext_tiny}" "${BATCH:=64}" "${SIZE:=224}" "${STEPS:=20}"
  : "${DTYPE:=bf16}" "${COMPILE_BACKEND:=inductor}"
fi
: "${OUT:=benchmarks/out}" "${HOWS:=eager compiled}"
SDSURGERY="${SDSURGERY:-.venv/bin/sdsurgery}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" || true
fi

for model in $MODELS; do
  for how in $HOWS; do
    flags=(--device "$DEVICE" --dtype "$DTYPE" --batch-size "$BATCH" --image-size "$SIZE" --steps "$STEPS"
           --channels-last --json "$OUT/$model-$how.json")
    if [ "$how" = compiled ]; then flags+=(--compile --compile-backend "$COMPILE_BACKEND"); fi
    echo "== $model, $how: $SDSURGERY bench $model ${flags[*]}"
    start=$(date +%s)
    COLUMNS=160 "$SDSURGERY" bench "$model" "${flags[@]}"
    echo "   ($(( $(date +%s) - start )) s)"
    "$PYTHON" benchmarks/table.py "$OUT" > "$OUT/gpu.md"
  done
done
echo "wrote $OUT/gpu.md"
