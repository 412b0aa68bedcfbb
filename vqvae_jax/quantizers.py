"""Vector quantizers: the seed's `VectorQuantizer` and `VectorQuantizerEMA` as Flax Linen modules,
with optional remedies for codebook collapse.

Both modules take inputs of any shape `[..., D]` and quantize each `D`-vector to its nearest code
(L2 distance) in a codebook of `K` codes. Everything that decides which code wins, and every
statistic (losses, perplexity, counts, EMA state), is computed in float32, whatever the input
dtype: bfloat16 distances pick wrong codes and break code usage.

Codebook options (all off by default, which is exactly the seed):
  * `codebook_init='kmeans'`: on the first training call, the codebook is set to k-means++ /
    Lloyd centres of that batch's (global) encoder outputs.
  * `dead_code_threshold > 0`: after each training call, every code whose usage (the
    zero-debiased EMA of its per-batch count, `batch_stats['code_usage']`) is below the
    threshold is replaced by an encoder output sampled from the current global batch.
  * `track_usage=True`: keep `code_usage` without restarting anything (implied by a threshold).
  * `cosine_codes=True`: inputs and codes are l2-normalised, so the lookup is by cosine (and
    `quantized` is a unit vector).
  * `codebook_dim=C`: the lookup happens in `C` dimensions, between Dense projections
    `D -> C` (`project_in`) and `C -> D` (`project_out`).
  * `entropy_weight > 0`: adds `entropy_weight * (log K - H(batch soft usage))` to `loss`.

Training calls. The data-dependent options (k-means init, restarts) need randomness and state:
pass `train=True`, `mutable=['batch_stats']` and `rngs={'codebook': key}` (a fresh key per step;
the result is a deterministic function of it). Everything runs inside the jitted step.

How a restart reaches the plain quantizer's codebook, which is a `params` entry the optimizer
owns: the module keeps an additive `batch_stats['codebook_offset']` `[K, C]` and looks codes up
in `params['embedding'] + codebook_offset`. A restart (or the k-means init) writes
`offset[k] = new_code[k] - params['embedding'][k]`, so the code in use becomes the new vector,
while gradients still reach `params['embedding']` unchanged and the optimizer keeps training it.
A training program that already threads `batch_stats` through `apply(..., mutable=
['batch_stats'])` and passes `rngs={'codebook': key}` needs no other change (`train/step.py` does
both). To export weights, fold the offset in with `merge_codebook_offset(variables)`;
`convert.to_seed_state_dict` does this itself.

Device layouts:
  * Under `jax.jit` with the batch sharded over a mesh, reductions over the batch are global
    already: no argument is needed.
  * Inside `shard_map` (or `pmap`), pass `axis_name` and the code counts, EMA sums, perplexity,
    k-means points and restart candidates are taken over that axis, like Haiku's
    `cross_replica_axis`; every device makes the same codebook changes.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from vqvae_jax.codebook import (batch_usage_entropy_loss, global_row_count, kmeans,
                                l2_normalize, nearest_code, nearest_in_distances,
                                perplexity_from_counts, sample_global_rows, squared_distances,
                                update_usage)
from vqvae_jax.quantizer_api import (QuantizerOutput, check_choice, check_codes, check_number,
                                     count_codes, flatten_inputs, in_range,
                                     nan_outside_range)

Array = jax.Array

__all__ = ['CodebookOptions', 'VectorQuantizer', 'VectorQuantizerEMA', 'merge_codebook_offset',
           'rotation_trick']

CODEBOOK_INITS = ('seed', 'kmeans')


def _mse(a: Array, b: Array, row_mask: Optional[Array] = None) -> Array:
  """Mean squared error of `[N, C]` arrays; with a float32 `[N]` 0/1 `row_mask`, the rows
  where it is 0 add nothing but still count in the mean's denominator (`N * C`)."""
  if row_mask is None:
    return jnp.mean(jnp.square(a - b))
  return jnp.sum(row_mask[:, None] * jnp.square(a - b)) / a.size


