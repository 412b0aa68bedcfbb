"""Trains a prior over the code grids of a trained VQ-VAE, through `train.loop`: its data (the
VQ-VAE's codes) and the task; the step is `train/prior_step.py`, the evaluation
`train/prior_evaluate.py`, the samples `train/prior_samples.py`.

The VQ-VAE's training and held-out images are encoded once, with its own `encode`, and the code
grids (and labels) are cached in the prior's workdir (`codes.npz`); the prior then trains on
them with the same loop as the VQ-VAE. Each evaluation logs the held-out bits per code beside
three baselines on the same codes (uniform, unigram, left-neighbour bigram) and writes
`samples.png`: samples decoded by the VQ-VAE.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import data as data_lib
from train import input_pipeline
from train import loop
from train.checkpoints import checkpoint_steps, load_model, read_run_info, write_run_info
from train.errors import UserError
from train.prior_evaluate import PriorEvaluator
from train.prior_step import create_train_state, make_optimizer, make_train_step, \
    prior_from_config
from train.step import to_model_input
from vqvae_jax import VQVAE

CODES_FILE = 'codes.npz'
IDENTITY_KEYS = ('vqvae_workdir', 'conditional', 'model')


@dataclasses.dataclass(frozen=True)
class CodeData:
  """A VQ-VAE's code grids, int32 `[N, h, w]`, and their labels (int32 `[N]`) where it has them.

  `train_labels` and `eval_labels` are None when the dataset has none; the quickstart's
  held-out photos are none of its training photos, so it has `train_labels` only.
  """

  train_codes: np.ndarray
  eval_codes: np.ndarray
  class_names: Tuple[str, ...]
  train_labels: Optional[np.ndarray]
  eval_labels: Optional[np.ndarray]
  vqvae_step: int

  def train_data(self, conditional: bool) -> Dict[str, np.ndarray]:
    data = {'codes': self.train_codes}
    if conditional:
      data['labels'] = self.train_labels
    return data


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the values that need no VQ-VAE; `check_against_vqvae` checks the rest."""
  loop.validate(config)
  loop.check_integer(config, 'num_samples', 0, 'an integer >= 0 (0: no samples.png)')
  loop.check_integer(config, 'sample_top_k', 0, 'an integer >= 0 (0 turns it off)')
  loop.check_integer(config, 'warmup_steps', 0, 'an integer >= 0')
  if not 0 <= config.weight_decay < math.inf:
    raise UserError(f'config.weight_decay={config.weight_decay!r}; accepted: a number >= 0.')
  if not 0 < config.sample_temperature < math.inf:
    raise UserError(f'config.sample_temperature={config.sample_temperature!r}; accepted: a '
                    f'finite number > 0.')
  if not 0 < config.sample_top_p <= 1:
    raise UserError(f'config.sample_top_p={config.sample_top_p!r}; accepted: a number in '
                    f'(0, 1] (1 turns it off).')
  if not config.vqvae_workdir:
    raise UserError('config.vqvae_workdir is empty; accepted: the --workdir of a trained '
                    'VQ-VAE, e.g. --config.vqvae_workdir=runs/quickstart.')


def open_vqvae_data(config: ml_collections.ConfigDict, workdir: str
                    ) -> Optional[data_lib.Splits]:
  """The VQ-VAE's dataset opened (nothing decoded but headers, nothing written), or None when
  the workdir's cache holds its codes already."""
  if os.path.exists(os.path.join(workdir, CODES_FILE)):
    return None
  return data_lib.open_splits(
      ml_collections.ConfigDict(read_run_info(config.vqvae_workdir)['config']))


def check_labels(config: ml_collections.ConfigDict, workdir: str,
                 splits: Optional[data_lib.Splits]) -> None:
  """A conditional prior whose held-out codes have no labels needs `label_dropout > 0`: their
  bits per code are the unconditional model's."""
  if not config.conditional or config.model.get('label_dropout', 0.0):
    return
  if splits is None:
    with np.load(os.path.join(workdir, CODES_FILE)) as cached:
      has_classes, has_eval_labels = len(cached['class_names']) > 0, 'eval_labels' in cached
  else:
    has_classes = bool(splits.class_names)
    has_eval_labels = splits.eval_labels is not None or bool(
        getattr(splits.eval, 'label_key', None))  # a streamed tfds split reads its labels
  if has_classes and not has_eval_labels:
    raise UserError('config.model.label_dropout=0, but the held-out codes have no labels, so '
                    'their bits per code need the unconditional model; accepted: '
                    'label_dropout > 0, or --config.conditional=False.')


