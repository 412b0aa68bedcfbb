"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"): each of `d` dimensions is bounded with tanh and rounded to one of `levels[i]` values.

The codebook is implied, the grid of `prod(levels)` points, so there is nothing to learn, no
auxiliary loss and nothing that can collapse. The arithmetic is that of the paper's official
JAX code, the `FSQ` class of google-research `fsq/fsq.ipynb` (`bound`, `round_ste`, `quantize`,
`codes_to_indexes`, `indexes_to_codes`), float32 for float32 inputs as there; `tests/test_fsq.py`
checks values and indices against golden values that notebook's own code produced
(`tests/golden/make_fsq_golden.py`).
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
from vqvae_jax.quantizer_api import (QuantizerOutput, check_codes, check_inputs, check_number,
                                     count_codes, nan_outside_range)

Array = jax.Array

__all__ = ['FSQ', 'NO_CODE', 'RECOMMENDED_LEVELS']

# The index of a vector with a NaN: no code has it, and `embed` gives NaN for it under `jit`.
NO_CODE = -1

# The paper's recommended levels for a codebook of about 2^bits codes (its Table 1), keyed by
# bits. `[7, 5, 5, 5, 5]` has 4,375 codes, the others 2^bits or a little less.
RECOMMENDED_LEVELS = {
    8: (8, 6, 5),
    10: (8, 5, 5, 5),
    12: (7, 5, 5, 5, 5),
    14: (8, 8, 8, 6, 5),
    16: (8, 8, 8, 5, 5, 5),
}


def _round_ste(z: Array) -> Array:
  """`round(z)` in the forward pass, the identity's gradient (the notebook's `round_ste`).

  The forward value is `round(z)` exactly: `round(z) - z` is exact in floating point (the two are
  within a factor 2 of each other, or the rounding is 0), so `z + (round(z) - z)` is too.
  """
  return z + lax.stop_gradient(jnp.round(z) - z)


