"""Codebook arithmetic shared by the quantizers: distances, k-means, global sampling, usage.

Pure functions of arrays, with no Flax state, so that they can be tested and reused alone:

  * `squared_distances`, `nearest_code`: the seed's L2 lookup.
  * `kmeans`: k-means++ seeding and Lloyd iterations, jit-compatible, for data-dependent
    codebook initialisation.
  * `sample_global_rows`: rows drawn from the global batch, the same on every device, for
    dead-code restarts and k-means inside `shard_map`.
  * `update_usage`: the zero-debiased EMA of per-code counts that decides which codes are dead.
  * `perplexity_from_counts`, `num_codes_used`, `usage_metrics`: code-usage metrics; apply
    `usage_metrics` to counts summed over a whole split, since the perplexity of one batch
    is bounded by its size.

Everything that decides a code or counts one is float32.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from vqvae_jax import blocks, xla_cpu

Array = jax.Array

# float32 matmuls at full precision: TPUs and GPUs otherwise run them in bf16 / tf32 passes.
_HIGHEST = lax.Precision.HIGHEST


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


def nearest_in_distances(distances: Array) -> Array:
  """int32 `[N]`: each row's nearest code in `[N, K]` distances, as `argmin` picks it.

  The first index wins ties, and a row with a NaN gets its first NaN, as with `jnp.argmin`.
  XLA:CPU gets the same indices in a form it runs faster (`xla_cpu.argmin_rows`).
  """
  return lax.platform_dependent(
      distances, cpu=xla_cpu.argmin_rows,
      default=lambda d: jnp.argmin(d, axis=1).astype(jnp.int32))


def nearest_code(flat_inputs: Array, codebook: Array, chunk_size: Optional[int] = None) -> Array:
  """Index of the nearest code for each row, as the seed's argmin picks it (first on ties).

  Args:
    flat_inputs: `[N, D]`.
    codebook: `[K, D]`.
    chunk_size: if set and smaller than `N`, rows are processed `chunk_size` at a time in a
      loop (`blocks.map_over_blocks` on every backend: its strided blocks keep a sharded batch
      on its devices), so at most `[chunk_size, K]` distances exist at once. This is what lets
      K = 65,536 codes search a million vectors. The indices are the same as without chunks:
      each row's arithmetic is unchanged. Unset, XLA:CPU still works in blocks of 2,048 rows
      (faster there, see `xla_cpu.search_in_blocks`); other backends search all rows at once.

  Returns:
    int32 `[N]`.
  """
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f'chunk_size must be None or an integer >= 1, got {chunk_size!r}.')

  def search(rows):
    return nearest_in_distances(squared_distances(rows, codebook))

  if chunk_size is not None:
    return blocks.map_over_blocks(search, (flat_inputs,), chunk_size)
  return lax.platform_dependent(
      flat_inputs, cpu=functools.partial(xla_cpu.search_in_blocks, search), default=search)


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """`x / max(|x|, eps)` along `axis`, float32: unit vectors for cosine codes."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def perplexity_from_counts(code_counts: Array) -> Array:
  """The seed's perplexity, `exp(-sum p log(p + 1e-10))` with `p = counts / sum(counts)`.

  Args:
    code_counts: `[K]` non-negative counts (one batch, or summed over a split).

  Returns:
    float32 scalar in `[1, K]`.
  """
  probs = code_counts / jnp.sum(code_counts)
  return jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))


def num_codes_used(code_counts: Array) -> Array:
  """Number of codes with a non-zero count, int32 scalar."""
  return jnp.sum(code_counts > 0).astype(jnp.int32)


