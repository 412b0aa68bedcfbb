"""The Linen modules inside Flax NNX models, through `flax.nnx.bridge.ToNNX`.

For `VQVAE` (EMA quantizer) and each quantizer alone: the NNX model starts from the Linen
variables, takes two jitted Adam steps with `nnx.Optimizer`, and must end where the same two
steps of plain Linen `apply` + optax end: same losses, outputs, params and (moved) EMA state.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from vqvae_jax import VQVAE, VectorQuantizer, VectorQuantizerEMA

SMALL = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=8, num_embeddings=32,
             embedding_dim=8)
LEARNING_RATE = 1e-2
STEPS = 2
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def load_linen_variables(bridged: nnx.Module, variables) -> None:
  """Sets the variables of a lazily initialised `ToNNX` module to the Linen `variables`.

  `ToNNX` keeps a Linen variable `collection/a/b/c` as the attribute `a`, a nested dict
  `{'b': {'c': Variable}}`, whose Variable type comes from the collection (`nnx.Param` for
  `params`, `nnx.BatchStat` for `batch_stats`).
  """
  expected_type = {'params': nnx.Param, 'batch_stats': nnx.BatchStat}
  for (collection, attribute, *path), value in traverse_util.flatten_dict(
      dict(variables)).items():
    variable = getattr(bridged, attribute)
    for name in path:
      variable = variable[name]
    assert isinstance(variable, expected_type[collection]), (collection, attribute, path)
    chex.assert_equal_shape([variable.get_value(), value])
    variable.set_value(jnp.asarray(value))


def linen_variables(bridged: nnx.Module, attributes) -> dict:
  """The inverse of `load_linen_variables`: `{'params': ..., 'batch_stats': ...}` as numpy."""
  collections = {'params': {}, 'batch_stats': {}}
  for attribute in attributes:
    node = getattr(bridged, attribute)
    leaves = ({(): node} if isinstance(node, nnx.Variable) else traverse_util.flatten_dict(
        node, is_leaf=lambda _, x: isinstance(x, nnx.Variable)))
    for path, variable in leaves.items():
      collection = 'params' if isinstance(variable, nnx.Param) else 'batch_stats'
      collections[collection][(attribute, *path)] = np.asarray(variable.get_value())
  return {name: traverse_util.unflatten_dict(flat) for name, flat in collections.items() if flat}


class Pipeline(nnx.Module):
  """An NNX model around a bridged Linen module: an optional `nnx.Linear` in front (so that
  a bare quantizer has params upstream to train), then the Linen module."""

  def __init__(self, linen_module, features: int = 0, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(features, features, rngs=rngs) if features else None
    self.bridged = nnx.bridge.ToNNX(linen_module, rngs=rngs)

  def __call__(self, x, train: bool):
    if self.linear is not None:
      x = self.linear(x)
    return self.bridged(x, train=train, mutable=['batch_stats'] if train else False)


def loss_and_outputs(model_output, targets):
  """`(loss, outputs)` of a `VQVAE` (reconstruction MSE + VQ loss) or a quantizer (VQ loss
  + MSE of the quantized vectors to a target, so that a plain codebook gets a gradient)."""
  if isinstance(model_output, tuple):
    recon, vq = model_output
  else:
    recon, vq = model_output.quantized, model_output
  loss = jnp.mean(jnp.square(recon - targets)) + vq.loss
  return loss, {'output': recon, 'indices': vq.indices, 'vq_loss': vq.loss}


def nnx_training(pipeline: Pipeline, inputs, targets):
  """`STEPS` jitted Adam steps through NNX: the per-step losses and outputs."""
  optimizer = nnx.Optimizer(pipeline, optax.adam(LEARNING_RATE), wrt=nnx.Param)

  @nnx.jit
  def train_step(pipeline, optimizer, inputs, targets):
    loss_fn = lambda pipeline: loss_and_outputs(pipeline(inputs, train=True), targets)
    (loss, outputs), grads = nnx.value_and_grad(loss_fn, has_aux=True)(pipeline)
    optimizer.update(pipeline, grads)
    return loss, outputs

  return [train_step(pipeline, optimizer, inputs, targets) for _ in range(STEPS)]


def linen_training(module, variables, linear, inputs, targets):
  """The same steps with `module.apply` and optax: the per-step results and final variables.

  `linear` is `(kernel, bias)` of the NNX model's `nnx.Linear`, or None.
  """
  params = {'module': variables.get('params', {})}
  if linear is not None:
    params['linear'] = {'kernel': linear[0], 'bias': linear[1]}
  batch_stats = variables.get('batch_stats', {})
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, inputs, targets):
    def loss_fn(params):
      x = inputs if linear is None else inputs @ params['linear']['kernel'] + params['linear'][
          'bias']
      model_vars = {'params': params['module'], 'batch_stats': batch_stats}
      output, updates = module.apply({k: v for k, v in model_vars.items() if v}, x, train=True,
                                     mutable=['batch_stats'])
      loss, outputs = loss_and_outputs(output, targets)
      return loss, (outputs, updates.get('batch_stats', {}))

    (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, (loss, outputs)

  results = []
  for _ in range(STEPS):
    params, batch_stats, opt_state, result = train_step(params, batch_stats, opt_state, inputs,
                                                        targets)
    results.append(result)
  final = {k: v for k, v in (('params', params['module']), ('batch_stats', batch_stats)) if v}
  return results, final, params.get('linear')


CASES = {
    'vqvae_ema': (lambda: VQVAE(**SMALL, decay=0.99), 0,
                  lambda: jax.random.uniform(jax.random.key(10), (4, 16, 16, 3)) - 0.5),
    'vector_quantizer': (lambda: VectorQuantizer(16, 4), 4,
                         lambda: jax.random.normal(jax.random.key(10), (4, 5, 5, 4))),
    'vector_quantizer_ema': (lambda: VectorQuantizerEMA(16, 4, decay=0.9), 4,
                             lambda: jax.random.normal(jax.random.key(10), (4, 5, 5, 4))),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_nnx_bridge_training_equals_linen(case):
  """Init from the Linen variables, two `nnx.jit` steps with `nnx.Optimizer`: the same losses,
  outputs, params and batch_stats as two `jax.jit` steps of Linen `apply` + optax."""
  make_module, features, make_inputs = CASES[case]
  module = make_module()
  inputs = make_inputs()
  targets = inputs if features == 0 else jax.random.normal(jax.random.key(11), inputs.shape)
  linen_init = module.init(jax.random.key(1), inputs)

  pipeline = Pipeline(make_module(), features, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(pipeline.bridged, inputs)
  load_linen_variables(pipeline.bridged, linen_init)
  attributes = sorted({path[0] for collection in linen_init.values() for path in
                       traverse_util.flatten_dict(collection)})
  chex.assert_trees_all_equal(linen_variables(pipeline.bridged, attributes),
                              jax.tree.map(np.asarray, dict(linen_init)))
  linear = None
  if features:
    linear = (np.asarray(pipeline.linear.kernel.get_value()),
              np.asarray(pipeline.linear.bias.get_value()))

  nnx_results = nnx_training(pipeline, inputs, targets)
  linen_results, linen_final, linen_linear = linen_training(module, linen_init, linear, inputs,
                                                            targets)

  for step, (nnx_result, linen_result) in enumerate(zip(nnx_results, linen_results)):
    chex.assert_trees_all_close(nnx_result, linen_result, **TOLERANCE,
                                custom_message=f'step {step}')
  nnx_final = linen_variables(pipeline.bridged, attributes)
  chex.assert_trees_all_close(nnx_final, linen_final, **TOLERANCE)
  if features:
    chex.assert_trees_all_close(
        {'kernel': pipeline.linear.kernel.get_value(), 'bias': pipeline.linear.bias.get_value()},
        linen_linear, **TOLERANCE)
  # The steps did something: the EMA state moved, the params trained, the loss changed.
  moved = lambda before, after: not np.allclose(before, after)
  init_stats = traverse_util.flatten_dict(linen_init.get('batch_stats', {}))
  final_stats = traverse_util.flatten_dict(nnx_final.get('batch_stats', {}))
  ema_state = [key for key in init_stats if key[-1] in ('ema_cluster_size', 'ema_w')]
  assert len(ema_state) == (0 if isinstance(module, VectorQuantizer) else 2)
  for key in init_stats:
    assert moved(init_stats[key], final_stats[key]), key
  for key, value in traverse_util.flatten_dict(linen_init.get('params', {})).items():
    assert moved(value, traverse_util.flatten_dict(nnx_final['params'])[key]), key
  assert nnx_results[0][0] != nnx_results[1][0]


def test_linen_variables_load_with_one_nnx_update():
  """The README's way to start an NNX model from Linen variables (trained, or converted from
  the seed): `nnx.update(model, nnx.bridge.variables.linen_vars_to_nnx_attrs(variables))`."""
  module = VQVAE(**SMALL, decay=0.99)
  images = jax.random.uniform(jax.random.key(10), (2, 16, 16, 3)) - 0.5
  variables = module.init(jax.random.key(1), images)
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, images)
  assert not np.allclose(model.vq['embedding'].get_value(),
                         variables['batch_stats']['vq']['embedding'])  # other random init
  nnx.update(model, nnx.bridge.variables.linen_vars_to_nnx_attrs(variables))
  chex.assert_trees_all_equal(linen_variables(model, ['decoder', 'encoder', 'pre_vq_conv', 'vq']),
                              jax.tree.map(np.asarray, dict(variables)))
  assert isinstance(model.vq['ema_w'], nnx.BatchStat)
  recon, vq = model(images)
  expected_recon, expected_vq = module.apply(variables, images)
  np.testing.assert_array_equal(recon, expected_recon)
  np.testing.assert_array_equal(vq.indices, expected_vq.indices)
  np.testing.assert_array_equal(model.encode(images), expected_vq.indices)
