"""Evaluation on a whole held-out split: NMSE, PSNR, code usage (the PNGs that show them are
`train/pictures.py`)."""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import input_pipeline
from train.step import to_model_input
from vqvae_jax import VQVAE
from vqvae_jax.codebook import usage_metrics


def _pre_quantization_output(module: Any, method_name: str) -> bool:
  return module.name == 'pre_vq_conv' and method_name == '__call__'


def make_eval_step(model: VQVAE) -> Callable[..., Dict[str, jax.Array]]:
  """`eval_step(variables, images_uint8[B, ...], weights[B]) -> sums`, not yet jitted.

  `weights` is 1 for real images and 0 for the padding that fills the last batch, so the sums
  cover the split exactly. `code_counts` is `[S * K]`: `S = model.codes_per_position` stages
  of `K = model.codebook_size` codes, stage after stage.
  """
  stages, codebook_size = model.codes_per_position, model.codebook_size

  def eval_step(variables, images_uint8, weights):
    images = to_model_input(images_uint8)
    # The latents z come out of the same forward pass, for the quantization error.
    (recon, vq), captured = model.apply(variables, images, train=False,
                                        capture_intermediates=_pre_quantization_output)
    latents = captured['intermediates']['pre_vq_conv']['__call__'][0].astype(jnp.float32)
    per_image = lambda x: jnp.mean(jnp.square(x - images), axis=(1, 2, 3))
    per_latent_image = lambda x: jnp.sum(jnp.square(x), axis=(1, 2, 3))
    codes = vq.indices.reshape(len(images), -1, stages) + codebook_size * jnp.arange(stages)
    code_weights = jnp.broadcast_to(weights[:, None, None], codes.shape)
    return {
        'squared_error': jnp.sum(per_image(recon) * weights),
        # PSNR is for displayable images: reconstructions clipped to the pixel range.
        'clipped_squared_error': jnp.sum(per_image(jnp.clip(recon, -0.5, 0.5)) * weights),
        'quantization_error': jnp.sum(
            per_latent_image(vq.quantized.astype(jnp.float32) - latents) * weights),
        'latent_energy': jnp.sum(per_latent_image(latents) * weights),
        'code_counts': jax.ops.segment_sum(code_weights.reshape(-1), codes.reshape(-1),
                                           num_segments=stages * codebook_size),
    }

  return eval_step


class Evaluator:
  """Runs the jitted eval step over a split sharded on `mesh`."""

  def __init__(self, model: VQVAE, mesh: jax.sharding.Mesh, batch_size: int, workers: int = 0):
    num_devices = mesh.devices.size
    self.batch_size = -(-batch_size // num_devices) * num_devices  # a multiple of the devices
    self.model, self.workers = model, workers
    self.batch_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    self._eval_step = jax.jit(make_eval_step(model), out_shardings=replicated)
    self.replicated = replicated
    self._reconstruct = jax.jit(lambda v, x: model.apply(v, to_model_input(x))[0],
                                out_shardings=replicated)

  def __call__(self, variables: Any, images, variance: float) -> Dict[str, Any]:
    """Metrics over all of `images` (uint8 `[N, H, W, C]`, or a source streamed batch by batch
    through `input_pipeline.sharded_split`, each process decoding only its rows).

    Returns:
      `eval_nmse` (MSE / training variance, the seed's recon_error), `eval_psnr` (dB, pixel
      range 1), `eval_perplexity`, `eval_codes_used`, `eval_dead_codes` over the whole split,
      `eval_quantization_error` (`sum |z - q|^2 / sum |z|^2` over the split's latents z and
      their codes q), and `code_counts` (`[K]` numpy; `[S, K]` for `S` codes per position)
      for the usage histogram. With several codes per position (residual VQ),
      `eval_codes_used` and `eval_dead_codes` add up the stages, `eval_perplexity` is their
      mean, and `eval_codes_used_stage{i}` gives each stage's.
    """
    totals = None
    for batch, weights in input_pipeline.sharded_split(images, self.batch_size,
                                                        self.batch_sharding, self.workers):
      sums = self._eval_step(variables, batch, weights)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    mse = totals['squared_error'] / len(images)
    clipped_mse = totals['clipped_squared_error'] / len(images)
    counts = totals['code_counts'].reshape(self.model.codes_per_position, -1)
    usage = [usage_metrics(stage_counts) for stage_counts in counts]
    return {
        'eval_nmse': float(mse / variance),
        'eval_psnr': float(10 * np.log10(1.0 / max(clipped_mse, 1e-12))),
        'eval_perplexity': float(np.mean([stage['perplexity'] for stage in usage])),
        'eval_codes_used': int(sum(stage['codes_used'] for stage in usage)),
        'eval_dead_codes': int(sum(stage['dead_codes'] for stage in usage)),
        'eval_quantization_error': float(totals['quantization_error'] /
                                         max(totals['latent_energy'], 1e-30)),
        **({f'eval_codes_used_stage{i}': int(stage['codes_used'])
            for i, stage in enumerate(usage)} if len(usage) > 1 else {}),
        'code_counts': np.asarray(counts if len(counts) > 1 else counts[0]),
    }

  def reconstructions(self, variables: Any, images: np.ndarray) -> np.ndarray:
    """uint8 reconstructions of a few images (replicated: every process gets all of them)."""
    images = input_pipeline.sharded_batch(images, np.arange(len(images)), self.replicated)
    recon = jax.device_get(self._reconstruct(variables, images))
    return np.clip(np.round((recon + 0.5) * 255), 0, 255).astype(np.uint8)