def usage_metrics(code_counts: Array) -> Dict[str, Array]:
  """Split-level codebook metrics from counts accumulated over many batches.

  Sum `QuantizerOutput.code_counts` over every batch of a split, then call this once: the
  perplexity of a single batch of `N` vectors can never exceed `N` (haiku #577).

  Args:
    code_counts: `[K]` counts summed over the split.

  Returns:
    A dict of scalars: `codes_used` (int32, codes chosen at least once), `dead_codes`
    (int32, `K - codes_used`), `perplexity` (float32, `exp` of the usage entropy) and
    `usage_fraction` (float32, `codes_used / K`).
  """
  used = num_codes_used(code_counts)
  size = code_counts.shape[0]
  return {'codes_used': used,
          'dead_codes': jnp.int32(size) - used,
          'perplexity': perplexity_from_counts(code_counts.astype(jnp.float32)),
          'usage_fraction': used.astype(jnp.float32) / size}


def update_usage(code_usage: Array, code_counts: Array, decay: float, step: Array) -> Array:
  """One step of the zero-debiased EMA of per-code counts.

  The stored value is already debiased, so it reads directly as "vectors per batch": after
  the first step it equals that step's counts instead of `(1 - decay) * counts`, which would
  make every code look dead at the start. With `h_t = decay h_{t-1} + (1 - decay) c_t` from
  `h_0 = 0` and `u_t = h_t / (1 - decay^t)`:

      u_t = (decay (1 - decay^(t-1)) u_{t-1} + (1 - decay) c_t) / (1 - decay^t)

  Args:
    code_usage: float32 `[K]`, `u_{t-1}` (zeros before the first step).
    code_counts: float32 `[K]`, this step's counts `c_t`.
    decay: in `[0, 1)`.
    step: int32 scalar, `t >= 1`.

  Returns:
    float32 `[K]`, `u_t`.
  """
  decay = jnp.asarray(decay, jnp.float32)
  t = step.astype(jnp.float32)
  previous_weight = decay * (1 - decay**(t - 1))
  return (previous_weight * code_usage + (1 - decay) * code_counts) / (1 - decay**t)


def global_row_count(num_local_rows: int, axis_name: Optional[str]) -> int:
  """Rows in the global batch when each device holds `num_local_rows` (static)."""
  if axis_name is None:
    return num_local_rows
  return num_local_rows * lax.axis_size(axis_name)


def sample_global_rows(key: Array, rows: Array, num_samples: int,
                       axis_name: Optional[str] = None) -> Array:
  """`num_samples` rows drawn uniformly from the global batch, identical on every device.

  Without `axis_name` (one device, or `jax.jit` over a sharded batch) this is `rows[idx]`.
  Inside `shard_map` each device holds one equal slice of the global batch, in axis order;
  all devices draw the same global indices from the same `key`, each contributes the rows it
  owns and zeros elsewhere, and a `psum` of the `[num_samples, D]` result gives every device
  the same rows as one device would pick from the whole batch. Only `num_samples` rows cross
  devices, never the whole batch.

  Rows are drawn without replacement when the global batch has at least `num_samples` rows,
  so that restarted codes are distinct; with replacement otherwise.

  Args:
    key: a PRNG key, the same on every device.
    rows: `[n, D]`, this device's rows (`n * num_devices` rows in the global batch).
    num_samples: how many rows to return.
    axis_name: the `shard_map` axis the batch is split over, or None.

  Returns:
    `[num_samples, D]`, the dtype of `rows`.
  """
  num_local = rows.shape[0]
  num_global = global_row_count(num_local, axis_name)
  global_index = jax.random.choice(key, num_global, (num_samples,),
                                   replace=num_samples > num_global)
  if axis_name is None:
    return jnp.take(rows, global_index, axis=0)
  local_index = global_index - lax.axis_index(axis_name) * num_local
  owned = (local_index >= 0) & (local_index < num_local)
  picked = jnp.take(rows, jnp.clip(local_index, 0, num_local - 1), axis=0)
  return lax.psum(jnp.where(owned[:, None], picked, jnp.zeros_like(picked)), axis_name)


