"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"): each of `d` dimensions is bounded with tanh and rounded to one of `levels[i]` values.

The codebook is implied, the grid of `prod(levels)` points, so there is nothing to learn, no
auxiliary loss and nothing that can collapse. The arithmetic is that of the paper's official
JAX code (google-research `fsq/fsq.ipynb`); `tests/test_fsq.py` checks values and indices
against golden values it produced.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqvae_jax.codebook import perplexity_from_counts
from vqvae_jax.quantizers import QuantizerOutput, check_codes

Array = jax.Array

# The paper's recommended levels for a codebook of about 2^bits codes (its Table 1; [7, 5, 5, 5, 5]
# has 4,375).
RECOMMENDED_LEVELS = {
    8: (8, 6, 5),
    10: (8, 5, 5, 5),
    12: (7, 5, 5, 5, 5),
    14: (8, 8, 8, 6, 5),
    16: (8, 8, 8, 5, 5, 5),
}


class FSQ(nn.Module):
  """Finite scalar quantization of `[..., d]` inputs, `d = len(levels)`.

  Per dimension `i` with `L = levels[i]`, `half_l = (L - 1) (1 - eps) / 2` and an offset of 0.5
  for even `L` (0 for odd):

      bounded   = tanh(z + shift) * half_l - offset,  shift = tan(offset / half_l)
      code      = round(bounded) / (L // 2)                      # in [-1, 1]
      quantized = code, with the gradient of bounded / (L // 2)  # straight-through round

  Odd `L` gives the values `{-1, ..., 1}` in steps of `1 / (L // 2)`; even `L` gives
  `{-1, ..., 1 - 2/L}`. The paper's recommended level sets (`RECOMMENDED_LEVELS`): 2^8
  `[8, 6, 5]`, 2^10 `[8, 5, 5, 5]`, 2^12 `[7, 5, 5, 5, 5]`, 2^14 `[8, 8, 8, 6, 5]`, 2^16
  `[8, 8, 8, 5, 5, 5]`.

  Attributes:
    levels: the number of values of each dimension, each `>= 2`; the codebook has
      `prod(levels)` codes.
    eps: keeps the bounded values just inside the outer levels (the paper's 1e-3).
    axis_name: inside `shard_map`, the batch axis to sum `code_counts` over.
  """

  levels: Tuple[int, ...]
  eps: float = 1e-3
  axis_name: Optional[str] = None

  def __post_init__(self):
    levels = tuple(self.levels) if isinstance(self.levels, (tuple, list)) else None
    if not levels or not all(isinstance(l, (int, np.integer)) for l in levels):
      raise ValueError(f'levels must be a non-empty sequence of integers, got {self.levels!r}.')
    if min(levels) < 2:
      raise ValueError(f'every level must be >= 2 (a dimension needs two values), got levels='
                       f'{levels} with {min(levels)}.')
    if math.prod(levels) >= 2**31:
      raise ValueError(f'prod(levels) must be < 2^31 (indices are int32), got {levels}.')
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f'eps must be in [0, 1), got {self.eps!r}.')
    super().__post_init__()

  @property
  def codebook_size(self) -> int:
    """`prod(levels)`: how many values an index takes."""
    return math.prod(self.levels)

  def _levels(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    levels = np.asarray(self.levels, np.int64)
    basis = np.concatenate(([1], np.cumprod(levels[:-1]))).astype(np.int32)
    return levels, levels // 2, basis

  def bound(self, z: Array) -> Array:
    """float32 `[..., d]`: `z` squashed into `(-L/2, L/2)` per dimension, before rounding."""
    levels = np.asarray(self.levels, np.float32)
    half_l = (levels - 1) * (1 - self.eps) / 2
    offset = np.where(np.asarray(self.levels) % 2 == 1, 0.0, 0.5).astype(np.float32)
    shift = np.tan(offset / half_l)
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs`.

    Args:
      inputs: `[..., d]`, any float dtype.
      train: unused (FSQ keeps no state); accepted so that every quantizer is called alike.

    Returns:
      A `QuantizerOutput`: `quantized` `[..., d]` in the inputs' dtype, its forward value the
      code exactly (`embed(indices)`), its gradient that of `bound(z) / (L // 2)`; `loss` float32
      0 (FSQ has no auxiliary loss); `perplexity` float32; `indices` int32 `[...]`, the mixed-radix
      index `sum_i digit_i * prod(levels[:i])` with `digit_i = round(bounded_i) + L_i // 2` in
      `[0, L_i)`; `code_counts` float32 `[prod(levels)]`.

    Raises:
      ValueError: the inputs do not end in `len(levels)`.
    """
    del train
    d = len(self.levels)
    if inputs.ndim < 1 or inputs.shape[-1] != d:
      raise ValueError(f'FSQ expects inputs of shape [..., {d}] (len(levels) for levels='
                       f'{tuple(self.levels)}), got shape {tuple(inputs.shape)}.')
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise TypeError(f'FSQ expects floating-point inputs, got {inputs.dtype}.')
    _, half_width, basis = self._levels()
    half_width = half_width.astype(np.float32)
    bounded = self.bound(inputs)
    rounded = jnp.round(bounded)
    # The code itself in the forward pass (so that it equals `embed` bit for bit), the
    # gradient of bounded / half_width: the notebook's round_ste(bound(z)) / half_width.
    scaled = bounded / half_width
    quantized = rounded / half_width + (scaled - lax.stop_gradient(scaled))
    digits = (lax.stop_gradient(rounded) + half_width).astype(jnp.int32)
    indices = jnp.sum(digits * basis, axis=-1)
    code_counts = jnp.zeros((self.codebook_size,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    if self.axis_name is not None:
      code_counts = lax.psum(code_counts, self.axis_name)
    return QuantizerOutput(
        quantized=quantized.astype(inputs.dtype), loss=jnp.zeros((), jnp.float32),
        perplexity=perplexity_from_counts(code_counts), indices=indices,
        code_counts=code_counts)

  def embed(self, indices: Array) -> Array:
    """The codes at `indices`.

    Args:
      indices: integer `[...]`, each in `[0, prod(levels))`.

    Returns:
      float32 `[..., d]`, the implied codebook's points, exactly the `quantized` values that
      gave these indices.

    Raises:
      TypeError, ValueError: as `VectorQuantizer.embed` (a concrete out-of-range code is named).
      Under `jit` an out-of-range code gives a row of NaN, never a valid code.
    """
    indices = check_codes(indices, self.codebook_size, 'FSQ.embed')
    levels, half_width, basis = self._levels()
    digits = (indices[..., None] // basis) % levels.astype(np.int32)
    codes = (digits.astype(jnp.float32) - half_width) / half_width.astype(np.float32)
    valid = (indices >= 0) & (indices < self.codebook_size)
    return jnp.where(valid[..., None], codes, jnp.nan)
