"""The quantizer contract (`vqvae_jax.quantizer_api`), once, over every registered family.

As Haiku's `vqvae_test.py` runs each test over both of its quantizers, each test here runs over
`CASES`: one small config per family in `FAMILIES` (a new family must add one, see
`test_every_family_has_a_case`), plus the options that change the estimator or the state (the
rotation trick; k-means init and restarts). What is a family's own maths (FSQ's golden values,
LFQ's entropies, residual VQ's stages and dropout, the rotation's gradient) stays in its own
test file.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import normal
from vqvae_jax import RECOMMENDED, quantizer_api
from vqvae_jax.quantizers import rotation_trick

D = 4  # every case quantizes [..., 4]
CASES = {
    'vq': dict(family='vq', num_embeddings=16, embedding_dim=D),
    'ema': dict(family='ema', num_embeddings=16, embedding_dim=D, decay=0.9),
    'ema_recommended': dict(family='ema', num_embeddings=16, embedding_dim=D,
                            **dict(RECOMMENDED, dead_code_threshold=1.0)),
    'vq_rotation': dict(family='vq', num_embeddings=16, embedding_dim=D, rotation_trick=True),
    'fsq': dict(family='fsq', levels=(4, 3, 5, 2)),
    # A temperature and groups that make the batch entropy depend on every device's vectors.
    'lfq': dict(family='lfq', embedding_dim=D, entropy_temperature=0.5, entropy_groups=2),
    'rvq': dict(family='rvq', num_quantizers=2, num_embeddings=8, embedding_dim=D),
}
RNGS = {'codebook': jax.random.key(2)}


def surrogate(name, apply, x, out):
  """The differentiable function of `x` whose gradient `quantized` carries: `x` itself for the
  straight-through estimator; FSQ's bound over its half-widths; the rotation trick of `x` to
  its codes."""
  if name == 'fsq':
    half_width = np.asarray(CASES['fsq']['levels']) // 2
    return apply(x, method='bound') / half_width.astype(np.float32)
  if name == 'vq_rotation':
    return rotation_trick(x.reshape(-1, D), apply(out.indices, method='embed').reshape(-1, D))
  return x


def build(name, **module_kwargs):
  return quantizer_api.build(CASES[name], **module_kwargs)


def train_call(module, variables, x, g, axis=None):
  """A training call: the output, the updated state and the gradient of `sum(g * quantized) +
  loss` to `x` (inside shard_map, `axis`, the loss is pmean'd into the global one)."""

  def objective(x):
    out, updates = module.apply(variables, x, train=True, mutable=['batch_stats'], rngs=RNGS)
    loss = out.loss if axis is None else jax.lax.pmean(out.loss, axis)
    dot = jnp.sum(g * out.quantized.astype(jnp.float32))
    dot = dot if axis is None else jax.lax.psum(dot, axis)
    return dot + loss, (out, updates.get('batch_stats', {}))

  (_, (out, state)), grad = jax.value_and_grad(objective, has_aux=True)(x)
  return out, state, grad


def init(module, x):
  return module.init(jax.random.key(1), x)


# 64 vectors with a leading axis of 8: one row of it per device in the multi-device test.
SHAPE = (8, 2, 4, D)


@functools.lru_cache(maxsize=None)
def reference(name):
  """One device, float32, computed once per case for the tests below: the module, its
  variables, the inputs and cotangents, the jitted training call, and its eager result."""
  module = build(name)
  x, g = normal(SHAPE), normal(SHAPE, seed=1)
  variables = init(module, x)
  jitted = jax.jit(functools.partial(train_call, module))
  return module, variables, x, g, jitted, train_call(module, variables, x, g)


def test_every_family_has_a_case():
  assert {case['family'] for case in CASES.values()} == set(quantizer_api.FAMILIES)


@pytest.mark.parametrize('name', sorted(CASES))
def test_shapes_dtypes_the_protocol_and_jit(name):
  module, variables, x, g, jitted, (out, state, grad) = reference(name)
  assert isinstance(module, quantizer_api.Quantizer)
  assert module.embedding_dim == D
  q, k = module.codes_per_position, module.codebook_size
  chex.assert_shape([out.quantized, grad], SHAPE)
  chex.assert_type([out.quantized, out.loss, out.perplexity, out.code_counts, grad],
                   jnp.float32)
  chex.assert_shape(out.indices, SHAPE[:-1] if q == 1 else SHAPE[:-1] + (q,))
  chex.assert_type(out.indices, jnp.int32)
  chex.assert_shape([out.loss, out.perplexity], ())
  chex.assert_shape(out.code_counts, (k,) if q == 1 else (q, k))
  np.testing.assert_array_equal(np.sum(out.code_counts, axis=-1), 64)
  assert 0 <= int(out.indices.min()) and int(out.indices.max()) < k
  chex.assert_tree_all_finite((out.quantized, out.loss, out.perplexity, state, grad))
  # jit equals eager.
  chex.assert_trees_all_close(jitted(variables, x, g), (out, state, grad), rtol=1e-5,
                              atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_embed_of_the_indices_is_quantized_and_the_gradient_is_the_estimators(name):
  module = build(name)
  x = normal((6, D), scale=2.0)
  variables = init(module, x)
  g = normal(x.shape, seed=1)
  apply = functools.partial(module.apply, variables)
  out = apply(x)
  np.testing.assert_allclose(apply(out.indices, method='embed'), out.quantized, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda i: apply(i, method='embed'))(out.indices),
                             out.quantized, atol=1e-6)
  # The loss's own gradient is left out: only the estimator's.
  grad = jax.grad(lambda x: jnp.sum(g * apply(x).quantized))(x)
  expected = jax.grad(lambda x: jnp.sum(g.reshape(-1, D) *
                                        surrogate(name, apply, x, out).reshape(-1, D)))(x)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(grad))) > 0