def kmeans_plus_plus(key: Array, points: Array, num_clusters: int) -> Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is a point drawn with
  probability proportional to its squared distance to the nearest centre chosen so far.

  Once every distinct point is a centre (fewer points than clusters), the rest are drawn
  uniformly.

  Args:
    key: a PRNG key.
    points: float32 `[N, D]`.
    num_clusters: K.

  Returns:
    float32 `[K, D]`, each row one of `points`.
  """
  points = points.astype(jnp.float32)
  num_points = points.shape[0]
  keys = jax.random.split(key, num_clusters)
  first = jax.random.randint(keys[0], (), 0, num_points)
  centres = jnp.zeros((num_clusters, points.shape[1]), jnp.float32).at[0].set(points[first])
  nearest = jnp.sum((points - points[first])**2, axis=1)

  def add_centre(i, carry):
    centres, nearest = carry
    total = jnp.sum(nearest)
    probs = jnp.where(total > 0, nearest / jnp.where(total > 0, total, 1.0), 1.0 / num_points)
    chosen = points[jax.random.choice(keys[i], num_points, p=probs)]
    nearest = jnp.minimum(nearest, jnp.sum((points - chosen)**2, axis=1))
    return centres.at[i].set(chosen), nearest

  centres, _ = lax.fori_loop(1, num_clusters, add_centre, (centres, nearest))
  return centres


def kmeans(key: Array, points: Array, num_clusters: int, num_iters: int,
           normalize: bool = False) -> Tuple[Array, Array]:
  """k-means++ seeding followed by `num_iters` Lloyd iterations; jit-compatible.

  A cluster that loses all its points keeps its centre. With `normalize=True` the centres
  are projected back onto the unit sphere after every iteration (spherical k-means, for
  cosine codes; `points` should then be unit vectors).

  Args:
    key: a PRNG key.
    points: `[N, D]`, any float dtype.
    num_clusters: K.
    num_iters: Lloyd iterations, `>= 0`.
    normalize: spherical k-means.

  Returns:
    `(centres, counts)`: float32 `[K, D]` and float32 `[K]`, how many points are nearest to
    each returned centre.
  """
  points = points.astype(jnp.float32)

  def assign(centres):
    indices = nearest_code(points, centres)
    counts = jnp.zeros((num_clusters,), jnp.float32).at[indices].add(1.0)
    return indices, counts

  def lloyd_step(_, centres):
    indices, counts = assign(centres)
    sums = jax.ops.segment_sum(points, indices, num_segments=num_clusters)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    if normalize:
      means = l2_normalize(means)
    return jnp.where(counts[:, None] > 0, means, centres)

  centres = lax.fori_loop(0, num_iters, lloyd_step, kmeans_plus_plus(key, points, num_clusters))
  return centres, assign(centres)[1]


def batch_usage_entropy_loss(distances: Array, temperature: float,
                             axis_name: Optional[str] = None) -> Array:
  """`log K - H(mean_n softmax(-distances_n / temperature))`: a code-diversity penalty.

  The soft assignment of each vector is a softmax over its negative distances; their mean
  over the (global) batch is a differentiable estimate of code usage. Its entropy is at most
  `log K`, reached when every code is used equally, so the penalty is >= 0 and 0 only for
  uniform usage. Its gradient pulls the codebook and the inputs towards spreading the batch
  over more codes, including codes that no vector currently picks.

  Args:
    distances: float32 `[N, K]` squared distances.
    temperature: > 0; smaller is closer to the hard assignment.
    axis_name: inside `shard_map`, the batch axis to average the soft usage over.

  Returns:
    float32 scalar.
  """
  soft_assignments = jax.nn.softmax(-distances.astype(jnp.float32) / temperature, axis=1)
  usage_sum = jnp.sum(soft_assignments, axis=0)
  num_rows = jnp.float32(distances.shape[0])
  if axis_name is not None:
    usage_sum, num_rows = lax.psum((usage_sum, num_rows), axis_name)
  usage = usage_sum / num_rows
  entropy = -jnp.sum(usage * jnp.log(usage + 1e-10))
  return jnp.log(jnp.float32(distances.shape[1])) - entropy
