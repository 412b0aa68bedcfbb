"""The train state and the jit-compiled training step: the seed's loss, optax, `k` steps per call.

The loss is the seed's: `mse(recon, x) / data_variance + vq_loss`, with images scaled to
`x / 255 - 0.5`. Batches arrive as uint8 and are scaled on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from train.errors import UserError
from vqvae_jax import VQVAE

Array = jax.Array
Metrics = Dict[str, Array]


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree, checkpointed whole."""

  step: Array  # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any  # the EMA quantizer's state; {} for the plain quantizer
  opt_state: Any
  rng: Array  # uint32 key data: the base key of the steps' random streams


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_from_config(model_config: Any, image_channels: int) -> VQVAE:
  """`VQVAE` from a config's `model` section; bad values raise a `UserError` naming them."""
  fields = dict(model_config)
  dtype = fields.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise UserError(f'config.model.dtype={dtype!r}; accepted: {sorted(DTYPES)}.')
  known = set(VQVAE.__dataclass_fields__) - {'parent', 'name', 'image_channels', 'dtype'}
  for key in fields:
    if key not in known:
      raise UserError(f'unknown config key model.{key}; accepted: {sorted(known)}.')
  try:
    return VQVAE(**fields, image_channels=image_channels, dtype=DTYPES[dtype])
  except ValueError as e:
    raise UserError(f'config.model: {e}') from None


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """The seed's optimizer: Adam with a constant learning rate."""
  return optax.adam(config.learning_rate)


def to_model_input(images_uint8: Array) -> Array:
  """uint8 `[..., H, W, C]` -> float32 in [-0.5, 0.5], the seed's `x / 255 - 0.5`."""
  return images_uint8.astype(jnp.float32) / 255.0 - 0.5


def create_train_state(model: VQVAE, tx: optax.GradientTransformation, rng: Array,
                       example_images: Array) -> TrainState:
  """A fresh state: the model's seed-like initialisation and the optimizer's."""
  init_rng, step_rng = jax.random.split(rng)
  variables = model.init(init_rng, to_model_input(example_images), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(step_rng))


def make_train_step(model: VQVAE, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Array, Array], Tuple[TrainState, Metrics]]:
  """`train_steps(state, images, data_variance) -> (state, metrics)`, not yet jitted.

  `images` is uint8 `[k, B, H, W, C]`: `k` optimizer steps run in one `lax.scan`, so that one
  dispatch does `k` steps and a small model is not bound by Python. `metrics` are float32
  means over the `k` steps: `loss`, `nmse` (the seed's recon_error), `vq_loss`, `perplexity`.
  """

  def one_step(state: TrainState, images_uint8: Array, data_variance: Array):
    images = to_model_input(images_uint8)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      (recon, vq), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
          mutable=['batch_stats'], rngs={'codebook': step_rng})
      nmse = jnp.mean(jnp.square(recon - images)) / data_variance
      return nmse + vq.loss, (nmse, vq, updates.get('batch_stats', {}))

    (loss, (nmse, vq, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    return state, {'loss': loss, 'nmse': nmse, 'vq_loss': vq.loss, 'perplexity': vq.perplexity}

  def train_steps(state: TrainState, images: Array, data_variance: Array):
    # A scan body is not XLA's entry computation, where XLA:CPU rewrites convolutions into its
    # fast form; `vqvae_jax.xla_cpu.conv2d` gives every convolution, gradients included, that
    # form itself, which is what keeps a step in `scan` as fast as one outside it (0.5 s, not 35
    # s, on CPU). Models whose convolutions bypass it lose that on CPU.
    state, metrics = jax.lax.scan(lambda s, x: one_step(s, x, data_variance), state, images)
    return state, jax.tree.map(jnp.mean, metrics)

  return train_steps