@pytest.mark.parametrize('name', sorted(CASES))
def test_bfloat16_inputs_give_float32_statistics(name):
  module, variables, x, g, jitted, _ = reference(name)
  x = x.astype(jnp.bfloat16)
  out, state, grad = jax.jit(functools.partial(train_call, module))(variables, x, g)
  # The same values in float32: the same codes and statistics.
  reference_out, reference_state, _ = jitted(variables, x.astype(jnp.float32), g)
  chex.assert_type([out.quantized, grad], jnp.bfloat16)
  chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
  chex.assert_trees_all_equal_dtypes(state, reference_state)
  np.testing.assert_array_equal(out.indices, reference_out.indices)
  chex.assert_trees_all_close((out.loss, out.perplexity, out.code_counts, state),
                              (reference_out.loss, reference_out.perplexity,
                               reference_out.code_counts, reference_state),
                              rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(CASES))
def test_eight_devices_under_jit_and_shard_map_equal_one(name, mesh):
  """A batch sharded over 8 devices under `jit`, and split by `shard_map` with `axis_name`,
  gives one device's outputs, state updates and gradient (codes, counts, EMA sums, k-means
  points and restart candidates are global)."""
  _, variables, x, g, jitted, _ = reference(name)
  single = jitted(variables, x, g)
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sharded = jitted(jax.device_put(variables, replicated), jax.device_put(x, by_row),
                   jax.device_put(g, by_row))
  assert len(sharded[2].sharding.device_set) == 8
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)

  per_device = build(name, axis_name='data')

  def mapped(variables, x, g):
    out, state, grad = train_call(per_device, variables, x, g, 'data')
    return (out.quantized, out.indices, jax.lax.pmean(out.loss, 'data'), out.perplexity,
            out.code_counts, state, grad)

  outputs = jax.jit(jax.shard_map(mapped, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                  out_specs=(P('data'), P('data'), P(), P(), P(), P(),
                                             P('data'))))(variables, x, g)
  out, state, grad = single
  chex.assert_trees_all_close(
      outputs, (out.quantized, out.indices, out.loss, out.perplexity, out.code_counts, state,
                grad), rtol=1e-5, atol=1e-6)


