"""LFQ (MAGVIT-v2 lookup-free quantization): codes and indices, gradients by hand, the entropies
against brute force over every code and at extreme scales in bfloat16, the entropy groups.
Shapes, dtypes, jit, devices and bad input: test_quantizer_contract.py."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal
from vqvae_jax import LFQ
from vqvae_jax.codebook import perplexity_from_counts
from vqvae_jax.lfq import MAX_EXACT_ENTROPY_DIM, code_distribution


def apply(module, x, method=None):
  """`module.apply({}, x, method=method)`, jitted: one compilation instead of one per op."""
  return jax.jit(functools.partial(module.apply, {}, method=method))(x)


def all_codes(d):
  """float64 `[2^d, d]`: row i is code i, +1 where bit j of i is set (bit 0 = dimension 0)."""
  i = np.arange(2**d)[:, None]
  return np.where((i >> np.arange(d)) & 1, 1.0, -1.0)


def brute_force_probs(z, temperature):
  """float64 `[N, 2^D]`: softmax over all codes of -|z - c|^2 / T, enumerated."""
  z = np.asarray(z, np.float64)
  codes = all_codes(z.shape[1])
  logits = -((z[:, None, :] - codes[None]) ** 2).sum(-1) / temperature
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def entropy(p):
  return -np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300)), 0.0), axis=-1)


def brute_force_entropies(z, temperature):
  """(mean per-sample entropy, entropy of the batch-mean distribution), float64."""
  p = brute_force_probs(z, temperature)
  return entropy(p).mean(), entropy(p.mean(axis=0))


def commitment(z, beta):
  z = np.asarray(z, np.float64)
  return beta * np.mean((z - np.where(z > 0, 1.0, -1.0))**2)


# ---- Forward: codes, indices, counts ----

def test_counts_and_perplexity_by_hand():
  lfq = LFQ(5)
  x = normal((2, 3, 4, 5))
  out = apply(lfq, x)
  assert lfq.codebook_size == 32
  indices = np.asarray(out.indices).reshape(-1)
  np.testing.assert_array_equal(out.code_counts, np.bincount(indices, minlength=32))
  np.testing.assert_allclose(out.perplexity, perplexity_from_counts(out.code_counts))
  freq = np.bincount(indices, minlength=32) / indices.size
  np.testing.assert_allclose(out.perplexity, np.exp(entropy(freq)), rtol=1e-5)


@pytest.mark.parametrize('d', [1, 3, 6])
def test_every_code_round_trips(d):
  lfq = LFQ(d)
  codes = apply(lfq, jnp.arange(2**d), LFQ.embed)
  chex.assert_type(codes, jnp.float32)
  np.testing.assert_array_equal(codes, all_codes(d))  # bit j of the index is dimension j
  # Vectors of any magnitude with these signs give these indices, and exactly these codes.
  scales = np.asarray(jax.random.uniform(jax.random.key(d), (2**d, d), minval=1e-3, maxval=50))
  out = apply(lfq, jnp.asarray(codes * scales))
  np.testing.assert_array_equal(out.indices, np.arange(2**d))
  np.testing.assert_array_equal(out.quantized, codes)
  np.testing.assert_array_equal(out.code_counts, np.ones(2**d))


def test_embed_of_indices_is_quantized_bit_for_bit():
  lfq = LFQ(7)
  # The last rows are large: there the float32 sum z + (q - z) of the straight-through formula
  # would give 0 (1 - 1e8 rounds to -1e8); the forward value must still be the code.
  x = normal((4, 9, 7), scale=0.8).at[-1, -3:].multiply(1e8)
  out = apply(lfq, x)
  np.testing.assert_array_equal(apply(lfq, out.indices, LFQ.embed), out.quantized)
  np.testing.assert_array_equal(out.quantized, np.where(np.asarray(x) > 0, 1.0, -1.0))
  np.testing.assert_array_equal(
      out.indices, (np.asarray(x) > 0).astype(np.int64) @ (2**np.arange(7)))


def test_bit_order_and_zero():
  lfq = LFQ(5)
  np.testing.assert_array_equal(apply(lfq, jnp.array([[1., -1, -1, 1, -1]])).indices, [9])
  # z == 0 (and -0) gives -1, bit 0; the smallest normal positive float32 gives +1 (XLA:CPU
  # flushes subnormals to zero, so they count as 0 there).
  tiny = float(np.finfo(np.float32).tiny)
  out = apply(lfq, jnp.array([[0.0, -0.0, tiny, -tiny, 0.0]]))
  np.testing.assert_array_equal(out.quantized, [[-1, -1, 1, -1, -1]])
  np.testing.assert_array_equal(out.indices, [4])


def test_wide_indices_and_narrow_code_dtypes():
  lfq = LFQ(20, entropy_groups=2)
  x = jnp.where(jnp.arange(20) % 3 == 0, 1.0, -1.0)[None]
  out = apply(lfq, x)
  assert int(out.indices[0]) == sum(2**d for d in range(0, 20, 3))
  np.testing.assert_array_equal(apply(lfq, out.indices, LFQ.embed), x)
  # An int8 code of a 512-code LFQ is in range, whatever 512 is in int8.
  np.testing.assert_array_equal(apply(LFQ(9), jnp.array([5], jnp.int8), LFQ.embed),
                                all_codes(9)[[5]])


# ---- Gradients by hand ----

def test_commitment_value_and_gradient_by_hand():
  z = normal((8, 3, 4))
  beta = 0.3
  lfq = LFQ(4, commitment_cost=beta, entropy_weight=0.0)
  loss, grad = jax.jit(jax.value_and_grad(lambda z: lfq.apply({}, z).loss))(z)
  q = np.where(np.asarray(z) > 0, 1.0, -1.0)
  np.testing.assert_allclose(loss, commitment(z, beta), rtol=1e-6)
  np.testing.assert_allclose(grad, 2 * beta * (np.asarray(z) - q) / z.size, rtol=1e-5)


def test_entropy_gradient_equals_brute_force_gradient():
  """The factorised entropy term's gradient equals that of the enumerated softmax."""
  d, t = 4, 0.6
  z = normal((12, d), scale=0.5)
  lfq = LFQ(d, commitment_cost=0.0, entropy_weight=1.0, entropy_temperature=t)

  def brute(z):  # differentiable enumeration, float32
    codes = jnp.asarray(all_codes(d), jnp.float32)
    p = jax.nn.softmax(-jnp.sum((z[:, None] - codes) ** 2, -1) / t, axis=-1)
    h = lambda p: -jnp.sum(p * jnp.log(p), axis=-1)
    return jnp.mean(h(p)) - h(jnp.mean(p, axis=0))

  np.testing.assert_allclose(jax.jit(jax.grad(lambda z: lfq.apply({}, z).loss))(z),
                             jax.jit(jax.grad(brute))(z),
                             rtol=1e-4, atol=1e-6)


