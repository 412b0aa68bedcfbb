"""FSQ, LFQ, residual VQ and the rotation trick: values, gradients, dtypes, devices, bad input.

conftest.py gives the process 8 CPU devices for the multi-device tests.
"""

import itertools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vqvae_jax import FSQ, LFQ, ResidualVQ, VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.fsq import RECOMMENDED_LEVELS
from vqvae_jax.quantizers import rotation_trick

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'fsq_golden.npz')


@pytest.fixture(scope='module')
def mesh():
  if jax.device_count() < 8:
    pytest.fail('needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  return Mesh(np.array(jax.devices()[:8]), ('data',))


def normal(shape, seed=0, scale=1.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale


def call(module, variables, x, train=False, key=3):
  if train:
    out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'],
                          rngs={'codebook': jax.random.key(key)})
    return out
  return module.apply(variables, x)


# ---- FSQ ----

def test_fsq_equals_the_official_notebook():
  golden = np.load(GOLDEN)
  num_sets = len([k for k in golden if k.startswith('levels_')])
  assert num_sets >= 6
  for i in range(num_sets):
    fsq = FSQ(tuple(int(l) for l in golden[f'levels_{i}']))
    out = fsq.apply({}, jnp.asarray(golden[f'inputs_{i}']))
    np.testing.assert_allclose(out.quantized, golden[f'quantized_{i}'], atol=1e-6)
    np.testing.assert_array_equal(out.indices, golden[f'indices_{i}'])
    # `indices_*` are the rows of the notebook's codebook. Where its own index differs, its
    # round trip misses the code (a float truncation, see make_fsq_golden.py).
    differs = out.indices != golden[f'raw_indices_{i}']
    misses = np.any(np.abs(golden[f'raw_round_trip_{i}'] - golden[f'quantized_{i}']) > 1e-3,
                    axis=-1)
    np.testing.assert_array_equal(differs, misses)
    codebook = fsq.apply({}, jnp.arange(fsq.codebook_size), method=FSQ.embed)
    np.testing.assert_allclose(codebook, golden[f'codebook_{i}'], atol=1e-7)


@pytest.mark.parametrize('bits', sorted(RECOMMENDED_LEVELS))
def test_fsq_round_trips_every_code_of_the_recommended_levels(bits):
  levels = RECOMMENDED_LEVELS[bits]
  fsq = FSQ(levels)
  # About 2^bits codes: [7, 5, 5, 5, 5] has 4,375 for "2^12".
  assert fsq.codebook_size == np.prod(levels) and 2**(bits - 1) < fsq.codebook_size < 2**(bits + 1)
  indices = jnp.arange(fsq.codebook_size)
  codes = fsq.apply({}, indices, method=FSQ.embed)
  # Inputs whose bounded value lands within 0.1 of each code's level: the inverse of `bound`.
  levels_np = np.asarray(levels, np.float32)
  half_l = (levels_np - 1) * (1 - 1e-3) / 2
  offset = np.where(np.asarray(levels) % 2 == 1, 0.0, 0.5)
  target = 0.9 * np.asarray(codes) * (np.asarray(levels) // 2)
  z = np.arctanh((target + offset) / half_l) - np.tan(offset / half_l)
  out = fsq.apply({}, jnp.asarray(z, jnp.float32))
  np.testing.assert_array_equal(out.indices, indices)
  np.testing.assert_array_equal(out.quantized, codes)  # embed(indices) == quantized, exactly
  np.testing.assert_array_equal(out.code_counts, np.ones(fsq.codebook_size))


def test_fsq_straight_through_gradient_is_the_bounds_derivative():
  levels = (8, 5, 4)
  fsq = FSQ(levels)
  z = normal((16, 3), scale=2.0)
  w = normal((16, 3), seed=1)
  grad = jax.grad(lambda z: jnp.sum(w * fsq.apply({}, z).quantized))(z)
  levels_np = np.asarray(levels, np.float64)
  half_l = (levels_np - 1) * (1 - 1e-3) / 2
  shift = np.tan(np.where(levels_np % 2 == 1, 0.0, 0.5) / half_l)
  by_hand = np.asarray(w) * (1 - np.tanh(np.asarray(z) + shift)**2) * half_l / (levels_np // 2)
  np.testing.assert_allclose(grad, by_hand, rtol=1e-5, atol=1e-6)


def test_fsq_shapes_dtypes_and_bfloat16():
  fsq = FSQ((8, 6, 5))
  x = normal((2, 4, 4, 3)).astype(jnp.bfloat16)
  out = jax.jit(lambda x: fsq.apply({}, x))(x)
  chex.assert_shape(out.quantized, (2, 4, 4, 3))
  chex.assert_type(out.quantized, jnp.bfloat16)
  chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
  chex.assert_type(out.indices, jnp.int32)
  chex.assert_shape(out.code_counts, (240,))
  assert float(out.loss) == 0.0 and float(out.code_counts.sum()) == 32
  assert fsq.init(jax.random.key(0), x) == {}  # no parameters, no state


@pytest.mark.parametrize('kwargs, match', [
    (dict(levels=(8, 1, 5)), r'every level must be >= 2 .* levels=\(8, 1, 5\) with 1'),
    (dict(levels=()), 'non-empty'),
    (dict(levels=(8, 8), eps=1.0), r'eps must be in \[0, 1\), got 1.0'),
])
def test_fsq_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    FSQ(**kwargs)


def test_fsq_bad_inputs_and_codes():
  fsq = FSQ((8, 8, 8))
  with pytest.raises(ValueError, match=r'\[\.\.\., 3\] \(len\(levels\).* got shape \(4, 5\)'):
    fsq.apply({}, jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match='got code 512'):
    fsq.apply({}, jnp.array([3, 512]), method=FSQ.embed)
  with pytest.raises(TypeError, match='integers'):
    fsq.apply({}, jnp.array([0.5]), method=FSQ.embed)
  traced = jax.jit(lambda i: fsq.apply({}, i, method=FSQ.embed))(jnp.array([1, 512, -1]))
  assert np.isfinite(traced[0]).all() and np.isnan(traced[1:]).all()


# ---- LFQ ----

def brute_force_entropies(z, temperature):
  """Per-sample and batch entropy over all 2^D codes of softmax(-|z - c|^2 / T), in float64."""
  z = np.asarray(z, np.float64)
  codes = np.array(list(itertools.product([-1.0, 1.0], repeat=z.shape[1])))
  logits = -((z[:, None, :] - codes[None]) ** 2).sum(-1) / temperature
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(axis=1, keepdims=True)
  h = lambda q: -np.sum(np.where(q > 0, q * np.log(np.maximum(q, 1e-300)), 0.0), axis=-1)
  return h(p).mean(), h(p.mean(axis=0))


def test_lfq_round_trips_every_code_and_counts_bits():
  lfq = LFQ(5)
  codes = lfq.apply({}, jnp.arange(32), method=LFQ.embed)
  out = lfq.apply({}, 0.7 * codes)
  np.testing.assert_array_equal(out.indices, np.arange(32))
  np.testing.assert_array_equal(out.quantized, codes)
  np.testing.assert_array_equal(out.code_counts, np.ones(32))
  # Bit d of the index is dimension d's sign.
  np.testing.assert_array_equal(lfq.apply({}, jnp.array([[1., -1, -1, 1, -1]])).indices, [9])


@pytest.mark.parametrize('groups', [None, 2])
def test_lfq_entropy_terms_equal_brute_force(groups):
  d, temperature = 6, 0.5
  lfq = LFQ(d, entropy_temperature=temperature, entropy_groups=groups)
  z = np.asarray(normal((40, d), scale=0.6))
  per_sample, batch = lfq.apply({}, jnp.asarray(z), method=LFQ.entropy_terms)
  expected_per_sample, expected_batch = brute_force_entropies(z, temperature)
  if groups:  # batch entropy: summed over the groups' own codebooks
    expected_batch = sum(brute_force_entropies(z[:, g * 3:(g + 1) * 3], temperature)[1]
                         for g in range(2))
  np.testing.assert_allclose(per_sample, expected_per_sample, rtol=1e-4)
  np.testing.assert_allclose(batch, expected_batch, rtol=1e-4)
  out = lfq.apply({}, jnp.asarray(z))
  commitment = 0.25 * np.mean((z - np.where(z > 0, 1, -1))**2)
  np.testing.assert_allclose(out.loss, commitment + 0.1 * (expected_per_sample - expected_batch),
                             rtol=1e-4)


def test_lfq_gradients_by_hand():
  z = normal((8, 4))
  g = normal((8, 4), seed=1)
  lfq = LFQ(4, entropy_weight=0.0, commitment_cost=0.3)
  np.testing.assert_allclose(
      jax.grad(lambda z: jnp.sum(g * lfq.apply({}, z).quantized))(z), g)  # straight-through
  q = np.where(np.asarray(z) > 0, 1.0, -1.0)
  np.testing.assert_allclose(jax.grad(lambda z: lfq.apply({}, z).loss)(z),
                             2 * 0.3 * (np.asarray(z) - q) / z.size, rtol=1e-5)


def test_lfq_bfloat16_keeps_float32_losses():
  lfq = LFQ(9)
  for scale in (1e-4, 1.0, 1e3):
    x = normal((4, 8, 8, 9), scale=scale).astype(jnp.bfloat16)
    out = jax.jit(lambda x: lfq.apply({}, x))(x)
    chex.assert_type(out.quantized, jnp.bfloat16)
    chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
    chex.assert_shape(out.code_counts, (512,))
    assert np.isfinite(float(out.loss))
    per_sample, batch = lfq.apply({}, x.reshape(-1, 9), method=LFQ.entropy_terms)
    assert float(per_sample) >= 0 and float(batch) >= -1e-6


@pytest.mark.parametrize('kwargs, match', [
    (dict(embedding_dim=20), r'embedding_dim=20 > 16 .* set entropy_groups'),
    (dict(embedding_dim=8, entropy_groups=3), r'divisor of embedding_dim=8 .* got 3'),
    (dict(embedding_dim=40, entropy_groups=4), r'embedding_dim must be an integer in \[1, 30\]'),
    (dict(embedding_dim=8, entropy_weight=-1), 'entropy_weight must be >= 0'),
    (dict(embedding_dim=8, entropy_temperature=0.0), 'entropy_temperature must be > 0'),
])
def test_lfq_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LFQ(**kwargs)


def test_lfq_bad_inputs_and_codes():
  lfq = LFQ(4)
  with pytest.raises(ValueError, match=r'\[\.\.\., 4\] \(embedding_dim\), got shape \(2, 3\)'):
    lfq.apply({}, jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match='got code 16'):
    lfq.apply({}, jnp.array([16]), method=LFQ.embed)
  LFQ(20, entropy_groups=2)  # a fallback chosen: accepted


# ---- The rotation trick ----

@pytest.mark.parametrize('quantizer_class', [VectorQuantizer, VectorQuantizerEMA])
def test_rotation_trick_keeps_forward_values_and_rotates_gradients(quantizer_class):
  x = normal((24, 6))
  g = np.asarray(normal((24, 6), seed=1))
  plain = quantizer_class(16, 6)
  rotated = quantizer_class(16, 6, rotation_trick=True)
  variables = plain.init(jax.random.key(2), x)
  out_plain, out_rotated = call(plain, variables, x), call(rotated, variables, x)
  np.testing.assert_array_equal(out_rotated.indices, out_plain.indices)
  # The codes exactly; straight-through's `e + sg(q - e)` can be an ulp off them.
  np.testing.assert_array_equal(
      out_rotated.quantized, rotated.apply(variables, out_plain.indices, method='embed'))
  np.testing.assert_allclose(out_rotated.quantized, out_plain.quantized, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(g * call(rotated, variables, x).quantized))(x)
  e = np.asarray(x, np.float64)
  q = np.asarray(out_plain.quantized, np.float64)
  for n in range(len(e)):
    e_hat, q_hat = e[n] / np.linalg.norm(e[n]), q[n] / np.linalg.norm(q[n])
    r = (e_hat + q_hat) / np.linalg.norm(e_hat + q_hat)
    rotation = np.eye(6) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, e_hat)
    np.testing.assert_allclose(rotation @ e_hat, q_hat, atol=1e-9)
    scale = np.linalg.norm(q[n]) / np.linalg.norm(e[n])
    np.testing.assert_allclose(grad[n], scale * rotation.T @ g[n], rtol=1e-4, atol=1e-5)


def test_rotation_trick_degenerate_rows_pass_straight_through():
  latents = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]])
  codes = jnp.array([[1.0, 1.0], [-3.0, 0.0], [0.0, 0.0]])  # e = 0; e^ = -q^; q = 0
  np.testing.assert_array_equal(rotation_trick(latents, codes), codes)
  grad = jax.grad(lambda e: jnp.sum(rotation_trick(e, codes) * jnp.arange(6.).reshape(3, 2)))
  np.testing.assert_array_equal(grad(latents), np.arange(6.).reshape(3, 2))


