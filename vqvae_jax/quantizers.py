"""Vector quantizers: the seed's `VectorQuantizer` and `VectorQuantizerEMA` as Flax Linen modules.

Both modules take inputs of any shape `[..., D]` and quantize each `D`-vector to its nearest code
(L2 distance) in a codebook of `K` codes. Everything that decides which code wins, and every
statistic (losses, perplexity, counts, EMA state), is computed in float32, whatever the input
dtype: bfloat16 distances pick wrong codes and break code usage.

Device layouts:
  * Under `jax.jit` with the batch sharded over a mesh, reductions over the batch are global
    already: no argument is needed.
  * Inside `shard_map` (or `pmap`), pass `axis_name` and the code counts, EMA sums and
    perplexity are summed over that axis, like Haiku's `cross_replica_axis`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

Array = jax.Array

# float32 matmuls at full precision: TPUs and GPUs otherwise run them in bf16 / tf32 passes.
_HIGHEST = lax.Precision.HIGHEST


@struct.dataclass
class QuantizerOutput:
  """What a quantizer returns.

  Attributes:
    quantized: `[..., D]`, the inputs' dtype. The nearest codes, with the straight-through
      estimator applied: the forward value is the code, the gradient flows to the inputs
      unchanged (`inputs + stop_gradient(codes - inputs)`).
    loss: float32 scalar. `q_latent + commitment_cost * e_latent` for `VectorQuantizer`,
      `commitment_cost * e_latent` for `VectorQuantizerEMA`.
    perplexity: float32 scalar, `exp(entropy)` of the batch's code distribution.
    indices: int32 `[...]`, the index of the nearest code for each input vector.
    code_counts: float32 `[K]`, how many input vectors chose each code in this batch (summed
      over `axis_name` when given).
    encodings: float32 `[N, K]` one-hot codes, `N = prod(inputs.shape[:-1])`; only when the
      module was built with `return_encodings=True`, else None.
    distances: float32 `[N, K]` squared distances to every code; only with
      `return_distances=True`, else None.
  """

  quantized: Array
  loss: Array
  perplexity: Array
  indices: Array
  code_counts: Array
  encodings: Optional[Array] = None
  distances: Optional[Array] = None


def squared_distances(flat_inputs: Array, codebook: Array) -> Array:
  """The seed's `|x|^2 + |e|^2 - 2 x.e`, in float32.

  Args:
    flat_inputs: `[N, D]`.
    codebook: `[K, D]`.

  Returns:
    float32 `[N, K]`.
  """
  x = flat_inputs.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  return (jnp.sum(x**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1) -
          2 * jnp.matmul(x, e.T, precision=_HIGHEST))


def nearest_code(flat_inputs: Array, codebook: Array, chunk_size: Optional[int] = None) -> Array:
  """Index of the nearest code for each row, as the seed's argmin picks it (first on ties).

  Args:
    flat_inputs: `[N, D]`.
    codebook: `[K, D]`.
    chunk_size: if set and smaller than `N`, rows are processed `chunk_size` at a time with
      `lax.map`, so at most `[chunk_size, K]` distances exist at once. This is what lets
      K = 65,536 codes search a million vectors. The indices are the same as without chunks:
      each row's arithmetic is unchanged.

  Returns:
    int32 `[N]`.
  """
  num_rows = flat_inputs.shape[0]
  if chunk_size is None or chunk_size >= num_rows:
    return jnp.argmin(squared_distances(flat_inputs, codebook), axis=1).astype(jnp.int32)
  num_chunks = -(-num_rows // chunk_size)
  padded = jnp.pad(flat_inputs, ((0, num_chunks * chunk_size - num_rows), (0, 0)))
  chunks = padded.reshape(num_chunks, chunk_size, flat_inputs.shape[1])
  indices = lax.map(
      lambda rows: jnp.argmin(squared_distances(rows, codebook), axis=1).astype(jnp.int32),
      chunks)
  return indices.reshape(-1)[:num_rows]


def perplexity_from_counts(code_counts: Array) -> Array:
  """The seed's perplexity, `exp(-sum p log(p + 1e-10))` with `p = counts / sum(counts)`."""
  probs = code_counts / jnp.sum(code_counts)
  return jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))