# ---- The entropy term against brute force ----

@pytest.mark.parametrize('groups', [1, 2, 4])
def test_code_distribution_is_the_softmax_over_every_code(groups):
  """p(c | z) over 2^4 codes factorises; each group's marginal is the brute force's."""
  d, t = 4, 0.7
  z = np.asarray(normal((10, d), scale=0.6))
  probs = np.asarray(code_distribution(jnp.asarray(z), t, groups))
  g = d // groups
  chex.assert_shape(probs, (10, groups, 2**g))
  full = brute_force_probs(z, t).reshape(10, *[2] * d)  # axes: bit d-1, ..., bit 0
  for k in range(groups):
    # Sum the other groups' bits out; keep bits k*g .. k*g + g - 1, most significant first.
    keep = [1 + (d - 1 - j) for j in range(k * g + g - 1, k * g - 1, -1)]
    other = tuple(a for a in range(1, d + 1) if a not in keep)
    marginal = full.sum(axis=other).reshape(10, -1)
    np.testing.assert_allclose(probs[:, k], marginal, rtol=1e-5, atol=1e-7)


def test_code_distribution_keeps_its_matmuls_float32_on_every_backend():
  """A TPU rounds a default-precision matmul's inputs to bfloat16, which would move logits of
  up to 1e4 by tens; CPU tests cannot see that, so check the precision the program asks for."""
  jaxpr = jax.make_jaxpr(lambda z: code_distribution(z, 0.01, 2))(jnp.zeros((8, 6)))
  dots = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == 'dot_general']
  assert len(dots) == 2
  for eqn in dots:
    assert eqn.params['precision'] in ((jax.lax.Precision.HIGHEST,) * 2,
                                       jax.lax.Precision.HIGHEST), eqn.params['precision']
  big = jnp.asarray([[30.0, -30.0, 0.5, 1e-3, -2.0, 7.0]])  # logits of up to 1.2e4 at T=0.01
  probs = code_distribution(big, 0.01, 1)[0, 0]
  assert float(jnp.sum(probs)) == pytest.approx(1.0, abs=1e-6)
  assert int(jnp.argmax(probs)) == 0b101101  # the signs of z, bit d = dimension d


