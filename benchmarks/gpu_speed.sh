#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md, "GPU speed", for a machine lent for a few minutes: core
# library only (torch, timm, torchvision; no Kedro, no MLflow), outputs under $OUT (default:
# ./gpu_speed_out). Each step has its own time limit so one slow step cannot eat the others' time.
# Two calls fit a 10-minute-per-command limit (compiling a ViT-B takes about a minute per path):
#
#   bash benchmarks/gpu_speed.sh                        # dinomaly official inpformer   (<= 7 min)
#   STEPS="check compile" bash benchmarks/gpu_speed.sh   # fast paths vs eager, compiled rates (<= 7 min)
#
# "official" times the released Dinomaly code beside ours; it needs that repository's files under
# $OFFICIAL (default .official/Dinomaly, git-ignored: copy it there and carry it; it is skipped
# when absent). "data" needs pandas and no GPU: run it on any machine with the GPU machine's cores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_speed_out}"
mkdir -p "$OUT"
STEPS="${STEPS:-dinomaly official inpformer}"
OFFICIAL="${OFFICIAL:-.official/Dinomaly}"
py() { timeout "$1" python "${@:2}"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
for step in $STEPS; do
  case "$step" in
    check)     # every fast path against eager, with inductor and CUDA graphs
      py 150 benchmarks/check_fast_paths.py --device cuda --methods dinomaly --backbone vitb --crop 392 --batch 16 \
        --infer-batch 16 --modes default,reduce-overhead --warmup 3 --iters 10 > "$OUT/check_fast_paths.md" 2>&1 ;;
    dinomaly)  # ViT-B/392 batch 16: before (fp32 encoder cast per call) and after, inference at 16 and 64
      py 90 benchmarks/bench_dinomaly.py --device cuda --backbones vitb,vits --crops 392,224 --batch 16 \
        --infer-batches 16,64 --no-hold > "$OUT/dinomaly_cast_per_call.md" 2>&1
      py 90 benchmarks/bench_dinomaly.py --device cuda --backbones vitb,vits --crops 392,224 --batch 16 \
        --infer-batches 16,64 > "$OUT/dinomaly_held.md" 2>&1 ;;
    official)  # the released code, fp32 as released and under bf16 autocast, same sizes and timing
      if [ -d "$OFFICIAL" ]; then
        py 75 benchmarks/bench_official_dinomaly.py --official "$OFFICIAL" --device cuda --backbones vitb,vits \
          --crops 392,224 --batch 16 --infer-batches 16,64 --precision fp32 > "$OUT/official_fp32.md" 2>&1
        py 75 benchmarks/bench_official_dinomaly.py --official "$OFFICIAL" --device cuda --backbones vitb,vits \
          --crops 392,224 --batch 16 --infer-batches 16,64 --precision bf16 > "$OUT/official_bf16.md" 2>&1
      else
        echo "no released Dinomaly code at $OFFICIAL" > "$OUT/official_fp32.md"
      fi ;;
    inpformer)
      py 120 benchmarks/bench_inpformer.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 > "$OUT/inpformer_held.md" 2>&1 ;;
    compile)   # the same with torch.compile (compile time excluded by the warm-up iterations)
      py 120 benchmarks/bench_dinomaly.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 --compile true --warmup 8 > "$OUT/dinomaly_compiled.md" 2>&1
      py 120 benchmarks/bench_dinomaly.py --device cuda --backbones vitb --crops 392 --batch 16 \
        --infer-batches 16,64 --compile reduce-overhead --warmup 8 > "$OUT/dinomaly_cudagraphs.md" 2>&1 ;;
    data)      # decoding MVTec-size PNGs with the machine's cores (needs pandas)
      py 60 benchmarks/make_mvtec_tree.py --out /tmp/mvtec_sized --scale 0.15 > "$OUT/tree.txt" 2>&1 &&
      py 90 benchmarks/bench_data.py --root /tmp/mvtec_sized --workers 8,16 --limit 0 > "$OUT/data.md" 2>&1 ;;
  esac
  echo "== $step: exit $?" >> "$OUT/steps.txt"
done
cat "$OUT"/*.md 2>/dev/null | tail -n 80
