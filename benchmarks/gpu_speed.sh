#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md, "GPU speed", for a machine lent for a few minutes: core
# library only (torch, timm, torchvision; no Kedro, no MLflow), outputs under $OUT (default:
# ./gpu_speed_out). Each step has its own time limit so one slow step cannot eat the others' time.
# Two calls fit a 10-minute-per-command limit (compiling a ViT-B takes about a minute per path):
#
#   bash benchmarks/gpu_speed.sh                                 # dinomaly inpformer check  (<= 7 min)
#   STEPS="compile data" bash benchmarks/gpu_speed.sh            # compiled rates, data path (<= 6 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_speed_out}"
mkdir -p "$OUT"
STEPS="${STEPS:-dinomaly inpformer check}"
py() { timeout "$1" python "${@:2}"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
for step in $STEPS; do
  case "$step" in
    check)     # every fast path against eager, with inductor and CUDA graphs
      py 200 benchmarks/check_fast_paths.py --device cuda --methods dinomaly --backbone vitb --crop 392 --batch 16 \
        --infer-batch 16 --modes default,reduce-overhead --warmup 3 --iters 10 > "$OUT/check_fast_paths.md" 2>&1 ;;
    dinomaly)  # ViT-B/392 batch 16: before (fp32 encoder cast per call) and after, inference at 16 and 64
      py 90 benchmarks/bench_dinomaly.py --device cuda --backbones vitb,vits --crops 392,224 --batch 16 \
        --infer-batches 16,64 --no-hold > "$OUT/dinomaly_cast_per_call.md" 2>&1
      py 90 benchmarks/bench_dinomaly.py --device cuda --backbones vitb,vits --crops 392,224 --batch 16 \
        --infer-batches 16,64 > "$OUT/dinomaly_held.md" 2>&1 ;;
    inpformer)
      py 120 benchmarks/bench_inpformer.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 > "$OUT/inpformer_held.md" 2>&1 ;;
    compile)   # the same with torch.compile (compile time excluded by the warm-up iterations)
      py 150 benchmarks/bench_dinomaly.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 --compile true --warmup 8 > "$OUT/dinomaly_compiled.md" 2>&1
      py 150 benchmarks/bench_dinomaly.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 --compile reduce-overhead --warmup 8 > "$OUT/dinomaly_cudagraphs.md" 2>&1 ;;
    data)      # decoding MVTec-size PNGs with the machine's cores (needs pandas)
      py 60 benchmarks/make_mvtec_tree.py --out /tmp/mvtec_sized --scale 0.15 > "$OUT/tree.txt" 2>&1 &&
      py 90 benchmarks/bench_data.py --root /tmp/mvtec_sized --workers 8,16 --limit 0 > "$OUT/data.md" 2>&1 ;;
  esac
  echo "== $step: exit $?" >> "$OUT/steps.txt"
done
cat "$OUT"/*.md 2>/dev/null | tail -n 80
