#!/usr/bin/env bash
# The checks one lent GPU session runs, in one go (device time is scarce: ~15 minutes a session).
#
#   bash benchmarks/run_gpu.sh OUT_DIR
#
# 1. The library's numerical tests on the GPU, with float32 matmuls and convolutions at full
#    precision (JAX_DEFAULT_MATMUL_PRECISION=highest): the golden values are float32 exact, and
#    GPUs otherwise run float32 convolutions as TF32.
# 2. `python -m train.bench`: the seed config against the seed's PyTorch eager on the same GPU,
#    in float32 and under bfloat16 autocast, one step per jit call and 20 (the trainer's
#    steps_per_dispatch), then the large-codebook search. torch.compile is left out to fit the
#    session: it compiles once per configuration and dtype, 15-60 s each, and did not beat eager
#    on the H200 (benchmarks/h200_ema_compile.md). The report is rewritten after each
#    configuration, so a timeout keeps what was measured.
# It uses the machine's own python3 with jax, flax, optax, chex and torch already installed.
set -uo pipefail
out=${1:?usage: bash benchmarks/run_gpu.sh OUT_DIR}
mkdir -p "$out"
# conftest.py's XLA:CPU flags are not for this machine; leave half the GPU to PyTorch.
export XLA_FLAGS= PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
nvidia-smi -L
python3 -c 'import jax, flax, optax, chex, torch; print("jax", jax.__version__, "flax",
flax.__version__, "optax", optax.__version__, "chex", chex.__version__, "torch",
torch.__version__, jax.devices())'
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 -m pytest -q \
  -o addopts= -p no:cacheprovider tests/test_seed_parity.py tests/test_quantizers.py \
  tests/test_model.py 2>&1 | tee "$out/tests.log" | tail -25
timeout "${BENCH_TIMEOUT_S:-400}" python3 -m train.bench --steps=40 --rounds=5 \
  --steps_per_dispatch=1,20 --no-torch_compile --out "$out/gpu.json" \
  --markdown "$out/gpu.md" 2>&1 \
  | tee "$out/bench.log" | grep -v '^Measurement' | tail -60
