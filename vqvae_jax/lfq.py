"""Lookup-free quantization (LFQ, Yu et al. 2023, "Language Model Beats Diffusion: Tokenizer is
Key to Visual Generation", MAGVIT-v2): each dimension is quantized to its sign.

The codebook is implied, `{-1, 1}^D`, `2^D` codes; the index of a code is its bits. An entropy
term keeps the codes in use: each vector's code distribution should be confident (low
per-sample entropy) while the batch as a whole spreads over the codebook (high entropy of the
batch-mean distribution).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqvae_jax.codebook import perplexity_from_counts
from vqvae_jax.quantizers import QuantizerOutput, check_codes

Array = jax.Array

# The exact batch entropy holds `[N, 2^D]` probabilities; above this many dimensions (per group)
# that matrix is too large, and the entropy must be taken over groups of dimensions.
MAX_EXACT_ENTROPY_DIM = 16
# Indices are int32.
MAX_DIM = 30


def binary_entropy_from_logits(logits: Array) -> Array:
  """Entropy in nats of a Bernoulli with `p = sigmoid(logits)`, float32, stable for any logit."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  return -(p * jax.nn.log_sigmoid(logits) + (1 - p) * jax.nn.log_sigmoid(-logits))


def _bits(num_dims: int) -> np.ndarray:
  """float32 `[2^num_dims, num_dims]`: row `c` holds the bits of `c`, least significant first."""
  codes = np.arange(2**num_dims)[:, None]
  return ((codes >> np.arange(num_dims)) & 1).astype(np.float32)