class CodebookOptions(nn.Module, kw_only=True):
  """The codebook options that both quantizers take, keyword-only, with the same meaning.

  `VectorQuantizer`, `VectorQuantizerEMA` and `VQVAE` (which passes them on) inherit them, so
  they are declared once. The defaults are the seed's behaviour; `RECOMMENDED` is the set the
  training configs use.

  Attributes:
    codebook_init: `'seed'` (the seed's random init) or `'kmeans'` (k-means over the first
      training batch's encoder outputs).
    kmeans_iters: Lloyd iterations of the k-means init, after k-means++ seeding.
    dead_code_threshold: restart every code whose `code_usage` (expected vectors per batch)
      falls below this; 0 disables restarts.
    usage_decay: decay of the `code_usage` EMA.
    track_usage: keep `batch_stats['code_usage']` even without restarts.
    cosine_codes: l2-normalise the inputs (after `project_in`) and the codes.
    codebook_dim: if set, quantize in this many dimensions between Dense projections.
    entropy_weight: weight of the batch code-usage entropy penalty added to `loss`
      (`codebook.batch_usage_entropy_loss`); 0 disables it.
    entropy_temperature: softmax temperature of that penalty's soft assignments.
    rotation_trick: pass gradients to the latents by the rotation trick (Fifty et al. 2024)
      instead of the straight-through estimator: a loss's gradient `g` at a code `q` reaches
      its latent `e` (in the code space, after `project_in` and the cosine normalisation) as
      `(|q|/|e|) R^T g`, `R` the rotation taking `e/|e|` to `q/|q|` (see the function
      `rotation_trick`). Indices, counts, losses (the plain codebook's `q_latent` gradient
      included) and state updates are unchanged; the forward value of `quantized` is the
      code exactly, where the default estimator can be an ulp off it.
  """

  codebook_init: str = 'seed'
  kmeans_iters: int = 10
  dead_code_threshold: float = 0.0
  usage_decay: float = 0.99
  track_usage: bool = False
  cosine_codes: bool = False
  codebook_dim: Optional[int] = None
  entropy_weight: float = 0.0
  entropy_temperature: float = 1.0
  rotation_trick: bool = False


# Their names, for passing them on: `VQVAE` hands each one to its quantizer.
CODEBOOK_OPTIONS = tuple(field.name for field in dataclasses.fields(CodebookOptions)
                         if field.name not in ('parent', 'name'))

