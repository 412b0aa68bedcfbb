"""FSQ (vqvae_jax/fsq.py): the official notebook's values and indices, round trips over every
recommended codebook, the straight-through gradient by hand, counts, NaN inputs. Shapes,
dtypes, jit, devices and bad input: test_quantizer_contract.py."""

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


# ---- Counts, fields, NaN ----

def test_counts_and_perplexity_by_hand():
  fsq = FSQ((3, 4))
  x = normal((500, 2), seed=4)
  assert fsq.init(jax.random.key(0), x) == {}  # no parameters, no state
  out = fsq.apply({}, x)
  assert float(out.loss) == 0.0 and np.abs(np.asarray(out.quantized)).max() <= 1.0
  counts = np.bincount(np.asarray(out.indices), minlength=12)
  np.testing.assert_array_equal(out.code_counts, counts)
  p = counts / counts.sum()
  nonzero = p[p > 0]
  np.testing.assert_allclose(out.perplexity, np.exp(-np.sum(nonzero * np.log(nonzero))),
                             rtol=1e-5)
  assert (counts > 0).sum() == 12


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


def test_nan_in_nan_out():
  """A vector with a NaN gets no code: index -1, NaN where the input is, counted nowhere, and
  its index embeds to NaN under jit (a valid digit-0 index before)."""
  fsq = FSQ((8, 5, 5))
  x = jnp.array([[0.3, jnp.nan, -0.2], [0.3, 0.1, -0.2], [jnp.nan] * 3])
  out = jax.jit(lambda x: fsq.apply({}, x))(x)
  indices = np.asarray(out.indices)
  np.testing.assert_array_equal(indices[[0, 2]], [-1, -1])
  assert 0 <= indices[1] < fsq.codebook_size
  np.testing.assert_array_equal(np.isnan(out.quantized), np.isnan(x))
  assert float(out.code_counts.sum()) == 1.0
  assert np.isnan(jax.jit(lambda i: fsq.apply({}, i, method=FSQ.embed))(out.indices)[0]).all()
  with pytest.raises(ValueError, match='got code -1'):
    fsq.apply({}, np.asarray(out.indices), method=FSQ.embed)