def _check_common(module: Any) -> None:
  if not isinstance(module.num_embeddings, int) or module.num_embeddings < 1:
    raise ValueError(f'num_embeddings must be an integer >= 1, got {module.num_embeddings!r}.')
  if not isinstance(module.embedding_dim, int) or module.embedding_dim < 1:
    raise ValueError(f'embedding_dim must be an integer >= 1, got {module.embedding_dim!r}.')
  if module.commitment_cost < 0:
    raise ValueError(f'commitment_cost must be >= 0, got {module.commitment_cost!r}.')
  if module.distance_chunk_size is not None and module.distance_chunk_size < 1:
    raise ValueError(
        f'distance_chunk_size must be None or >= 1, got {module.distance_chunk_size!r}.')


def _flatten(module: Any, inputs: Array) -> Array:
  if inputs.ndim < 1 or inputs.shape[-1] != module.embedding_dim:
    raise ValueError(f'{type(module).__name__} expects inputs of shape [..., {module.embedding_dim}]'
                     f' (embedding_dim), got shape {tuple(inputs.shape)}.')
  return inputs.reshape(-1, module.embedding_dim).astype(jnp.float32)


def _lookup(module: Any, flat_inputs: Array, codebook: Array):
  """Nearest codes and the batch statistics shared by both quantizers."""
  if module.return_distances:
    distances = squared_distances(flat_inputs, codebook)
    indices = jnp.argmin(distances, axis=1).astype(jnp.int32)
  else:
    distances = None
    indices = nearest_code(flat_inputs, codebook, module.distance_chunk_size)
  codes = jnp.take(codebook, indices, axis=0)
  code_counts = jnp.zeros((module.num_embeddings,), jnp.float32).at[indices].add(1.0)
  if module.axis_name is not None:
    code_counts = lax.psum(code_counts, module.axis_name)
  return indices, codes, code_counts, distances


def _output(module: Any, inputs: Array, flat_inputs: Array, indices: Array, codes: Array,
            code_counts: Array, distances: Optional[Array], loss: Array) -> QuantizerOutput:
  straight_through = flat_inputs + lax.stop_gradient(codes - flat_inputs)
  encodings = None
  if module.return_encodings:
    encodings = jax.nn.one_hot(indices, module.num_embeddings, dtype=jnp.float32)
  return QuantizerOutput(
      quantized=straight_through.reshape(inputs.shape).astype(inputs.dtype),
      loss=loss,
      perplexity=perplexity_from_counts(code_counts),
      indices=indices.reshape(inputs.shape[:-1]),
      code_counts=code_counts,
      encodings=encodings,
      distances=distances)


def _mse(a: Array, b: Array) -> Array:
  return jnp.mean(jnp.square(a - b))