class _VectorQuantizerBase(CodebookOptions):
  """What both quantizers share: field checks, the codebook options' state, the forward pass
  and `embed`.

  Each quantizer declares its own fields, so that each keeps the seed's positional order; the
  ones read here are `num_embeddings`, `embedding_dim`, `commitment_cost`, `axis_name`,
  `distance_chunk_size`, `return_encodings` and `return_distances`. Each also provides what
  differs between the two codebooks:
    * `codebook`: the `[K, C]` codebook in use;
    * `has_training_state`: whether `train=True` updates `batch_stats`;
    * `_codebook_loss(latents, codes, row_mask)`: the loss before the entropy term (rows
      where the optional `row_mask` is 0 add nothing; see `__call__`);
    * `_update_codebook(latents, indices, code_counts, step)`: after each training lookup;
    * `_write_codes(mask, new_codes, sizes, step)`: how a k-means init or restart sets codes.
  """

  if TYPE_CHECKING:  # declared by each quantizer, in its own order
    num_embeddings: int
    embedding_dim: int
    commitment_cost: float
    axis_name: Optional[str]
    distance_chunk_size: Optional[int]
    return_encodings: bool
    return_distances: bool

  # ---- Field checks and feature switches. ----

  def _check_common_fields(self) -> None:
    check_number('num_embeddings', self.num_embeddings, 1, integer=True)
    check_number('embedding_dim', self.embedding_dim, 1, integer=True)
    check_number('commitment_cost', self.commitment_cost, 0)
    if self.distance_chunk_size is not None:
      check_number('distance_chunk_size', self.distance_chunk_size, 1, integer=True)
    check_choice('codebook_init', self.codebook_init, CODEBOOK_INITS)
    check_number('kmeans_iters', self.kmeans_iters, 0, integer=True)
    check_number('dead_code_threshold', self.dead_code_threshold, 0)
    check_number('usage_decay', self.usage_decay, 0, 1, high_open=True)
    check_choice('track_usage', self.track_usage, (True, False))
    check_choice('cosine_codes', self.cosine_codes, (True, False))
    if self.codebook_dim is not None:
      check_number('codebook_dim', self.codebook_dim, 1, integer=True)
    check_number('entropy_weight', self.entropy_weight, 0)
    check_number('entropy_temperature', self.entropy_temperature, 0, low_open=True)
    check_choice('rotation_trick', self.rotation_trick, (True, False))

  @property
  def _restarts_dead_codes(self) -> bool:
    return self.dead_code_threshold > 0

  @property
  def _tracks_usage(self) -> bool:
    return self.track_usage or self._restarts_dead_codes

  @property
  def _writes_codes(self) -> bool:
    """Whether training calls overwrite codes with data (k-means init or restarts)."""
    return self.codebook_init == 'kmeans' or self._restarts_dead_codes

  @property
  def _has_codebook_state(self) -> bool:
    return self._tracks_usage or self._writes_codes

  @property
  def _code_dim(self) -> int:
    """C: the size of the codes, `codebook_dim` when the lookup is projected, else D."""
    return self.embedding_dim if self.codebook_dim is None else self.codebook_dim

  def _setup_codebook_options(self, needs_counter: bool) -> None:
    """Declares the projections and the state the codebook options need (nothing by default).

    State, float32 unless said, in `batch_stats`:
      * `counter` `[]` int32: training calls so far (k-means runs at 0; debiasing uses it).
      * `code_usage` `[K]`: zero-debiased EMA of per-batch code counts (see
        `codebook.update_usage`); with `track_usage` or `dead_code_threshold > 0`.
    """
    if self.codebook_dim is not None:
      # float32 and full precision: the codes are decided in this space.
      self.project_in = nn.Dense(self.codebook_dim, dtype=jnp.float32,
                                 precision=lax.Precision.HIGHEST)
      self.project_out = nn.Dense(self.embedding_dim, dtype=jnp.float32,
                                  precision=lax.Precision.HIGHEST)
    self.counter = (self.variable('batch_stats', 'counter', jnp.zeros, (), jnp.int32)
                    if needs_counter else None)
    if self._tracks_usage:
      self.code_usage = self.variable('batch_stats', 'code_usage', jnp.zeros,
                                      (self.num_embeddings,), jnp.float32)

  # ---- The forward pass. ----

  def _to_code_space(self, flat_inputs: Array) -> Array:
    """`[N, D]` inputs -> `[N, C]` latents, the vectors that are actually quantized."""
    latents = flat_inputs
    if self.codebook_dim is not None:
      latents = self.project_in(latents)
    if self.cosine_codes:
      latents = l2_normalize(latents)
    return latents

  def _from_code_space(self, codes: Array) -> Array:
    """`[..., C]` codes -> `[..., D]`."""
    return codes if self.codebook_dim is None else self.project_out(codes)

  def _codes_in_use(self, stored_codebook: Array) -> Array:
    """The stored codebook as the lookup uses it: unit rows for cosine codes."""
    return l2_normalize(stored_codebook) if self.cosine_codes else stored_codebook

  def _lookup(self, latents: Array, codebook: Array, row_mask: Optional[Array] = None):
    """Nearest codes and the batch statistics shared by both quantizers; rows where
    `row_mask` is 0 are left out of the counts."""
    if self.return_distances or self.entropy_weight > 0:  # the entropy term needs all of them
      distances = squared_distances(latents, codebook)
      indices = nearest_in_distances(distances)
    else:
      distances = None
      indices = nearest_code(latents, codebook, self.distance_chunk_size)
    codes = jnp.take(codebook, indices, axis=0)
    code_counts = count_codes(indices, self.num_embeddings, self.axis_name, row_mask)
    return indices, codes, code_counts, distances

  def _check_training_call(self) -> None:
    if not self.is_mutable_collection('batch_stats'):
      raise ValueError(f"{type(self).__name__} with train=True updates its state: call "
                       f"apply(..., mutable=['batch_stats']), or pass train=False.")
    if self._writes_codes and not self.has_rng('codebook'):
      raise ValueError(f"{type(self).__name__} with codebook_init={self.codebook_init!r} and "
                       f"dead_code_threshold={self.dead_code_threshold!r} draws random codes "
                       f"when training: pass rngs={{'codebook': key}} to apply (a new key each "
                       f"step).")

  def _kmeans_init(self, key: Array, latents: Array) -> None:
    """On the first training call (counter 0), sets every code to k-means centres of the batch.

    Inside `shard_map` the points are the global batch, gathered inside the branch that runs
    only once, so later steps pay nothing for it.
    """
    first_call = self.counter.value == 0
    num_codes = self.num_embeddings

    def centres_of_batch():
      points_key, kmeans_key = jax.random.split(key)
      num_points = global_row_count(latents.shape[0], self.axis_name)
      # A permutation of the whole global batch: inside shard_map, the gather of all of it.
      points = sample_global_rows(points_key, latents, num_points, self.axis_name)
      return kmeans(kmeans_key, points, num_codes, self.kmeans_iters,
                    normalize=self.cosine_codes)

    def unchanged():
      return (jnp.zeros((num_codes, latents.shape[1]), jnp.float32),
              jnp.zeros((num_codes,), jnp.float32))

    centres, sizes = lax.cond(first_call, centres_of_batch, unchanged)
    self._write_codes(jnp.broadcast_to(first_call, (num_codes,)), centres, sizes,
                      self.counter.value)

  def _restart_dead_codes(self, key: Array, latents: Array, code_usage: Array,
                          step: Array) -> Array:
    """Replaces codes with `code_usage < dead_code_threshold` by vectors of the global batch.

    The restarted codes' usage (and, for the EMA quantizer, their cluster size) is set to the
    threshold: they count as just alive, so a code that catches no vector is redrawn next step.

    Returns:
      float32 `[K]`, the usage after the restart.
    """
    threshold = jnp.float32(self.dead_code_threshold)
    dead = code_usage < threshold
    candidates = sample_global_rows(key, latents, self.num_embeddings, self.axis_name)
    self._write_codes(dead, candidates, jnp.full_like(code_usage, threshold), step)
    return jnp.where(dead, threshold, code_usage)

  def __call__(self, inputs: Array, train: bool = False, *, row_mask: Optional[Array] = None,
               exact_codes: bool = False) -> QuantizerOutput:
    """Quantizes `inputs`.

    Args:
      inputs: `[..., D]`, any float dtype.
      train: update the state: always for `VectorQuantizerEMA`; for `VectorQuantizer` only
        when a codebook option keeps one (k-means init, usage, restarts), else nothing
        changes. Then `batch_stats` must be mutable and, for k-means or restarts, a
        `'codebook'` rng given. The output is the same either way, except that the k-means
        init replaces the codebook before the first training call's lookup.
      row_mask: float32 `[N]` of 0 and 1 (`N = prod(inputs.shape[:-1])`, the rows in C
        order), or None for all ones; `ResidualVQ` passes the vectors its dropout keeps.
        Rows where it is 0 are still quantized, but they are left out of `code_counts` (so of
        the perplexity, the EMA cluster sizes and sums, and `code_usage`) and add 0 to the
        squared-error losses, whose means still divide by every row (the pmean over devices
        stays the global value). The k-means init, restart candidates and the entropy term
        still use every row.
      exact_codes: make the forward value of `quantized` the codes exactly: the
        straight-through estimator as `codes + (latents - sg(latents))` instead of the seed's
        `latents + sg(codes - latents)`, which rounds to within an ulp of the latents' scale
        of them. The same gradient. (The rotation trick gives the codes exactly either way.)

    Returns:
      A `QuantizerOutput`; `quantized` has the shape and dtype of `inputs`, `indices` is
      int32 `[...]`, `code_counts` float32 `[K]`.

    Raises:
      ValueError: `inputs` do not end in D; or a training call that updates state lacks
        `mutable=['batch_stats']`, the `'codebook'` rng, or any input vector.
      TypeError: `inputs` are not floating point.
    """
    flat_inputs = flatten_inputs(inputs, self.embedding_dim, type(self).__name__)
    latents = self._to_code_space(flat_inputs)
    updating = train and self.has_training_state and not self.is_initializing()
    if updating:
      self._check_training_call()
      if not flat_inputs.shape[0]:
        # Counts, EMA sums and k-means points of nothing: NaN statistics or out-of-range
        # samples.
        raise ValueError(f'{type(self).__name__} with train=True needs at least one input '
                         f'vector, got inputs of shape {tuple(inputs.shape)}.')
      if self._writes_codes:
        kmeans_key, restart_key = jax.random.split(self.make_rng('codebook'))
      # What is written into the state (centres, restarted codes, EMA sums) carries no gradient.
      detached_latents = lax.stop_gradient(latents)
      if self.codebook_init == 'kmeans':
        self._kmeans_init(kmeans_key, detached_latents)
    codebook = self.codebook  # read after the k-means init, so this call uses the centres
    indices, codes, code_counts, distances = self._lookup(latents, codebook, row_mask)
    if updating:
      step = None if self.counter is None else self.counter.value + 1
      # The EMA sums of the kept rows only, like `code_counts`.
      summed_latents = (detached_latents if row_mask is None else
                        detached_latents * row_mask[:, None])
      self._update_codebook(summed_latents, indices, code_counts, step)
      if self._tracks_usage:
        code_usage = update_usage(self.code_usage.value, code_counts, self.usage_decay, step)
        if self._restarts_dead_codes:
          code_usage = self._restart_dead_codes(restart_key, detached_latents, code_usage, step)
        self.code_usage.value = code_usage
      if step is not None:
        self.counter.value = step
    loss = self._codebook_loss(latents, codes, row_mask)
    if self.entropy_weight > 0:
      loss = loss + self.entropy_weight * batch_usage_entropy_loss(
          distances, self.entropy_temperature, self.axis_name)

    if self.rotation_trick:
      straight_through = rotation_trick(latents, codes)
    elif exact_codes:
      straight_through = lax.stop_gradient(codes) + (latents - lax.stop_gradient(latents))
    else:  # the seed's estimator, which the parity tests pin
      straight_through = latents + lax.stop_gradient(codes - latents)
    quantized = self._from_code_space(straight_through)
    return QuantizerOutput(
        quantized=quantized.reshape(inputs.shape).astype(inputs.dtype),
        loss=loss,
        perplexity=perplexity_from_counts(code_counts),
        indices=indices.reshape(inputs.shape[:-1]),
        code_counts=code_counts,
        encodings=(jax.nn.one_hot(indices, self.num_embeddings, dtype=jnp.float32)
                   if self.return_encodings else None),
        distances=distances if self.return_distances else None)

  @property
  def codebook_size(self) -> int:
    """K (`num_embeddings`): how many values an index takes, `indices` in `[0, K)`."""
    return self.num_embeddings

  @property
  def codes_per_position(self) -> int:
    """1: one code per input vector."""
    return 1

  # ---- Codes to vectors. ----

  def embed(self, indices: Array) -> Array:
    """The codes at `indices`.

    Args:
      indices: integer `[...]`, each in `[0, K)`.

    Returns:
      float32 `[..., D]`: row `indices[...]` of `codebook` (through `project_out` when
      `codebook_dim` is set).

    Raises:
      TypeError: `indices` are not integers.
      ValueError: concrete `indices` (not traced) hold a value outside `[0, K)`; the message
        names it. Traced `indices` (under `jit`, `vmap`, `scan`) cannot be checked without a
        device sync: there an out-of-range index, negative ones included, gives a row of NaN,
        never a valid code.
    """
    indices = check_codes(indices, self.num_embeddings, f'{type(self).__name__}.embed')
    inside = in_range(indices, self.num_embeddings)
    codes = jnp.take(self.codebook, jnp.where(inside, indices, 0).astype(jnp.int32), axis=0)
    return self._from_code_space(nan_outside_range(codes, indices, self.num_embeddings))


