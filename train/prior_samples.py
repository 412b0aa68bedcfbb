"""Samples of a trained prior decoded by its VQ-VAE, in labelled rows for a PNG; the sampling
options a config or a command line sets."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np

from vqvae_jax import VQVAE
from vqvae_jax.autoregressive_prior import CodePrior, sample


SAMPLES_PER_ROW = 8


def row_labels(num_samples: int, num_classes: Optional[int]) -> Optional[np.ndarray]:
  """Labels for rows of `SAMPLES_PER_ROW` samples: row `r` gets `r mod num_classes`."""
  if not num_classes:
    return None
  return (np.arange(num_samples) // SAMPLES_PER_ROW % num_classes).astype(np.int32)


def sample_image_rows(prior: CodePrior, params: Any, decode, vqvae_variables: Any,
                      key: jax.Array, num_samples: int, labels: Optional[np.ndarray],
                      class_names: Tuple[str, ...], **options):
  """Samples code grids and decodes them: `(codes [B, h, w], image rows, row names)`.

  `decode` is `(vqvae_variables, codes) -> images`, jitted; the rows hold `SAMPLES_PER_ROW`
  uint8 images each, named by their label ('' without one).
  """
  codes = sample(prior, params, key, num_samples=num_samples, labels=labels, **options)
  images = to_uint8(decode(vqvae_variables, codes))
  starts = range(0, len(images), SAMPLES_PER_ROW)
  rows = [images[i:i + SAMPLES_PER_ROW] for i in starts]
  names = ['' if labels is None else class_names[labels[i]] for i in starts]
  return np.asarray(codes), rows, names


def describe_options(temperature: float, top_k: Optional[int], top_p: Optional[float],
                     guidance_scale: Optional[float] = None) -> str:
  nucleus = top_p if top_p and top_p < 1 else 'off'
  text = f'temperature {temperature:g}, top-k {top_k or "off"}, top-p {nucleus}'
  return text + (f', guidance {guidance_scale:g}' if guidance_scale is not None else '')


def sampling_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return dict(temperature=float(config.sample_temperature),
              top_k=int(config.sample_top_k) or None,
              top_p=float(config.sample_top_p) if config.sample_top_p < 1 else None)


def make_decode(vqvae: VQVAE):
  """`decode(variables, codes [B, h, w]) -> images [B, H, W, C]` in model space, jitted."""
  return jax.jit(lambda variables, codes: vqvae.apply(variables, codes, method=VQVAE.decode))


def to_uint8(images: jax.Array) -> np.ndarray:
  """Model-space images (`x / 255 - 0.5`) back to uint8 pixels."""
  return np.clip(np.round((np.asarray(images) + 0.5) * 255), 0, 255).astype(np.uint8)
