"""The one training loop of the project: it trains the VQ-VAE (`train/trainer.py`) and the prior
over its codes (`train/prior_training.py`). What the tasks share, the train state, its
initialisation, the `k`-step scan and the config keys read here, is in `train/state.py`.

A `Task` says what is trained: its host data, its state's initialisation, its `k`-step jit
body and its evaluation. The loop does the rest, the same for every task: data-parallel jit
steps over a mesh of all devices with the state donated, `k` steps per dispatch, the
deterministic batch order, orbax checkpoints and resume, SIGTERM, `metrics.jsonl`, TensorBoard
and the progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import time
from typing import Any, Callable, Dict, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train import data as data_lib
from train import input_pipeline
from train.checkpoints import Checkpoints, abstract_state
from train.errors import UserError
from train.state import TrainState

PyTree = Any
Metrics = Dict[str, float]


@dataclasses.dataclass
class Task:
  """What the loop trains.

  Attributes:
    train_data: a pytree of host arrays `[N, ...]`, one row per training example; or a source
      that decodes on demand (`input_pipeline.FolderSource`, `TfdsSource`).
    init_state: `(rng, example) -> TrainState`, where `example` is `train_data`'s first row
      with its batch axis (`[1, ...]`); jitted by the loop, and traced with `jax.eval_shape`
      for the abstract state a checkpoint restores into.
    train_steps: `(state, batch, *step_args) -> (state, metrics)`, not yet jitted; `batch` is
      `train_data`'s rows for `k` steps (`[k, B, ...]`), `metrics` float32 scalars.
    evaluate: `(state, step) -> metrics` on the held-out data; it writes its own pictures
      (process 0), and the loop logs what it returns. Called on every process.
    step_args: arrays every step reads as they are (e.g. the data variance), replicated.
    example_name: what one example is, for the throughput metric (`images_per_sec`).
    notice: `() -> str`, a warning the loop prints (process 0) at a log step whenever it
      changes; '' for none.
  """

  train_data: PyTree
  init_state: Callable[[jax.Array, PyTree], TrainState]
  train_steps: Callable[..., Tuple[TrainState, Dict[str, jax.Array]]]
  evaluate: Callable[[TrainState, int], Metrics]
  step_args: Tuple[Any, ...] = ()
  example_name: str = 'images'
  notice: Callable[[], str] = lambda: ''


def data_mesh() -> Mesh:
  """All devices on one `data` axis: the batch is split over them, the state replicated."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the loop's config values, which a config file or an override may get wrong."""
  positive = (1, 'a positive integer')
  integers = {  # key: (the lowest accepted value, what is accepted)
      'batch_size': positive, 'eval_batch_size': positive, 'steps_per_dispatch': positive,
      'keep_checkpoints': positive,
      'num_train_steps': (0, 'an integer >= 0'),
      'log_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'eval_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'checkpoint_every_steps': (0, 'an integer >= 0 (0 turns it off)'),
      'seed': (0, 'an integer >= 0'),
      'data_on_device_max_bytes': (0, 'an integer >= 0 (0 streams every split)'),
  }
  for key, (lowest, accepted) in integers.items():
    check_integer(config, key, lowest, accepted)
  if 'data_workers' in config:
    check_integer(config, 'data_workers', 0, 'an integer >= 0 (0 decodes in this process)')
  if not config.learning_rate > 0:
    raise UserError(f'config.learning_rate={config.learning_rate!r}; accepted: a number > 0.')
  num_devices = jax.device_count()
  if config.batch_size % num_devices:
    raise UserError(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{num_devices} devices; accepted: a multiple of {num_devices}.')


def check_integer(config: ml_collections.ConfigDict, key: str, lowest: int,
                  accepted: str) -> None:
  value = config[key]
  if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
    raise UserError(f'config.{key}={value!r}; accepted: {accepted}.')


def check_builds(what: str, build: Callable[[], Any]) -> Any:
  """`build()`, typically a `jax.eval_shape` of a model's init (no computation, no memory),
  with a `TypeError` or `ValueError` it raises as a `UserError` naming `what`. JAX's own type
  errors (a tracer used as a bool) are bugs, and keep their traceback."""
  try:
    return build()
  except jax.errors.JAXTypeError:
    raise
  except (TypeError, ValueError) as e:
    raise UserError(f'{what}: {str(e).splitlines()[0]}') from None


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

  def write(self, step: int, metrics: Metrics) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def progress(self, steps: int, metrics: Metrics) -> None:
    if self.enabled:
      if metrics:
        self.bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items()}, refresh=False)
      self.bar.update(steps)

  def print(self, line: str) -> None:
    if self.enabled:
      print(line, flush=True)

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