class LFQ(nn.Module):
  """Lookup-free quantization of `[..., D]` inputs to `{-1, 1}^D`.

  Forward: `q_d = +1` where `z_d > 0`, else `-1` (so `z_d == 0` gives -1); `quantized` is `q`
  with the straight-through gradient (`z + sg(q - z)`). `indices = sum_d [z_d > 0] 2^d`.

  Loss, float32 whatever the input dtype (peers saw negative or NaN entropy losses in half
  precision):

      commitment_cost * mean((z - sg(q))^2)
        + entropy_weight * (mean_n H(p(. | z_n)) - H(mean_n p(. | z_n)))

  where `p(c | z)` is a softmax over all `2^D` codes `c` of `-|z - c|^2 / entropy_temperature`.
  Because `|z - c|^2 = |z|^2 + D - 2 z.c`, that softmax factorises over dimensions:
  `p(c_d = +1 | z) = sigmoid(4 z_d / entropy_temperature)`. So the per-sample entropy is the sum
  of the dimensions' binary entropies, exactly, with no `[N, 2^D]` matrix. The batch-mean
  distribution does not factorise: it is computed over the whole implied codebook (`[N, 2^D]`,
  allowed up to `MAX_EXACT_ENTROPY_DIM` dimensions) or, with `entropy_groups=G`, over `G`
  groups of `D / G` dimensions, with the groups' entropies summed (an upper bound of the whole
  codebook's). It is never taken per bit: a per-bit batch entropy is maximised by codes whose
  bits are each balanced but correlated, which the MAGVIT-v2 author pointed out to peers
  (lucidrains/vector-quantize-pytorch #78). MAGVIT-v2's defaults: commitment 0.25, entropy
  weight 0.1, temperature 0.01. The formulas are derived here; the grouping is the remedy the
  issue asks for (as google/praxis' video quantizer factorises it), not a copy of its code.

  Inside `shard_map` with `axis_name`, the batch-mean distribution is averaged over the axis
  (the batch entropy is global); the commitment and per-sample terms are means over this
  device's vectors: `lax.pmean` the loss for the global one.

  Attributes:
    embedding_dim: D, the inputs' last dimension; `2^D` codes (`D <= 30`).
    commitment_cost: weight of the commitment term.
    entropy_weight: weight of the entropy term; 0 disables it.
    entropy_temperature: temperature of the code distribution, `> 0`.
    entropy_groups: None for the exact batch entropy over `2^D` codes (`D <=
      MAX_EXACT_ENTROPY_DIM`), or the number of groups of dimensions to take it over.
    axis_name: inside `shard_map`, the batch axis for counts and the batch entropy.
  """

  embedding_dim: int
  commitment_cost: float = 0.25
  entropy_weight: float = 0.1
  entropy_temperature: float = 0.01
  entropy_groups: Optional[int] = None
  axis_name: Optional[str] = None

  def __post_init__(self):
    d = self.embedding_dim
    if not isinstance(d, (int, np.integer)) or not 1 <= d <= MAX_DIM:
      raise ValueError(f'embedding_dim must be an integer in [1, {MAX_DIM}] (indices are int32),'
                       f' got {d!r}.')
    if self.commitment_cost < 0:
      raise ValueError(f'commitment_cost must be >= 0, got {self.commitment_cost!r}.')
    if self.entropy_weight < 0:
      raise ValueError(f'entropy_weight must be >= 0, got {self.entropy_weight!r}.')
    if not self.entropy_temperature > 0:
      raise ValueError(f'entropy_temperature must be > 0, got {self.entropy_temperature!r}.')
    groups = self.entropy_groups
    if groups is None:
      if self.entropy_weight > 0 and d > MAX_EXACT_ENTROPY_DIM:
        raise ValueError(
            f'LFQ with embedding_dim={d} > {MAX_EXACT_ENTROPY_DIM} would hold [N, 2^{d}] '
            f'probabilities for the exact batch entropy; set entropy_groups (a divisor of {d} '
            f'leaving at most {MAX_EXACT_ENTROPY_DIM} dimensions per group), or '
            f'entropy_weight=0.')
    elif (not isinstance(groups, (int, np.integer)) or groups < 1 or d % groups or
          d // groups > MAX_EXACT_ENTROPY_DIM):
      raise ValueError(f'entropy_groups must be None or a divisor of embedding_dim={d} leaving '
                       f'at most {MAX_EXACT_ENTROPY_DIM} dimensions per group, got {groups!r}.')
    super().__post_init__()

  @property
  def codebook_size(self) -> int:
    """`2^embedding_dim`: how many values an index takes."""
    return 2**self.embedding_dim

  def entropy_terms(self, latents: Array):
    """`(mean per-sample entropy, batch entropy)` in nats, float32 scalars, for `[N, D]`."""
    logits = 4.0 * latents.astype(jnp.float32) / self.entropy_temperature
    per_sample = jnp.mean(jnp.sum(binary_entropy_from_logits(logits), axis=-1))
    groups = self.entropy_groups or 1
    group_dim = self.embedding_dim // groups
    bits = _bits(group_dim)  # [2^g, g]
    log_plus, log_minus = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    batch = jnp.zeros((), jnp.float32)
    for g in range(groups):
      dims = slice(g * group_dim, (g + 1) * group_dim)
      # log p(c | z) for every code c of this group: [N, 2^g].
      log_probs = log_plus[:, dims] @ bits.T + log_minus[:, dims] @ (1 - bits).T
      mean_probs = jnp.mean(jnp.exp(log_probs), axis=0)
      if self.axis_name is not None:
        mean_probs = lax.pmean(mean_probs, self.axis_name)
      batch = batch - jnp.sum(jnp.where(mean_probs > 0,
                                        mean_probs * jnp.log(jnp.maximum(mean_probs, 1e-30)),
                                        0.0))
    return per_sample, batch

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs`.

    Args:
      inputs: `[..., D]`, any float dtype.
      train: unused (LFQ keeps no state); accepted so that every quantizer is called alike.

    Returns:
      A `QuantizerOutput`: `quantized` `[..., D]` in the inputs' dtype (values +-1); `loss`
      float32 (see the class docstring); `perplexity` float32; `indices` int32 `[...]`;
      `code_counts` float32 `[2^D]`.

    Raises:
      ValueError: the inputs do not end in D.
    """
    del train
    d = self.embedding_dim
    if inputs.ndim < 1 or inputs.shape[-1] != d:
      raise ValueError(f'LFQ expects inputs of shape [..., {d}] (embedding_dim), got shape '
                       f'{tuple(inputs.shape)}.')
    if not jnp.issubdtype(inputs.dtype, jnp.floating):
      raise TypeError(f'LFQ expects floating-point inputs, got {inputs.dtype}.')
    latents = inputs.reshape(-1, d).astype(jnp.float32)
    positive = latents > 0
    codes = jnp.where(positive, 1.0, -1.0)
    indices = jnp.sum(positive.astype(jnp.int32) << jnp.arange(d, dtype=jnp.int32), axis=-1)
    loss = self.commitment_cost * jnp.mean(jnp.square(latents - lax.stop_gradient(codes)))
    if self.entropy_weight > 0:
      per_sample, batch = self.entropy_terms(latents)
      loss = loss + self.entropy_weight * (per_sample - batch)
    code_counts = jnp.zeros((self.codebook_size,), jnp.float32).at[indices].add(1.0)
    if self.axis_name is not None:
      code_counts = lax.psum(code_counts, self.axis_name)
    quantized = latents + lax.stop_gradient(codes - latents)
    return QuantizerOutput(
        quantized=quantized.reshape(inputs.shape).astype(inputs.dtype), loss=loss,
        perplexity=perplexity_from_counts(code_counts),
        indices=indices.reshape(inputs.shape[:-1]), code_counts=code_counts)

  def embed(self, indices: Array) -> Array:
    """The codes at `indices`.

    Args:
      indices: integer `[...]`, each in `[0, 2^D)`.

    Returns:
      float32 `[..., D]`: `+1` where bit `d` of the index is set, else `-1`.

    Raises:
      TypeError, ValueError: as `VectorQuantizer.embed` (a concrete out-of-range code is named).
      Under `jit` an out-of-range code gives a row of NaN, never a valid code.
    """
    indices = check_codes(indices, self.codebook_size, 'LFQ.embed')
    bits = (indices[..., None] >> jnp.arange(self.embedding_dim, dtype=jnp.int32)) & 1
    codes = 2.0 * bits.astype(jnp.float32) - 1.0
    valid = (indices >= 0) & (indices < self.codebook_size)
    return jnp.where(valid[..., None], codes, jnp.nan)
