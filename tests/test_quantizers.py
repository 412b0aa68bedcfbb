"""Quantizer behaviour: straight-through gradients, EMA equations, modes, shapes, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae_jax import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.quantizers import nearest_code, squared_distances

K, D = 16, 4


def inputs(shape=(2, 3, 5, D), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize('quantizer', [VectorQuantizer(K, D), VectorQuantizerEMA(K, D)])
@pytest.mark.parametrize('shape', [(7, D), (2, 3, 5, D), (1, 2, 2, 2, D)])
def test_shapes_and_dtypes(quantizer, shape):
  x = inputs(shape)
  variables = quantizer.init(jax.random.key(1), x)
  out = quantizer.apply(variables, x)
  chex.assert_shape(out.quantized, shape)
  chex.assert_shape(out.indices, shape[:-1])
  chex.assert_shape(out.code_counts, (K,))
  chex.assert_rank([out.loss, out.perplexity], 0)
  chex.assert_type([out.quantized, out.loss, out.perplexity, out.code_counts],
                   jnp.float32)
  chex.assert_type(out.indices, jnp.int32)
  assert out.encodings is None and out.distances is None  # N x K only on request
  np.testing.assert_allclose(out.code_counts.sum(), np.prod(shape[:-1]))


def test_nearest_code_is_l2_argmin_and_quantized_is_that_code():
  quantizer = VectorQuantizer(K, D, return_distances=True, return_encodings=True)
  x = inputs()
  variables = quantizer.init(jax.random.key(1), x)
  codebook = np.asarray(variables['params']['embedding']) * K  # U(-1, 1): many codes win
  out = quantizer.apply({'params': {'embedding': codebook}}, x)
  flat = np.asarray(x).reshape(-1, D)
  expected = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
  np.testing.assert_allclose(out.distances, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out.indices.reshape(-1), expected.argmin(1))
  np.testing.assert_allclose(out.quantized.reshape(-1, D), codebook[expected.argmin(1)],
                             atol=1e-6)
  np.testing.assert_array_equal(out.encodings.argmax(1), expected.argmin(1))
  chex.assert_shape([out.encodings, out.distances], (flat.shape[0], K))
  assert len(np.unique(expected.argmin(1))) > 4


def test_chunked_search_finds_the_same_indices():
  x = jax.random.normal(jax.random.key(0), (1000, 8))
  codebook = jax.random.normal(jax.random.key(1), (300, 8))
  direct = jnp.argmin(squared_distances(x, codebook), axis=1)
  for chunk in (1, 7, 128, 999, 1000, 5000):
    np.testing.assert_array_equal(nearest_code(x, codebook, chunk), direct)


def test_straight_through_gradients():
  """d(out)/d(inputs) is the identity; the codebook gets only the q_latent gradient."""
  quantizer = VectorQuantizer(K, D, commitment_cost=0.25)
  x = inputs()
  params = quantizer.init(jax.random.key(1), x)['params']
  cotangent = inputs(seed=3)

  def decoder_term(x, params):
    return jnp.sum(quantizer.apply({'params': params}, x).quantized * cotangent)

  grad_x, grad_params = jax.grad(decoder_term, argnums=(0, 1))(x, params)
  np.testing.assert_allclose(grad_x, cotangent, atol=1e-6)  # the encoder gets the decoder's
  np.testing.assert_array_equal(grad_params['embedding'], 0.0)  # not the codebook

  def vq_loss(x, params):
    return quantizer.apply({'params': params}, x).loss

  grad_x, grad_params = jax.grad(vq_loss, argnums=(0, 1))(x, params)
  out = quantizer.apply({'params': params}, x)
  flat, codes = np.asarray(x).reshape(-1, D), np.asarray(params['embedding'])[
      np.asarray(out.indices).reshape(-1)]
  n = flat.size
  # loss = mean((q - sg(x))^2) + beta * mean((sg(q) - x)^2)
  np.testing.assert_allclose(grad_x.reshape(-1, D), 0.25 * 2 * (flat - codes) / n, atol=1e-7)
  expected = np.zeros((K, D), np.float32)
  np.add.at(expected, np.asarray(out.indices).reshape(-1), 2 * (codes - flat) / n)
  np.testing.assert_allclose(grad_params['embedding'], expected, atol=1e-7)


def hand_ema_update(state, flat, decay, eps, k):
  onehot = np.eye(k)[np.argmin(((flat[:, None] - state['embedding'][None]) ** 2).sum(-1), 1)]
  size = state['ema_cluster_size'] * decay + (1 - decay) * onehot.sum(0)
  n = size.sum()
  size = (size + eps) / (n + k * eps) * n
  ema_w = state['ema_w'] * decay + (1 - decay) * onehot.T @ flat
  return {'embedding': ema_w / size[:, None], 'ema_cluster_size': size, 'ema_w': ema_w}


def test_ema_update_equations():
  quantizer = VectorQuantizerEMA(K, D, decay=0.9, epsilon=1e-3)
  x = inputs()
  state = quantizer.init(jax.random.key(1), x)['batch_stats']
  state = jax.tree.map(np.asarray, state)
  # A warm state, so the update is not dominated by the cold start.
  state['ema_cluster_size'] = np.linspace(1, 3, K).astype(np.float32)
  state['ema_w'] = state['embedding'] * state['ema_cluster_size'][:, None]
  flat = np.asarray(x, np.float64).reshape(-1, D)
  expected = hand_ema_update(jax.tree.map(lambda a: a.astype(np.float64), state), flat, 0.9,
                             1e-3, K)
  out, updates = quantizer.apply({'batch_stats': state}, x, train=True, mutable=['batch_stats'])
  chex.assert_trees_all_close(dict(updates['batch_stats']), expected, rtol=1e-5, atol=1e-6)
  # The lookup used the codebook from before the update.
  before = quantizer.apply({'batch_stats': state}, x)
  np.testing.assert_array_equal(out.indices, before.indices)
  np.testing.assert_allclose(out.quantized, before.quantized)
  # loss = beta * e_latent only.
  codes = state['embedding'][np.asarray(out.indices).reshape(-1)]
  np.testing.assert_allclose(out.loss, 0.25 * np.mean((codes - flat) ** 2), rtol=1e-5)


def test_zero_debiased_ema():
  """Haiku's EMA: hidden = d*hidden + (1-d)*value from zero, average = hidden / (1 - d^t)."""
  decay, eps = 0.9, 1e-5
  quantizer = VectorQuantizerEMA(K, D, decay=decay, epsilon=eps, zero_debias=True)
  x1, x2 = inputs(seed=0), inputs(seed=1)
  variables = quantizer.init(jax.random.key(1), x1)
  state = variables['batch_stats']
  np.testing.assert_array_equal(state['ema_w'], 0.0)
  assert int(state['counter']) == 0
  hidden_n, hidden_w = np.zeros(K), np.zeros((K, D))
  codebook = np.asarray(state['embedding'], np.float64)
  for t, x in enumerate((x1, x2), start=1):
    flat = np.asarray(x, np.float64).reshape(-1, D)
    onehot = np.eye(K)[np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), 1)]
    hidden_n = decay * hidden_n + (1 - decay) * onehot.sum(0)
    hidden_w = decay * hidden_w + (1 - decay) * onehot.T @ flat
    size, w = hidden_n / (1 - decay**t), hidden_w / (1 - decay**t)
    smoothed = (size + eps) / (size.sum() + K * eps) * size.sum()
    codebook = w / smoothed[:, None]
    _, updates = quantizer.apply({'batch_stats': state}, x, train=True, mutable=['batch_stats'])
    state = updates['batch_stats']
    assert int(state['counter']) == t
    np.testing.assert_allclose(state['ema_cluster_size'], hidden_n, rtol=1e-5)
    np.testing.assert_allclose(state['ema_w'], hidden_w, rtol=1e-5, atol=1e-6)
    used = onehot.sum(0) > 0
    np.testing.assert_allclose(np.asarray(state['embedding'])[used], codebook[used], rtol=1e-4)
  # After one step, a code used by its inputs is their mean: no cold-start blow-up.
  flat = np.asarray(x1).reshape(-1, D)
  _, first = quantizer.apply(variables, x1, train=True, mutable=['batch_stats'])
  idx = np.asarray(quantizer.apply(variables, x1).indices).reshape(-1)
  code = idx[0]
  np.testing.assert_allclose(first['batch_stats']['embedding'][code],
                             flat[idx == code].mean(0), rtol=1e-3)


