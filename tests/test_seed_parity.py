"""The Flax modules against golden values made by the seed's own PyTorch code.

The golden files come from tests/golden/make_golden.py (needs torch); these tests do not.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqvae_jax import VQVAE, VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.convert import from_seed_state_dict, seed_architecture, to_seed_state_dict

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden')
# Must match tests/golden/make_golden.py.
COMMITMENT_COST, DECAY, LEARNING_RATE, DATA_VARIANCE = 0.25, 0.99, 3e-4, 0.06327
ATOL = 1e-4  # the bar; EMA codes reach ~1e5 after the cold start, hence also rtol


def load(variant):
  return dict(np.load(os.path.join(GOLDEN, f'seed_golden_{variant}.npz')))


def state_dict(golden, prefix):
  return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


def build(golden, decay):
  arch = seed_architecture(state_dict(golden, 'init/'))
  arch.pop('ema')
  return VQVAE(**arch, commitment_cost=COMMITMENT_COST, decay=decay)


@pytest.mark.parametrize('variant,decay', [('plain', 0.0), ('ema', DECAY)])
def test_forward_matches_seed(variant, decay):
  golden = load(variant)
  model = build(golden, decay)
  variables = from_seed_state_dict(state_dict(golden, 'init/'), model)
  images = golden['images'][0]
  recon, vq = model.apply(variables, images)
  np.testing.assert_allclose(recon, golden['eval/recon'], atol=ATOL)
  np.testing.assert_allclose(vq.loss, golden['eval/loss'], rtol=1e-5)
  np.testing.assert_allclose(vq.perplexity, golden['eval/perplexity'], rtol=1e-5)
  np.testing.assert_array_equal(vq.indices, golden['eval/indices'])
  np.testing.assert_allclose(vq.quantized, golden['eval/quantized'], atol=ATOL)


@pytest.mark.parametrize('variant,decay', [('plain', 0.0), ('ema', DECAY)])
def test_adam_training_matches_seed(variant, decay):
  """Three Adam steps of the seed's recipe give the seed's losses, weights and EMA state."""
  golden = load(variant)
  model = build(golden, decay)
  variables = from_seed_state_dict(state_dict(golden, 'init/'), model)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  optimizer = optax.adam(LEARNING_RATE)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, images):
    def loss_fn(params):
      (recon, vq), updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                         train=True, mutable=['batch_stats'])
      loss = jnp.mean((recon - images)**2) / DATA_VARIANCE + vq.loss
      return loss, (vq, updates.get('batch_stats', {}))
    (loss, (vq, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, (loss, vq.loss,
                                                                          vq.perplexity)

  arch = seed_architecture(state_dict(golden, 'init/'))
  losses = []
  for i, images in enumerate(golden['images'][:-1]):
    params, batch_stats, opt_state, metrics = step(params, batch_stats, opt_state, images)
    losses.append(metrics)
    if i == 0:
      expected = state_dict(golden, 'step1/')
      got = to_seed_state_dict({'params': params, 'batch_stats': batch_stats}, arch)
      for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=ATOL, err_msg=key)
  np.testing.assert_allclose(np.asarray(losses), golden['train/losses'], rtol=1e-4)
  expected = state_dict(golden, 'final/')
  got = to_seed_state_dict({'params': params, 'batch_stats': batch_stats}, arch)
  assert set(got) == set(expected)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=ATOL, err_msg=key)
  recon, vq = model.apply({'params': params, 'batch_stats': batch_stats}, golden['images'][-1])
  np.testing.assert_allclose(recon, golden['final_eval/recon'], atol=ATOL)
  np.testing.assert_allclose(vq.loss, golden['final_eval/loss'], rtol=1e-4)


def test_plain_quantizer_values_and_gradients_match_seed():
  golden = load('plain')
  embedding = golden['vq_init/_embedding.weight']
  k, d = embedding.shape
  vq = VectorQuantizer(k, d, COMMITMENT_COST)
  for call in range(2):
    inputs, cotangent = golden[f'vq{call}/inputs'], golden[f'vq{call}/cotangent']

    def objective(embedding, inputs):
      out = vq.apply({'params': {'embedding': embedding}}, inputs)
      return out.loss + jnp.sum(out.quantized * cotangent), out

    (_, out), (grad_embedding, grad_inputs) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(embedding, inputs)
    assert len(np.unique(out.indices)) > 10  # the test must exercise the argmin
    np.testing.assert_array_equal(out.indices, golden[f'vq{call}/indices'])
    np.testing.assert_allclose(out.quantized, golden[f'vq{call}/quantized'], atol=1e-6)
    np.testing.assert_allclose(out.loss, golden[f'vq{call}/loss'], rtol=1e-6)
    np.testing.assert_allclose(out.perplexity, golden[f'vq{call}/perplexity'], rtol=1e-5)
    np.testing.assert_allclose(grad_inputs, golden[f'vq{call}/grad_inputs'], atol=1e-6)
    np.testing.assert_allclose(grad_embedding, golden[f'vq{call}/grad_embedding'], atol=1e-6)


def test_ema_quantizer_updates_match_seed():
  """Two training calls: outputs, input gradients and the EMA state after each."""
  golden = load('ema')
  batch_stats = {'embedding': golden['vq_init/_embedding.weight'],
                 'ema_cluster_size': golden['vq_init/_ema_cluster_size'],
                 'ema_w': golden['vq_init/_ema_w']}
  k, d = batch_stats['embedding'].shape
  vq = VectorQuantizerEMA(k, d, COMMITMENT_COST, DECAY)
  for call in range(2):
    inputs, cotangent = golden[f'vq{call}/inputs'], golden[f'vq{call}/cotangent']

    def objective(inputs):
      out, updates = vq.apply({'batch_stats': batch_stats}, inputs, train=True,
                              mutable=['batch_stats'])
      return out.loss + jnp.sum(out.quantized * cotangent), (out, updates['batch_stats'])

    (_, (out, batch_stats)), grad_inputs = jax.value_and_grad(objective, has_aux=True)(inputs)
    np.testing.assert_array_equal(out.indices, golden[f'vq{call}/indices'])
    # After the cold start the codes are ~20, hence the relative tolerance.
    np.testing.assert_allclose(out.quantized, golden[f'vq{call}/quantized'], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.loss, golden[f'vq{call}/loss'], rtol=1e-6)
    np.testing.assert_allclose(out.perplexity, golden[f'vq{call}/perplexity'], rtol=1e-5)
    np.testing.assert_allclose(grad_inputs, golden[f'vq{call}/grad_inputs'], atol=1e-6)
    for ours, theirs in (('embedding', '_embedding.weight'),
                         ('ema_cluster_size', '_ema_cluster_size'), ('ema_w', '_ema_w')):
      np.testing.assert_allclose(batch_stats[ours], golden[f'vq{call}_after/{theirs}'],
                                 rtol=1e-5, atol=1e-6, err_msg=ours)
  # The seed's cold start collapses the codebook: the second call uses a single code.
  assert golden['vq1/perplexity'] == pytest.approx(1.0)


def test_parity_holds_under_the_trainers_xla_cpu_option():
  """The trainer hands XLA:CPU's elementwise ops to YNNPACK and its lone convolutions to XLA's
  own kernels (train/cpu_tuning.py); the seed's numbers must hold there too. XLA reads its
  flags once per process, hence the subprocess."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from train import cpu_tuning  # pylint: disable=g-import-not-at-top
  env = dict(os.environ)
  if not cpu_tuning.use_measured_cpu_fusions(env):
    pytest.skip(f'the trainer sets no XLA:CPU option with this jaxlib or XLA_FLAGS '
                f'({env.get("XLA_FLAGS")!r})')
  assert cpu_tuning.YNN_FUSION_FLAG in env['XLA_FLAGS']
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k',
       'not under_the_trainers_xla_cpu_option'], env=env, capture_output=True, text=True,
      check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert ' passed' in result.stdout and ' failed' not in result.stdout
