"""FSQ (vqvae_jax/fsq.py): the official notebook's values and indices, round trips over every
recommended codebook, the straight-through gradient by hand, dtypes, jit, 8 devices, bad input.

conftest.py gives the process 8 CPU devices for the multi-device tests.
"""

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import normal
from vqvae_jax import FSQ
from vqvae_jax.fsq import RECOMMENDED_LEVELS

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'fsq_golden.npz')


@pytest.fixture(scope='module')
def golden():
  data = np.load(GOLDEN)
  return [{key: data[f'{key}_{i}'] for key in ('levels', 'inputs', 'quantized', 'indices',
                                               'codebook')}
          for i in range(len([k for k in data if k.startswith('levels_')]))]


def by_hand(levels, eps=1e-3):
  """float64 `half_l`, `offset`, `shift` and `half_width` of the paper, per dimension."""
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 - eps) / 2
  offset = np.where(levels % 2 == 1, 0.0, 0.5)
  return half_l, offset, np.tan(offset / half_l), levels // 2


# ---- The official notebook ----

def test_golden_file_covers_odd_even_and_large_inputs(golden):
  """So that the golden test below cannot pass on easy cases only."""
  levels = np.concatenate([case['levels'] for case in golden])
  assert len(golden) >= 8 and set(levels % 2) == {0, 1} and {2, 16} <= set(levels)
  assert {tuple(case['levels']) for case in golden} >= set(RECOMMENDED_LEVELS.values())
  inputs = np.concatenate([case['inputs'].ravel() for case in golden])
  assert np.isinf(inputs).any() and (np.abs(inputs[np.isfinite(inputs)]) > 1e29).any()
  assert (np.abs(inputs[inputs != 0]) < 1e-5).any()
  # Every value of every dimension occurs, the outer levels included.
  for case in golden:
    hw = case['levels'] // 2
    digits = np.round(case['quantized'] * hw + hw)
    for dim, level in enumerate(case['levels']):
      assert set(digits[:, dim]) == set(range(level)), case['levels']