def check_against_vqvae(config: ml_collections.ConfigDict, vqvae: VQVAE,
                        vqvae_variables: Any) -> None:
  """The checks that need the VQ-VAE: `sample_top_k <= K`, and a prior built from
  `config.model` over its code grid (abstractly: shapes only)."""
  if config.sample_top_k > vqvae.codebook_size:
    raise UserError(f'config.sample_top_k={config.sample_top_k}; accepted: an integer in '
                    f'[0, {vqvae.codebook_size}] (K of the VQ-VAE in {config.vqvae_workdir}; '
                    f'0 turns it off).')
  image_shape = read_run_info(config.vqvae_workdir)['image_shape']
  grid_shape = jax.eval_shape(
      lambda variables, images: vqvae.apply(variables, images, method=VQVAE.encode),
      vqvae_variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)).shape[1:]
  # One class stands for the dataset's: their number is known once its labels are read.
  prior = prior_from_config(config, vqvae.codebook_size, grid_shape,
                            1 if config.conditional else None)
  codes = jax.ShapeDtypeStruct((1, *grid_shape), jnp.int32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if prior.num_classes else None
  loop.check_builds('config.model', lambda: jax.eval_shape(
      prior.init, jax.random.key(0), codes, labels))


def encode_codes(vqvae: VQVAE, variables: Any, images, mesh: jax.sharding.Mesh,
                 batch_size: int, workers: int = 0) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Code grids of a split, in sharded batches.

  Args:
    vqvae, variables: the VQ-VAE; `variables` replicated on `mesh`.
    images: uint8 `[N, H, W, C]`, a source streamed through `input_pipeline.sharded_split`,
      or a source whose rows are `{'images', 'labels'}` (`TfdsSource.with_labels`).
    mesh, batch_size: the batches' layout; `batch_size` is rounded up to the devices.
    workers: worker processes for a decoding source.

  Returns:
    `(codes, labels)`: int32 `[N, H/4, W/4]`, and the int32 `[N]` labels read with the images
    (None when the source has none).
  """
  batch_sharding = NamedSharding(mesh, P('data'))
  replicated = NamedSharding(mesh, P())
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size

  def encode_batch(variables, batch):
    pixels, labels = (batch['images'], batch['labels']) if isinstance(batch, dict) else \
        (batch, None)
    return vqvae.apply(variables, to_model_input(pixels), method=VQVAE.encode), labels

  encode = jax.jit(encode_batch, out_shardings=replicated)
  batches = [jax.device_get(encode(variables, batch))
             for batch, _ in input_pipeline.sharded_split(images, batch_size, batch_sharding,
                                                          workers)]
  codes, labels = (np.concatenate(parts)[:len(images)].astype(np.int32)
                   if parts[0] is not None else None for parts in zip(*batches))
  return codes, labels


def load_or_encode_codes(config: ml_collections.ConfigDict, workdir: str, vqvae: VQVAE,
                         vqvae_variables: Any, vqvae_step: int, mesh: jax.sharding.Mesh,
                         splits: Optional[data_lib.Splits] = None) -> CodeData:
  """The VQ-VAE's code grids: from the workdir's cache, or encoded once and cached there.

  `splits`: the VQ-VAE's dataset, opened (`open_vqvae_data`); opened here if None.
  """
  path = os.path.join(workdir, CODES_FILE)
  if os.path.exists(path):
    with np.load(path) as cached:
      stored = {key: cached[key] for key in cached.files}
    labels = {key: stored[key] if key in stored else None
              for key in ('train_labels', 'eval_labels')}
    return CodeData(train_codes=stored['train_codes'], eval_codes=stored['eval_codes'],
                    class_names=tuple(str(n) for n in stored['class_names']),
                    vqvae_step=int(stored['vqvae_step']), **labels)
  vqvae_config = ml_collections.ConfigDict(read_run_info(config.vqvae_workdir)['config'])
  images = data_lib.read(splits or data_lib.open_splits(vqvae_config), vqvae_config)
  print(f'Encoding {len(images.train)} training and {len(images.eval)} held-out images with '
        f'the VQ-VAE in {config.vqvae_workdir} (step {vqvae_step}); cached in {path}.',
        flush=True)

  def encode(split, labels):
    if labels is None and isinstance(split, input_pipeline.TfdsSource) and split.label_key:
      split = split.with_labels()  # a streamed split's labels, read with its images
    codes, streamed_labels = encode_codes(vqvae, vqvae_variables, split, mesh,
                                          config.eval_batch_size,
                                          vqvae_config.get('data_workers', 0))
    return codes, labels if streamed_labels is None else streamed_labels

  (train_codes, train_labels), (eval_codes, eval_labels) = (
      encode(images.train, images.train_labels), encode(images.eval, images.eval_labels))
  codes = CodeData(train_codes=train_codes, eval_codes=eval_codes,
                   class_names=tuple(images.class_names), train_labels=train_labels,
                   eval_labels=eval_labels, vqvae_step=vqvae_step)
  if jax.process_index() == 0:
    arrays = {key: value for key, value in dataclasses.asdict(codes).items()
              if value is not None}
    arrays['class_names'] = np.asarray(codes.class_names, dtype=str)
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a crash leaves no half-written cache
  return codes


def load_vqvae(vqvae_workdir: str, step: Optional[int] = None) -> Tuple[VQVAE, Any, int]:
  """The trained VQ-VAE of `vqvae_workdir` at `step` (the latest by default), its variables and
  its checkpoint's step."""
  if not os.path.isdir(vqvae_workdir):
    raise UserError(f'config.vqvae_workdir={vqvae_workdir!r} is not a directory; accepted: the '
                    f'--workdir of a trained VQ-VAE, e.g. runs/quickstart.')
  steps = checkpoint_steps(vqvae_workdir)
  if step is not None and step not in steps:
    raise UserError(f'the prior was trained on the codes of the VQ-VAE in {vqvae_workdir} at '
                    f'step {step}, and that checkpoint is gone (it holds steps {list(steps)}); '
                    f'train a new prior in another --workdir.')
  step = step if step is not None else (steps[-1] if steps else None)
  model, variables = load_model(vqvae_workdir, step)
  if model.codes_per_position != 1:
    raise UserError(f'the VQ-VAE in {vqvae_workdir} has quantizer={model.quantizer_family!r}, '
                    f'{model.codes_per_position} codes per grid position; the prior models one '
                    f"code per position; accepted: a VQ-VAE with quantizer 'vq', 'ema', 'fsq' "
                    f"or 'lfq'.")
  return model, variables, step


def cached_vqvae_step(workdir: str) -> Optional[int]:
  """The VQ-VAE step whose codes the workdir's cache holds; None before they are encoded."""
  path = os.path.join(workdir, CODES_FILE)
  if not os.path.exists(path):
    return None
  with np.load(path) as cached:
    return int(cached['vqvae_step'])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains (or resumes) the prior in `workdir`; returns the last evaluation's metrics."""
  validate(config)
  # A resumed prior keeps the VQ-VAE checkpoint its cached codes came from, even if the VQ-VAE
  # has trained on since.
  vqvae, vqvae_variables, vqvae_step = load_vqvae(config.vqvae_workdir, cached_vqvae_step(workdir))
  check_against_vqvae(config, vqvae, vqvae_variables)
  splits = open_vqvae_data(config, workdir)
  check_labels(config, workdir, splits)
  loop.prepare_workdir(workdir)  # after the checks of the config, the VQ-VAE and its data
  mesh = loop.data_mesh()
  vqvae_variables = jax.device_put(vqvae_variables, NamedSharding(mesh, P()))
  codes = load_or_encode_codes(config, workdir, vqvae, vqvae_variables, vqvae_step, mesh,
                               splits)
  conditional = bool(config.conditional and codes.class_names)
  prior = prior_from_config(config, vqvae.codebook_size, codes.train_codes.shape[1:],
                            len(codes.class_names) if conditional else None)
  write_run_info(workdir, config, {
      'num_embeddings': vqvae.codebook_size, 'grid_shape': list(prior.grid_shape),
      'class_names': list(codes.class_names) if conditional else [],
      'vqvae_step': codes.vqvae_step}, identity_keys=IDENTITY_KEYS)
  tx = make_optimizer(config)
  evaluator = PriorEvaluator(prior, codes, conditional, vqvae, vqvae_variables, mesh, config,
                             workdir)
  task = loop.Task(train_data=codes.train_data(conditional),
                   init_state=functools.partial(create_train_state, prior, tx),
                   train_steps=make_train_step(prior, tx), evaluate=evaluator,
                   example_name='grids')
  return loop.run(task, config, workdir, mesh)