def test_rotation_trick_with_projected_cosine_codes_and_bfloat16():
  quantizer = VectorQuantizerEMA(16, 8, codebook_dim=4, cosine_codes=True, rotation_trick=True)
  x = normal((4, 4, 8)).astype(jnp.bfloat16)
  variables = quantizer.init(jax.random.key(0), x)
  out = jax.jit(lambda v, x: call(quantizer, v, x))(variables, x)
  chex.assert_type(out.quantized, jnp.bfloat16)
  reference = VectorQuantizerEMA(16, 8, codebook_dim=4, cosine_codes=True)
  np.testing.assert_allclose(out.quantized.astype(jnp.float32),
                             call(reference, variables, x).quantized.astype(jnp.float32),
                             atol=1e-2)
  grad = jax.grad(lambda x: jnp.sum(call(quantizer, variables, x).quantized.astype(jnp.float32)))(
      x.astype(jnp.float32))
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


# ---- Residual VQ ----

def test_one_stage_equals_the_ema_quantizer():
  x = normal((32, 4))
  residual = ResidualVQ(1, 16, 4, decay=0.9, zero_debias=False)
  single = VectorQuantizerEMA(16, 4, decay=0.9)
  variables = residual.init(jax.random.key(0), x)
  stage_variables = {'batch_stats': variables['batch_stats']['stage_0']}
  out, updates = residual.apply(variables, x, train=True, mutable=['batch_stats'])
  expected, expected_updates = single.apply(stage_variables, x, train=True,
                                            mutable=['batch_stats'])
  np.testing.assert_array_equal(out.indices[..., 0], expected.indices)
  np.testing.assert_allclose(out.quantized, expected.quantized, atol=1e-7)
  chex.assert_trees_all_close(updates['batch_stats']['stage_0'],
                              expected_updates['batch_stats'])