# One table of bad fields for every family: each names the field and the value.
BAD_FIELDS = [
    (dict(family='vqq'), r"family must be one of \('vq', 'ema', 'fsq', 'lfq', 'rvq'\), "
                         r"got 'vqq'"),
    (dict(family='fsq', levels=(8, 8), num_embeddings=4), "no field 'num_embeddings'.*levels"),
    (dict(family='lfq', embedding_dim=9, codebook_init='kmeans'), "no field 'codebook_init'"),
    (dict(CASES['vq'], num_embeddings=0), 'num_embeddings must be an integer >= 1, got 0'),
    (dict(CASES['vq'], codebook_init='kmeans++'), "codebook_init must be one of.*'kmeans\\+\\+'"),
    (dict(CASES['vq'], usage_decay=1.0), r'usage_decay must be a number in \[0, 1\), got 1.0'),
    (dict(CASES['vq'], rotation_trick=1), 'rotation_trick must be one of .*got 1'),
    (dict(CASES['vq'], kmeans_iters=-1), 'kmeans_iters must be an integer >= 0, got -1'),
    (dict(CASES['vq'], dead_code_threshold=-0.5), 'dead_code_threshold must be a number >= 0'),
    (dict(CASES['vq'], codebook_dim=0), 'codebook_dim must be an integer >= 1, got 0'),
    (dict(CASES['vq'], entropy_weight=-1.0), 'entropy_weight must be a number >= 0, got -1.0'),
    (dict(CASES['vq'], entropy_temperature=0.0), 'entropy_temperature must be a number > 0'),
    (dict(CASES['ema'], decay=1.0), r'decay must be a number in \[0, 1\), got 1.0'),
    (dict(CASES['ema'], epsilon=-1.0), 'epsilon must be a number >= 0, got -1.0'),
    (dict(family='fsq', levels=(8, 1)), 'every level must be an integer >= 2, got 1'),
    (dict(family='fsq', levels=()), 'levels must be a non-empty sequence'),
    (dict(family='fsq', levels=(2**16, 2**16)), r'prod\(levels\) must be < 2\^31'),
    (dict(family='lfq', embedding_dim=31), r'embedding_dim must be an integer in \[1, 30\]'),
    (dict(family='lfq', embedding_dim=4, entropy_temperature=0.0),
     'entropy_temperature must be a number > 0, got 0.0'),
    (dict(family='lfq', embedding_dim=4, commitment_cost=float('nan')),
     'commitment_cost must be a number >= 0, got nan'),
    (dict(family='lfq', embedding_dim=18), 'set entropy_groups'),
    (dict(CASES['rvq'], num_quantizers=0), 'num_quantizers must be an integer >= 1, got 0'),
    (dict(CASES['rvq'], quantizer_dropout=1.5), r'quantizer_dropout must be a number in \[0, 1\]'),
    (dict(CASES['rvq'], num_embeddings=True), 'num_embeddings must be an integer >= 1, got True'),
]


@pytest.mark.parametrize('config, match', BAD_FIELDS)
def test_bad_fields_name_the_value(config, match):
  with pytest.raises(ValueError, match=match):
    quantizer_api.build(config)


@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_inputs_and_codes(name):
  module = build(name)
  x = normal((3, D))
  variables = init(module, x)
  apply = functools.partial(module.apply, variables)
  with pytest.raises(ValueError, match=rf'inputs of shape \[\.\.\., {D}\].*got shape \(3, 5\)'):
    apply(normal((3, 5)))
  with pytest.raises(TypeError, match='floating-point inputs, got int32'):
    apply(jnp.zeros((3, D), jnp.int32))
  q, k = module.codes_per_position, module.codebook_size
  codes = lambda value: jnp.full((2, q) if q > 1 else (2,), value)
  with pytest.raises(TypeError, match='codes must be integers'):
    apply(codes(1.0), method='embed')
  for bad in (k, -2):
    with pytest.raises(ValueError, match=f'got code {bad} .*codes must be in \\[0, {k}\\)'):
      apply(codes(bad), method='embed')
  # Under jit the values are not known: a bad code embeds to NaN, never to a valid code, in
  # every integer dtype (uint8 255 is no marker); the good ones embed as when concrete.
  embed = jax.jit(lambda i: apply(i, method='embed'))
  got = embed(jnp.stack([codes(k - 1), codes(k), codes(-2)]))
  np.testing.assert_array_equal(got[0], apply(codes(k - 1), method='embed'))
  assert np.isfinite(got[0]).all() and np.isnan(got[1:]).all()
  got = embed(jnp.stack([codes(k - 1), codes(255)]).astype(jnp.uint8))  # every case: k < 255
  np.testing.assert_array_equal(got[0], apply(codes(k - 1), method='embed'))
  assert np.isnan(got[1]).all()
