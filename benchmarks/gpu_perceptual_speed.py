"""LPIPS and InceptionV3 images/s on a lent accelerator, with initialised weights and no train/
imports (such a machine has neither grain nor the weight files). Same timing as
train.bench.perceptual: jitted, after compilation, best of 5 rounds, batch 256.

    python3 benchmarks/gpu_perceptual_speed.py OUT.json
"""
import json
import sys

import jax
import jax.numpy as jnp

from train.bench.measure import best_seconds  # jax only: no grain on a lent machine
from vqvae_jax import perceptual


rows, key, batch = [], jax.random.key(0), 256
for dtype in (jnp.float32, jnp.bfloat16):
  small = jnp.zeros((1, 32, 32, 3))
  lpips = {net: (jax.jit(perceptual.LPIPS(net, dtype=dtype).apply),
                 perceptual.LPIPS(net).init(key, small, small)) for net in perceptual.lpips.NETWORKS}
  inception = perceptual.InceptionV3(dtype=dtype)
  inception_variables = inception.init(key, jnp.zeros((1, 299, 299, 3)))
  features = jax.jit(lambda v, x: inception.apply(v, perceptual.preprocess(x)))
  for size in (32, 64, 256):
    a = jax.random.uniform(jax.random.key(size), (batch, size, size, 3)) - 0.5
    b = jax.random.uniform(jax.random.key(size + 1), (batch, size, size, 3)) - 0.5
    row = {'dtype': jnp.dtype(dtype).name, 'size': size, 'batch_size': batch}
    for net, (apply, params) in lpips.items():
      row[f'lpips_{net}_images_per_s'] = batch / best_seconds(lambda: apply(params, a, b), 5)
    row['inception_images_per_s'] = batch / best_seconds(
        lambda: features(inception_variables, a), 5)
    rows.append(row)
    print(json.dumps(row), flush=True)
with open(sys.argv[1], 'w') as f:
  json.dump({'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__, 'rows': rows},
            f, indent=1)
