"""The training loop: data-parallel jit steps over a device mesh, evaluation, checkpoints, logs."""

from __future__ import annotations

import functools
import json
import os
import signal
import tempfile
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import data as data_lib
from train import evaluate as evaluate_lib
from train.checkpoints import Checkpoints, write_run_info
from train.errors import UserError
from train.step import (TrainState, abstract_train_state, create_train_state, make_train_step,
                        make_optimizer, model_from_config)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the values a config file or a `--config.key=value` override may get wrong."""
  positive = (1, 'a positive integer')
  integers = {  # key: (the lowest accepted value, what is accepted)
      'batch_size': positive, 'eval_batch_size': positive, 'steps_per_dispatch': positive,
      'keep_checkpoints': positive,
      'num_train_steps': (0, 'an integer >= 0'), 'num_reconstructions': (0, 'an integer >= 0'),
      'log_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'eval_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'checkpoint_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'image_size': (0, "an integer >= 0 (0 keeps the dataset's size)"),
  }
  for key, (lowest, accepted) in integers.items():
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
      raise UserError(f'config.{key}={value!r}; accepted: {accepted}.')
  if not config.learning_rate > 0:
    raise UserError(f'config.learning_rate={config.learning_rate!r}; accepted: a number > 0.')
  num_devices = jax.device_count()
  if config.batch_size % num_devices:
    raise UserError(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{num_devices} devices; accepted: a multiple of {num_devices}.')


def prepare_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise UserError(f'workdir {workdir!r} is not writable: {e.strerror}.') from None


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between dispatches, to save and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class _Logs:
  """metrics.jsonl, TensorBoard events and the progress bar; written by process 0 only."""

  def __init__(self, workdir: str, initial_step: int, total_steps: int):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self.bar = tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                    mininterval=2.0)

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def progress(self, steps: int, metrics: Dict[str, float]) -> None:
    if self.enabled:
      if metrics:
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()}, refresh=False)
      self.bar.update(steps)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self._jsonl.close()
      self._tensorboard.close()


def _next_stop(step: int, config: ml_collections.ConfigDict) -> int:
  """The first step after `step` at which the loop must pause: log, eval, checkpoint or end."""
  stop = config.num_train_steps
  for every in (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps):
    if every:
      stop = min(stop, (step // every + 1) * every)
  return min(stop, step + config.steps_per_dispatch)


def _due(step: int, every: int, last_step: int) -> bool:
  return step == last_step or bool(every and step % every == 0)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
  validate(config)
  data = data_lib.load(config)
  model = model_from_config(config.model, data.image_shape[-1])
  prepare_workdir(workdir)  # after every check of the config, so that an error writes nothing
  variance = write_run_info(workdir, config, data.variance, data.image_shape)
  tx = make_optimizer(config)

  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  steps_sharding = NamedSharding(mesh, P(None, 'data'))  # [k, B, ...]: batch over devices
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state = checkpoints.restore_latest(
      abstract_train_state(model, tx, data.image_shape, replicated))
  if state is None:
    init = functools.partial(create_train_state, model, tx)
    state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed), data.train[:1])
  step = int(jax.device_get(state.step))
  if step:
    logging.info('resuming from step %d', step)
    print(f'Resuming {workdir} from step {step}.', flush=True)

  train_steps = make_train_step(model, tx)
  on_device = (jax.process_count() == 1 and
               data.train.nbytes <= config.data_on_device_max_bytes)
  if on_device:
    # The whole training split lives on the devices; each dispatch sends only indices.
    train_images = jax.device_put(data.train, replicated)
    step_fn = jax.jit(lambda state, images, indices, variance:
                      train_steps(state, images[indices], variance),
                      in_shardings=(replicated, replicated, steps_sharding, replicated),
                      out_shardings=(replicated, replicated), donate_argnums=0)
  else:
    step_fn = jax.jit(train_steps, in_shardings=(replicated, steps_sharding, replicated),
                      out_shardings=(replicated, replicated), donate_argnums=0)
  order = data_lib.BatchOrder(len(data.train), config.batch_size, config.seed)
  evaluator = evaluate_lib.Evaluator(model, mesh, config.eval_batch_size)
  preemption = _Preemption()
  logs = _Logs(workdir, step, config.num_train_steps)
  last_eval: Dict[str, Any] = {}
  variance_on_device = jax.device_put(np.float32(variance), replicated)
  try:
    timer, images_since = time.perf_counter(), 0
    while step < config.num_train_steps:
      num_steps = _next_stop(step, config) - step
      indices = order.indices(step, num_steps)
      if on_device:
        indices = jax.make_array_from_callback(indices.shape, steps_sharding,
                                               lambda index: indices[index])
        state, metrics = step_fn(state, train_images, indices, variance_on_device)
      else:
        batch = data_lib.sharded_batch(data.train, indices, steps_sharding)
        state, metrics = step_fn(state, batch, variance_on_device)
      step += num_steps
      images_since += num_steps * config.batch_size
      shown = {}
      if _due(step, config.log_every_steps, config.num_train_steps):
        shown = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - timer
        shown['images_per_sec'] = images_since / elapsed
        timer, images_since = time.perf_counter(), 0
        logs.write(step, shown)
      logs.progress(num_steps, shown)
      if _due(step, config.eval_every_steps, config.num_train_steps):
        last_eval = _evaluate(evaluator, state, data, variance, config, workdir, step, logs)
        timer = time.perf_counter()
      if _due(step, config.checkpoint_every_steps, config.num_train_steps) or \
          preemption.requested:
        checkpoints.save(step, state)
      if preemption.requested:
        print(f'SIGTERM: saved a checkpoint at step {step}; exiting.', flush=True)
        break
  finally:
    checkpoints.close()
    logs.close()
    preemption.restore()
  return last_eval


def _evaluate(evaluator, state: TrainState, data, variance: float, config, workdir: str,
              step: int, logs: _Logs) -> Dict[str, Any]:
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  metrics = evaluator(variables, data.eval, variance)
  code_counts = metrics.pop('code_counts')
  logs.write(step, metrics)
  originals = data.eval[:config.num_reconstructions]
  reconstructions = evaluator.reconstructions(variables, originals) if len(originals) else None
  if jax.process_index() == 0:
    if reconstructions is not None:
      evaluate_lib.write_reconstruction_grid(os.path.join(workdir, 'reconstructions.png'),
                                             originals, reconstructions, step=step)
    evaluate_lib.write_usage_histogram(os.path.join(workdir, 'code_usage.png'), code_counts,
                                       step=step)
    print(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in metrics.items()), flush=True)
  return metrics
