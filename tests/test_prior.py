"""The prior over code grids: causality, bits per code, cached sampling, devices, bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqvae_jax.autoregressive_prior import (CodePrior, baseline_bits_per_code, filter_logits, sample)

K, GRID = 16, (3, 4)
TINY = dict(width=32, depth=2, num_heads=4)


def _codes(seed=0, batch=4, k=K, grid=GRID):
  return jax.random.randint(jax.random.key(seed), (batch, *grid), 0, k)


def _init(prior, batch=4, labels=None):
  return prior.init(jax.random.key(1), _codes(batch=batch), labels)['params']


@pytest.fixture(scope='module')
def conditional():
  prior = CodePrior(num_embeddings=K, grid_shape=GRID, num_classes=3, label_dropout=0.2, **TINY)
  return prior, _init(prior, labels=jnp.array([0, 1, 2, 0]))


def test_shapes_and_dtypes():
  for dtype in (jnp.float32, jnp.bfloat16):
    prior = CodePrior(num_embeddings=K, grid_shape=GRID, dtype=dtype, **TINY)
    params = _init(prior)
    logits = prior.apply({'params': params}, _codes())
    chex.assert_shape(logits, (4, 12, K))
    chex.assert_type(logits, jnp.float32)
    bits = prior.apply({'params': params}, _codes(), method=CodePrior.bits_per_code)
    chex.assert_shape(bits, (4,))
    chex.assert_type(bits, jnp.float32)
    for leaf in jax.tree.leaves(params):
      chex.assert_type(leaf, jnp.float32)


def test_changing_a_code_changes_no_logit_at_or_before_its_position():
  prior = CodePrior(num_embeddings=K, grid_shape=GRID, **TINY)
  params = _init(prior)
  codes = np.asarray(_codes(batch=1))
  base = prior.apply({'params': params}, codes)
  length = GRID[0] * GRID[1]
  for t in range(length):
    changed = codes.reshape(1, -1).copy()
    changed[0, t] = (changed[0, t] + 1) % K
    logits = prior.apply({'params': params}, changed.reshape(codes.shape))
    np.testing.assert_array_equal(logits[:, :t + 1], base[:, :t + 1])
    if t + 1 < length:  # the next position reads code t, so it must see the change
      assert np.abs(logits[:, t + 1] - base[:, t + 1]).max() > 1e-4


def test_bits_per_code_is_mean_cross_entropy_over_ln2(conditional):
  prior, params = conditional
  codes, labels = _codes(seed=5), jnp.array([2, 1, 0, 1])
  logits = prior.apply({'params': params}, codes, labels)
  nats = optax.softmax_cross_entropy_with_integer_labels(logits, codes.reshape(4, -1))
  expected = np.asarray(nats).mean(axis=1) / math.log(2)
  bits = prior.apply({'params': params}, codes, labels, method=CodePrior.bits_per_code)
  np.testing.assert_allclose(bits, expected, rtol=1e-6)
  assert np.all(np.asarray(bits) > 0)


@pytest.mark.parametrize('options', [
    dict(), dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6), dict(guidance_scale=2.5),
    dict(top_k=5, top_p=0.9, temperature=1.3)], ids=str)
def test_cached_and_uncached_sampling_give_the_same_samples(conditional, options):
  prior, params = conditional
  labels = np.array([0, 1, 2, 1, 0, 2])
  cached = sample(prior, params, jax.random.key(7), labels=labels, **options)
  uncached = sample(prior, params, jax.random.key(7), labels=labels, use_cache=False, **options)
  chex.assert_shape(cached, (6, *GRID))
  chex.assert_type(cached, jnp.int32)
  np.testing.assert_array_equal(cached, uncached)
  assert len(np.unique(np.asarray(cached))) > 3  # sampled, not a constant grid


def test_cached_step_logits_equal_teacher_forced_logits_on_the_sampled_codes(conditional):
  prior, params = conditional
  labels = jnp.array([0, 2, 1])
  codes = sample(prior, params, jax.random.key(3), labels=labels)
  teacher_forced = prior.apply({'params': params}, codes, labels)
  flat = codes.reshape(3, -1)
  cache = prior.apply({'params': params}, labels, jnp.int32(0), method=CodePrior.decode_step,
                      mutable=['cache'])[1]['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  tokens = labels
  for t in range(flat.shape[1]):
    logits, updated = prior.apply({'params': params, 'cache': cache}, tokens, jnp.int32(t),
                                  method=CodePrior.decode_step, mutable=['cache'])
    cache = updated['cache']
    np.testing.assert_allclose(logits, teacher_forced[:, t], atol=2e-5, rtol=1e-5)
    tokens = flat[:, t]


def test_sampling_is_a_function_of_the_key(conditional):
  prior, params = conditional
  labels = np.array([0, 1, 2, 0])
  first = sample(prior, params, jax.random.key(11), labels=labels)
  again = sample(prior, params, jax.random.key(11), labels=labels)
  other = sample(prior, params, jax.random.key(12), labels=labels)
  np.testing.assert_array_equal(first, again)
  assert np.any(np.asarray(first) != np.asarray(other))
  # Labels and prefixes may be lists.
  np.testing.assert_array_equal(sample(prior, params, jax.random.key(11), labels=[0, 1, 2, 0]),
                                first)
  # Example i depends on (key, i) only: a smaller batch gives the same first examples.
  np.testing.assert_array_equal(sample(prior, params, jax.random.key(11), labels=labels[:2]),
                                first[:2])


def test_eight_devices_sample_what_one_device_samples(conditional):
  prior, params = conditional
  assert jax.device_count() == 8, 'conftest.py forces 8 CPU devices'
  labels = np.arange(16) % 3
  one = sample(prior, params, jax.random.key(5), labels=labels, top_p=0.9, guidance_scale=1.5)
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  split = sample(prior, params, jax.random.key(5), labels=labels, top_p=0.9, guidance_scale=1.5,
                 batch_sharding=NamedSharding(mesh, P('data')))
  assert len(split.sharding.device_set) == 8
  np.testing.assert_array_equal(split, one)


def test_prefix_is_kept_exactly_and_the_rest_is_sampled(conditional):
  prior, params = conditional
  given = np.asarray(_codes(seed=9, batch=5)).reshape(5, -1)[:, :5]
  labels = np.array([0, 1, 2, 0, 1])
  out = np.asarray(sample(prior, params, jax.random.key(2), labels=labels, prefix=given))
  np.testing.assert_array_equal(out.reshape(5, -1)[:, :5], given)
  without = np.asarray(sample(prior, params, jax.random.key(2), labels=labels))
  assert np.any(out.reshape(5, -1)[:, 5:] != without.reshape(5, -1)[:, 5:])  # conditioned on it


def test_top_k_one_is_greedy_decoding(conditional):
  prior, params = conditional
  labels = jnp.array([1, 2])
  out = sample(prior, params, jax.random.key(0), labels=labels, top_k=1)
  greedy = np.zeros((2, GRID[0] * GRID[1]), np.int32)
  for t in range(greedy.shape[1]):
    logits = prior.apply({'params': params}, greedy.reshape(2, *GRID), labels)
    greedy[:, t] = np.argmax(logits[:, t], axis=-1)
  np.testing.assert_array_equal(np.asarray(out).reshape(2, -1), greedy)


def test_filter_logits_keeps_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]]))
  kept = lambda x: np.isfinite(np.asarray(x))
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=2)),
                                [[1, 0, 1, 0], [0, 0, 1, 1]])
  # Row 0: 0.5 < 0.65, so 0.3 joins; 0.8 >= 0.65, so nothing more. Row 1: 0.4, then 0.3.
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=jnp.float32(0.65))),
                                [[1, 0, 1, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=jnp.float32(0.1))),
                                [[1, 0, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_p=jnp.float32(1.0))),
                                np.ones((2, 4)))
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=3, top_p=jnp.float32(0.95))),
                                [[1, 0, 1, 1], [0, 1, 1, 1]])
  # Ties at the threshold are kept: a uniform row keeps every code.
  uniform = jnp.zeros((1, 4))
  assert kept(filter_logits(uniform, top_k=1)).all() and kept(
      filter_logits(uniform, top_p=jnp.float32(0.3))).all()


def _train(prior, codes, labels, steps, seed=0):
  params = prior.init(jax.random.key(seed), codes, labels)['params']
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss_fn(params):
      logits = prior.apply({'params': params}, codes, labels, train=True,
                           rngs={'dropout': key})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, codes.reshape(len(codes), -1)).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(steps):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  return params


def test_class_conditional_sampling_follows_the_label():
  # Label c's grids are all code 3c; the unconditional model (label dropout) mixes the three.
  prior = CodePrior(num_embeddings=8, grid_shape=(2, 2), width=32, depth=1, num_heads=2,
                    num_classes=3, label_dropout=0.3)
  labels = jnp.arange(48) % 3
  codes = jnp.broadcast_to(3 * labels[:, None, None], (48, 2, 2)).astype(jnp.int32)
  params = _train(prior, codes, labels, steps=150)
  wanted = np.array([0, 1, 2, 2, 1, 0])
  for options in (dict(), dict(guidance_scale=3.0)):
    out = np.asarray(sample(prior, params, jax.random.key(4), labels=wanted, **options))
    np.testing.assert_array_equal(out, np.broadcast_to(3 * wanted[:, None, None], out.shape))
  bits = prior.apply({'params': params}, codes, labels, method=CodePrior.bits_per_code)
  assert float(bits.mean()) < 0.1  # log2 8 = 3 for a uniform guess


def test_baselines_on_a_hand_counted_example():
  train = np.array([[[0, 1, 0, 1]], [[0, 1, 1, 1]]])  # K = 2, one row of 4 per grid
  held_out = np.array([[[0, 1, 1, 0]]])
  out = baseline_bits_per_code(train, held_out, num_embeddings=2)
  assert out['uniform'] == 1.0
  # Unigram with add-one: counts 3+1, 5+1 -> p(0) = 0.4, p(1) = 0.6.
  unigram = -(2 * math.log2(0.4) + 2 * math.log2(0.6)) / 4
  assert out['unigram'] == pytest.approx(unigram)
  # Left-neighbour pairs: 0->1 three times, 1->0 once, 1->1 twice; add-one smoothed rows:
  # p(1|0) = 4/5, p(0|1) = 2/5, p(1|1) = 3/5. The first code uses the unigram p(0) = 0.4.
  bigram = -(math.log2(0.4) + math.log2(4 / 5) + math.log2(3 / 5) + math.log2(2 / 5)) / 4
  assert out['bigram'] == pytest.approx(bigram)
