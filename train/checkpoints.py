"""Checkpoints (orbax `CheckpointManager`), the run's stored config, and loading a trained model
(`load_model`) or prior (`load_prior`).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash, a kill or a preemption mid-save leaves the previous checkpoints intact. A checkpoint
that still fails to restore is skipped in favour of the one before it.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from train.errors import UserError
from train import prior_step
from train.step import create_train_state, make_optimizer, model_from_config
from vqvae_jax import VQVAE
from vqvae_jax.autoregressive_prior import CodePrior

RUN_FILE = 'run.json'
# Config keys that define the model and the data it learns; a resumed run must keep them.
IDENTITY_KEYS = ('dataset', 'image_size', 'model')


class Checkpoints:
  """Periodic asynchronous saves into `workdir/checkpoints`, keeping the last `keep`."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = os.path.abspath(workdir)
    self.manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def save(self, step: int, state: Any) -> None:
    """Starts saving `state` in the background; returns at once."""
    # Orbax copies arrays to the host in the background, while the next training step donates
    # (overwrites) the state's buffers: save an on-device copy that nothing else touches.
    snapshot = jax.tree.map(jnp.copy, state)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot)),
                      force=True)

  def restore_latest(self, abstract_state: Any) -> Optional[Any]:
    """The newest checkpoint that restores, or None if there is none.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with shardings (from `jax.eval_shape`).
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored.state
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read is treated the same: this checkpoint is unusable, the earlier
        # ones may not be.
        aside = self._set_aside(step)
        message = (f'checkpoint at step {step} is unreadable ({type(e).__name__}: '
                   f'{str(e).splitlines()[0] if str(e) else ""}); moved it to {aside} and fell '
                   f'back to the previous one.')
        logging.warning(message)
        print(f'warning: {message}', flush=True)
    return None

  def _set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the manager's way, keeping it for inspection."""
    aside = os.path.join(self.workdir, 'unreadable_checkpoints', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(self.manager.directory, str(step)), aside)
    self.manager.reload()
    return aside

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def write_run_info(workdir: str, config: ml_collections.ConfigDict, facts: Dict[str, Any],
                   identity_keys: Tuple[str, ...] = IDENTITY_KEYS,
                   kept: Tuple[str, ...] = (),
                   identity_of: Optional[Dict[str, Callable[[Any], Any]]] = None
                   ) -> Dict[str, Any]:
  """Stores the config and the data facts with the run; refuses an incompatible resume.

  Args:
    workdir: the run's directory.
    config: the run's config; on resume, its `identity_keys` must equal the stored ones.
    facts: JSON-able facts about the data (e.g. the image shape). On resume each must equal
      the stored one, except those named in `kept`, which keep their stored values.
    identity_keys: the config keys that define the model and the data it learns.
    kept: facts a resumed run takes from the stored run, e.g. the data variance it trained with.
    identity_of: for some identity keys, what of their value must match (applied to the
      stored and the new value alike), e.g. a section in today's layout from an older one.

  Returns:
    The facts the run trains with: the stored ones when resuming.
  """
  path = os.path.join(workdir, RUN_FILE)
  # Through JSON, so that a tuple (FSQ's levels) compares equal to the list it is stored as.
  info = {'config': json.loads(json.dumps(config.to_dict())), **facts}
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    for key in identity_keys:
      identity = (identity_of or {}).get(key, lambda value: value)
      old_value, new_value = stored['config'].get(key), info['config'].get(key)
      if old_value is not None and new_value is not None:
        old_value, new_value = identity(old_value), identity(new_value)
      for name, (old, new) in _differences(key, old_value, new_value).items():
        raise UserError(f'workdir {workdir} holds a run with config.{name}={old!r}, but this run '
                        f'has config.{name}={new!r}; use another --workdir, or the same config '
                        f'to resume.')
    for key in facts:
      if key in kept:
        info[key] = stored[key]
      elif stored.get(key) != info[key]:
        raise UserError(f'workdir {workdir} holds a run whose data had {key} '
                        f'{stored.get(key)!r}, but the data now has {info[key]!r}; use another '
                        f'--workdir.')
  if jax.process_index() == 0:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(info, f, indent=2)
    os.replace(tmp, path)
  return {key: info[key] for key in facts}


