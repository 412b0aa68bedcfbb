"""What every training task shares: the train state, its initialisation, the `k`-step scan, and
the config keys the loop reads.

A task (the VQ-VAE in `train/trainer.py`, the prior in `train/prior_training.py`) writes one
optimizer step, `one_step(state, batch, *step_args) -> (state, metrics)`; `scan_steps` turns it
into the `k`-steps-per-dispatch body that `train.loop.run` jits.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from train.errors import UserError

Array = jax.Array
Metrics = Dict[str, Array]
# The dtypes a config's `model.dtype` may name.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def pop_model_dtype(fields: Dict[str, Any]) -> Any:
  """Removes `dtype` (default 'float32') from a config's `model` fields and returns it as a
  jnp dtype; an unknown name raises a `UserError` naming it and the accepted ones."""
  dtype = fields.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise UserError(f'config.model.dtype={dtype!r}; accepted: {sorted(DTYPES)}.')
  return DTYPES[dtype]


@struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree, checkpointed whole."""

  step: Array  # int32 scalar: optimizer steps taken
  params: Any
  batch_stats: Any  # non-trainable state updated by the step (the EMA quantizer's); {} for none
  opt_state: Any
  rng: Array  # uint32 key data: the base key of the steps' random streams

  def step_key(self) -> Array:
    """This step's random key: a pure function of the base key and the step."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

  def apply_gradients(self, tx: optax.GradientTransformation, grads: Any,
                      **changes: Any) -> 'TrainState':
    """The state after one optimizer step with `grads`; `changes` replace other fields
    (e.g. `batch_stats`)."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **changes)


def init_train_state(init_variables: Callable[[Array], Dict[str, Any]],
                     tx: optax.GradientTransformation, rng: Array) -> TrainState:
  """A fresh state at step 0.

  Args:
    init_variables: `rng -> variables`, the model's `init` with its example input bound; the
      variables hold `params` and, optionally, `batch_stats`.
    tx: the optimizer; its state is initialised from the params.
    rng: split into the key `init_variables` gets and the base key of the steps' streams.

  Returns:
    A `TrainState` with `step == 0`.
  """
  init_rng, step_rng = jax.random.split(rng)
  variables = init_variables(init_rng)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(step_rng))


def scan_steps(one_step: Callable[..., Tuple[TrainState, Metrics]]
               ) -> Callable[..., Tuple[TrainState, Metrics]]:
  """`train_steps(state, batches, *step_args) -> (state, metrics)`, not yet jitted.

  Args:
    one_step: `(state, batch, *step_args) -> (state, metrics)`, one optimizer step.

  Returns:
    A function that runs `one_step` once per leading index of `batches` (`[k, B, ...]`) in one
    `lax.scan`, so that one dispatch does `k` steps and a small model is not bound by Python;
    its metrics are the float32 means over the `k` steps.
  """

  def train_steps(state: TrainState, batches: Any, *step_args: Any):
    state, metrics = jax.lax.scan(lambda s, batch: one_step(s, batch, *step_args), state,
                                  batches)
    return state, jax.tree.map(jnp.mean, metrics)

  return train_steps


def loop_config() -> ml_collections.ConfigDict:
  """The keys `train.loop` reads, with their defaults; every task's config starts from it."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.batch_size = 32
  config.learning_rate = 3e-4
  config.num_train_steps = 10_000
  config.steps_per_dispatch = 10  # optimizer steps per jit call

  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  # A training split of at most this many bytes is kept on the device; a larger one streams
  # from disk, decoded in `data_workers` grain worker processes (no more than the host's cores:
  # on a laptop, more would only take CPU from the step).
  config.data_on_device_max_bytes = 2 * 1024**3
  config.data_workers = min(8, os.cpu_count() or 1)
  return config
