"""The VQ families' own maths: the nearest code, the seed's straight-through gradients, the EMA
equations and modes. Shapes, dtypes, jit, devices and bad input: test_quantizer_contract.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqvae_jax import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.codebook import nearest_code, squared_distances

K, D = 16, 4


def inputs(shape=(2, 3, 5, D), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


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