def test_eval_mode_changes_nothing():
  quantizer = VectorQuantizerEMA(K, D)
  x = inputs()
  variables = quantizer.init(jax.random.key(1), x)
  _, updates = quantizer.apply(variables, x, train=False, mutable=['batch_stats'])
  chex.assert_trees_all_equal(updates['batch_stats'], variables['batch_stats'])
  _, updates = quantizer.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(updates['batch_stats']['embedding'],
                         variables['batch_stats']['embedding'])


def test_train_without_mutable_batch_stats_is_a_clear_error():
  quantizer = VectorQuantizerEMA(K, D)
  x = inputs()
  variables = quantizer.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    quantizer.apply(variables, x, train=True)


@pytest.mark.parametrize('quantizer', [VectorQuantizer(K, D), VectorQuantizerEMA(K, D)])
def test_jit_vmap_grad(quantizer):
  x = inputs((4, 6, D))
  variables = quantizer.init(jax.random.key(1), x[0])
  eager = quantizer.apply(variables, x[0])
  jitted = jax.jit(quantizer.apply)(variables, x[0])
  chex.assert_trees_all_close(jitted, eager)
  batched = jax.vmap(quantizer.apply, in_axes=(None, 0))(variables, x)
  for i in range(4):
    np.testing.assert_array_equal(batched.indices[i], quantizer.apply(variables, x[i]).indices)
  grad = jax.grad(lambda x: quantizer.apply(variables, x).loss)(x[0])
  assert np.all(np.isfinite(grad)) and np.any(grad != 0)