@pytest.mark.parametrize('t, scale', [(0.5, 0.6), (0.01, 0.01), (0.01, 1.0)])
def test_exact_entropy_equals_brute_force_over_every_code(t, scale):
  d = 4
  z = np.asarray(normal((40, d), seed=2, scale=scale))
  lfq = LFQ(d, entropy_temperature=t)
  per_sample, batch = apply(lfq, jnp.asarray(z), LFQ.entropy_terms)
  expected_per_sample, expected_batch = brute_force_entropies(z, t)
  np.testing.assert_allclose(per_sample, expected_per_sample, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(batch, expected_batch, rtol=1e-4, atol=1e-6)
  out = apply(lfq, jnp.asarray(z))
  np.testing.assert_allclose(
      out.loss, commitment(z, 0.25) + 0.1 * (expected_per_sample - expected_batch),
      rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('groups', [2, 3, 6])
def test_grouped_entropy_is_the_brute_force_summed_over_groups(groups):
  d, t = 6, 0.5
  z = np.asarray(normal((40, d), seed=3, scale=0.6))
  lfq = LFQ(d, entropy_temperature=t, entropy_groups=groups)
  per_sample, batch = apply(lfq, jnp.asarray(z), LFQ.entropy_terms)
  g = d // groups
  expected_per_sample, exact_batch = brute_force_entropies(z, t)  # per-sample: not grouped
  expected_batch = sum(brute_force_entropies(z[:, k * g:(k + 1) * g], t)[1]
                       for k in range(groups))
  np.testing.assert_allclose(per_sample, expected_per_sample, rtol=1e-4)
  np.testing.assert_allclose(batch, expected_batch, rtol=1e-4)
  assert expected_batch > exact_batch + 1e-3  # the grouped form is another number...
  np.testing.assert_allclose(
      apply(lfq, jnp.asarray(z)).loss,
      commitment(z, 0.25) + 0.1 * (expected_per_sample - expected_batch), rtol=1e-4)
  # ... and one group is the exact form.
  np.testing.assert_array_equal(
      apply(LFQ(d, entropy_temperature=t, entropy_groups=1), jnp.asarray(z)).loss,
      apply(LFQ(d, entropy_temperature=t), jnp.asarray(z)).loss)


def test_weights_scale_their_terms():
  d, t = 5, 0.4
  z = np.asarray(normal((30, d), seed=4, scale=0.5))
  per_sample, batch = brute_force_entropies(z, t)
  lfq = LFQ(d, commitment_cost=0.7, entropy_weight=0.3, entropy_temperature=t,
            diversity_weight=0.5)
  np.testing.assert_allclose(apply(lfq, jnp.asarray(z)).loss,
                             commitment(z, 0.7) + 0.3 * (per_sample - 0.5 * batch), rtol=1e-4)


@pytest.mark.parametrize('d, groups', [(4, None), (6, 3), (8, 2)])
def test_entropy_signs_and_bounds(d, groups):
  """0 <= mean per-sample entropy <= batch entropy <= D log 2, so the term is <= 0; with one
  vector the two entropies are equal (the batch mean is that vector's distribution)."""
  lfq = LFQ(d, entropy_temperature=0.3, entropy_groups=groups)
  terms = lambda x: apply(lfq, x, LFQ.entropy_terms)
  for seed, scale in enumerate([1e-3, 0.1, 1.0, 30.0]):
    per_sample, batch = map(float, terms(normal((64, d), seed=seed, scale=scale)))
    assert 0 <= per_sample <= batch + 1e-5 and batch <= d * math.log(2) + 1e-5
  one_ps, one_batch = terms(normal((1, d), seed=9, scale=0.3))
  assert float(one_batch) > 0.5
  np.testing.assert_allclose(one_ps, one_batch, rtol=1e-5)
  # Every vector at 0: each distribution is uniform over the codes.
  np.testing.assert_allclose(terms(jnp.zeros((3, d))), [d * math.log(2)] * 2, rtol=1e-6)


# ---- Precision ----

@pytest.mark.parametrize('scale', [1e-30, 1.0, 1e15])
def test_bfloat16_entropies_at_extreme_scales(scale):
  lfq = LFQ(9, entropy_groups=3)
  x = normal((4, 6, 6, 9), scale=scale).astype(jnp.bfloat16)
  out = apply(lfq, x)
  chex.assert_type(out.quantized, jnp.bfloat16)
  chex.assert_type([out.loss, out.perplexity, out.code_counts], jnp.float32)
  chex.assert_shape(out.code_counts, (512,))
  assert np.isfinite(float(out.loss)) and np.isfinite(float(out.perplexity))
  # The statistics are those of the float32 values of the inputs, bit for bit.
  upcast = apply(lfq, x.astype(jnp.float32))
  np.testing.assert_array_equal(out.loss, upcast.loss)
  np.testing.assert_array_equal(out.indices, upcast.indices)
  np.testing.assert_array_equal(out.quantized.astype(jnp.float32), upcast.quantized)
  per_sample, batch = apply(lfq, x, LFQ.entropy_terms)
  chex.assert_type([per_sample, batch], jnp.float32)
  assert 0 <= float(per_sample) <= float(batch) + 1e-5
  grad = jax.jit(jax.grad(lambda x: lfq.apply({}, x).loss))(x)
  assert np.isfinite(np.asarray(grad, np.float32)).all()


def test_tiny_bfloat16_inputs_have_the_uniform_entropy():
  """At 1e-30 every logit 4z/T is ~0: p = 1/2 per dimension; a half-precision sigmoid near
  1/2 is where peers' entropies went negative."""
  lfq = LFQ(6, entropy_temperature=0.01)
  x = normal((32, 6), scale=1e-30).astype(jnp.bfloat16)
  np.testing.assert_allclose(apply(lfq, x, LFQ.entropy_terms),
                             [6 * math.log(2)] * 2, rtol=1e-6)


def test_infinite_logits_give_finite_entropies():
  """|z| near the float32 maximum makes 4z/T overflow to inf; the entropies stay 0 and finite."""
  lfq = LFQ(4)
  z = jnp.array([[3e38, -3e38, 1e37, -1e37]] * 2)
  per_sample, batch = apply(lfq, z, LFQ.entropy_terms)
  assert float(per_sample) == 0.0 and float(batch) == 0.0


# ---- Entropy groups ----

@pytest.mark.parametrize('kwargs, match', [
    (dict(embedding_dim=20), r'embedding_dim=20 > 16 .* set entropy_groups .* e\.g\. 2'),
    (dict(embedding_dim=17), r'embedding_dim=17 > 16 .* set entropy_groups .* e\.g\. 17'),
    (dict(embedding_dim=8, entropy_groups=3), r'divisor of embedding_dim=8 .* got 3'),
    (dict(embedding_dim=20, entropy_groups=1), r'divisor of embedding_dim=20 .* got 1'),
    (dict(embedding_dim=8, entropy_groups=0), r'entropy_groups .* got 0'),
    (dict(embedding_dim=8, entropy_groups=2.0), r'entropy_groups .* got 2\.0'),
    (dict(embedding_dim=8, entropy_groups=True), r'entropy_groups .* got True'),
])
def test_bad_entropy_groups(kwargs, match):
  with pytest.raises(ValueError, match=match):
    LFQ(**kwargs)


def test_accepted_limits():
  assert LFQ(MAX_EXACT_ENTROPY_DIM).codebook_size == 2**16  # the exact limit itself
  assert LFQ(20, entropy_groups=2).codebook_size == 2**20
  assert LFQ(20, entropy_weight=0.0).codebook_size == 2**20  # no entropy, nothing to hold
  assert LFQ(30, entropy_groups=2).codebook_size == 2**30