def read_run_info(workdir: str) -> Dict[str, Any]:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    raise UserError(f'{workdir} holds no training run (no {RUN_FILE}).')
  with open(path) as f:
    return json.load(f)


def _differences(name: str, old: Any, new: Any) -> Dict[str, Tuple[Any, Any]]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = {}
    for key in sorted(set(old) | set(new)):
      out.update(_differences(f'{name}.{key}', old.get(key), new.get(key)))
    return out
  return {} if old == new else {name: (old, new)}


def checkpoint_steps(workdir: str) -> Tuple[int, ...]:
  """The steps of the checkpoints in `workdir`, oldest first; empty if it holds none."""
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints')) as manager:
    return tuple(sorted(manager.all_steps()))


def abstract_state(init_state: Callable[[jax.Array, Any], Any], example: Any,
                   sharding: jax.sharding.Sharding) -> Any:
  """The shapes and dtypes `init_state(rng, example)` returns, placed by `sharding`, computed
  without running it (`jax.eval_shape`): what a checkpoint restores into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(init_state, jax.random.key(0), example))


def restore_state(workdir: str, init_state: Callable[[jax.Array, Any], Any], example: Any,
                  step: Optional[int] = None) -> Any:
  """A run's train state from a checkpoint, onto this process's first device.

  Args:
    workdir: the `--workdir` of a training run.
    init_state: `(rng, example) -> TrainState`, the run's state initialisation; only its
      shapes are used (`jax.eval_shape`).
    example: what `init_state` takes as its example batch (arrays or `jax.ShapeDtypeStruct`).
    step: the checkpoint to load; the latest by default.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise UserError(f'{workdir} holds no checkpoint yet.')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f'{workdir} holds no checkpoint at step {step}; it holds steps '
                    f'{list(steps)}.')
  # Whatever topology the run was trained on.
  abstract = abstract_state(init_state, example,
                            jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints')) as manager:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract))).state


def load_model(workdir: str, step: Optional[int] = None) -> Tuple[VQVAE, Dict[str, Any]]:
  """A trained model and its variables, for `encode`/`decode` in a notebook.

      model, variables = load_model('runs/quickstart')
      codes = model.apply(variables, images, method=VQVAE.encode)

  Args:
    workdir: the `--workdir` of a training run.
    step: the checkpoint to load; the latest by default.

  Returns:
    `(model, {'params': ..., 'batch_stats': ...})`. The model takes float images in
    [-0.5, 0.5] (`uint8 / 255 - 0.5`), NHWC.
  """
  info = read_run_info(workdir)
  if 'image_shape' not in info:
    raise UserError(f'{workdir} holds no VQ-VAE run (its run.json has no image shape); '
                    f'accepted: the --workdir of python -m train.')
  config = ml_collections.ConfigDict(info['config'])
  model = model_from_config(config.model, info['image_shape'][-1])
  example = jax.ShapeDtypeStruct((1, *info['image_shape']), jnp.uint8)
  state = restore_state(workdir, functools.partial(create_train_state, model,
                                                   make_optimizer(config)), example, step)
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return model, variables


def load_prior(workdir: str) -> Tuple[CodePrior, Any, Dict[str, Any]]:
  """A trained prior, its `params` and its run info (config, class names, grid shape).

      prior, params, info = load_prior('runs/prior')
      codes = sample(prior, params, jax.random.key(0), num_samples=16)
  """
  info = read_run_info(workdir)
  if 'grid_shape' not in info:
    raise UserError(f'{workdir} holds a VQ-VAE run, not a prior; accepted: the --workdir of '
                    f'python -m train.prior.')
  config = ml_collections.ConfigDict(info['config'])
  prior = prior_step.prior_from_config(config, info['num_embeddings'], info['grid_shape'],
                                       len(info['class_names']) or None)
  tx = prior_step.make_optimizer(config)
  example = {'codes': jax.ShapeDtypeStruct((1, *info['grid_shape']), jnp.int32)}
  if prior.num_classes:
    example['labels'] = jax.ShapeDtypeStruct((1,), jnp.int32)
  state = restore_state(workdir, functools.partial(prior_step.create_train_state, prior, tx), example)
  return prior, state.params, info