def test_two_stages_by_hand_and_their_ema_updates():
  x = normal((64, 4))
  rvq = ResidualVQ(2, 8, 4, decay=0.9)
  variables = rvq.init(jax.random.key(0), x)
  out, updates = rvq.apply(variables, x, train=True, mutable=['batch_stats'])
  chex.assert_shape(out.indices, (64, 2))
  chex.assert_shape(out.code_counts, (2, 8))
  residual = np.asarray(x)
  for stage in range(2):
    codebook = np.asarray(variables['batch_stats'][f'stage_{stage}']['embedding'])
    nearest = np.argmin(((residual[:, None] - codebook[None])**2).sum(-1), axis=1)
    np.testing.assert_array_equal(out.indices[:, stage], nearest)
    counts = np.bincount(nearest, minlength=8)
    np.testing.assert_array_equal(out.code_counts[stage], counts)
    # Zero-debiased EMA: the stored cluster sizes are the raw EMA from zero.
    np.testing.assert_allclose(updates['batch_stats'][f'stage_{stage}']['ema_cluster_size'],
                               0.1 * counts, rtol=1e-6)
    residual = residual - codebook[nearest]
  np.testing.assert_allclose(out.quantized, np.asarray(x) - residual, atol=1e-6)
  np.testing.assert_allclose(rvq.apply(variables, out.indices, method=ResidualVQ.embed),
                             out.quantized, atol=1e-6)
  g = normal((64, 4), seed=5)
  np.testing.assert_allclose(
      jax.grad(lambda x: jnp.sum(g * rvq.apply(variables, x).quantized))(x), g, atol=1e-6)