class VectorQuantizer(_VectorQuantizerBase):
  """The seed's `VectorQuantizer` (van den Oord et al. 2017), with a learned codebook.

  The codebook is the param `embedding`, `[K, C]` (`C = codebook_dim or D`), initialised
  `U(-1/K, 1/K)` like the seed. It is trained by the loss: `loss = q_latent + commitment_cost *
  e_latent`, where `q_latent = mean((codes - sg(inputs))^2)` moves the codebook only, and
  `e_latent = mean((sg(codes) - inputs)^2)` moves the inputs (the encoder) only.

  With `codebook_init='kmeans'` or `dead_code_threshold > 0` the codes in use are
  `embedding + batch_stats['codebook_offset']` (see the module docstring for why); with the
  defaults there is no state at all and `train` changes nothing.

  Attributes:
    num_embeddings: K, the number of codes.
    embedding_dim: D, the inputs' last dimension (and the size of each code unless
      `codebook_dim` is set).
    commitment_cost: beta, the weight of `e_latent`.
    axis_name: inside `shard_map`/`pmap`, the batch axis to sum code counts over.
    distance_chunk_size: if set, the nearest-code search runs this many vectors at a time
      (see `codebook.nearest_code`), for codebooks too large for a full `[N, K]` distance
      matrix. Not used when `entropy_weight > 0`, which needs every distance.
    return_encodings: also return the `[N, K]` one-hot encodings.
    return_distances: also return the `[N, K]` distances (this materialises them).
    The keyword-only codebook options (`codebook_init`, `dead_code_threshold`, ...): see
      `CodebookOptions`.
  """

  num_embeddings: int
  embedding_dim: int
  commitment_cost: float = 0.25
  axis_name: Optional[str] = None
  distance_chunk_size: Optional[int] = None
  return_encodings: bool = False
  return_distances: bool = False

  def __post_init__(self):
    self._check_common_fields()
    super().__post_init__()

  def setup(self):
    limit = 1.0 / self.num_embeddings
    shape = (self.num_embeddings, self._code_dim)
    self.embedding = self.param(
        'embedding',
        lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -limit, limit), shape)
    self._setup_codebook_options(needs_counter=self._has_codebook_state)
    if self._writes_codes:
      self.codebook_offset = self.variable('batch_stats', 'codebook_offset', jnp.zeros, shape,
                                           jnp.float32)

  @property
  def has_training_state(self) -> bool:
    """Whether `train=True` updates `batch_stats`."""
    return self._has_codebook_state

  def _codebook_loss(self, latents: Array, codes: Array,
                     row_mask: Optional[Array] = None) -> Array:
    q_latent = _mse(codes, lax.stop_gradient(latents), row_mask)
    e_latent = _mse(lax.stop_gradient(codes), latents, row_mask)
    return q_latent + self.commitment_cost * e_latent

  def _update_codebook(self, latents, indices, code_counts, step) -> None:
    """The optimizer trains this codebook: nothing to do here."""
    del latents, indices, code_counts, step

  def _write_codes(self, mask: Array, new_codes: Array, sizes: Array, step: Array) -> None:
    """Makes code `k` equal `new_codes[k]` where `mask[k]`, through the offset.

    `stop_gradient` on the param: the offset is a constant, so `d code / d embedding = I`.
    """
    del sizes, step  # the plain codebook has no cluster sizes
    offset = new_codes - lax.stop_gradient(self.embedding)
    self.codebook_offset.value = jnp.where(mask[:, None], offset, self.codebook_offset.value)

  @property
  def codebook(self) -> Array:
    """The `[K, C]` codebook in use: `embedding (+ codebook_offset)`, unit rows if cosine."""
    stored = self.embedding
    if self._writes_codes:
      stored = stored + self.codebook_offset.value
    return self._codes_in_use(stored)


