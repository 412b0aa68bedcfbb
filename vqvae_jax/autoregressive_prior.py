"""A prior over code grids: a causal transformer that generates VQ-VAE codes in raster order.

The VQ-VAE paper fits an autoregressive prior (a PixelCNN) over the code grids of a trained
VQ-VAE and decodes its samples into new images; VQGAN and DALL-E use a causal transformer.
`CodePrior` is the transformer: for a grid of `h x w` codes it reads, at position `t`, the code
of position `t - 1` (a start token, or the class token, at `t = 0`) plus a 2-D embedding of the
position `t` it predicts, and returns logits over the `K` codes.

    prior = CodePrior(num_embeddings=512, grid_shape=(8, 8))
    params = prior.init(key, codes)['params']                      # codes: int [B, 8, 8]
    logits = prior.apply({'params': params}, codes)                # [B, 64, 512], float32
    bits = prior.apply({'params': params}, codes, method=CodePrior.bits_per_code)   # [B]
    samples = sample(prior, params, key, num_samples=64, temperature=1.0)          # [64, 8, 8]
    images = vqvae.apply(vqvae_variables, samples, method=VQVAE.decode)

`sample` is one jitted function: it keeps each layer's keys and values in a cache and runs the
`h * w` steps in a `lax.fori_loop`, so each step costs one position, not the whole prefix.
Sampling is a pure function of the key: every example draws from its own key
(`fold_in(key, example)`, then `fold_in(., position)`), so a batch split over devices samples
exactly what one device does.

Numerics: the layers compute in `dtype` (e.g. bfloat16); layer norms, attention softmax,
logits and losses are float32.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from vqvae_jax.quantizer_api import check_codes as check_code_values

Array = jax.Array
Dtype = Any
PyTree = Any


class _CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention, teacher-forced or one position at a time with a cache.

  The cache (`cache` collection): `cached_key` and `cached_value` `[B, L, heads, head_dim]` in `dtype`.
  """

  num_heads: int
  max_length: int
  dtype: Dtype
  dropout: float

  @nn.compact
  def __call__(self, x: Array, train: bool, position: Optional[Array] = None) -> Array:
    """`x` `[B, T, W]` -> `[B, T, W]`.

    With `position` (an int32 scalar), `x` is the single position `[B, 1, W]` at that index:
    its key and value are written into the cache, and it attends to the cached positions
    `<= position`. Without it, `x` is positions `0 .. T-1` and attends causally.
    """
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype)
    query, key, value = (dense((self.num_heads, head_dim), name=name)(x)
                         for name in ('query', 'key', 'value'))
    if position is None:
      key_positions = jnp.arange(length)
      query_positions = jnp.arange(length)
    else:
      cached_key = self.variable('cache', 'cached_key', jnp.zeros,
                                 (batch, self.max_length, self.num_heads, head_dim), key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                   (batch, self.max_length, self.num_heads, head_dim),
                                   value.dtype)
      start = (0, position, 0, 0)
      cached_key.value = lax.dynamic_update_slice(cached_key.value, key, start)
      cached_value.value = lax.dynamic_update_slice(cached_value.value, value, start)
      key, value = cached_key.value, cached_value.value
      key_positions = jnp.arange(self.max_length)
      query_positions = position[None]
    # float32 scores and softmax: bfloat16 logits over hundreds of positions lose the ranking.
    scores = jnp.einsum('bqhd,bkhd->bhqk', query, key,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    causal = key_positions[None, :] <= query_positions[:, None]
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = nn.Dropout(self.dropout, deterministic=not train)(jax.nn.softmax(scores))
    out = jnp.einsum('bhqk,bkhd->bqhd', weights.astype(self.dtype), value)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name='out')(out)


