"""The VQ-VAE's training step: the seed's loss and optimizer, `k` steps per call (`train.state`).

The loss is the seed's: `mse(recon, x) / data_variance + vq_loss`, with images scaled to
`x / 255 - 0.5`. Batches arrive as uint8 and are scaled on the device.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax

from train.errors import UserError
from train.state import Metrics, TrainState, init_train_state, pop_model_dtype, scan_steps
from vqvae_jax import QUANTIZERS, VQVAE
from vqvae_jax.quantizers import CODEBOOK_OPTIONS

Array = jax.Array


def model_from_config(model_config: Any, image_channels: int) -> VQVAE:
  """`VQVAE` from a config's `model` section; bad values raise a `UserError` naming them.

  The section holds the architecture and `quantizer`: `family` and one section of fields per
  family (`train/configs/quantizer_families.py`); the model gets `family` and its own section. A
  section written before the quantizer had its own config (a `run.json` of an older run) is
  read as today's (`upgrade_model_config`).
  """
  fields = upgrade_model_config(_as_dict(model_config))
  dtype = pop_model_dtype(fields)
  known = set(VQVAE.__dataclass_fields__) - {'parent', 'name', 'image_channels', 'dtype'}
  for key in fields:
    if key not in known:
      raise UserError(f'unknown config key model.{key}; accepted: {sorted(known)}.')
  if fields.get('quantizer') is not None:
    fields['quantizer'] = _chosen_quantizer(fields['quantizer'])
  try:
    return VQVAE(**fields, image_channels=image_channels, dtype=dtype)
  except ValueError as e:
    raise UserError(f'config.model: {e}') from None


def _chosen_quantizer(sections: Any) -> Dict[str, Any]:
  """`{'family': f, **sections[f]}` from `config.model.quantizer`."""
  sections = dict(sections)
  family = sections.get('family')
  if family not in QUANTIZERS:
    raise UserError(f'config.model.quantizer.family={family!r}; accepted: {QUANTIZERS}.')
  if not isinstance(sections.get(family), Mapping):
    raise UserError(f'config.model.quantizer has no section {family!r} for its family; add '
                    f'config.model.quantizer.{family} with the fields of that family.')
  return dict(family=family, **sections[family])


def identity_of_model_config(model_config: Any) -> Dict[str, Any]:
  """What of a `model` section defines the model: the section, today's layout, with only the
  chosen family's quantizer fields (the other families' sections change nothing)."""
  fields = upgrade_model_config(_as_dict(model_config))
  sections = fields.get('quantizer')
  if isinstance(sections, Mapping) and sections.get('family') in sections:
    family = sections['family']
    fields['quantizer'] = {'family': family, family: dict(sections[family])}
  return fields


def _as_dict(section: Any) -> Dict[str, Any]:
  """A config section (a ConfigDict, or a dict read from `run.json`) as nested dicts."""
  return section.to_dict() if hasattr(section, 'to_dict') else dict(section)


# The keys of a `model` section from before the quantizer had its own config.
_ARCHITECTURE_KEYS = ('num_hiddens', 'num_residual_layers', 'num_residual_hiddens',
                      'residual_skip', 'dtype')
_LEGACY_LFQ_KEYS = {'lfq_entropy_weight': 'entropy_weight',
                    'lfq_entropy_temperature': 'entropy_temperature',
                    'lfq_entropy_groups': 'entropy_groups'}


def upgrade_model_config(fields: Dict[str, Any]) -> Dict[str, Any]:
  """A `model` section in today's layout (returned as it is) from either layout.

  The older one held the architecture, the quantizer's fields and `quantizer` (a family name,
  or None: `decay > 0` picks `'ema'`, else `'vq'`) side by side; LFQ's fields had an `lfq_`
  prefix and FSQ's levels were `fsq_levels`. It becomes the architecture plus
  `quantizer = {'family': f, f: {the fields that family reads}}`, the same model.
  """
  if isinstance(fields.get('quantizer'), Mapping):
    return fields
  old = dict(fields)
  upgraded = {key: old.pop(key) for key in _ARCHITECTURE_KEYS if key in old}
  family = old.pop('quantizer', None) or ('ema' if old.get('decay', 0.0) > 0 else 'vq')
  codebook = {key: old[key] for key in ('num_embeddings', 'embedding_dim', 'commitment_cost',
                                        'distance_chunk_size', *CODEBOOK_OPTIONS) if key in old}
  ema = {key: old[key] for key in ('decay', 'epsilon', 'zero_debias') if key in old}
  sections = {
      'vq': codebook,
      'ema': {**codebook, **ema},
      'fsq': {'levels': old.get('fsq_levels', (8, 8, 8))},
      'lfq': {'embedding_dim': old.get('embedding_dim', 64),
              'commitment_cost': old.get('commitment_cost', 0.25),
              **{new: old[key] for key, new in _LEGACY_LFQ_KEYS.items() if key in old}},
      'rvq': {**codebook, **ema, **{key: old[key] for key in ('num_quantizers',
                                                              'quantizer_dropout')
                                    if key in old}},
  }
  if family not in sections:
    raise UserError(f'config.model.quantizer={family!r}; accepted: {QUANTIZERS}.')
  upgraded['quantizer'] = {'family': family, family: sections[family]}
  return upgraded


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