def _nbytes(tree: PyTree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def run(task: Task, config: ml_collections.ConfigDict, workdir: str, mesh: Mesh) -> Metrics:
  """Trains (or resumes) `task` in `workdir` up to `config.num_train_steps`.

  Returns:
    The last evaluation's metrics ({} if none ran).
  """
  replicated = NamedSharding(mesh, P())
  steps_sharding = NamedSharding(mesh, P(None, 'data'))  # [k, B, ...]: batch over devices
  source = input_pipeline.as_source(task.train_data)
  example = source[:1]
  checkpoints = Checkpoints(workdir, config.keep_checkpoints)
  state = checkpoints.restore_latest(abstract_state(task.init_state, example, replicated))
  if state is None:
    state = jax.jit(task.init_state, out_shardings=replicated)(jax.random.key(config.seed),
                                                               example)
  step = int(jax.device_get(state.step))
  if step:
    logging.info('resuming from step %d', step)
    print(f'Resuming {workdir} from step {step}.', flush=True)

  step_args = jax.device_put(task.step_args, replicated)
  on_device = (isinstance(source, input_pipeline.ArraySource) and jax.process_count() == 1 and
               _nbytes(task.train_data) <= config.data_on_device_max_bytes)
  if on_device:
    # The whole training split lives on the devices; each dispatch sends only indices.
    train_data = jax.device_put(task.train_data, replicated)
    step_fn = jax.jit(
        lambda state, data, indices, args: task.train_steps(
            state, jax.tree.map(lambda x: x[indices], data), *args),
        in_shardings=(replicated, replicated, steps_sharding, replicated),
        out_shardings=(replicated, replicated), donate_argnums=0)
  else:
    step_fn = jax.jit(lambda state, batch, args: task.train_steps(state, batch, *args),
                      in_shardings=(replicated, steps_sharding, replicated),
                      out_shardings=(replicated, replicated), donate_argnums=0)
  order = data_lib.BatchOrder(len(source), config.batch_size, config.seed)
  if not on_device:
    # This process's rows of every batch, decoded ahead in grain's workers.
    rows = input_pipeline.process_rows(steps_sharding, (1, config.batch_size), axis=1)
    batches = input_pipeline.step_batches(source, order, step, config.num_train_steps, rows,
                                          config.data_workers)
  preemption = _Preemption()
  logs = _Logs(workdir, step, config.num_train_steps)
  last_eval: Metrics = {}
  notice = ''
  try:
    timer, examples_since = time.perf_counter(), 0
    while step < config.num_train_steps:
      num_steps = _next_stop(step, config) - step
      if on_device:
        indices = order.indices(step, num_steps)
        indices = jax.make_array_from_callback(indices.shape, steps_sharding,
                                               lambda index: indices[index])
        state, metrics = step_fn(state, train_data, indices, step_args)
      else:
        local = jax.tree.map(lambda *steps: np.stack(steps),
                             *[next(batches) for _ in range(num_steps)])
        batch = input_pipeline.global_array(
            local, rows, steps_sharding,
            lambda leaf: (num_steps, config.batch_size) + leaf.shape[2:], axis=1)
        state, metrics = step_fn(state, batch, step_args)
      step += num_steps
      examples_since += num_steps * config.batch_size
      shown = {}
      if _due(step, config.log_every_steps, config.num_train_steps):
        shown = {k: float(v) for k, v in jax.device_get(metrics).items()}
        shown[f'{task.example_name}_per_sec'] = (
            examples_since / (time.perf_counter() - timer))
        timer, examples_since = time.perf_counter(), 0
        logs.write(step, shown)
        if task.notice() != notice:
          notice = task.notice()
          logs.print(notice)
      logs.progress(num_steps, shown)
      if _due(step, config.eval_every_steps, config.num_train_steps):
        last_eval = task.evaluate(state, step)
        logs.write(step, last_eval)
        logs.print(f'step {step}: ' + ', '.join(f'{k}={v:.4g}' for k, v in last_eval.items()))
        timer = time.perf_counter()
      if _due(step, config.checkpoint_every_steps, config.num_train_steps) or \
          preemption.requested:
        checkpoints.save(step, state)
      if preemption.requested:
        print(f'SIGTERM: saved a checkpoint at step {step}; exiting.', flush=True)
        break
  finally:
    if not on_device:
      batches.close()  # stops grain's worker processes
    checkpoints.close()
    logs.close()
    preemption.restore()
  return last_eval
