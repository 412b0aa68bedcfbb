"""Residual vector quantization (SoundStream, Zeghidour et al. 2021; EnCodec, Défossez et al.
2022): a chain of quantizers, each quantizing what the previous ones left."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqvae_jax import quantizer_api
from vqvae_jax.quantizer_api import QuantizerOutput, check_codes, check_number, flatten_inputs
from vqvae_jax.quantizers import CODEBOOK_OPTIONS, CodebookOptions

Array = jax.Array

# `indices` of a stage that quantizer dropout left out for that example; `embed` adds nothing
# for it. Only in signed integer codes: an unsigned dtype cannot hold it.
DROPPED = -1


class ResidualVQ(CodebookOptions):
  """`num_quantizers` stages of `K` codes; stage `i` quantizes the residual `r_i`:

      r_0 = z,   c_i = code of r_i in stage i,   r_{i+1} = r_i - c_i,   quantized = sum_i c_i

  Each stage is a `VectorQuantizerEMA` (`decay > 0`) or a `VectorQuantizer` (`decay == 0`)
  with its own codebook and state, and every keyword-only codebook option (k-means init,
  dead-code restart, `cosine_codes`, `codebook_dim`, `rotation_trick`, ...) is passed to each
  stage, so it acts per stage on that stage's residuals (stage `i`'s k-means init clusters
  the `r_i` of the first training batch; its restarts draw from the `r_i`).

  Forward value: `quantized` is the sum of the stages' codes exactly (summed in stage order;
  `embed(indices)` gives the same value bitwise for float32 inputs, up to the rounding of
  codes that are computed from the codebook, with `cosine_codes` or `codebook_dim`, which
  may differ by an ulp between compiled programs).

  Gradients. Each stage's output carries its own estimator and the residuals are chained
  through them (EnCodec's and DAC's `residual = residual - quantized`, no stop-gradient):
    * straight-through (default): `d quantized / d z = I`. Then `r_i` for `i >= 1` carries
      no gradient to `z` (`d r_1/d z = I - I`), so, as in EnCodec, only stage 0's commitment
      term reaches the inputs (with `codebook_dim`, the stages' projections make it otherwise).
    * `rotation_trick=True`: stage `i` passes `M_i^T` back with `M_i = lambda_i R_i` (see
      `vqvae_jax.quantizers.rotation_trick`, for `e = r_i`, `q = c_i`), so the gradient to
      `z` is `J^T g` with `J = sum_i M_i (I - M_{i-1}) ... (I - M_0)`, the Jacobian of the
      chain `r_{i+1} = (I - M_i) r_i` with the rotations held constant.

  Quantizer dropout (SoundStream): in a training call with `quantizer_dropout = p > 0`, each
  example (a row along the inputs' leading axis; all of an example's vectors alike) draws,
  with probability `p`, a depth `n` uniform in `[1, Q]`, else `n = Q`, and uses only its first
  `n` stages. For the stages `i >= n` of that example: they add zero to `quantized` (and no
  gradient), their squared-error losses get 0 from its vectors (each stage's mean still
  divides by all the batch's vectors, as DAC does, so a stage that is often dropped weighs
  less), its vectors are left out of their `code_counts`, perplexity, EMA cluster sizes and
  sums and code usage, and `indices[..., i] = -1` (`DROPPED`). `embed` adds nothing for a
  `-1`, so `embed(indices) == quantized` holds in dropout calls too, and `embed` of indices
  with stages `n..Q-1` set to -1 decodes the first `n` stages alone. The k-means init,
  restart candidates and the entropy term (`entropy_weight`) still use every vector's
  residual: those are residuals of the same distribution, only the example's output is cut.
  The draw needs `rngs={'codebook': key}` and is a deterministic function of the key; inside
  `shard_map` (with `axis_name`) each device folds its axis index into the key, so devices
  draw independently. With `train=False` every stage is used.

  State: `batch_stats['stage_{i}']` as each stage keeps it; params `params['stage_{i}']` for
  plain stages.

  Attributes:
    num_quantizers: Q, the number of stages, an integer `>= 1`.
    num_embeddings: K, codes per stage.
    embedding_dim: D, the inputs' last dimension.
    commitment_cost: each stage's beta.
    decay: each stage's EMA decay, in `[0, 1)`; 0 selects plain stages whose codebooks the
      optimizer trains through their `q_latent` loss.
    epsilon: the EMA stages' Laplace smoothing (see `VectorQuantizerEMA`).
    zero_debias: the EMA stages' zero-debiased EMA; on by default (the seed's biased EMA
      collapses codebooks, and residual VQ has no seed checkpoints to keep).
    quantizer_dropout: the probability, in `[0, 1]`, that an example is cut to its first `n`
      stages in a training call (see above); 0 disables it.
    axis_name: inside `shard_map`/`pmap`, the batch axis every stage sums its counts and EMA
      sums over.
    distance_chunk_size: passed to every stage (see `VectorQuantizer`).
    The keyword-only codebook options: see `CodebookOptions`; each stage gets them all.
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
    check_number('num_quantizers', self.num_quantizers, 1, integer=True)
    check_number('quantizer_dropout', self.quantizer_dropout, 0, 1)
    check_number('decay (0 selects plain stages)', self.decay, 0, 1, high_open=True)
    quantizer_api.build(self.stage_config, parent=None)  # a bad stage field fails here
    super().__post_init__()

  @property
  def stage_config(self):
    """Each stage's quantizer config: `'ema'` when `decay > 0`, else `'vq'`, with this
    module's codebook fields."""
    config = dict(family='vq', num_embeddings=self.num_embeddings,
                  embedding_dim=self.embedding_dim, commitment_cost=self.commitment_cost,
                  distance_chunk_size=self.distance_chunk_size,
                  **{name: getattr(self, name) for name in CODEBOOK_OPTIONS})
    if self.decay > 0:
      config.update(family='ema', decay=self.decay, epsilon=self.epsilon,
                    zero_debias=self.zero_debias)
    return config

  def setup(self):
    self.stages = [quantizer_api.build(self.stage_config, axis_name=self.axis_name,
                                       name=f'stage_{i}') for i in range(self.num_quantizers)]

  @property
  def codebook_size(self) -> int:
    """K (`num_embeddings`): how many values each index takes; `indices[..., i]` is a code
    of stage `i`, in `[0, K)` (or -1 for a stage dropped in a training call)."""
    return self.num_embeddings

  @property
  def codes_per_position(self) -> int:
    """Q (`num_quantizers`): one code per stage."""
    return self.num_quantizers

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs` through every stage.

    Args:
      inputs: `[..., D]`, any float dtype; the stages work in float32.
      train: update each stage's state (for EMA stages or stateful codebook options,
        `mutable=['batch_stats']`), and apply quantizer dropout. A `'codebook'` rng is needed
        for k-means init, restarts or quantizer dropout.

    Returns:
      A `QuantizerOutput`:
        quantized: `[..., D]` in the inputs' dtype, the sum of the (kept) stages' codes.
        loss: float32 scalar, the sum of the stages' losses.
        perplexity: float32 scalar, the mean over the stages of each stage's batch perplexity
          (`exp` of the entropy of its `code_counts`); in a dropout call, over the stages
          that at least one vector used.
        indices: int32 `[..., Q]`, stage `i`'s code in `[..., i]` (-1 where dropped).
        code_counts: float32 `[Q, K]`, each stage's counts of this batch's indices (summed
          over `axis_name` when set); row `i` sums to the vectors that used stage `i`.
        encodings, distances: None.

    Raises:
      TypeError: the inputs are not floating point.
      ValueError: `inputs` do not end in D; a training call with dropout lacks the
        `'codebook'` rng; or a stage's own training-call check fails.
    """
    residual = flatten_inputs(inputs, self.embedding_dim, 'ResidualVQ')
    depth = None  # int32 [N]: how many stages each vector uses, in a dropout call
    if train and self.quantizer_dropout > 0 and not self.is_initializing():
      depth = self._depth_per_vector(inputs.shape)

    quantized = None
    losses, perplexities, indices, counts = [], [], [], []
    for i, stage in enumerate(self.stages):
      kept = None if depth is None else depth > i  # bool [N]
      row_mask = None if kept is None else kept.astype(jnp.float32)
      out = stage(residual, train, row_mask=row_mask, exact_codes=True)
      residual = residual - out.quantized
      stage_codes, stage_indices = out.quantized, out.indices
      if kept is not None:
        stage_codes = jnp.where(kept[:, None], stage_codes, 0.0)
        stage_indices = jnp.where(kept, stage_indices, DROPPED)
      quantized = stage_codes if quantized is None else quantized + stage_codes
      losses.append(out.loss)
      perplexities.append(out.perplexity)
      indices.append(stage_indices)
      counts.append(out.code_counts)
    code_counts = jnp.stack(counts)
    perplexities = jnp.stack(perplexities)
    if depth is None:
      perplexity = jnp.mean(perplexities)
    else:  # a stage no vector used has 0/0 counts: leave it out
      used = jnp.sum(code_counts, axis=1) > 0
      perplexity = (jnp.sum(jnp.where(used, perplexities, 0.0)) /
                    jnp.maximum(jnp.sum(used), 1).astype(jnp.float32))
    return QuantizerOutput(
        quantized=quantized.reshape(inputs.shape).astype(inputs.dtype),
        loss=sum(losses[1:], losses[0]),
        perplexity=perplexity,
        indices=jnp.stack(indices, axis=-1).reshape(inputs.shape[:-1] +
                                                    (self.num_quantizers,)),
        code_counts=code_counts)

  def _depth_per_vector(self, shape: Sequence[int]) -> Array:
    """int32 `[N]`: how many stages each of the `N` input vectors uses (one draw per example,
    a row along the leading axis, shared by its vectors; one example for 1-D inputs)."""
    if not self.has_rng('codebook'):
      raise ValueError("ResidualVQ with quantizer_dropout > 0 draws the stages each example "
                       "keeps when training: pass rngs={'codebook': key} to apply (a new key "
                       "each step).")
    key = self.make_rng('codebook')
    if self.axis_name is not None:
      key = jax.random.fold_in(key, lax.axis_index(self.axis_name))
    drop_key, depth_key = jax.random.split(key)
    num_examples = shape[0] if len(shape) > 1 else 1
    vectors_per_example = int(np.prod(shape[1:-1], dtype=np.int64)) if len(shape) > 1 else 1
    dropped = jax.random.bernoulli(drop_key, self.quantizer_dropout, (num_examples,))
    depth = jax.random.randint(depth_key, (num_examples,), 1, self.num_quantizers + 1)
    depth = jnp.where(dropped, depth, self.num_quantizers).astype(jnp.int32)
    return jnp.repeat(depth, vectors_per_example, total_repeat_length=num_examples *
                      vectors_per_example)

  def embed(self, indices: Array) -> Array:
    """The sum of the stages' codes.

    Args:
      indices: integer `[..., Q]`: `[..., i]` a code of stage `i` in `[0, K)`, or -1
        (`DROPPED`, in a signed dtype) for a stage that adds nothing. Unsigned codes have no
        marker: uint8 255 is code 255.

    Returns:
      float32 `[..., D]`: the sum, in stage order, of `stages[i].embed(indices[..., i])` over
      the stages not marked -1 (zeros where all are); equal to `quantized` of the call that
      gave `indices` for float32 inputs, dropout calls included (bitwise, but for an ulp of
      rounding in codes computed by `cosine_codes` or `codebook_dim`).

    Raises:
      TypeError: `indices` are not integers.
      ValueError: their last axis is not Q; or concrete `indices` (not traced) hold a value
        outside `[0, K)` other than -1 (the message names it). Under `jit` such a value gives
        NaN in the output, never a valid code.
    """
    if not hasattr(indices, 'dtype'):
      indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
      check_codes(indices, self.num_embeddings, 'ResidualVQ.embed')  # raises the TypeError
    if indices.ndim < 1 or indices.shape[-1] != self.num_quantizers:
      raise ValueError(f'ResidualVQ.embed expects codes of shape [..., {self.num_quantizers}] '
                       f'(num_quantizers), got shape {tuple(indices.shape)}.')
    if jnp.issubdtype(indices.dtype, jnp.signedinteger):
      dropped = indices == DROPPED
    else:  # `== -1` would compare with the dtype's largest value, a valid code
      dropped = jnp.zeros(indices.shape, bool)
    indices = check_codes(jnp.where(dropped, 0, indices), self.num_embeddings,
                          'ResidualVQ.embed')
    total = None
    for i, stage in enumerate(self.stages):
      codes = jnp.where(dropped[..., i, None], 0.0, stage.embed(indices[..., i]))
      total = codes if total is None else total + codes
    return total