@pytest.mark.parametrize('quantizer', [VectorQuantizer(K, D), VectorQuantizerEMA(K, D)])
def test_bfloat16_inputs_keep_float32_statistics(quantizer):
  x = inputs()
  variables = quantizer.init(jax.random.key(1), x)
  out32 = quantizer.apply(variables, x)
  out16 = quantizer.apply(variables, x.astype(jnp.bfloat16))
  assert out16.quantized.dtype == jnp.bfloat16
  chex.assert_type([out16.loss, out16.perplexity, out16.code_counts], jnp.float32)
  # Same codes as float32 distances on the bf16-rounded inputs.
  ref = quantizer.apply(variables, x.astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(out16.indices, ref.indices)
  np.testing.assert_allclose(out16.loss, ref.loss, rtol=1e-6)
  assert out32.loss.dtype == jnp.float32


def test_embed_returns_codes():
  quantizer = VectorQuantizer(K, D)
  x = inputs()
  variables = quantizer.init(jax.random.key(1), x)
  out = quantizer.apply(variables, x)
  codes = quantizer.apply(variables, out.indices, method=VectorQuantizer.embed)
  np.testing.assert_allclose(codes, out.quantized, atol=1e-6)


@pytest.mark.parametrize('make,match', [
    (lambda: VectorQuantizer(0, D), 'num_embeddings must be an integer >= 1, got 0'),
    (lambda: VectorQuantizerEMA(-3, D), 'num_embeddings must be an integer >= 1, got -3'),
    (lambda: VectorQuantizer(K, 0), 'embedding_dim must be an integer >= 1, got 0'),
    (lambda: VectorQuantizerEMA(K, D, decay=1.0), r'decay must be in \[0, 1\), got 1.0'),
    (lambda: VectorQuantizerEMA(K, D, decay=-0.1), r'decay must be in \[0, 1\), got -0.1'),
    (lambda: VectorQuantizer(K, D, commitment_cost=-1.0), 'commitment_cost must be >= 0'),
])
def test_bad_arguments_name_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize('quantizer', [VectorQuantizer(K, D), VectorQuantizerEMA(K, D)])
def test_wrong_last_dimension_names_the_shape(quantizer):
  with pytest.raises(ValueError, match=r'\[\.\.\., 4\].*got shape \(2, 3, 5\)'):
    quantizer.init(jax.random.key(0), jnp.zeros((2, 3, 5)))


@pytest.mark.parametrize('quantizer', [VectorQuantizer(K, D), VectorQuantizerEMA(K, D),
                                       VectorQuantizer(K, D, codebook_dim=3, cosine_codes=True)])
def test_embed_out_of_range_codes(quantizer):
  """Concrete codes outside [0, K): a ValueError naming the code and the range. Traced ones:
  NaN rows exactly there (a clamp, or take's wrap of -1 to K - 1, would give a valid code);
  the in-range rows are the codebook's, eager or jitted."""
  variables = quantizer.init(jax.random.key(1), inputs())
  embed = lambda indices: quantizer.apply(variables, indices, method=type(quantizer).embed)
  name = type(quantizer).__name__
  for bad in (K, 600, -1):
    with pytest.raises(ValueError, match=rf'{name}.embed: got code {bad} \(1 of 3 codes are '
                                         rf'out of range\); codes must be in \[0, {K}\)'):
      embed(np.array([0, bad, 3]))
  with pytest.raises(TypeError, match=rf'codes must be integers in \[0, {K}\), got dtype float32'):
    embed(jnp.array([0.0, 1.0]))
  indices = jnp.array([[0, K, 3], [-1, K - 1, 600]], jnp.int32)
  got = jax.jit(embed)(indices)
  chex.assert_shape(got, (2, 3, D))
  chex.assert_type(got, jnp.float32)
  out_of_range = np.array([[False, True, False], [True, False, True]])
  assert np.isnan(got[out_of_range]).all()
  valid = np.array([0, 3, K - 1])
  expected = embed(valid)
  assert np.isfinite(expected).all()
  np.testing.assert_array_equal(got[~out_of_range], expected)
  np.testing.assert_array_equal(jax.jit(embed)(valid), expected)
