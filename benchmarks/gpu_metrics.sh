#!/usr/bin/env bash
# LPIPS and FID feature throughput on a GPU (one H200): images/s at 32, 64 and 256 px, float32
# and bfloat16, batch 256; the FID weights are fetched first (no torch). About 3 minutes.
#   bash benchmarks/gpu_metrics.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
python -m train.fid --fetch-weights
for dtype in float32 bfloat16; do
  python -m train.bench.perceptual --sizes 32,64,256 --batch_size 256 --rounds 5 --dtype "$dtype" \
      --out "benchmarks/perceptual_gpu_$dtype.json"
done
