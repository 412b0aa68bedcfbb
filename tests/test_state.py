"""train/state.py: the train state, its initialisation, the k-step scan and the loop's keys."""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import state as state_lib
from train.errors import UserError

TX = optax.sgd(0.1)


def one_step(state, batch, scale):
  """A least-squares step on `w`, its random key drawn as every task's is."""
  noise = jax.random.uniform(state.step_key(), ())

  def loss_fn(params):
    return jnp.mean(jnp.square(params['w'] * batch - scale))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(TX, grads), {'loss': loss, 'noise': noise}


def fresh_state():
  return state_lib.init_train_state(lambda rng: {'params': {'w': jnp.float32(0.5)}}, TX,
                                    jax.random.key(3))


def test_scan_steps_equals_one_step_at_a_time_and_means_the_metrics():
  batches = jnp.asarray([[1.0, 2.0], [3.0, -1.0], [0.5, 0.25]], jnp.float32)  # k=3 steps of B=2
  scanned, metrics = jax.jit(state_lib.scan_steps(one_step))(fresh_state(), batches,
                                                             jnp.float32(2.0))
  stepped, losses, noises = fresh_state(), [], []
  for batch in batches:
    stepped, step_metrics = one_step(stepped, batch, jnp.float32(2.0))
    losses.append(step_metrics['loss'])
    noises.append(step_metrics['noise'])
  assert int(scanned.step) == 3
  np.testing.assert_allclose(scanned.params['w'], stepped.params['w'], rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(metrics['noise'], np.mean(noises), rtol=1e-6)
  assert len(set(np.asarray(noises).tolist())) == 3  # each step its own key
  chex.assert_type(metrics['loss'], jnp.float32)


def test_apply_gradients_is_one_optax_step_and_replaces_the_named_fields():
  state = fresh_state()
  new = state.apply_gradients(TX, {'w': jnp.float32(2.0)}, batch_stats={'n': jnp.float32(7)})
  assert int(new.step) == 1
  np.testing.assert_allclose(new.params['w'], 0.5 - 0.1 * 2.0, rtol=1e-6)
  assert float(new.batch_stats['n']) == 7.0
  np.testing.assert_array_equal(new.rng, state.rng)


def test_init_train_state_keeps_the_key_split_that_checkpoints_were_written_with():
  """The first half of the split initialises the model, the second seeds the steps: the rule
  both tasks had, so that runs and their checkpoints reproduce."""
  seen = []

  def init_variables(rng):
    seen.append(rng)
    return {'params': {'w': jnp.zeros(2)}, 'batch_stats': {'mean': jnp.ones(2)}}

  state = state_lib.init_train_state(init_variables, TX, jax.random.key(3))
  init_rng, step_rng = jax.random.split(jax.random.key(3))
  np.testing.assert_array_equal(jax.random.key_data(seen[0]), jax.random.key_data(init_rng))
  np.testing.assert_array_equal(state.rng, jax.random.key_data(step_rng))
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  np.testing.assert_array_equal(state.batch_stats['mean'], np.ones(2))
  assert fresh_state().batch_stats == {}


@pytest.mark.parametrize('name', ['cifar10', 'quickstart', 'tpu', 'imagenet128',
                                  'prior_quickstart', 'prior_cifar10'])
def test_every_config_has_the_loops_keys(name):
  config = importlib.import_module(f'train.configs.{name}').get_config()
  missing = set(state_lib.loop_config()) - set(config)
  assert not missing, missing


def test_model_dtype_is_popped_and_an_unknown_one_is_named():
  fields = {'dtype': 'bfloat16', 'width': 8}
  assert state_lib.pop_model_dtype(fields) == jnp.bfloat16 and fields == {'width': 8}
  assert state_lib.pop_model_dtype({}) == jnp.float32
  with pytest.raises(UserError, match=r"config.model.dtype='float16'; accepted: \['bfloat16', "
                                      r"'float32'\]"):
    state_lib.pop_model_dtype({'dtype': 'float16'})
