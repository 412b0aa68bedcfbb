"""The VQ-VAE's training step: the seed's loss and optimizer, `k` steps per call (`train.state`).

The loss is the seed's: `mse(recon, x) / data_variance + vq_loss`, with images scaled to
`x / 255 - 0.5`. Batches arrive as uint8 and are scaled on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import optax

from train.errors import UserError
from train.state import Metrics, TrainState, init_train_state, pop_model_dtype, scan_steps
from vqvae_jax import VQVAE

Array = jax.Array


def model_from_config(model_config: Any, image_channels: int) -> VQVAE:
  """`VQVAE` from a config's `model` section; bad values raise a `UserError` naming them."""
  fields = dict(model_config)
  dtype = pop_model_dtype(fields)
  known = set(VQVAE.__dataclass_fields__) - {'parent', 'name', 'image_channels', 'dtype'}
  for key in fields:
    if key not in known:
      raise UserError(f'unknown config key model.{key}; accepted: {sorted(known)}.')
  try:
    return VQVAE(**fields, image_channels=image_channels, dtype=dtype)
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
  return init_train_state(
      lambda init_rng: model.init(init_rng, to_model_input(example_images), train=False), tx,
      rng)


def make_train_step(model: VQVAE, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, Array, Array], Tuple[TrainState, Metrics]]:
  """`train_steps(state, images, data_variance) -> (state, metrics)`, not yet jitted.

  `images` is uint8 `[k, B, H, W, C]`: `k` optimizer steps run in one `lax.scan`, so that one
  dispatch does `k` steps and a small model is not bound by Python. `metrics` are float32
  means over the `k` steps: `loss`, `nmse` (the seed's recon_error), `vq_loss`, `perplexity`.
  """

  def one_step(state: TrainState, images_uint8: Array, data_variance: Array):
    images = to_model_input(images_uint8)
    step_rng = state.step_key()

    def loss_fn(params):
      (recon, vq), updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
          mutable=['batch_stats'], rngs={'codebook': step_rng})
      nmse = jnp.mean(jnp.square(recon - images)) / data_variance
      return nmse + vq.loss, (nmse, vq, updates.get('batch_stats', {}))

    (loss, (nmse, vq, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(tx, grads, batch_stats=batch_stats)
    return state, {'loss': loss, 'nmse': nmse, 'vq_loss': vq.loss, 'perplexity': vq.perplexity}

  # A scan body is not XLA's entry computation, where XLA:CPU rewrites convolutions into its
  # fast form; `vqvae_jax.convolutions.conv2d` gives every convolution, gradients included, that
  # form itself, which is what keeps a step in `scan` as fast as one outside it (0.5 s, not 35
  # s, on CPU). Models whose convolutions bypass it lose that on CPU.
  return scan_steps(one_step)

