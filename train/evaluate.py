"""Evaluation on a whole held-out split: NMSE, PSNR, code usage, and the PNGs that show them."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

from train import data as data_lib
from train.step import to_model_input
from vqvae_jax import VQVAE
from vqvae_jax.codebook import usage_metrics


def make_eval_step(model: VQVAE) -> Callable[..., Dict[str, jax.Array]]:
  """`eval_step(variables, images_uint8[B, ...], weights[B]) -> sums`, not yet jitted.

  `weights` is 1 for real images and 0 for the padding that fills the last batch, so the sums
  cover the split exactly.
  """

  def eval_step(variables, images_uint8, weights):
    images = to_model_input(images_uint8)
    recon, vq = model.apply(variables, images, train=False)
    per_image = lambda x: jnp.mean(jnp.square(x - images), axis=(1, 2, 3))
    codes = vq.indices.reshape(len(images), -1)
    code_weights = jnp.broadcast_to(weights[:, None], codes.shape)
    return {
        'squared_error': jnp.sum(per_image(recon) * weights),
        # PSNR is for displayable images: reconstructions clipped to the pixel range.
        'clipped_squared_error': jnp.sum(per_image(jnp.clip(recon, -0.5, 0.5)) * weights),
        'code_counts': jax.ops.segment_sum(code_weights.reshape(-1), codes.reshape(-1),
                                           num_segments=model.num_embeddings),
    }

  return eval_step


class Evaluator:
  """Runs the jitted eval step over a split sharded on `mesh`, and writes its images."""

  def __init__(self, model: VQVAE, mesh: jax.sharding.Mesh, batch_size: int):
    num_devices = mesh.devices.size
    self.batch_size = -(-batch_size // num_devices) * num_devices  # a multiple of the devices
    self.model = model
    self.batch_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    self._eval_step = jax.jit(make_eval_step(model), out_shardings=replicated)
    self.replicated = replicated
    self._reconstruct = jax.jit(lambda v, x: model.apply(v, to_model_input(x))[0],
                                out_shardings=replicated)

  def __call__(self, variables: Any, images: np.ndarray, variance: float) -> Dict[str, Any]:
    """Metrics over all of `images` (uint8 `[N, H, W, C]`).

    Returns:
      `eval_nmse` (MSE / training variance, the seed's recon_error), `eval_psnr` (dB, pixel
      range 1), `eval_perplexity`, `eval_codes_used`, `eval_dead_codes` over the whole split,
      and `code_counts` (`[K]` numpy) for the usage histogram.
    """
    totals = None
    for start in range(0, len(images), self.batch_size):
      indices = np.arange(start, start + self.batch_size)
      weights = (indices < len(images)).astype(np.float32)
      indices = np.minimum(indices, len(images) - 1)
      batch = data_lib.sharded_batch(images, indices, self.batch_sharding)
      weights = jax.make_array_from_callback(weights.shape, self.batch_sharding,
                                             lambda index: weights[index])
      sums = self._eval_step(variables, batch, weights)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    mse = totals['squared_error'] / len(images)
    clipped_mse = totals['clipped_squared_error'] / len(images)
    counts = totals['code_counts']
    usage = usage_metrics(counts)
    return {
        'eval_nmse': float(mse / variance),
        'eval_psnr': float(10 * np.log10(1.0 / max(clipped_mse, 1e-12))),
        'eval_perplexity': float(usage['perplexity']),
        'eval_codes_used': int(usage['codes_used']),
        'eval_dead_codes': int(usage['dead_codes']),
        'code_counts': np.asarray(counts),
    }

  def reconstructions(self, variables: Any, images: np.ndarray) -> np.ndarray:
    """uint8 reconstructions of a few images (replicated: every process gets all of them)."""
    images = data_lib.sharded_batch(images, np.arange(len(images)), self.replicated)
    recon = jax.device_get(self._reconstruct(variables, images))
    return np.clip(np.round((recon + 0.5) * 255), 0, 255).astype(np.uint8)


def write_reconstruction_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray,
                              scale: int = 4) -> None:
  """A PNG with the originals in the top row and their reconstructions below, upscaled."""
  rows = [np.concatenate(list(images), axis=1) for images in (originals, reconstructions)]
  grid = np.concatenate(rows, axis=0)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.NEAREST)
  _save_atomically(image, path)


def write_usage_histogram(path: str, code_counts: np.ndarray, height: int = 160) -> None:
  """A PNG bar chart of per-code usage, codes sorted by count (dead codes at the right, red)."""
  counts = np.sort(np.asarray(code_counts))[::-1]
  bar = max(1, 1024 // len(counts))
  image = Image.new('RGB', (bar * len(counts), height), 'white')
  draw = ImageDraw.Draw(image)
  peak = max(float(counts.max()), 1.0)
  for i, count in enumerate(counts):
    if count > 0:
      top = height - max(1, int((height - 1) * count / peak))
      draw.rectangle([i * bar, top, (i + 1) * bar - 1, height - 1], fill=(40, 90, 200))
    else:
      draw.rectangle([i * bar, height - 4, (i + 1) * bar - 1, height - 1], fill=(220, 40, 40))
  _save_atomically(image, path)


def _save_atomically(image: Image.Image, path: str) -> None:
  tmp = path + '.tmp'
  image.save(tmp, format='PNG')
  os.replace(tmp, path)