def test_quantizer_dropout_keeps_the_first_stages_per_example():
  x = normal((16, 3, 3, 4))
  rvq = ResidualVQ(3, 8, 4, quantizer_dropout=1.0)
  variables = rvq.init(jax.random.key(0), x)
  full = rvq.apply(variables, x)
  stage_codes = [rvq.apply(variables, full.indices[..., i],
                           method=lambda m, c, i=i: m.stages[i].embed(c)) for i in range(3)]
  dropped = call(rvq, variables, x, train=True, key=7)
  again = call(rvq, variables, x, train=True, key=7)
  np.testing.assert_array_equal(dropped.quantized, again.quantized)  # a function of the key
  kept_counts = []
  for b in range(16):
    matches = [n for n in range(1, 4) if np.allclose(
        dropped.quantized[b], sum(stage_codes[i][b] for i in range(n)), atol=1e-6)]
    assert matches, b
    kept_counts.append(matches[0])
  assert len(set(kept_counts)) > 1  # examples keep different numbers of stages
  np.testing.assert_allclose(call(rvq, variables, x).quantized, full.quantized)  # eval: all
  with pytest.raises(ValueError, match="rngs=\\{'codebook': key\\}"):
    rvq.apply(variables, x, train=True, mutable=['batch_stats'])