class FSQ(nn.Module):
  """Finite scalar quantization of `[..., d]` inputs, `d = len(levels)`.

  Per dimension `i`, with `L = levels[i]`, `half_width = L // 2`, `half_l = (L - 1) (1 - eps) / 2`
  and `offset` 0 for odd `L`, 0.5 for even `L` (all as in the notebook):

      bounded   = tanh(z + shift) * half_l - offset,  shift = tan(offset / half_l)
      quantized = round_ste(bounded) / half_width        # in [-1, 1]
      digit     = round(bounded) + half_width            # in [0, L)
      index     = sum_i digit_i * prod(levels[:i])       # mixed radix, first dimension fastest

  `round_ste` is rounding with the straight-through gradient, so the forward value of
  `quantized` is the code, `round(bounded) / half_width`, and its gradient that of
  `bounded / half_width`: `(1 - tanh(z + shift)^2) * half_l / half_width`. Odd `L` gives the
  values `{-1, ..., 1}` in steps of `1 / half_width`; even `L` gives `{-1, ..., 1 - 2/L}`.

  The paper's recommended level sets, `RECOMMENDED_LEVELS[bits]`, for a codebook of about
  2^bits codes:

      2^8  [8, 6, 5]         2^10 [8, 5, 5, 5]       2^12 [7, 5, 5, 5, 5]
      2^14 [8, 8, 8, 6, 5]   2^16 [8, 8, 8, 5, 5, 5]

  Everything is computed in float32 whatever the input dtype; `quantized` is cast back to it.
  No parameters and no state: `init` returns `{}`, and `apply({}, x)` needs no rng.

  Where this departs from the notebook: the notebook's `codes_to_indexes` rescales the float
  codes and truncates a float sum (`.astype(uint32)`). Here the digits are the rounded integers
  themselves, so the index is exact whatever the float arithmetic: float64 (numpy's, when the
  codes come as a numpy array) puts `-1/3 * 3 + 3` at 1.99999997 and a fused multiply-add puts
  `-2/3 * 3 + 3` at 0.99999994, one index too low once truncated; and float32 sums are no
  longer exact beyond 2^24 codes. Where the notebook's index is right the two are equal (the
  golden test).

  Attributes:
    levels: the number of values of each dimension, each an integer `>= 2`; the codebook has
      `prod(levels)` codes (below 2^31: indices are int32). A list is stored as a tuple.
    eps: keeps the bounded values just inside the outer levels (the paper's 1e-3), in [0, 1).
    axis_name: inside `shard_map`/`pmap`, the batch axis to sum `code_counts` over (under a
      plain `jit` over a sharded batch the counts are global already).
  """

  levels: Tuple[int, ...]
  eps: float = 1e-3
  axis_name: Optional[str] = None

  def __post_init__(self):
    levels = self.levels
    if not isinstance(levels, (tuple, list)) or not levels:
      raise ValueError(f'levels must be a non-empty sequence of integers >= 2, got {levels!r}.')
    for level in levels:
      check_number('every level', level, 2, integer=True)
    levels = tuple(int(l) for l in levels)
    if math.prod(levels) >= 2**31:
      raise ValueError(f'prod(levels) must be < 2^31 (indices are int32), got levels={levels} '
                       f'with {math.prod(levels)} codes.')
    check_number('eps', self.eps, 0, 1, high_open=True)
    object.__setattr__(self, 'levels', levels)  # hashable, whatever sequence was given
    super().__post_init__()

  @property
  def embedding_dim(self) -> int:
    """`len(levels)`: the inputs' last dimension."""
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    """`prod(levels)`: how many values an index takes."""
    return math.prod(self.levels)

  @property
  def codes_per_position(self) -> int:
    """1: one code per input vector."""
    return 1

  def _constants(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 `levels`, `half_width = levels // 2` and the mixed-radix `basis`, each `[d]`."""
    levels = np.asarray(self.levels, np.int64)
    basis = np.concatenate(([1], np.cumprod(levels[:-1])))
    return levels.astype(np.int32), (levels // 2).astype(np.int32), basis.astype(np.int32)

  def bound(self, z: Array) -> Array:
    """float32 `[..., d]`: `z` squashed into `(-half_l - offset, half_l - offset)` per dimension.

    The notebook's `bound`, operation for operation: `half_l` is computed in float64 and used
    in float32, `shift` is float32 `tan` of a float32 quotient.
    """
    levels = np.asarray(self.levels, np.int64)
    half_l = np.float32((levels - 1) * (1 - self.eps) / 2)
    offset = np.where(levels % 2 == 1, 0.0, 0.5).astype(np.float32)
    shift = jnp.tan(jnp.asarray(offset) / jnp.asarray(half_l))
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs`.

    Args:
      inputs: `[..., d]` with `d = len(levels)`, any float dtype.
      train: unused (FSQ keeps no state); accepted so that every quantizer is called alike.

    Returns:
      A `QuantizerOutput` with
        quantized: `[..., d]`, the inputs' dtype: `round_ste(bounded) / half_width`, in
          [-1, 1]; for float32 inputs its forward value equals `embed(indices)` bit for bit.
        loss: float32 scalar 0 (FSQ has no auxiliary loss).
        perplexity: float32 scalar, `perplexity_from_counts(code_counts)`.
        indices: int32 `[...]`, the mixed-radix index of each vector's code, in
          `[0, prod(levels))` (the notebook's `codes_to_indexes`); -1 (`NO_CODE`) for a
          vector with a NaN, whose `quantized` is NaN where the input is and which
          `embed` gives as NaN under `jit` (a ValueError when concrete): NaN in, NaN out.
        code_counts: float32 `[prod(levels)]`, how many vectors of this batch got each index
          (summed over `axis_name` when it is set); NaN vectors count nowhere.
        encodings, distances: None.

    Raises:
      ValueError: `inputs` do not have the shape `[..., len(levels)]`.
      TypeError: `inputs` are not floating point.
    """
    del train
    check_inputs(inputs, self.embedding_dim, f'FSQ(levels={self.levels})')
    _, half_width, basis = self._constants()
    bounded = self.bound(inputs)
    quantized = _round_ste(bounded) / half_width.astype(np.float32)
    digits = (jnp.round(lax.stop_gradient(bounded)) + half_width).astype(jnp.int32)
    indices = jnp.sum(digits * basis, axis=-1, dtype=jnp.int32)
    # NaN in, NaN out: a vector with a NaN has no code (casting NaN to an integer would give
    # one silently).
    indices = jnp.where(jnp.any(jnp.isnan(bounded), axis=-1), NO_CODE, indices)
    code_counts = count_codes(indices.reshape(-1), self.codebook_size, self.axis_name)
    return QuantizerOutput(
        quantized=quantized.astype(inputs.dtype), loss=jnp.zeros((), jnp.float32),
        perplexity=perplexity_from_counts(code_counts), indices=indices,
        code_counts=code_counts)

  def embed(self, indices: Array) -> Array:
    """The codes at `indices`: the notebook's `indexes_to_codes`.

    `digit_i = (index // prod(levels[:i])) % levels[i]`, `code_i = (digit_i - half_width_i) /
    half_width_i`.

    Args:
      indices: integer `[...]`, each in `[0, prod(levels))`.

    Returns:
      float32 `[..., d]`, the implied codebook's points: exactly the `quantized` values (of
      float32 inputs) that gave these indices. Under `jit`, where the indices cannot be
      checked here, an out-of-range index gives a row of NaN, never a valid code.

    Raises:
      TypeError: `indices` are not integers.
      ValueError: concrete `indices` hold a value outside `[0, prod(levels))`; the message
        names it.
    """
    indices = jnp.asarray(check_codes(indices, self.codebook_size, 'FSQ.embed'))
    levels, half_width, basis = self._constants()
    # int32: the radix arithmetic overflows int8/int16.
    digits = (indices.astype(jnp.int32)[..., None] // basis) % levels
    half_width = half_width.astype(np.float32)
    codes = (digits.astype(jnp.float32) - half_width) / half_width
    return nan_outside_range(codes, indices, self.codebook_size)
