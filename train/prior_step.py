"""The prior's training step: teacher-forced cross-entropy and AdamW, `k` steps per call
(`train.state`); the prior built from a config."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from train.errors import UserError
from train.state import TrainState, init_train_state, pop_model_dtype, scan_steps
from vqvae_jax.autoregressive_prior import CodePrior, cross_entropy


def prior_from_config(config: ml_collections.ConfigDict, num_embeddings: int,
                      grid_shape: Tuple[int, int], num_classes: Optional[int]) -> CodePrior:
  """`CodePrior` from a config's `model` section; bad values raise a `UserError` naming them."""
  fields = dict(config.model)
  dtype = pop_model_dtype(fields)
  if not num_classes:
    fields.pop('label_dropout', None)
  try:
    return CodePrior(num_embeddings=num_embeddings, grid_shape=tuple(grid_shape),
                     num_classes=num_classes or None, dtype=dtype, **fields)
  except (TypeError, ValueError) as e:
    raise UserError(f'config.model: {e}') from None


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """A linear warmup from 0 over `warmup_steps`, then a cosine decay to a tenth of the rate
  at `num_train_steps`. A run no longer than its warmup only warms up (optax needs a decay of
  at least one step)."""
  warmup_steps = min(config.warmup_steps, config.num_train_steps)
  return optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, warmup_steps, max(config.num_train_steps, warmup_steps + 1),
      end_value=0.1 * config.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with `learning_rate_schedule`, as transformers are usually trained."""
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate_schedule(config), b2=0.95,
                                 weight_decay=config.weight_decay))


def create_train_state(prior: CodePrior, tx: optax.GradientTransformation, rng: jax.Array,
                       example: Dict[str, jax.Array]) -> TrainState:
  """A fresh state for `prior`; `example` holds `codes` `[1, h, w]` (and `labels` `[1]`)."""
  return init_train_state(
      lambda init_rng: prior.init(init_rng, example['codes'], example.get('labels')), tx, rng)


def make_train_step(prior: CodePrior, tx: optax.GradientTransformation):
  """`train_steps(state, batch) -> (state, metrics)`, `k` steps in a `lax.scan`, not jitted.

  `batch['codes']` is int32 `[k, B, h, w]` (and `batch['labels']` `[k, B]`). `metrics`:
  `loss` (nats per code, the mean teacher-forced cross-entropy) and `bits_per_code`.
  """

  def one_step(state: TrainState, batch: Dict[str, jax.Array]):
    codes = batch['codes']
    dropout_rng = state.step_key()

    def loss_fn(params):
      logits = prior.apply({'params': params}, codes, batch.get('labels'), train=True,
                           rngs={'dropout': dropout_rng})
      return jnp.mean(cross_entropy(logits, codes.reshape(len(codes), -1)))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(tx, grads)
    return state, {'loss': loss, 'bits_per_code': loss / math.log(2)}

  return scan_steps(one_step)