def test_residual_kmeans_init_and_restarts_act_per_stage():
  x = normal((256, 4))
  rvq = ResidualVQ(2, 8, 4, codebook_init='kmeans', dead_code_threshold=0.5)
  variables = rvq.init(jax.random.key(0), x)
  _, updates = rvq.apply(variables, x, train=True, mutable=['batch_stats'],
                         rngs={'codebook': jax.random.key(1)})
  for stage in ('stage_0', 'stage_1'):
    new = updates['batch_stats'][stage]
    assert int(new['counter']) == 1 and 'code_usage' in new
    assert not np.allclose(new['embedding'], variables['batch_stats'][stage]['embedding'])


def test_residual_bfloat16_and_bad_fields():
  rvq = ResidualVQ(2, 8, 4)
  x = normal((2, 4, 4, 4)).astype(jnp.bfloat16)
  variables = rvq.init(jax.random.key(0), x)
  out = jax.jit(lambda v, x: call(rvq, v, x))(variables, x)
  chex.assert_type(out.quantized, jnp.bfloat16)
  chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
  chex.assert_type(out.indices, jnp.int32)
  with pytest.raises(ValueError, match='num_quantizers must be an integer >= 1, got 0'):
    ResidualVQ(0, 8, 4)
  with pytest.raises(ValueError, match=r'quantizer_dropout must be in \[0, 1\], got 1.5'):
    ResidualVQ(2, 8, 4, quantizer_dropout=1.5)
  with pytest.raises(ValueError, match=r'codes of shape \[\.\.\., 2\]'):
    rvq.apply(variables, jnp.zeros((3,), jnp.int32), method=ResidualVQ.embed)


# ---- Every family on 8 devices ----

FAMILIES = {
    'fsq': lambda axis=None: FSQ((8, 5, 4), axis_name=axis),
    'lfq': lambda axis=None: LFQ(3, entropy_temperature=0.5, axis_name=axis),
    'rvq': lambda axis=None: ResidualVQ(2, 8, 3, decay=0.9, axis_name=axis),
    'rotation': lambda axis=None: VectorQuantizerEMA(8, 3, decay=0.9, rotation_trick=True,
                                                     axis_name=axis),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_eight_devices_equal_one(mesh, family):
  x = normal((64, 3))
  module = FAMILIES[family]()
  variables = module.init(jax.random.key(1), x)

  def stats(module, variables, x):
    (out, updates) = module.apply(variables, x, train=True, mutable=['batch_stats'])
    grad = jax.grad(lambda x: jnp.sum(module.apply(variables, x).quantized ** 2))(x)
    return out.perplexity, out.code_counts, updates.get('batch_stats', {}), out.loss, grad

  single = jax.jit(lambda v, x: stats(module, v, x))(variables, x)
  replicated = NamedSharding(mesh, P())
  sharded = jax.jit(lambda v, x: stats(module, v, x),
                    out_shardings=(replicated,) * 4 + (NamedSharding(mesh, P('data')),))(
                        jax.device_put(variables, replicated),
                        jax.device_put(x, NamedSharding(mesh, P('data'))))
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)
  # Inside shard_map, axis_name makes the counts (and the EMA, the batch entropy) global.
  per_device = FAMILIES[family]('data')
  mapped = jax.jit(jax.shard_map(
      lambda v, x: stats(per_device, v, x)[:3], mesh=mesh, in_specs=(P(), P('data')),
      out_specs=(P(), P(), P())))(variables, x)
  chex.assert_trees_all_close(mapped, single[:3], rtol=1e-5, atol=1e-6)
  if family == 'lfq':
    batch_entropy = lambda m, x: m.apply({}, x, method=LFQ.entropy_terms)[1]
    global_batch = jax.jit(jax.shard_map(lambda x: batch_entropy(per_device, x), mesh=mesh,
                                         in_specs=P('data'), out_specs=P()))(x)
    np.testing.assert_allclose(global_batch, batch_entropy(module, x), rtol=1e-5)
