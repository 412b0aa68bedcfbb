"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec, Défossez et al.
2022): a chain of quantizers, each quantizing what the previous ones left."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from vqvae_jax.quantizers import (CODEBOOK_OPTIONS, CodebookOptions, QuantizerOutput,
                                  VectorQuantizer, VectorQuantizerEMA, check_codes)

Array = jax.Array


class ResidualVQ(CodebookOptions):
  """`num_quantizers` stages of `K` codes; stage `i` quantizes the residual `r_i`:

      r_0 = z,   q_i = stage_i(r_i),   r_{i+1} = r_i - q_i,   quantized = sum_i q_i

  Each stage is a `VectorQuantizerEMA` (`decay > 0`) or a `VectorQuantizer` (`decay == 0`)
  with its own codebook and state, so the keyword-only codebook options (k-means init,
  dead-code restart, `rotation_trick`, ...) act per stage. A stage's output carries its own
  gradient estimator, and the residual chain passes gradients through it: with the
  straight-through estimator the gradient of `quantized` with respect to `z` is the identity.

  State: `batch_stats['stage_{i}']` as each stage keeps it; params `params['stage_{i}']` for
  plain stages.

  Attributes:
    num_quantizers: Q, the number of stages, `>= 1`.
    num_embeddings: K, codes per stage.
    embedding_dim: D, the inputs' last dimension.
    commitment_cost: each stage's beta.
    decay: each stage's EMA decay; 0 selects plain stages whose codebooks the optimizer trains.
    epsilon, zero_debias: the EMA stages' (see `VectorQuantizerEMA`); zero-debiased by default.
    quantizer_dropout: in training calls, the probability that an example (a row along the
      inputs' leading axis) uses only its first `n` stages, `n` uniform in `[1, Q]`
      (SoundStream's quantizer dropout, so that fewer stages still decode). Needs
      `rngs={'codebook': key}`. Every stage still quantizes, learns from and counts every
      residual; only `quantized` leaves the dropped stages out.
    axis_name, distance_chunk_size: passed to every stage.
  """

  num_quantizers: int
  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  zero_debias: bool = True
  quantizer_dropout: float = 0.0
  axis_name: Optional[str] = None
  distance_chunk_size: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.num_quantizers, int) or self.num_quantizers < 1:
      raise ValueError(f'num_quantizers must be an integer >= 1, got {self.num_quantizers!r}.')
    if not 0.0 <= self.quantizer_dropout <= 1.0:
      raise ValueError(f'quantizer_dropout must be in [0, 1], got {self.quantizer_dropout!r}.')
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f'decay must be in [0, 1) (0 selects plain stages), got {self.decay!r}.')
    self._stage(parent=None)  # a bad stage field fails here, at construction
    super().__post_init__()

  def _stage(self, **module_kwargs):
    fields = dict(num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim,
                  commitment_cost=self.commitment_cost, axis_name=self.axis_name,
                  distance_chunk_size=self.distance_chunk_size,
                  **{name: getattr(self, name) for name in CODEBOOK_OPTIONS}, **module_kwargs)
    if self.decay > 0:
      return VectorQuantizerEMA(decay=self.decay, epsilon=self.epsilon,
                                zero_debias=self.zero_debias, **fields)
    return VectorQuantizer(**fields)

  def setup(self):
    self.stages = [self._stage(name=f'stage_{i}') for i in range(self.num_quantizers)]

  @property
  def codebook_size(self) -> int:
    """K, the codes of each stage."""
    return self.num_embeddings

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs` through every stage.

    Args:
      inputs: `[..., D]`, any float dtype.
      train: update each stage's state (`mutable=['batch_stats']`; a `'codebook'` rng for
        k-means init, restarts or quantizer dropout).

    Returns:
      A `QuantizerOutput`: `quantized` `[..., D]` in the inputs' dtype, the sum of the stages'
      codes; `loss` float32, the sum of the stages' losses; `perplexity` float32, the mean of
      the stages' batch perplexities; `indices` int32 `[..., Q]`, stage `i`'s code in
      `[..., i]`; `code_counts` float32 `[Q, K]`, each stage's counts.
    """
    residual = inputs.astype(jnp.float32)
    outputs = []
    for stage in self.stages:
      out = stage(residual, train=train)
      outputs.append(out)
      residual = residual - out.quantized
    stage_codes = jnp.stack([out.quantized for out in outputs])  # [Q, ..., D]
    if train and self.quantizer_dropout > 0 and not self.is_initializing():
      stage_codes = stage_codes * self._kept_stages(inputs.shape)[..., None]
    return QuantizerOutput(
        quantized=jnp.sum(stage_codes, axis=0).astype(inputs.dtype),
        loss=sum(out.loss for out in outputs),
        perplexity=jnp.mean(jnp.stack([out.perplexity for out in outputs])),
        indices=jnp.stack([out.indices for out in outputs], axis=-1),
        code_counts=jnp.stack([out.code_counts for out in outputs]))

  def _kept_stages(self, shape) -> Array:
    """float32 `[Q, *shape[:-1]]`: 1 where an example keeps a stage, per leading-axis row."""
    if not self.has_rng('codebook'):
      raise ValueError("ResidualVQ with quantizer_dropout > 0 draws the stages each example "
                       "keeps when training: pass rngs={'codebook': key} to apply (a new key "
                       "each step).")
    drop_key, count_key = jax.random.split(self.make_rng('codebook'))
    num_examples = shape[0] if len(shape) > 1 else 1
    dropped = jax.random.bernoulli(drop_key, self.quantizer_dropout, (num_examples,))
    kept = jax.random.randint(count_key, (num_examples,), 1, self.num_quantizers + 1)
    kept = jnp.where(dropped, kept, self.num_quantizers)
    mask = (jnp.arange(self.num_quantizers)[:, None] < kept[None, :]).astype(jnp.float32)
    return mask.reshape((self.num_quantizers, num_examples) +
                        (1,) * (len(shape) - 2)) * jnp.ones((1,) + tuple(shape[:-1]))

  def embed(self, indices: Array) -> Array:
    """The sum of the stages' codes.

    Args:
      indices: integer `[..., Q]`, each in `[0, K)`.

    Returns:
      float32 `[..., D]`, equal to `quantized` of the call that gave `indices` (outside
      training calls with quantizer dropout).

    Raises:
      TypeError, ValueError: as `VectorQuantizer.embed`; also a last axis other than Q.
      Under `jit` an out-of-range code gives NaN, never a valid code.
    """
    indices = check_codes(indices, self.num_embeddings, 'ResidualVQ.embed')
    if indices.ndim < 1 or indices.shape[-1] != self.num_quantizers:
      raise ValueError(f'ResidualVQ.embed expects codes of shape [..., {self.num_quantizers}] '
                       f'(num_quantizers), got shape {tuple(indices.shape)}.')
    return sum(stage.embed(indices[..., i]) for i, stage in enumerate(self.stages))
