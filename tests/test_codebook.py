"""Codebook-collapse remedies: usage EMA, dead-code restart, k-means init, cosine codes,
projected lookup, entropy penalty, their multi-device behaviour and the recommended preset.

tests/conftest.py gives 8 forced CPU devices."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqvae_jax import (RECOMMENDED, VQVAE, VectorQuantizer, VectorQuantizerEMA,
                       merge_codebook_offset, usage_metrics)
from vqvae_jax.codebook import (batch_usage_entropy_loss, kmeans, kmeans_plus_plus,
                                nearest_code, nearest_in_distances, sample_global_rows,
                                squared_distances, update_usage)
from vqvae_jax.convert import to_seed_state_dict

K, D = 16, 4
QUANTIZERS = [VectorQuantizer, VectorQuantizerEMA]


@functools.partial(jax.jit, static_argnums=0)
def _jitted_train_call(quantizer, variables, x, key):
  out, updates = quantizer.apply(variables, x, train=True, mutable=['batch_stats'],
                                 rngs={'codebook': key})
  return out, updates['batch_stats']


def train_call(quantizer, variables, x, key=0):
  """One jitted training call; returns the output and the new batch_stats."""
  return _jitted_train_call(quantizer, variables, x, jax.random.key(key))


def codebook_of(quantizer, variables):
  return quantizer.apply(variables, method=lambda m: m.codebook)


def clustered(num_points, num_clusters=K, dim=D, seed=0, spread=0.05):
  """Points around `num_clusters` well-separated centres."""
  centres_key, assign_key, noise_key = jax.random.split(jax.random.key(seed), 3)
  centres = 3 * jax.random.normal(centres_key, (num_clusters, dim))
  labels = jax.random.randint(assign_key, (num_points,), 0, num_clusters)
  return centres[labels] + spread * jax.random.normal(noise_key, (num_points, dim))


def test_defaults_keep_the_seeds_variables():
  x = clustered(32)
  assert 'batch_stats' not in VectorQuantizer(K, D).init(jax.random.key(0), x)
  stats = VectorQuantizerEMA(K, D).init(jax.random.key(0), x)['batch_stats']
  assert set(stats) == {'embedding', 'ema_cluster_size', 'ema_w'}
  # The plain default ignores train=True: no state, no rng needed.
  variables = VectorQuantizer(K, D).init(jax.random.key(0), x)
  out = VectorQuantizer(K, D).apply(variables, x, train=True)
  chex.assert_trees_all_equal(out, VectorQuantizer(K, D).apply(variables, x))


# ---- usage statistics ----

@pytest.mark.parametrize('cls', QUANTIZERS)
def test_code_usage_is_the_zero_debiased_ema_of_counts(cls):
  decay = 0.9
  quantizer = cls(K, D, track_usage=True, usage_decay=decay)
  x1, x2 = clustered(64, seed=1), clustered(64, seed=2)
  variables = quantizer.init(jax.random.key(0), x1)
  np.testing.assert_array_equal(variables['batch_stats']['code_usage'], 0.0)
  out1, stats = train_call(quantizer, variables, x1)
  np.testing.assert_allclose(stats['code_usage'], out1.code_counts)  # debiased: no 0.1 factor
  out2, stats = train_call(quantizer, {**variables, 'batch_stats': stats}, x2)
  hidden = decay * (1 - decay) * out1.code_counts + (1 - decay) * out2.code_counts
  np.testing.assert_allclose(stats['code_usage'], hidden / (1 - decay**2), rtol=1e-6)
  assert int(stats['counter']) == 2
  assert np.sum(np.asarray(out1.code_counts) > 0) >= 4  # the test exercises several codes


def test_update_usage_from_zero_is_the_first_counts():
  counts = jnp.array([3.0, 0.0, 5.0])
  np.testing.assert_allclose(update_usage(jnp.zeros(3), counts, 0.99, jnp.int32(1)), counts)


def test_usage_metrics_from_accumulated_counts():
  batches = [jnp.array([3.0, 0.0, 1.0, 0.0, 0.0]), jnp.array([0.0, 0.0, 1.0, 0.0, 3.0])]
  metrics = usage_metrics(sum(batches))  # [3, 0, 2, 0, 3] over the split
  assert int(metrics['codes_used']) == 3 and int(metrics['dead_codes']) == 2
  p = np.array([3, 2, 3]) / 8
  np.testing.assert_allclose(metrics['perplexity'], np.exp(-np.sum(p * np.log(p))), rtol=1e-5)
  np.testing.assert_allclose(metrics['usage_fraction'], 0.6)


# ---- dead-code restart ----

def far_codebook_variables(quantizer, x):
  """Codes 0..7 on the data, codes 8..15 far away (dead for sure)."""
  variables = quantizer.init(jax.random.key(0), x)
  codes = jnp.concatenate([x[:8], 100.0 + jnp.arange(8 * D, dtype=jnp.float32).reshape(8, D)])
  if isinstance(quantizer, VectorQuantizer):
    return {**variables, 'params': {'embedding': codes}}
  stats = {**variables['batch_stats'], 'embedding': codes, 'ema_w': codes,
           'ema_cluster_size': jnp.ones((K,))}
  return {'batch_stats': stats}


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_restart_replaces_exactly_the_dead_codes_with_batch_vectors(cls):
  threshold = 2.0
  quantizer = cls(K, D, dead_code_threshold=threshold)
  x = clustered(64, num_clusters=8, seed=3)
  variables = far_codebook_variables(quantizer, x)
  before = np.asarray(codebook_of(quantizer, variables))
  out, stats = train_call(quantizer, variables, x)
  after = np.asarray(codebook_of(quantizer, {**variables, 'batch_stats': stats}))
  dead = np.asarray(out.code_counts) < threshold  # first step: usage == counts
  assert dead[8:].all() and 0 < dead.sum() < K  # far codes and some others
  np.testing.assert_array_equal(stats['code_usage'][dead], threshold)
  # Each dead code is now a distinct vector of the batch (the plain codebook's
  # `param + (vector - param)` rounds in float32: 1e-5 with params near 100).
  distance_to_batch = np.abs(after[dead][:, None] - np.asarray(x)[None]).max(-1)
  assert distance_to_batch.min(1).max() < 1e-5
  assert len(np.unique(distance_to_batch.argmin(1))) == dead.sum()
  if cls is VectorQuantizer:  # live codes untouched (the optimizer moves them, not the module)
    np.testing.assert_array_equal(after[~dead], before[~dead])
  else:  # live codes got exactly the EMA update of a quantizer without restarts
    _, plain_ema = train_call(VectorQuantizerEMA(K, D), variables, x)
    np.testing.assert_allclose(after[~dead], plain_ema['embedding'][~dead], rtol=1e-6)


@pytest.mark.parametrize('zero_debias', [False, True])
def test_restarted_ema_codes_have_consistent_statistics(zero_debias):
  """`ema_w / ema_cluster_size` of a restarted code is the code, so an EMA update in which it
  gets no vectors leaves it where the restart put it."""
  threshold = 2.0
  quantizer = VectorQuantizerEMA(K, D, decay=0.9, zero_debias=zero_debias,
                                 dead_code_threshold=threshold)
  x = clustered(64, num_clusters=8, seed=3)
  variables = far_codebook_variables(quantizer, x)
  if zero_debias:
    variables = quantizer.init(jax.random.key(0), x)
  out, stats = train_call(quantizer, variables, x)
  dead = np.asarray(out.code_counts) < threshold
  scale = (1 - 0.9) if zero_debias else 1.0  # stored sizes are raw EMAs when zero-debiased
  np.testing.assert_allclose(stats['ema_cluster_size'][dead], threshold * scale, rtol=1e-6)
  np.testing.assert_allclose(stats['ema_w'][dead], stats['embedding'][dead] * threshold * scale,
                             rtol=1e-6)
  far_away = 1000.0 + clustered(64, num_clusters=1, seed=4)  # every vector picks one code
  reference = VectorQuantizerEMA(K, D, decay=0.9, zero_debias=zero_debias, track_usage=True)
  out2, stats2 = train_call(reference, {'batch_stats': stats}, far_away)
  unused = dead & (np.asarray(out2.code_counts) == 0)
  assert unused.sum() >= 4
  # Laplace smoothing rescales sizes by (total) / (total + K eps): a 1e-6 relative change.
  np.testing.assert_allclose(stats2['embedding'][unused], stats['embedding'][unused], rtol=1e-4)


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_restart_is_deterministic_given_the_rng(cls):
  quantizer = cls(K, D, dead_code_threshold=2.0)
  x = clustered(64, num_clusters=8, seed=3)
  variables = far_codebook_variables(quantizer, x)
  first = train_call(quantizer, variables, x, key=7)[1]
  chex.assert_trees_all_equal(first, train_call(quantizer, variables, x, key=7)[1])
  eager, updates = quantizer.apply(variables, x, train=True, mutable=['batch_stats'],
                                   rngs={'codebook': jax.random.key(7)})
  chex.assert_trees_all_close(first, updates['batch_stats'], rtol=1e-6, atol=1e-6)
  other = train_call(quantizer, variables, x, key=8)[1]
  assert not np.allclose(codebook_of(quantizer, {**variables, 'batch_stats': first}),
                         codebook_of(quantizer, {**variables, 'batch_stats': other}))


def test_plain_restart_survives_the_optimizer_step():
  """The training program only threads batch_stats: the restarted code stays where the
  restart put it, moved by one Adam step like any other code."""
  learning_rate = 1e-3
  quantizer = VectorQuantizer(K, D, dead_code_threshold=2.0)
  x = clustered(64, num_clusters=8, seed=3)
  variables = far_codebook_variables(quantizer, x)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(variables['params'])

  def loss_fn(params):
    out, updates = quantizer.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                   x, train=True, mutable=['batch_stats'],
                                   rngs={'codebook': jax.random.key(0)})
    return out.loss, (out, updates['batch_stats'])

  (_, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  assert np.any(grads['embedding'] != 0)
  updates, _ = optimizer.update(grads, opt_state)
  params = optax.apply_updates(variables['params'], updates)
  restarted = codebook_of(quantizer, {'params': variables['params'], 'batch_stats': stats})
  trained = codebook_of(quantizer, {'params': params, 'batch_stats': stats})
  dead = np.asarray(out.code_counts) < 2.0
  np.testing.assert_allclose(trained[dead], restarted[dead], atol=1.01 * learning_rate)
  assert np.abs(trained[dead] - 100).max() > 10  # not back at the far codes
  # Exported weights carry the restarted codes.
  merged = merge_codebook_offset({'params': params, 'batch_stats': stats}, path=())
  np.testing.assert_allclose(merged['params']['embedding'], trained, rtol=1e-6)
  np.testing.assert_array_equal(merged['batch_stats']['codebook_offset'], 0.0)


def test_seed_export_folds_the_offset():
  model = VQVAE(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8,
                quantizer=dict(family='vq', num_embeddings=32, embedding_dim=8,
                               dead_code_threshold=1.0))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)) - 0.5
  variables = model.init(jax.random.key(1), images)
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, images, rngs={'codebook': jax.random.key(2)})
  variables = {**variables, **updates}
  assert np.abs(variables['batch_stats']['vq']['codebook_offset']).max() > 0
  arch = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8, num_embeddings=32,
              embedding_dim=8, ema=False)
  exported = to_seed_state_dict(variables, arch)['_vq_vae._embedding.weight']
  in_use = model.apply(variables, method=lambda m: m.vq.codebook)
  np.testing.assert_allclose(exported, in_use, rtol=1e-6)


# ---- k-means init ----

def quantization_error(quantizer, variables, x):
  return float(jnp.mean(jnp.square(quantizer.apply(variables, x).quantized - x)))


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_kmeans_init_fits_the_first_batch(cls):
  x = clustered(512, num_clusters=K, dim=D, seed=5)
  seed_init = cls(K, D)
  kmeans_init = cls(K, D, codebook_init='kmeans')
  variables = kmeans_init.init(jax.random.key(0), x)
  seed_variables = seed_init.init(jax.random.key(0), x)
  out, stats = train_call(kmeans_init, variables, x)
  assert int(stats['counter']) == 1
  # The first call already quantizes with the centres.
  centred = {**variables, 'batch_stats': stats}
  np.testing.assert_allclose(out.quantized, kmeans_init.apply(centred, x).quantized,
                             atol=0.2 if cls is VectorQuantizerEMA else 1e-5)
  error = quantization_error(kmeans_init, centred, x)
  seed_error = quantization_error(seed_init, seed_variables, x)
  assert error < 0.02 * seed_error, (error, seed_error)
  assert int(jnp.sum(out.code_counts > 0)) >= 14  # of 16 clusters
  # Only the first call initialises: a second batch far away moves no plain code.
  if cls is VectorQuantizer:
    _, later = train_call(kmeans_init, centred, x + 50.0, key=1)
    np.testing.assert_array_equal(later['codebook_offset'], stats['codebook_offset'])


@pytest.mark.parametrize('cls,kwargs', [(VectorQuantizer, {}),
                                        (VectorQuantizerEMA, dict(zero_debias=False)),
                                        (VectorQuantizerEMA, dict(zero_debias=True))])
def test_kmeans_codes_with_empty_clusters_stay_on_the_data(cls, kwargs):
  # 5 distinct vectors for 16 codes: 11 clusters catch nothing. Their EMA sums are zero, and
  # the EMA update used to turn those codes into 0 / epsilon = 0.
  distinct = 3 * jax.random.normal(jax.random.key(1), (5, D))
  x = jnp.tile(distinct, (40, 1))
  quantizer = cls(K, D, codebook_init='kmeans', **kwargs)
  variables = quantizer.init(jax.random.key(0), x)
  for step in range(3):  # the first call initialises; the later ones are plain updates
    out, stats = train_call(quantizer, variables, x, key=step)
    variables = {**variables, 'batch_stats': stats}
    codebook = codebook_of(quantizer, variables)
    to_data = jnp.min(jnp.linalg.norm(codebook[:, None] - distinct[None], axis=-1), axis=1)
    # Live codes of the seed's EMA sit a little off their vectors (its Laplace smoothing);
    # a zeroed code would be about 3 away.
    np.testing.assert_allclose(to_data, 0.0, atol=1e-2)
    assert int(jnp.sum(out.code_counts > 0)) == 5


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_training_on_no_vectors_or_integers_is_a_clear_error(cls):
  quantizer = cls(K, D, codebook_init='kmeans')
  variables = quantizer.init(jax.random.key(0), jnp.zeros((2, D)))
  with pytest.raises(ValueError, match=r'train=True needs at least one input vector, got '
                     r'inputs of shape \(3, 0, 4\)'):
    train_call(quantizer, variables, jnp.zeros((3, 0, D)))
  quantizer.apply(variables, jnp.zeros((0, D)))  # evaluation of nothing is allowed
  with pytest.raises(TypeError, match='expects floating-point inputs, got int32'):
    quantizer.apply(variables, jnp.zeros((2, D), jnp.int32))


def test_nearest_code_rejects_a_chunk_size_below_one():
  with pytest.raises(ValueError, match='chunk_size must be None or an integer >= 1, got 0'):
    nearest_code(jnp.zeros((4, D)), jnp.zeros((K, D)), chunk_size=0)


def test_kmeans_lloyd_iterations_improve_on_kmeans_plus_plus():
  x = clustered(400, num_clusters=10, dim=3, seed=6, spread=0.5)
  key = jax.random.key(0)

  def inertia(centres):
    return float(jnp.sum(jnp.min(squared_distances(x, centres), axis=1)))

  seeded = kmeans_plus_plus(key, x, 10)
  centres, counts = kmeans(key, x, 10, num_iters=10)
  assert inertia(centres) < inertia(seeded)
  np.testing.assert_allclose(counts.sum(), 400)
  chex.assert_trees_all_equal(kmeans(key, x, 10, 10), jax.jit(kmeans, static_argnums=(2, 3))(
      key, x, 10, 10))  # deterministic, and the same under jit
  # More clusters than points: every point becomes a centre, the rest repeat points.
  few = x[:5]
  centres, counts = kmeans(key, few, 8, num_iters=3)
  assert len(np.unique(np.asarray(centres), axis=0)) == 5
  np.testing.assert_allclose(counts.sum(), 5)


# ---- multi-device ----

@pytest.mark.parametrize('cls', QUANTIZERS)
def test_shard_map_with_axis_name_makes_the_same_codebook_changes(mesh, cls):
  """k-means over the global batch and restarts from it, identical on all 8 devices and equal
  to one device seeing the whole batch."""
  options = dict(codebook_init='kmeans', dead_code_threshold=3.0, zero_debias=True)
  if cls is VectorQuantizer:
    options.pop('zero_debias')
  reference = cls(K, D, **options)
  sharded = cls(K, D, axis_name='data', **options)
  batches = [clustered(64, num_clusters=12, seed=s) for s in (7, 8)]
  variables = reference.init(jax.random.key(0), batches[0])

  def two_steps(module, variables, batches):
    counts = []
    for step, x in enumerate(batches):
      out, stats = train_call(module, variables, x, key=step)
      variables = {**variables, 'batch_stats': stats}
      counts.append(out.code_counts)
    return counts, variables['batch_stats']

  single = jax.jit(lambda v, b: two_steps(reference, v, b))(variables, batches)
  per_device = jax.jit(jax.shard_map(
      lambda v, b: two_steps(sharded, v, b), mesh=mesh, in_specs=(P(), P('data')),
      out_specs=(P(), P())))(variables, batches)
  restarted = np.asarray(single[1]['code_usage']) == 3.0
  assert restarted.any()  # the second step restarted codes
  chex.assert_trees_all_close(per_device, single, rtol=1e-5, atol=1e-6)
  # Every device holds the same state, not just the first one returned.
  every_device = jax.jit(jax.shard_map(
      lambda v, b: jax.tree.map(lambda a: a[None], two_steps(sharded, v, b)[1]), mesh=mesh,
      in_specs=(P(), P('data')), out_specs=P('data')))(variables, batches)
  for leaf in jax.tree.leaves(every_device):
    np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[:1], leaf.shape))


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_jit_over_a_sharded_batch_equals_one_device(mesh, decay):
  options = {k: v for k, v in RECOMMENDED.items() if decay or k not in ('decay', 'zero_debias')}
  model = VQVAE(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8,
                quantizer=dict(family='ema' if decay else 'vq', num_embeddings=32,
                               embedding_dim=8, **options))
  images = jax.random.uniform(jax.random.key(0), (16, 16, 16, 3)) - 0.5
  variables = model.init(jax.random.key(1), images)

  def call(variables, images):
    (_, vq), updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                   rngs={'codebook': jax.random.key(2)})
    return vq.code_counts, updates['batch_stats']

  single = jax.jit(call)(variables, images)
  replicated = NamedSharding(mesh, P())
  sharded = jax.jit(call, out_shardings=replicated)(
      jax.device_put(variables, replicated),
      jax.device_put(images, NamedSharding(mesh, P('data'))))
  chex.assert_trees_all_close(sharded, single, rtol=1e-4, atol=1e-5)
  assert int(single[1]['vq']['counter']) == 1


def test_sample_global_rows_equals_one_device(mesh):
  rows = jnp.arange(64 * 3, dtype=jnp.float32).reshape(64, 3)
  key = jax.random.key(3)
  expected = sample_global_rows(key, rows, 20)
  got = jax.jit(jax.shard_map(lambda r: sample_global_rows(key, r, 20, 'data'), mesh=mesh,
                              in_specs=P('data'), out_specs=P()))(rows)
  np.testing.assert_array_equal(got, expected)
  assert len(np.unique(np.asarray(expected)[:, 0])) == 20  # without replacement


# ---- cosine codes, projected lookup, entropy penalty ----

@pytest.mark.parametrize('cls', QUANTIZERS)
def test_cosine_codes_have_unit_norm(cls):
  quantizer = cls(K, D, cosine_codes=True, dead_code_threshold=1.0)
  x = 5 * clustered(64, num_clusters=8, seed=9)
  variables = quantizer.init(jax.random.key(0), x)
  for step in range(2):
    out, stats = train_call(quantizer, variables, x, key=step)
    variables = {**variables, 'batch_stats': stats}
    np.testing.assert_allclose(jnp.linalg.norm(out.quantized, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(codebook_of(quantizer, variables), axis=-1), 1.0,
                               rtol=1e-5)
  # The code is the one of highest cosine similarity.
  codebook = codebook_of(quantizer, variables)
  cosine = (x / jnp.linalg.norm(x, axis=-1, keepdims=True)) @ codebook.T
  np.testing.assert_array_equal(quantizer.apply(variables, x).indices, jnp.argmax(cosine, 1))


@pytest.mark.parametrize('cls', QUANTIZERS)
def test_codebook_dim_projections(cls):
  code_dim = 3
  quantizer = cls(K, 8, codebook_dim=code_dim)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
  variables = quantizer.init(jax.random.key(1), x)
  params = variables['params']
  chex.assert_shape([params['project_in']['kernel'], params['project_out']['kernel']],
                    [(8, code_dim), (code_dim, 8)])
  chex.assert_shape(codebook_of(quantizer, variables), (K, code_dim))
  out = quantizer.apply(variables, x)
  chex.assert_shape(out.quantized, x.shape)
  chex.assert_shape(out.indices, (2, 5, 5))
  embedded = quantizer.apply(variables, out.indices, method=cls.embed)
  chex.assert_shape(embedded, x.shape)
  np.testing.assert_allclose(embedded, out.quantized, atol=1e-5)
  # Gradients reach both projections.
  grads = jax.grad(lambda p: jnp.sum(quantizer.apply({**variables, 'params': p}, x).quantized)
                   + quantizer.apply({**variables, 'params': p}, x).loss)(params)
  assert np.abs(grads['project_in']['kernel']).max() > 0
  assert np.abs(grads['project_out']['kernel']).max() > 0


def test_model_with_codebook_dim_decodes_its_codes():
  model = VQVAE(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8,
                quantizer=dict(family='vq', num_embeddings=32, embedding_dim=8, codebook_dim=4,
                               cosine_codes=True))
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3)) - 0.5
  variables = model.init(jax.random.key(1), images)
  recon, vq = model.apply(variables, images)
  codes = model.apply(variables, images, method=VQVAE.encode)
  np.testing.assert_allclose(model.apply(variables, codes, method=VQVAE.decode), recon,
                             atol=1e-5)
  chex.assert_shape(variables['params']['vq']['embedding'], (32, 4))


def test_entropy_penalty_value_and_gradient():
  weight, temperature = 0.5, 2.0
  with_entropy = VectorQuantizer(K, D, entropy_weight=weight, entropy_temperature=temperature)
  without = VectorQuantizer(K, D)
  x = clustered(64, num_clusters=3, seed=10)  # 3 clusters: at most 3 codes are picked
  params = without.init(jax.random.key(0), x)['params']
  params = {'embedding': params['embedding'] * K * 3}  # U(-3, 3)
  # Value: log K minus the entropy of the mean softmax assignment.
  distances = np.asarray(squared_distances(x, params['embedding']), np.float64)
  soft = np.exp(-distances / temperature - np.max(-distances / temperature, 1, keepdims=True))
  usage = (soft / soft.sum(1, keepdims=True)).mean(0)
  expected = np.log(K) + np.sum(usage * np.log(usage))
  loss_of = lambda q, p: q.apply({'params': p}, x).loss
  np.testing.assert_allclose(loss_of(with_entropy, params) - loss_of(without, params),
                             weight * expected, rtol=1e-4)
  # Gradient: the plain loss ignores codes no vector picks; the penalty pulls them in.
  out = without.apply({'params': params}, x)
  unused = np.asarray(out.code_counts) == 0
  assert unused.sum() >= K - 3
  plain_grad = jax.grad(loss_of, argnums=1)(without, params)['embedding']
  entropy_grad = jax.grad(loss_of, argnums=1)(with_entropy, params)['embedding']
  np.testing.assert_array_equal(plain_grad[unused], 0.0)
  assert np.all(np.abs(entropy_grad[unused]).sum(1) > 0)
  # Following it raises the batch's soft usage entropy.
  penalty = lambda p: batch_usage_entropy_loss(squared_distances(x, p['embedding']),
                                               temperature)
  stepped = jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(penalty)(params))
  assert float(penalty(stepped)) < float(penalty(params))
  # Finite difference along the gradient of the module's entropy term.
  direction = (entropy_grad - plain_grad) / weight
  eps = 1e-2
  numeric = (penalty({'embedding': params['embedding'] + eps * direction}) -
             penalty({'embedding': params['embedding'] - eps * direction})) / (2 * eps)
  np.testing.assert_allclose(numeric, jnp.sum(direction * direction), rtol=2e-2)


# ---- errors ----

@pytest.mark.parametrize('cls', QUANTIZERS)
def test_training_without_the_codebook_rng_is_a_clear_error(cls):
  quantizer = cls(K, D, dead_code_threshold=1.0)
  x = clustered(32)
  variables = quantizer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="dead_code_threshold=1.0.*rngs=\\{'codebook': key\\}"):
    quantizer.apply(variables, x, train=True, mutable=['batch_stats'])
  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    quantizer.apply(variables, x, train=True, rngs={'codebook': jax.random.key(0)})
  quantizer.apply(variables, x)  # evaluation needs neither


# ---- the collapse the seed suffers, and the recommended preset ----

def test_recommended_preset_prevents_the_seeds_collapse():
  """The seed's EMA cold start on its golden inputs collapses to 1 code from the second call
  (test_ema_quantizer_updates_match_seed); the recommended options keep most codes in use."""
  golden = dict(np.load('tests/golden/seed_golden_ema.npz'))
  seed_state = {'embedding': golden['vq_init/_embedding.weight'],
                'ema_cluster_size': golden['vq_init/_ema_cluster_size'],
                'ema_w': golden['vq_init/_ema_w']}
  num_codes, dim = seed_state['embedding'].shape  # 64 codes of 16
  batches = [golden['vq0/inputs'], golden['vq1/inputs']] * 5  # 60 vectors each
  options = {k: v for k, v in RECOMMENDED.items() if k != 'decay'}
  seed = VectorQuantizerEMA(num_codes, dim, 0.25, 0.99)
  recommended = VectorQuantizerEMA(num_codes, dim, 0.25, 0.99, **options)

  def split_usage(quantizer, state):
    total = jnp.zeros((num_codes,))
    for step, x in enumerate(batches):
      out, state = train_call(quantizer, {'batch_stats': state}, x, key=step)
      if step >= 2:  # after the cold start
        total = total + out.code_counts
    return usage_metrics(total)

  seed_usage = split_usage(seed, seed_state)
  usage = split_usage(recommended, recommended.init(jax.random.key(0), batches[0])['batch_stats'])
  assert int(seed_usage['codes_used']) <= 2
  assert int(usage['codes_used']) >= 56, usage  # of 64; measured 61
  assert float(usage['perplexity']) > 40, usage  # measured 51


def test_nearest_in_distances_is_numpys_argmin_with_ties_nans_and_odd_row_counts():
  """On the CPU the search is two `min`s in blocks of 2,048 rows; it must pick what `argmin`
  picks: the first of tied codes, the first NaN of a row that has one, also in a last block
  that is only partly filled (5,000 rows)."""
  rng = np.random.default_rng(0)
  distances = rng.integers(0, 6, (5000, 64)).astype(np.float32)  # many ties
  distances[7, [3, 40]] = np.nan
  distances[4100, 5] = np.nan
  distances[4999] = np.inf
  distances[2048, :] = 2.0
  got = np.asarray(jax.jit(nearest_in_distances)(jnp.asarray(distances)))
  np.testing.assert_array_equal(got, np.argmin(distances, axis=1))
  assert got[7] == 3 and got[4100] == 5 and got[4999] == 0 and got[2048] == 0
  assert got.dtype == np.int32
