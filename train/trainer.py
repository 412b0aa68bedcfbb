"""Trains the VQ-VAE: the seed's loss and optimizer on an image dataset, through `train.loop`."""

from __future__ import annotations

import functools
import os
from typing import Any, Dict

import jax
import ml_collections
import numpy as np

from train import data as data_lib
from train import evaluate as evaluate_lib
from train import loop
from train import perceptual_eval, pictures
from train.checkpoints import write_run_info
from train.errors import UserError
from train.state import TrainState
from train.step import create_train_state, identity_of_model_config, make_optimizer, \
    make_train_step, model_from_config, to_model_input

__all__ = ['train_and_evaluate', 'validate', 'UserError']


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the values a config file or a `--config.key=value` override may get wrong."""
  loop.validate(config)
  loop.check_integer(config, 'num_reconstructions', 0, 'an integer >= 0')
  loop.check_integer(config, 'image_size', 0, "an integer >= 0 (0 keeps the dataset's size)")
  if config.image_channels not in (0, 1, 3) or isinstance(config.image_channels, bool):
    raise UserError(f'config.image_channels={config.image_channels!r}; accepted: 0 (the '
                    f"images' own), 1 or 3.")
  perceptual_eval.validate(config)
  model_from_config(config.model, config.image_channels or 3)  # its fields, before any data


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) in `workdir`; returns the last evaluation's metrics."""
  validate(config)
  splits = data_lib.open_splits(config, workdir)
  model = model_from_config(config.model, splits.image_shape[-1])
  loop.check_builds('config.model', lambda: jax.eval_shape(
      lambda rng, images: model.init(rng, images, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, *splits.image_shape), np.float32)))
  loop.prepare_workdir(workdir)  # after every check of the config, so that an error writes nothing
  data = data_lib.read(splits, config, workdir)
  variance = write_run_info(workdir, config, {'data_variance': data.variance,
                                              'image_shape': list(data.image_shape)},
                            kept=('data_variance',),
                            identity_of={'model': identity_of_model_config})['data_variance']
  tx = make_optimizer(config)
  mesh = loop.data_mesh()
  evaluator = evaluate_lib.Evaluator(model, mesh, config.eval_batch_size, config.data_workers)
  perceptual = perceptual_eval.ReconstructionMetrics(
      lambda v, x: model.apply(v, to_model_input(x))[0], mesh, config, workdir)
  task = loop.Task(
      train_data=data.train,
      init_state=functools.partial(create_train_state, model, tx),
      train_steps=make_train_step(model, tx),
      evaluate=lambda state, step: {
          **_evaluate(evaluator, state, data, variance, config, workdir, step),
          **perceptual({'params': state.params, 'batch_stats': state.batch_stats}, data.eval)},
      step_args=(np.float32(variance),),
      notice=lambda: _skipped_notice(data.skipped(), workdir))
  return loop.run(task, config, workdir, mesh)


def _skipped_notice(skipped, workdir: str) -> str:
  """One warning line naming the unreadable image files skipped so far ('' for none)."""
  if not skipped:
    return ''
  shown = ', '.join(skipped[:3]) + (', ...' if len(skipped) > 3 else '')
  return (f'warning: {len(skipped)} unreadable image file(s) skipped, each replaced by the next '
          f'readable file of its class ({os.path.join(workdir, data_lib.SKIPPED_LOG)} lists '
          f'them): {shown}')


def _evaluate(evaluator, state: TrainState, data, variance: float, config, workdir: str,
              step: int) -> Dict[str, Any]:
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  metrics = evaluator(variables, data.eval, variance)
  code_counts = metrics.pop('code_counts')
  originals = data.eval[:config.num_reconstructions]
  reconstructions = evaluator.reconstructions(variables, originals) if len(originals) else None
  if jax.process_index() == 0:
    if reconstructions is not None:
      pictures.write_reconstruction_grid(os.path.join(workdir, 'reconstructions.png'),
                                             originals, reconstructions, step=step)
    pictures.write_usage_histogram(os.path.join(workdir, 'code_usage.png'), code_counts,
                                       step=step)
  return metrics