class VectorQuantizer(nn.Module):
  """The seed's `VectorQuantizer` (van den Oord et al. 2017), with a learned codebook.

  The codebook is the param `embedding`, `[K, D]`, initialised `U(-1/K, 1/K)` like the seed.
  It is trained by the loss: `loss = q_latent + commitment_cost * e_latent`, where
  `q_latent = mean((codes - sg(inputs))^2)` moves the codebook only, and
  `e_latent = mean((sg(codes) - inputs)^2)` moves the inputs (the encoder) only.

  Attributes:
    num_embeddings: K, the number of codes.
    embedding_dim: D, the size of each code; the inputs' last dimension.
    commitment_cost: beta, the weight of `e_latent`.
    axis_name: inside `shard_map`/`pmap`, the batch axis to sum code counts over.
    distance_chunk_size: if set, the nearest-code search runs this many vectors at a time
      (see `nearest_code`), for codebooks too large for a full `[N, K]` distance matrix.
    return_encodings: also return the `[N, K]` one-hot encodings.
    return_distances: also return the `[N, K]` distances (this materialises them).
  """

  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  axis_name: Optional[str] = None
  distance_chunk_size: Optional[int] = None
  return_encodings: bool = False
  return_distances: bool = False

  def __post_init__(self):
    _check_common(self)
    super().__post_init__()

  def setup(self):
    limit = 1.0 / self.num_embeddings
    self.embedding = self.param(
        'embedding',
        lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -limit, limit),
        (self.num_embeddings, self.embedding_dim))

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs`.

    Args:
      inputs: `[..., D]`, any float dtype.
      train: accepted for symmetry with `VectorQuantizerEMA`; this module has no state.

    Returns:
      A `QuantizerOutput`; `quantized` has the shape and dtype of `inputs`.
    """
    del train
    flat_inputs = _flatten(self, inputs)
    indices, codes, code_counts, distances = _lookup(self, flat_inputs, self.embedding)
    q_latent = _mse(codes, lax.stop_gradient(flat_inputs))
    e_latent = _mse(lax.stop_gradient(codes), flat_inputs)
    loss = q_latent + self.commitment_cost * e_latent
    return _output(self, inputs, flat_inputs, indices, codes, code_counts, distances, loss)

  def embed(self, indices: Array) -> Array:
    """Codes for integer `indices` of any shape `[...]`: float32 `[..., D]`."""
    return jnp.take(self.embedding, indices, axis=0)

  @property
  def codebook(self) -> Array:
    """The `[K, D]` codebook."""
    return self.embedding


class VectorQuantizerEMA(nn.Module):
  """The seed's `VectorQuantizerEMA`: codes are exponential moving averages of their inputs.

  State, all float32 in the mutable `batch_stats` collection:
    * `embedding` `[K, D]`: the codebook, initialised N(0, 1) as in the seed.
    * `ema_cluster_size` `[K]`: EMA of how many inputs chose each code; zeros at the start.
    * `ema_w` `[K, D]`: EMA of the sum of the inputs that chose each code. The seed initialises
      it N(0, 1), independently of the codebook; with `zero_debias=True` it starts at zeros.
    * `counter` `[]` int32: number of updates; only with `zero_debias=True`.

  With `train=True` (and `batch_stats` mutable) each call updates the state after the lookup,
  which uses the codebook from before the update, exactly as the seed does:

      N     = decay * N + (1 - decay) * counts
      N     = (N + eps) / (sum(N) + K * eps) * sum(N)             # Laplace smoothing, stored
      ema_w = decay * ema_w + (1 - decay) * onehot^T inputs
      embedding = ema_w / N

  The seed starts N at zeros, so after its first update the codes are `ema_w` divided by about
  `(1 - decay) * counts`: a hundredfold jump that collapses the codebook (measured: 406 distinct
  codes fell to 1 in 3 steps). `zero_debias=True` gives Sonnet's and Haiku's zero-debiased EMA
  instead: `N` and `ema_w` hold the raw EMAs from zero, both are divided by
  `1 - decay^counter`, and Laplace smoothing is applied to the debiased sizes without being
  stored. The default is the seed's behaviour, which its checkpoints depend on.

  `loss = commitment_cost * mean((sg(codes) - inputs)^2)`: the codebook gets no gradient.
  With `train=False` nothing changes.

  Attributes:
    num_embeddings: K, the number of codes.
    embedding_dim: D, the size of each code; the inputs' last dimension.
    commitment_cost: beta.
    decay: the EMA decay, in [0, 1).
    epsilon: the Laplace smoothing constant.
    zero_debias: use the zero-debiased EMA of Sonnet and Haiku (recommended for new runs).
    axis_name: inside `shard_map`/`pmap`, the batch axis to sum counts and EMA sums over.
    distance_chunk_size: see `VectorQuantizer`.
    return_encodings: also return the `[N, K]` one-hot encodings.
    return_distances: also return the `[N, K]` distances.
  """

  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  zero_debias: bool = False
  axis_name: Optional[str] = None
  distance_chunk_size: Optional[int] = None
  return_encodings: bool = False
  return_distances: bool = False

  def __post_init__(self):
    _check_common(self)
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f'decay must be in [0, 1), got {self.decay!r}.')
    if self.epsilon < 0:
      raise ValueError(f'epsilon must be >= 0, got {self.epsilon!r}.')
    super().__post_init__()

  def setup(self):
    shape = (self.num_embeddings, self.embedding_dim)
    self.embedding = self.variable(
        'batch_stats', 'embedding',
        lambda: jax.random.normal(self.make_rng('params'), shape, jnp.float32))
    self.ema_cluster_size = self.variable(
        'batch_stats', 'ema_cluster_size', jnp.zeros, (self.num_embeddings,), jnp.float32)
    if self.zero_debias:
      self.ema_w = self.variable('batch_stats', 'ema_w', jnp.zeros, shape, jnp.float32)
      self.counter = self.variable('batch_stats', 'counter', jnp.zeros, (), jnp.int32)
    else:
      self.ema_w = self.variable(
          'batch_stats', 'ema_w',
          lambda: jax.random.normal(self.make_rng('params'), shape, jnp.float32))

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes `inputs` and, with `train=True`, updates the EMA state.

    Args:
      inputs: `[..., D]`, any float dtype.
      train: update `batch_stats` (they must be mutable); the output is the same either way.

    Returns:
      A `QuantizerOutput`; `quantized` has the shape and dtype of `inputs`.
    """
    flat_inputs = _flatten(self, inputs)
    codebook = self.embedding.value
    indices, codes, code_counts, distances = _lookup(self, flat_inputs, codebook)
    if train and not self.is_initializing():
      if not self.is_mutable_collection('batch_stats'):
        raise ValueError("VectorQuantizerEMA with train=True updates its state: call apply(..., "
                         "mutable=['batch_stats']), or pass train=False.")
      self._update(flat_inputs, indices, code_counts)
    loss = self.commitment_cost * _mse(lax.stop_gradient(codes), flat_inputs)
    return _output(self, inputs, flat_inputs, indices, codes, code_counts, distances, loss)

  def _update(self, flat_inputs: Array, indices: Array, code_counts: Array) -> None:
    flat_inputs = lax.stop_gradient(flat_inputs)
    code_sums = jax.ops.segment_sum(flat_inputs, indices, num_segments=self.num_embeddings)
    if self.axis_name is not None:
      code_sums = lax.psum(code_sums, self.axis_name)
    decay, eps, k = self.decay, self.epsilon, self.num_embeddings
    cluster_size = self.ema_cluster_size.value * decay + (1 - decay) * code_counts
    ema_w = self.ema_w.value * decay + (1 - decay) * code_sums
    if self.zero_debias:
      counter = self.counter.value + 1
      debias = 1 - jnp.asarray(decay, jnp.float32)**counter.astype(jnp.float32)
      self.counter.value = counter
      self.ema_cluster_size.value = cluster_size
      self.ema_w.value = ema_w
      cluster_size, ema_w = cluster_size / debias, ema_w / debias
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    if not self.zero_debias:
      self.ema_cluster_size.value = smoothed
      self.ema_w.value = ema_w
    self.embedding.value = ema_w / smoothed[:, None]

  def embed(self, indices: Array) -> Array:
    """Codes for integer `indices` of any shape `[...]`: float32 `[..., D]`."""
    return jnp.take(self.embedding.value, indices, axis=0)

  @property
  def codebook(self) -> Array:
    """The `[K, D]` codebook."""
    return self.embedding.value


def num_codes_used(code_counts: Array) -> Array:
  """Number of codes with a non-zero count, int32."""
  return jnp.sum(code_counts > 0).astype(jnp.int32)