def test_equals_the_official_notebook(golden):
  for case in golden:
    fsq = FSQ(tuple(int(l) for l in case['levels']))
    inputs = jnp.asarray(case['inputs'])
    for out in (fsq.apply({}, inputs), jax.jit(lambda x: fsq.apply({}, x))(inputs)):
      np.testing.assert_allclose(out.quantized, case['quantized'], rtol=0, atol=1e-6)
      np.testing.assert_array_equal(out.indices, case['indices'])
    codebook = fsq.apply({}, jnp.arange(fsq.codebook_size), method=FSQ.embed)
    np.testing.assert_allclose(codebook, case['codebook'], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(
        fsq.apply({}, jnp.asarray(case['indices']), method=FSQ.embed), out.quantized)


def test_bound_is_the_papers_formula():
  levels = (8, 6, 5, 2, 16, 3)
  z = normal((256, 6), scale=3.0)
  half_l, offset, shift, half_width = by_hand(levels)
  bounded = FSQ(levels).bound(z)
  chex.assert_type(bounded, jnp.float32)
  np.testing.assert_allclose(bounded, np.tanh(np.float64(z) + shift) * half_l - offset,
                             rtol=0, atol=2e-6)
  # Within +-half_l of -offset (tanh saturates at 1 in float32), so that rounding gives the
  # L integers from -(L // 2) to (L - 1) // 2, each of them.
  assert np.all(np.abs(np.asarray(bounded) + offset) <= half_l + 1e-6)
  saturated = np.round(FSQ(levels).bound(jnp.array([-1e9, 1e9])[:, None] * jnp.ones(6)))
  np.testing.assert_array_equal(saturated, [-half_width, (np.asarray(levels) - 1) // 2])


# ---- The implicit codebook ----

@pytest.mark.parametrize('bits', sorted(RECOMMENDED_LEVELS))
def test_recommended_levels_round_trip_every_code(bits):
  levels = RECOMMENDED_LEVELS[bits]
  fsq = FSQ(levels)
  size = math.prod(levels)
  # About 2^bits codes: [7, 5, 5, 5, 5] has 4,375 for 2^12, the others 2^bits or fewer.
  assert fsq.codebook_size == size and abs(math.log2(size) - bits) < 0.1
  indices = jnp.arange(size, dtype=jnp.int32)
  codes = np.asarray(fsq.apply({}, indices, method=FSQ.embed))
  chex.assert_shape(codes, (size, len(levels)))
  assert len(np.unique(codes, axis=0)) == size and np.abs(codes).max() == 1.0
  # Inputs whose bounded values are 0.9 times each code's level (well inside its rounding
  # cell): the inverse of the bound, in float64.
  half_l, offset, shift, half_width = by_hand(levels)
  z = np.arctanh((0.9 * codes * half_width + offset) / half_l) - shift
  assert np.isfinite(z).all()
  out = jax.jit(lambda x: fsq.apply({}, x))(jnp.asarray(z, jnp.float32))
  np.testing.assert_array_equal(out.indices, indices)  # indices -> embed -> indices
  np.testing.assert_array_equal(out.quantized, codes)  # embed(indices) == quantized, bitwise
  np.testing.assert_array_equal(out.code_counts, np.ones(size))
  np.testing.assert_allclose(out.perplexity, size, rtol=1e-3)
  # The mixed radix, by hand: digit_i = code_i * half_width_i + half_width_i.
  digits = np.round(codes * half_width + half_width).astype(np.int64)
  basis = np.concatenate([[1], np.cumprod(levels[:-1])])
  np.testing.assert_array_equal(digits @ basis, np.arange(size))


def test_embed_keeps_the_index_shape():
  fsq = FSQ((8, 5, 5, 5))
  indices = jax.random.randint(jax.random.key(0), (2, 3, 4), 0, 1000)
  codes = fsq.apply({}, indices, method=FSQ.embed)
  chex.assert_shape(codes, (2, 3, 4, 4))
  chex.assert_type(codes, jnp.float32)
  flat = fsq.apply({}, indices.reshape(-1), method=FSQ.embed)
  np.testing.assert_array_equal(codes.reshape(-1, 4), flat)
  np.testing.assert_array_equal(fsq.apply({}, np.asarray(indices, np.int64), method=FSQ.embed),
                                codes)


@pytest.mark.parametrize('dtype', [jnp.int8, jnp.uint8, jnp.int16, jnp.uint16, jnp.uint32])
def test_embed_of_narrow_integer_codes_equals_int32(dtype):
  """The mixed radix of 64,000 codes does not fit int8 or int16: embed widens them first (it
  gave NaN for code 5 as int8)."""
  fsq = FSQ((8, 8, 8, 5, 5, 5))
  wide = np.arange(min(jnp.iinfo(dtype).max, 63_999) + 1, dtype=np.int64)
  wide = wide[np.linspace(0, len(wide) - 1, 97).astype(int)]
  want = fsq.apply({}, jnp.asarray(wide, jnp.int32), method=FSQ.embed)
  narrow = jnp.asarray(wide, dtype)
  np.testing.assert_array_equal(fsq.apply({}, narrow, method=FSQ.embed), want)
  np.testing.assert_array_equal(jax.jit(lambda i: fsq.apply({}, i, method=FSQ.embed))(narrow),
                                want)
  assert not np.any(np.isnan(want))


# ---- Gradient ----

@pytest.mark.parametrize('levels', [(8, 5, 4), (7, 6, 2), (16, 3, 8, 5)])
def test_straight_through_gradient_is_the_bounds_derivative(levels):
  """d sum(w * quantized) / dz = w * d bound(z)/dz / half_width, with
  d bound / dz = (1 - tanh(z + shift)^2) * half_l, for moderate and saturating z."""
  fsq = FSQ(levels)
  z = normal((64, len(levels)), scale=2.0)
  w = normal((64, len(levels)), seed=1)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(w * fsq.apply({}, z).quantized)))(z)
  half_l, _, shift, half_width = by_hand(levels)
  expected = (np.float64(w) * (1 - np.tanh(np.float64(z) + shift)**2) * half_l / half_width)
  # float32 `1 - tanh^2` loses digits where tanh is near 1: atol 1e-6.
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert np.abs(expected).min() < 1e-2 < np.abs(expected).max()  # both regimes occur


def test_gradient_reaches_bfloat16_inputs():
  fsq = FSQ((8, 6, 5))
  z = normal((16, 3)).astype(jnp.bfloat16)
  grad = jax.grad(lambda z: jnp.sum(fsq.apply({}, z).quantized.astype(jnp.float32)))(z)
  chex.assert_type(grad, jnp.bfloat16)
  half_l, _, shift, half_width = by_hand((8, 6, 5))
  expected = (1 - np.tanh(np.float64(z.astype(jnp.float32)) + shift)**2) * half_l / half_width
  np.testing.assert_allclose(np.float32(grad), expected, rtol=1e-2)


# ---- Dtypes, shapes, jit ----

@pytest.mark.parametrize('shape', [(3,), (5, 3), (2, 4, 4, 3)])
def test_shapes_and_dtypes(shape):
  fsq = FSQ((8, 6, 5))
  x = normal(shape)
  assert fsq.init(jax.random.key(0), x) == {}  # no parameters, no state
  out = fsq.apply({}, x, train=True)
  chex.assert_shape([out.quantized, out.indices, out.code_counts], [shape, shape[:-1], (240,)])
  chex.assert_type([out.quantized, out.loss, out.perplexity, out.code_counts],
                   jnp.float32)
  chex.assert_type(out.indices, jnp.int32)
  chex.assert_rank([out.loss, out.perplexity], 0)
  assert out.encodings is None and out.distances is None
  assert float(out.loss) == 0.0 and float(out.code_counts.sum()) == math.prod(shape[:-1])
  assert np.abs(np.asarray(out.quantized)).max() <= 1.0
  chex.assert_trees_all_equal(jax.jit(lambda x: fsq.apply({}, x))(x), out)


def test_counts_and_perplexity_by_hand():
  fsq = FSQ((3, 4))
  x = normal((500, 2), seed=4)
  out = fsq.apply({}, x)
  counts = np.bincount(np.asarray(out.indices), minlength=12)
  np.testing.assert_array_equal(out.code_counts, counts)
  p = counts / counts.sum()
  nonzero = p[p > 0]
  np.testing.assert_allclose(out.perplexity, np.exp(-np.sum(nonzero * np.log(nonzero))),
                             rtol=1e-5)
  assert (counts > 0).sum() == 12


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_their_dtype_and_float32_statistics(dtype):
  fsq = FSQ((8, 6, 5))
  x = normal((2, 8, 8, 3), scale=2.0).astype(dtype)
  out = jax.jit(lambda x: fsq.apply({}, x))(x)
  chex.assert_type(out.quantized, dtype)
  chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
  chex.assert_type(out.indices, jnp.int32)
  # The same codes as the float32 inputs of equal value: the arithmetic is float32.
  reference = fsq.apply({}, x.astype(jnp.float32))
  np.testing.assert_array_equal(out.indices, reference.indices)
  np.testing.assert_array_equal(out.quantized, reference.quantized.astype(dtype))
  np.testing.assert_array_equal(out.code_counts, reference.code_counts)
  assert float(out.perplexity) == float(reference.perplexity) > 10


def test_fields_and_codebook_size():
  names = [f.name for f in dataclasses.fields(FSQ) if f.name not in ('parent', 'name')]
  assert names == ['levels', 'eps', 'axis_name']
  fsq = FSQ([8, 5, 5, 5])
  assert fsq.levels == (8, 5, 5, 5) and hash(fsq) == hash(FSQ((8, 5, 5, 5)))
  assert fsq.eps == 1e-3 and fsq.axis_name is None and fsq.codebook_size == 1000
  assert FSQ((np.int64(4), 3)).levels == (4, 3)
  # With eps = 0 the bound reaches the outer level itself (tanh saturates at 1 in float32).
  wide = FSQ((5,), eps=0.0).bound(jnp.array([[40.0]]))
  np.testing.assert_allclose(wide, [[2.0]])


# ---- 8 devices ----

def test_sharded_jit_and_shard_map_equal_one_device(mesh):
  fsq = FSQ((8, 5, 4))
  x = normal((64, 3), scale=1.5)

  def stats(module, x):
    out = module.apply({}, x)
    grad = jax.grad(lambda x: jnp.sum(module.apply({}, x).quantized ** 2))(x)
    return out.perplexity, out.code_counts, out.quantized, out.indices, grad

  single = jax.jit(lambda x: stats(fsq, x))(x)
  assert float(single[0]) > 10  # many codes in use
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sharded_x = jax.device_put(x, rows)
  sharded = jax.jit(lambda x: stats(fsq, x),
                    out_shardings=(replicated, replicated, rows, rows, rows))(sharded_x)
  assert len(sharded[2].sharding.device_set) == 8
  chex.assert_trees_all_close(sharded, single, rtol=1e-6, atol=1e-7)
  # Inside shard_map each device sees 8 vectors; axis_name sums the counts over all 64.
  per_device = FSQ((8, 5, 4), axis_name='data')
  mapped = jax.jit(jax.shard_map(
      lambda x: stats(per_device, x), mesh=mesh, in_specs=P('data'),
      out_specs=(P(), P(), P('data'), P('data'), P('data'))))(sharded_x)
  chex.assert_trees_all_close(mapped, single, rtol=1e-6, atol=1e-7)
  # Without axis_name each device counts only its own 8 vectors.
  local = jax.jit(jax.shard_map(lambda x: fsq.apply({}, x).code_counts, mesh=mesh,
                                in_specs=P('data'), out_specs=P('data')))(sharded_x)
  assert local.shape == (8 * 160,) and float(local[:160].sum()) == 8


# ---- Bad input ----

@pytest.mark.parametrize('kwargs, match', [
    (dict(levels=(8, 1, 5)), r'every level must be >= 2 .* levels=\(8, 1, 5\) with 1\.'),
    (dict(levels=(0,)), r'levels=\(0,\) with 0\.'),
    (dict(levels=(4, -3)), r'levels=\(4, -3\) with -3\.'),
    (dict(levels=()), r'levels must be a non-empty sequence of integers >= 2, got \(\)'),
    (dict(levels=[]), r'non-empty sequence .* got \[\]'),
    (dict(levels=(8, 2.5)), r'sequence of integers >= 2, got \(8, 2.5\)'),
    (dict(levels=8), 'sequence of integers >= 2, got 8'),
    (dict(levels=(True, 3)), r'got \(True, 3\)'),
    (dict(levels=(2**16, 2**16)), r'prod\(levels\) must be < 2\^31 .* 4294967296 codes'),
    (dict(levels=(8, 8), eps=1.0), r'eps must be in \[0, 1\), got 1.0'),
    (dict(levels=(8, 8), eps=-0.1), r'eps must be in \[0, 1\), got -0.1'),
])
def test_bad_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    FSQ(**kwargs)


def test_bad_inputs():
  fsq = FSQ((8, 8, 8))
  for shape in [(4, 5), (3, 2), (), (0,)]:
    with pytest.raises(ValueError, match=r'\[\.\.\., 3\] \(len\(levels\) for levels='
                       r'\(8, 8, 8\)\), got shape ' + (r'\(\)' if not shape else
                                                       r'\(' + ', '.join(map(str, shape)))):
      fsq.apply({}, jnp.zeros(shape))
  with pytest.raises(TypeError, match='floating-point inputs, got int32'):
    fsq.apply({}, jnp.zeros((4, 3), jnp.int32))


def test_bad_codes():
  fsq = FSQ((8, 8, 8))
  with pytest.raises(ValueError, match=r'got code 512 .* must be in \[0, 512\)'):
    fsq.apply({}, jnp.array([3, 512]), method=FSQ.embed)
  with pytest.raises(ValueError, match='got code -1'):
    fsq.apply({}, np.array([[0, -1]]), method=FSQ.embed)
  with pytest.raises(TypeError, match=r'integers in \[0, 512\), got dtype float32'):
    fsq.apply({}, jnp.array([0.0, 1.0]), method=FSQ.embed)
  with pytest.raises(TypeError, match='integers'):
    fsq.apply({}, [0.5], method=FSQ.embed)
  # Under jit the values are unknown here: an out-of-range code gives NaN, never a valid code.
  traced = np.asarray(jax.jit(lambda i: fsq.apply({}, i, method=FSQ.embed))(
      jnp.array([511, 512, -1, 0])))
  assert np.isfinite(traced[[0, 3]]).all() and np.isnan(traced[1:3]).all()
  np.testing.assert_array_equal(traced[0], fsq.apply({}, jnp.array(511), method=FSQ.embed))