class VectorQuantizerEMA(_VectorQuantizerBase):
  """The seed's `VectorQuantizerEMA`: codes are exponential moving averages of their inputs.

  State, all float32 in the mutable `batch_stats` collection (`C = codebook_dim or D`):
    * `embedding` `[K, C]`: the codebook, initialised N(0, 1) as in the seed.
    * `ema_cluster_size` `[K]`: EMA of how many inputs chose each code; zeros at the start.
    * `ema_w` `[K, C]`: EMA of the sum of the inputs that chose each code. The seed initialises
      it N(0, 1), independently of the codebook; with `zero_debias=True` it starts at zeros.
    * `counter` `[]` int32: number of updates; with `zero_debias=True` or any state-keeping
      codebook option.
    * `code_usage` `[K]`: with `track_usage` or `dead_code_threshold > 0` (see
      `VectorQuantizer`).

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

  When the k-means init or a restart sets code `k` to a vector `v` with cluster size `n`
  (the k-means cluster's count, or `dead_code_threshold`), `embedding[k] = v` and the stored
  `ema_cluster_size[k]`, `ema_w[k]` are set as if `n` vectors equal to `v` had been averaged
  (`n` and `n v`, times `1 - decay^counter` when zero-debiased), so the next EMA update starts
  from `v` instead of undoing the change.

  `loss = commitment_cost * mean((sg(codes) - inputs)^2)`: the codebook gets no gradient.
  With `train=False` nothing changes.

  Attributes:
    num_embeddings: K, the number of codes.
    embedding_dim: D, the inputs' last dimension.
    commitment_cost: beta.
    decay: the EMA decay, in [0, 1).
    epsilon: the Laplace smoothing constant.
    zero_debias: use the zero-debiased EMA of Sonnet and Haiku (recommended for new runs).
    axis_name: inside `shard_map`/`pmap`, the batch axis to sum counts and EMA sums over.
    distance_chunk_size: see `VectorQuantizer`.
    return_encodings: also return the `[N, K]` one-hot encodings.
    return_distances: also return the `[N, K]` distances.
    The keyword-only codebook options: see `CodebookOptions`.
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
    self._check_common_fields()
    check_number('decay', self.decay, 0, 1, high_open=True)
    check_number('epsilon', self.epsilon, 0)
    super().__post_init__()

  def setup(self):
    shape = (self.num_embeddings, self._code_dim)
    self.embedding = self.variable(
        'batch_stats', 'embedding',
        lambda: jax.random.normal(self.make_rng('params'), shape, jnp.float32))
    self.ema_cluster_size = self.variable(
        'batch_stats', 'ema_cluster_size', jnp.zeros, (self.num_embeddings,), jnp.float32)
    if self.zero_debias:
      self.ema_w = self.variable('batch_stats', 'ema_w', jnp.zeros, shape, jnp.float32)
    else:
      self.ema_w = self.variable(
          'batch_stats', 'ema_w',
          lambda: jax.random.normal(self.make_rng('params'), shape, jnp.float32))
    self._setup_codebook_options(needs_counter=self.zero_debias or self._has_codebook_state)

  @property
  def has_training_state(self) -> bool:
    """Always: `train=True` updates the EMA."""
    return True

  def _codebook_loss(self, latents: Array, codes: Array,
                     row_mask: Optional[Array] = None) -> Array:
    return self.commitment_cost * _mse(lax.stop_gradient(codes), latents, row_mask)

  def _stored_size_scale(self, step: Array) -> Array:
    """What the stored `ema_cluster_size`/`ema_w` are multiplied by relative to the debiased
    values: `1 - decay^step` when zero-debiased (they hold the raw EMAs), else 1."""
    if not self.zero_debias:
      return jnp.float32(1.0)
    return 1 - jnp.asarray(self.decay, jnp.float32)**step.astype(jnp.float32)

  def _update_codebook(self, latents: Array, indices: Array, code_counts: Array,
                       step: Optional[Array]) -> None:
    """The EMA update (see the class docstring); `step` is the counter after this call."""
    code_sums = jax.ops.segment_sum(latents, indices, num_segments=self.num_embeddings)
    if self.axis_name is not None:
      code_sums = lax.psum(code_sums, self.axis_name)
    decay, eps, k = self.decay, self.epsilon, self.num_embeddings
    cluster_size = self.ema_cluster_size.value * decay + (1 - decay) * code_counts
    ema_w = self.ema_w.value * decay + (1 - decay) * code_sums
    if self.zero_debias:
      self.ema_cluster_size.value = cluster_size
      self.ema_w.value = ema_w
      debias = self._stored_size_scale(step)
      cluster_size, ema_w = cluster_size / debias, ema_w / debias
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    if not self.zero_debias:
      self.ema_cluster_size.value = smoothed
      self.ema_w.value = ema_w
    averaged = ema_w / smoothed[:, None]
    if self.codebook_init == 'kmeans':
      # A k-means centre whose cluster caught no vector has no sums to average (its `ema_w`
      # is zero, and so is every later one until a vector picks it): it keeps its centre
      # instead of becoming 0 / epsilon. With the seed's init this never applies: its `ema_w`
      # starts random, and the seed divides it however small the cluster.
      averaged = jnp.where(jnp.any(ema_w != 0, axis=1, keepdims=True), averaged,
                           self.embedding.value)
    self.embedding.value = averaged

  def _write_codes(self, mask: Array, new_codes: Array, sizes: Array, step: Array) -> None:
    """Sets code `k` to `new_codes[k]` with cluster size `sizes[k]` where `mask[k]`."""
    stored_sizes = sizes * self._stored_size_scale(step)
    rows = mask[:, None]
    self.embedding.value = jnp.where(rows, new_codes, self.embedding.value)
    self.ema_cluster_size.value = jnp.where(mask, stored_sizes, self.ema_cluster_size.value)
    self.ema_w.value = jnp.where(rows, new_codes * stored_sizes[:, None], self.ema_w.value)

  @property
  def codebook(self) -> Array:
    """The `[K, C]` codebook in use (unit rows if `cosine_codes`)."""
    return self._codes_in_use(self.embedding.value)


# Rows whose unit latent and unit code sum to less than this (an angle within 0.06 degrees of
# 180) have no well-defined rotation: the rotation plane, spanned by `e^ + q^`, is lost in
# float32 rounding (`r` would be off by about 1e-7 * sqrt(C) / |e^ + q^|).
ROTATION_ANTIPODAL_TOLERANCE = 1e-3


def _norm_and_direction(x: Array) -> Tuple[Array, Array]:
  """`(|x|, x / |x|)` per row, without overflow or underflow: `sqrt(sum(x^2))` overflows in
  float32 from |x| ~ 1e19 and underflows below ~1e-19, so each row is first scaled by the power
  of two nearest its largest magnitude (`ldexp`, exact; a division by the magnitude itself
  is what XLA may rewrite, and its constant folding then gave NaN at 1e25). A zero row (or a
  subnormal one, which XLA:CPU flushes to zero) gives norm 0 and direction 0."""
  _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
  scaled = jnp.ldexp(x, -exponent)
  scaled_norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=-1, keepdims=True))
  direction = scaled / jnp.where(scaled_norm > 0, scaled_norm, 1.0)
  return jnp.ldexp(scaled_norm, exponent), direction


def rotation_trick(latents: Array, codes: Array) -> Array:
  """The codes, with the rotation trick's gradient to the latents (Fifty et al. 2024,
  "Restructuring Vector Quantization with the Rotation Trick", section 4.2 and Algorithm 1:
  the Householder form, as `get_very_efficient_rotation` in the authors' cfifty/rotation_trick).

  With `e` a latent (a row), `q` its code, `e^ = e/|e|`, `q^ = q/|q|`,
  `r = (e^ + q^)/|e^ + q^|` and `lambda = |q|/|e|`, the rotation

      R = I - 2 r r^T + 2 q^ e^^T

  maps `e^` to `q^` (so `lambda R e = q`) and is the identity on the complement of the plane
  of `e` and `q`. The output is computed as

      sg(lambda) * (e - 2 r (r . e) + 2 q^ (e^ . e))     with r, q^, e^ stop-gradient,

  so `lambda` and `R` are constants and the gradient a loss sends to `e` is `lambda R^T g`
  (the gradient of `<g, lambda R e>`), where the straight-through estimator sends `g`. The
  forward value is `q` exactly: the output is `sg(q) + (x - sg(x))` with `x` the rotated
  latent, so rounding in the rotation never changes it (the seed's straight-through
  `e + sg(q - e)` can be an ulp off `q`). The codes get no gradient from this output.

  Degenerate rows fall back to the straight-through gradient (`g` itself): `e = 0` or `q = 0`
  (no direction to rotate), `e^ = -q^` up to `|e^ + q^| < ROTATION_ANTIPODAL_TOLERANCE` (no
  unique rotation plane), or `lambda` not finite. Their constants are set so that the
  rotated latent is `e` itself: no NaN or infinity reaches the value or the gradient.

  Args:
    latents: float32 `[N, C]`, the vectors that were quantized.
    codes: float32 `[N, C]`, their codes.

  Returns:
    float32 `[N, C]`: `codes` in value.
  """
  codes = lax.stop_gradient(codes)
  e_norm, e_hat = _norm_and_direction(lax.stop_gradient(latents))
  q_norm, q_hat = _norm_and_direction(codes)
  bisector = e_hat + q_hat
  bisector_norm = jnp.sqrt(jnp.sum(bisector * bisector, axis=-1, keepdims=True))
  scale = q_norm / jnp.where(e_norm > 0, e_norm, 1.0)
  degenerate = ((e_norm == 0) | (q_norm == 0) | ~jnp.isfinite(scale) |
                (bisector_norm < ROTATION_ANTIPODAL_TOLERANCE))
  # The straight-through constants in degenerate rows: R = I, lambda = 1.
  scale = jnp.where(degenerate, 1.0, scale)
  r = jnp.where(degenerate, 0.0, bisector / jnp.where(degenerate, 1.0, bisector_norm))
  q_hat = jnp.where(degenerate, 0.0, q_hat)
  e_hat = jnp.where(degenerate, 0.0, e_hat)
  dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
  rotated = scale * (latents - 2 * r * dot(r, latents) + 2 * q_hat * dot(e_hat, latents))
  return codes + (rotated - lax.stop_gradient(rotated))


def merge_codebook_offset(variables: Mapping[str, Any],
                          path: Tuple[str, ...] = ('vq',)) -> Dict[str, Any]:
  """Folds a plain quantizer's `codebook_offset` into its `params` codebook, for export.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of a model (or of a quantizer, `path=()`).
    path: where the quantizer sits in both collections (`('vq',)` in `VQVAE`).

  Returns:
    New nested dicts with `params[path]['embedding'] + codebook_offset` as the embedding and
    the offset zeroed, so the codes in use are unchanged; the variables as they are if they
    hold no offset.
  """
  flat = traverse_util.flatten_dict(dict(variables))
  offset_key = ('batch_stats', *path, 'codebook_offset')
  if offset_key not in flat:
    return dict(variables)
  embedding_key = ('params', *path, 'embedding')
  flat[embedding_key] = flat[embedding_key] + flat[offset_key]
  flat[offset_key] = jnp.zeros_like(flat[offset_key])
  return traverse_util.unflatten_dict(flat)