class _Block(nn.Module):
  """Pre-norm transformer block: `x + attention(norm(x))`, then `x + mlp(norm(x))`."""

  num_heads: int
  max_length: int
  mlp_ratio: int
  dtype: Dtype
  dropout: float

  @nn.compact
  def __call__(self, x: Array, train: bool, position: Optional[Array] = None) -> Array:
    width = x.shape[-1]
    drop = nn.Dropout(self.dropout, deterministic=not train)
    y = nn.LayerNorm(dtype=jnp.float32, name='attention_norm')(x)
    y = _CausalSelfAttention(self.num_heads, self.max_length, self.dtype, self.dropout,
                             name='attention')(y.astype(self.dtype), train, position)
    x = x + drop(y).astype(jnp.float32)
    y = nn.LayerNorm(dtype=jnp.float32, name='mlp_norm')(x).astype(self.dtype)
    y = nn.Dense(self.mlp_ratio * width, dtype=self.dtype, name='mlp_in')(y)
    y = nn.Dense(width, dtype=self.dtype, name='mlp_out')(nn.gelu(y))
    return x + drop(y).astype(jnp.float32)


class CodePrior(nn.Module):
  """An autoregressive prior over int code grids `[B, h, w]`: a causal transformer, raster order.

  Attributes:
    num_embeddings: K, the VQ-VAE's codebook size; codes are in `[0, K)`.
    grid_shape: `(h, w)`, the code grid the prior models (the VQ-VAE's `H/4, W/4`).
    width: model width.
    depth: number of transformer blocks.
    num_heads: attention heads; must divide `width`.
    mlp_ratio: hidden size of each block's MLP, in multiples of `width`.
    dropout: dropout rate on attention weights and on each residual branch, in training.
    num_classes: None for an unconditional prior; else the number of labels, and every grid
      starts from its label's token instead of the start token.
    label_dropout: with `num_classes`, the probability that a training example's label is
      replaced by the "no label" token. A prior trained with it also models the codes without
      a label, which `sample(..., guidance_scale=...)` needs for classifier-free guidance.
    dtype: computation dtype of the layers, e.g. `jnp.bfloat16`. Parameters, layer norms,
      the attention softmax, logits and losses are float32.

  Training calls with `dropout > 0` or `label_dropout > 0` need `rngs={'dropout': key}`.
  """

  num_embeddings: int
  grid_shape: Tuple[int, int]
  width: int = 256
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  dropout: float = 0.0
  num_classes: Optional[int] = None
  label_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name in ('num_embeddings', 'width', 'depth', 'num_heads', 'mlp_ratio'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'CodePrior.{name} must be a positive integer, got {value!r}.')
    grid = tuple(self.grid_shape) if isinstance(self.grid_shape, (tuple, list)) else ()
    if len(grid) != 2 or not all(isinstance(n, int) and n >= 1 for n in grid):
      raise ValueError(f'CodePrior.grid_shape must be (h, w) with positive integers, got '
                       f'{self.grid_shape!r}.')
    object.__setattr__(self, 'grid_shape', grid)  # a list from a config becomes hashable
    if self.width % self.num_heads:
      raise ValueError(f'CodePrior.num_heads={self.num_heads} must divide width={self.width}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'CodePrior.dropout must be in [0, 1), got {self.dropout!r}.')
    if self.num_classes is not None and (not isinstance(self.num_classes, int) or
                                         self.num_classes < 1):
      raise ValueError(f'CodePrior.num_classes must be None or a positive integer, got '
                       f'{self.num_classes!r}.')
    if not 0.0 <= self.label_dropout < 1.0 or (self.label_dropout and self.num_classes is None):
      raise ValueError(f'CodePrior.label_dropout must be in [0, 1), and 0 without num_classes; '
                       f'got {self.label_dropout!r} with num_classes={self.num_classes!r}.')
    super().__post_init__()

  @property
  def length(self) -> int:
    """L = h * w, the number of codes in a grid."""
    return self.grid_shape[0] * self.grid_shape[1]

  @property
  def null_label(self) -> int:
    """The token index of "no label": the start token of unconditional grids."""
    return self.num_classes or 0

  def setup(self):
    init = nn.initializers.normal(0.02)
    self.code_embedding = nn.Embed(self.num_embeddings, self.width, embedding_init=init)
    # Start tokens: one per class plus "no label" (the only one without classes).
    self.start_embedding = nn.Embed(self.null_label + 1, self.width, embedding_init=init)
    self.row_embedding = self.param('row_embedding', init, (self.grid_shape[0], self.width))
    self.column_embedding = self.param('column_embedding', init,
                                       (self.grid_shape[1], self.width))
    self.embedding_dropout = nn.Dropout(self.dropout)
    self.blocks = [_Block(self.num_heads, self.length, self.mlp_ratio, self.dtype, self.dropout,
                          name=f'block_{i}') for i in range(self.depth)]
    self.final_norm = nn.LayerNorm(dtype=jnp.float32)
    self.head = nn.Dense(self.num_embeddings, dtype=jnp.float32)

  def _position_embedding(self, positions: Array) -> Array:
    """`[T]` raster positions -> `[T, width]`: row embedding + column embedding."""
    rows, columns = jnp.divmod(positions, self.grid_shape[1])
    return self.row_embedding[rows] + self.column_embedding[columns]

  def _start_tokens(self, batch: int, labels: Optional[Array], train: bool) -> Array:
    """The token index each grid starts from: its label, or "no label"."""
    if labels is None:
      return jnp.full((batch,), self.null_label, jnp.int32)
    labels = labels.astype(jnp.int32)
    if train and self.label_dropout > 0:
      dropped = jax.random.bernoulli(self.make_rng('dropout'), self.label_dropout, (batch,))
      labels = jnp.where(dropped, self.null_label, labels)
    return labels

  def _logits(self, x: Array, train: bool, position: Optional[Array] = None) -> Array:
    x = self.embedding_dropout(x, deterministic=not train)
    for block in self.blocks:
      x = block(x, train, position)
    return self.head(self.final_norm(x))

  def __call__(self, codes: Array, labels: Optional[Array] = None, train: bool = False
               ) -> Array:
    """Teacher-forced logits.

    Args:
      codes: int `[B, h, w]` code grids, values in `[0, K)`.
      labels: int `[B]` in `[0, num_classes)`, for a class-conditional prior; None otherwise.
        With `label_dropout`, `labels=None` asks for the unconditional ("no label") model.
      train: apply dropout and label dropout.

    Returns:
      float32 `[B, h*w, K]`: at position `t`, the logits of code `t` given codes `< t`.
    """
    codes = check_codes(self, codes)
    labels = check_labels(self, labels, codes.shape[0])
    return self.teacher_forced(codes, self._start_tokens(codes.shape[0], labels, train), train)

  def teacher_forced(self, codes: Array, start_tokens: Array, train: bool = False) -> Array:
    """`__call__` from the start tokens (labels, or `null_label`), unchecked."""
    batch = codes.shape[0]
    flat = codes.reshape(batch, self.length).astype(jnp.int32)
    start = self.start_embedding(start_tokens)[:, None]
    previous = self.code_embedding(flat[:, :-1])
    x = jnp.concatenate([start, previous], axis=1)
    x = x + self._position_embedding(jnp.arange(self.length))
    return self._logits(x, train)

  def bits_per_code(self, codes: Array, labels: Optional[Array] = None) -> Array:
    """Per-example negative log-likelihood in bits per code: float32 `[B]`.

    The mean over the grid's positions of `-log2 p(code_t | codes < t)`; its mean over a
    split is the prior's bits per code (`log2 K` for a uniform guess). Codes outside
    `[0, K)` are a ValueError, or, traced under jit, give NaN.
    """
    codes = check_codes(self, codes)
    logits = self(codes, labels)
    flat = codes.reshape(codes.shape[0], self.length)
    nats = cross_entropy(logits, flat)
    return jnp.mean(nats, axis=-1) / math.log(2)

  def decode_step(self, tokens: Array, position: Array) -> Array:
    """One position of sampling, with the cache (`mutable=['cache']`).

    Args:
      tokens: int32 `[B]`: at `position = 0` the start tokens (a label, or `null_label`);
        after it, the codes chosen at `position - 1`.
      position: int32 scalar, the position whose code is predicted.

    Returns:
      float32 `[B, K]` logits of the code at `position`. The cache holds the keys and values
      of positions `0 .. position` afterwards.
    """
    # Both lookups are clipped into range: the one not selected must not read past its table.
    embedding = jnp.where(position == 0,
                          self.start_embedding(jnp.minimum(tokens, self.null_label)),
                          self.code_embedding(jnp.minimum(tokens, self.num_embeddings - 1)))
    x = (embedding + self._position_embedding(position[None]))[:, None]
    return self._logits(x, train=False, position=position)[:, 0]


def cross_entropy(logits: Array, codes: Array) -> Array:
  """float32 `-log p(code)` per position: logits `[..., K]`, int codes `[...]` -> `[...]`.

  A code outside `[0, K)` gives NaN (a gather would wrap -1 to the last code's value).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  codes = codes.astype(jnp.int32)
  nats = -jnp.take_along_axis(log_probs, codes[..., None], axis=-1)[..., 0]
  return jnp.where((codes >= 0) & (codes < logits.shape[-1]), nats, jnp.nan)


# ---- Input checks: one clear ValueError (TypeError for a wrong dtype) naming the value. ----

def check_codes(prior: CodePrior, codes: Any, name: str = 'codes') -> Any:
  """Shape `[B, h, w]` (the trained grid) and `vqvae_jax.quantizer_api.check_codes`' contract:
  an integer dtype (else TypeError) and, if concrete, values in [0, K) (else ValueError).

  Returns:
    `codes` as an array (a list or a tuple becomes one).
  """
  shape = tuple(np.shape(codes))
  if len(shape) != 3 or shape[1:] != prior.grid_shape:
    raise ValueError(f'{name} must have shape [B, {prior.grid_shape[0]}, {prior.grid_shape[1]}] '
                     f'(the grid the prior was built for), got shape {shape}.')
  return check_code_values(codes, prior.num_embeddings, f'CodePrior {name}')


def check_labels(prior: CodePrior, labels: Any, batch: Optional[int] = None) -> Any:
  """None, or int `[B]` in `[0, num_classes)` for a conditional prior; returns them as an array."""
  if labels is None:
    return None
  if prior.num_classes is None:
    raise ValueError('labels were given, but this prior is unconditional (num_classes=None); '
                     'accepted: labels=None.')
  labels = labels if hasattr(labels, 'dtype') else np.asarray(labels)
  shape = tuple(np.shape(labels))
  if len(shape) != 1 or (batch is not None and shape[0] != batch):
    raise ValueError(f'labels must have shape [B] ({batch if batch is not None else "B"} '
                     f'examples), got shape {shape}; accepted: one integer label per example.')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f'labels must be integers, got dtype {labels.dtype}.')
  if not isinstance(labels, jax.core.Tracer) and labels.size:
    values = np.asarray(labels)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= prior.num_classes:
      raise ValueError(f'labels holds {low if low < 0 else high}; accepted: integers in '
                       f'[0, {prior.num_classes}).')
  return labels


def _number(value: Any, name: str, accepted: str, integer: bool = False) -> Any:
  """`value` as a Python float (or int): a finite real number, numpy scalars included."""
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind) or \
      not math.isfinite(value):
    raise ValueError(f'{name} must be {accepted}, got {value!r}.')
  return int(value) if integer else float(value)


# ---- Sampling. ----

def filter_logits(logits: Array, top_k: Optional[int] = None, top_p: Optional[Array] = None
                  ) -> Array:
  """Sets to -inf every logit outside the `top_k` largest and outside the nucleus `top_p`.

  The nucleus is the smallest set of the most likely codes whose probabilities sum to at least
  `top_p`; the most likely code is always kept (so `top_p <= 0` keeps only it), and so are
  codes tied with the last one kept; `top_p >= 1` keeps every code.
  `logits` float32 `[B, K]`.
  """
  if top_k is not None:
    kth_largest = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p is not None:
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The least likely code kept: the last whose predecessors' mass is below top_p.
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    # A float32 cumulative sum can reach 1 before the last code: top_p >= 1 must keep all.
    kept = jnp.where(top_p >= 1, logits.shape[-1], jnp.maximum(kept, 1))
    threshold = jnp.take_along_axis(descending, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _draw(logits: Array, example_keys: Array, position: Array, temperature: Array,
          top_k: Optional[int], top_p: Optional[Array]) -> Array:
  """Codes `[B]` drawn from `logits` `[B, K]`, each example from its own key and position.

  The largest logit is subtracted before dividing by the temperature, and the temperature is
  at least float32's smallest normal number: as it goes to 0, the draw goes to the argmax
  instead of overflowing (`x / 1e-40` is `inf` or NaN in float32).
  """
  temperature = jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
  shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
  logits = filter_logits(shifted / temperature, top_k, top_p)
  keys = jax.vmap(lambda k: jax.random.fold_in(k, position))(example_keys)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('prior', 'num_samples', 'top_k', 'use_top_p',
                                             'guided', 'use_cache', 'prefix_length',
                                             'batch_sharding'))
def _sample(prior: CodePrior, params: PyTree, key: Array, labels: Optional[Array],
            temperature: Array, top_p: Array, guidance_scale: Array, prefix: Array, *,
            num_samples: int, top_k: Optional[int], use_top_p: bool, guided: bool,
            use_cache: bool, prefix_length: int, batch_sharding=None) -> Array:
  length = prior.length
  on_batch = (lambda x: x) if batch_sharding is None else (
      lambda x: lax.with_sharding_constraint(x, batch_sharding))
  example_keys = on_batch(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_samples)))
  start = on_batch(jnp.full((num_samples,), prior.null_label, jnp.int32) if labels is None
                   else labels.astype(jnp.int32))
  if guided:  # the conditional and the unconditional model side by side, in one batch
    start = jnp.concatenate([start, jnp.full_like(start, prior.null_label)])
  variables = {'params': params}

  def guide(logits):
    if not guided:
      return logits
    conditional, unconditional = jnp.split(logits, 2)
    return unconditional + guidance_scale * (conditional - unconditional)

  def choose(logits, position, codes):
    drawn = _draw(guide(logits), example_keys, position, temperature, top_k,
                  top_p if use_top_p else None)
    given = prefix[:, jnp.minimum(position, prefix.shape[1] - 1)]
    return jnp.where(position < prefix_length, given, drawn)

  codes = on_batch(jnp.zeros((num_samples, length), jnp.int32))
  if use_cache:
    cache = jax.eval_shape(lambda: prior.apply(variables, start, jnp.int32(0),
                                               method=CodePrior.decode_step,
                                               mutable=['cache'])[1]['cache'])
    cache = jax.tree.map(lambda s: on_batch(jnp.zeros(s.shape, s.dtype)), cache)

    def step(position, carry):
      codes, tokens, cache = carry
      logits, updated = prior.apply({**variables, 'cache': cache}, tokens, position,
                                    method=CodePrior.decode_step, mutable=['cache'])
      chosen = choose(logits, position, codes)
      tokens = jnp.concatenate([chosen, chosen]) if guided else chosen
      return codes.at[:, position].set(chosen), tokens, updated['cache']

    codes, _, _ = lax.fori_loop(0, length, step, (codes, start, cache))
  else:
    def step(position, codes):
      # The whole prefix again at every position: the reference the cache is checked against.
      grids = jnp.concatenate([codes, codes]) if guided else codes
      logits = prior.apply(variables, grids.reshape(-1, *prior.grid_shape), start,
                           method=CodePrior.teacher_forced)
      logits = lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False)
      return codes.at[:, position].set(choose(logits, position, codes))

    codes = lax.fori_loop(0, length, step, codes)
  return codes.reshape(num_samples, *prior.grid_shape)


def sample(prior: CodePrior, params: PyTree, key: Array, *, num_samples: Optional[int] = None,
           labels: Any = None, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, guidance_scale: Optional[float] = None,
           prefix: Any = None, use_cache: bool = True,
           batch_sharding: Optional[jax.sharding.Sharding] = None) -> Array:
  """Samples code grids from the prior: one jitted `fori_loop` over the `h * w` positions.

  Args:
    prior: the `CodePrior` the parameters belong to.
    params: its `params` collection.
    key: a PRNG key. The samples are a pure function of it: example `i` draws position `t`
      from `fold_in(fold_in(key, i), t)`, whatever the batch size or device layout.
    num_samples: B; may be omitted when `labels` or `prefix` give it.
    labels: int `[B]` in `[0, num_classes)` for a class-conditional prior; None draws from
      the unconditional model, which only a prior trained with `label_dropout > 0` has (for a
      conditional prior without it, None is a ValueError).
    temperature: a finite number > 0; logits are divided by it before filtering. As it goes
      to 0, the draw goes to the most likely code (greedy decoding).
    top_k: keep only the `top_k` most likely codes at each position (1 <= top_k <= K).
    top_p: keep only the nucleus of the most likely codes whose mass reaches `top_p`, in
      (0, 1]; 1 keeps every code, like None.
    guidance_scale: a finite number: classifier-free guidance with labels, logits
      `u + s * (c - u)` from the conditional `c` and unconditional `u` models (1 is the
      conditional model alone; larger follows the label more closely; 0 is the unconditional
      model). Needs a prior trained with `label_dropout > 0`.
    prefix: int `[B, P]` codes in raster order (`grid[:, :r].reshape(B, -1)` is the top `r`
      rows), `P <= h * w`: the first `P` codes are these, and the rest are sampled given them.
    use_cache: False recomputes the whole prefix at each position instead of using the cache;
      the samples are the same for the same key. For checks and benchmarks.
    batch_sharding: where the batch axis lives, e.g. `NamedSharding(mesh, P('data'))` to
      split the samples over devices (B a multiple of their number); None leaves it to jit.

  Returns:
    int32 `[B, h, w]` code grids, to decode with `VQVAE.decode`.
  """
  temperature = _number(temperature, 'temperature', 'a finite number > 0')
  if temperature <= 0:
    raise ValueError(f'temperature must be a finite number > 0, got {temperature!r}.')
  if top_p is not None:
    top_p = _number(top_p, 'top_p', 'a number in (0, 1]')
    if not 0 < top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1], got {top_p!r}.')
    top_p = None if top_p == 1 else top_p
  if top_k is not None:
    top_k = _number(top_k, 'top_k', f'an integer in [1, {prior.num_embeddings}] (K)', True)
    if not 1 <= top_k <= prior.num_embeddings:
      raise ValueError(f'top_k must be an integer in [1, {prior.num_embeddings}] (K), got '
                       f'{top_k!r}.')
  if guidance_scale is not None:
    guidance_scale = _number(guidance_scale, 'guidance_scale', 'a finite number')
  if num_samples is not None:
    num_samples = _number(num_samples, 'num_samples', 'an integer >= 1', True)
  labels = None if labels is None else (labels if hasattr(labels, 'dtype')
                                        else np.asarray(labels))
  prefix = None if prefix is None else (prefix if hasattr(prefix, 'dtype')
                                        else np.asarray(prefix))
  for name, value in (('labels', labels), ('prefix', prefix)):
    if value is not None and np.ndim(value) != (1 if name == 'labels' else 2):
      raise ValueError(f'{name} must have shape {"[B]" if name == "labels" else "[B, P]"}, got '
                       f'shape {tuple(np.shape(value))}.')
  sizes = {n for n in (num_samples, None if labels is None else len(labels),
                       None if prefix is None else len(prefix)) if n is not None}
  if len(sizes) != 1 or min(sizes) < 1:
    raise ValueError(f'num_samples={num_samples!r}, labels and prefix must agree on one batch '
                     f'size >= 1 (give at least one), got sizes {sorted(sizes)}.')
  batch = sizes.pop()
  labels = check_labels(prior, labels, batch)
  if labels is None and prior.num_classes and not prior.label_dropout:
    raise ValueError('labels=None asks for the unconditional model, which this conditional '
                     'prior never trained (label_dropout=0); accepted: labels, or a prior '
                     'trained with label_dropout > 0.')
  if guidance_scale is not None:
    if labels is None or not prior.label_dropout:
      raise ValueError(f'guidance_scale={guidance_scale!r} needs labels and a prior trained '
                       f'with label_dropout > 0 (this one: label_dropout={prior.label_dropout}'
                       f', labels {"given" if labels is not None else "None"}).')
  prefix_length = 0
  if prefix is not None:
    if np.ndim(prefix) != 2 or not 0 <= np.shape(prefix)[1] <= prior.length:
      raise ValueError(f'prefix must have shape [B, P] with P <= {prior.length} (h * w), got '
                       f'shape {tuple(np.shape(prefix))}.')
    check_code_values(prefix, prior.num_embeddings, 'sample prefix')
    prefix_length = np.shape(prefix)[1]
  prefix = (jnp.zeros((batch, 1), jnp.int32) if not prefix_length
            else jnp.asarray(prefix, jnp.int32))
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
  return _sample(prior, params, key, labels, jnp.float32(temperature),
                 jnp.float32(1.0 if top_p is None else top_p),
                 jnp.float32(1.0 if guidance_scale is None else guidance_scale), prefix,
                 num_samples=batch, top_k=top_k, use_top_p=top_p is not None,
                 guided=guidance_scale is not None, use_cache=use_cache,
                 prefix_length=prefix_length, batch_sharding=batch_sharding)


# ---- Baselines: what a prior must beat. ----

def baseline_bits_per_code(train_codes: np.ndarray, eval_codes: np.ndarray,
                           num_embeddings: int) -> Dict[str, float]:
  """Held-out bits per code of three simple models fitted on the training grids.

  Args:
    train_codes: int `[N, h, w]` training grids.
    eval_codes: int `[M, h, w]` held-out grids.
    num_embeddings: K.

  Returns:
    `uniform`: `log2 K`. `unigram`: the cross-entropy of the held-out codes under the training
    codes' histogram (add-one smoothed, so no code has probability 0). `bigram`: the
    cross-entropy under `p(code | the code to its left)` from training counts with add-one
    smoothing; the first code of each row uses the unigram.
  """
  k = num_embeddings
  grids = []
  for name, codes in (('train_codes', train_codes), ('eval_codes', eval_codes)):
    codes = np.asarray(check_code_values(np.asarray(codes), k, f'baseline_bits_per_code '
                                                               f'{name}'), np.int64)
    if codes.ndim != 3 or not codes.size:
      raise ValueError(f'baseline_bits_per_code: {name} must be a non-empty [N, h, w] grid, '
                       f'got shape {codes.shape}.')
    grids.append(codes)
  train_codes, eval_codes = grids
  unigram = np.bincount(train_codes.ravel(), minlength=k) + 1.0
  unigram_log2 = np.log2(unigram / unigram.sum())
  # Only the pairs that occur are counted (pair id = left * K + right): O(codes), not O(K^2).
  pair_ids, pair_counts = np.unique(train_codes[:, :, :-1] * k + train_codes[:, :, 1:],
                                    return_counts=True)
  left_counts = np.bincount(train_codes[:, :, :-1].ravel(), minlength=k)
  eval_left, eval_right = eval_codes[:, :, :-1].ravel(), eval_codes[:, :, 1:].ravel()
  eval_ids = eval_left * k + eval_right
  found = np.minimum(np.searchsorted(pair_ids, eval_ids), max(len(pair_ids) - 1, 0))
  counts = np.where(pair_ids[found] == eval_ids, pair_counts[found], 0) if len(pair_ids) else \
      np.zeros(len(eval_ids))
  bigram_log2 = np.log2((counts + 1.0) / (left_counts[eval_left] + k))
  first = eval_codes[:, :, 0]
  bigram_bits = (-unigram_log2[first].sum() - bigram_log2.sum()) / eval_codes.size
  return {'uniform': float(np.log2(k)), 'unigram': float(-unigram_log2[eval_codes].mean()),
          'bigram': float(bigram_bits)}
