"""Trains a prior over the code grids of a trained VQ-VAE, through `train.loop`.

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
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from train import data as data_lib
from train import input_pipeline
from train import evaluate as evaluate_lib
from train import loop
from train.checkpoints import checkpoint_steps, load_model, read_run_info, restore_state, \
    write_run_info
from train.errors import UserError
from train.step import DTYPES, TrainState, to_model_input
from vqvae_jax import VQVAE
from vqvae_jax.prior import CodePrior, baseline_bits_per_code, cross_entropy, sample

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
  loop.validate(config)
  loop.check_integer(config, 'num_samples', 0, 'an integer >= 0 (0: no samples.png)')
  loop.check_integer(config, 'sample_top_k', 0, 'an integer >= 0 (0 turns it off)')
  if not config.sample_temperature > 0:
    raise UserError(f'config.sample_temperature={config.sample_temperature!r}; accepted: a '
                    f'number > 0.')
  if not 0 < config.sample_top_p <= 1:
    raise UserError(f'config.sample_top_p={config.sample_top_p!r}; accepted: a number in '
                    f'(0, 1] (1 turns it off).')
  if not config.vqvae_workdir:
    raise UserError('config.vqvae_workdir is empty; accepted: the --workdir of a trained '
                    'VQ-VAE, e.g. --config.vqvae_workdir=runs/quickstart.')


def prior_from_config(config: ml_collections.ConfigDict, num_embeddings: int,
                      grid_shape: Tuple[int, int], num_classes: Optional[int]) -> CodePrior:
  """`CodePrior` from a config's `model` section; bad values raise a `UserError` naming them."""
  fields = dict(config.model)
  dtype = fields.pop('dtype', 'float32')
  if dtype not in DTYPES:
    raise UserError(f'config.model.dtype={dtype!r}; accepted: {sorted(DTYPES)}.')
  if not num_classes:
    fields.pop('label_dropout', None)
  try:
    return CodePrior(num_embeddings=num_embeddings, grid_shape=tuple(grid_shape),
                     num_classes=num_classes or None, dtype=DTYPES[dtype], **fields)
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
  init_rng, step_rng = jax.random.split(rng)
  params = prior.init(init_rng, example['codes'], example.get('labels'))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), rng=jax.random.key_data(step_rng))


def make_train_step(prior: CodePrior, tx: optax.GradientTransformation):
  """`train_steps(state, batch) -> (state, metrics)`, `k` steps in a `lax.scan`, not jitted.

  `batch['codes']` is int32 `[k, B, h, w]` (and `batch['labels']` `[k, B]`). `metrics`:
  `loss` (nats per code, the mean teacher-forced cross-entropy) and `bits_per_code`.
  """

  def one_step(state: TrainState, batch: Dict[str, jax.Array]):
    codes = batch['codes']
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      logits = prior.apply({'params': params}, codes, batch.get('labels'), train=True,
                           rngs={'dropout': dropout_rng})
      return jnp.mean(cross_entropy(logits, codes.reshape(len(codes), -1)))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state)
    return state, {'loss': loss, 'bits_per_code': loss / math.log(2)}

  def train_steps(state: TrainState, batch: Dict[str, jax.Array]):
    state, metrics = jax.lax.scan(one_step, state, batch)
    return state, jax.tree.map(jnp.mean, metrics)

  return train_steps


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
                         vqvae_variables: Any, vqvae_step: int, mesh: jax.sharding.Mesh
                         ) -> CodeData:
  """The VQ-VAE's code grids: from the workdir's cache, or encoded once and cached there."""
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
  images = data_lib.load(vqvae_config)
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


class PriorEvaluator:
  """Held-out bits per code, the baselines on the same codes, and `samples.png`."""

  def __init__(self, prior: CodePrior, codes: CodeData, conditional: bool, vqvae: VQVAE,
               vqvae_variables: Any, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
               workdir: str):
    self.prior, self.codes, self.config, self.workdir = prior, codes, config, workdir
    self.vqvae_variables = vqvae_variables
    self.eval_labels = codes.eval_labels if conditional else None
    num_devices = mesh.devices.size
    self.batch_size = -(-config.eval_batch_size // num_devices) * num_devices
    self.batch_sharding = NamedSharding(mesh, P('data'))
    self._bits = jax.jit(
        lambda params, grids, labels, weights: jnp.sum(
            weights * prior.apply({'params': params}, grids, labels,
                                  method=CodePrior.bits_per_code)),
        out_shardings=NamedSharding(mesh, P()))
    baselines = baseline_bits_per_code(codes.train_codes, codes.eval_codes,
                                       prior.num_embeddings)
    self.baselines = {f'{name}_bits_per_code': bits for name, bits in baselines.items()}
    self._decode = make_decode(vqvae)

  def __call__(self, state: TrainState, step: int) -> Dict[str, float]:
    codes = self.codes.eval_codes
    total = 0.0
    split = {'codes': codes, 'labels': self.eval_labels}
    for batch, weights in input_pipeline.sharded_split(split, self.batch_size,
                                                        self.batch_sharding):
      total += float(self._bits(state.params, batch['codes'], batch['labels'], weights))
    metrics = {'eval_bits_per_code': total / len(codes), **self.baselines}
    if self.config.num_samples:
      grid_rows, labels = self.samples(state.params, step)
      if jax.process_index() == 0:
        evaluate_lib.write_image_grid(os.path.join(self.workdir, 'samples.png'), grid_rows,
                                      labels, self.title(step))
    return metrics

  def samples(self, params: Any, step: int):
    labels = row_labels(self.config.num_samples, self.prior.num_classes)
    _, rows, names = sample_image_rows(
        self.prior, params, self._decode, self.vqvae_variables,
        jax.random.fold_in(jax.random.key(self.config.seed), step), self.config.num_samples,
        labels, self.codes.class_names, **sampling_options(self.config))
    return rows, names

  def title(self, step: int) -> str:
    return f'Prior samples at step {step}: {describe_options(**sampling_options(self.config))}'


SAMPLES_PER_ROW = 8


def row_labels(num_samples: int, num_classes: Optional[int]) -> Optional[np.ndarray]:
  """Labels for rows of `SAMPLES_PER_ROW` samples: row `r` gets `r mod num_classes`."""
  if not num_classes:
    return None
  return (np.arange(num_samples) // SAMPLES_PER_ROW % num_classes).astype(np.int32)


def sample_image_rows(prior: CodePrior, params: Any, decode, vqvae_variables: Any,
                      key: jax.Array, num_samples: int, labels: Optional[np.ndarray],
                      class_names: Tuple[str, ...], **options):
  """Samples code grids and decodes them: `(codes [B, h, w], image rows, row names)`.

  `decode` is `(vqvae_variables, codes) -> images`, jitted; the rows hold `SAMPLES_PER_ROW`
  uint8 images each, named by their label ('' without one).
  """
  codes = sample(prior, params, key, num_samples=num_samples, labels=labels, **options)
  images = to_uint8(decode(vqvae_variables, codes))
  starts = range(0, len(images), SAMPLES_PER_ROW)
  rows = [images[i:i + SAMPLES_PER_ROW] for i in starts]
  names = ['' if labels is None else class_names[labels[i]] for i in starts]
  return np.asarray(codes), rows, names


def describe_options(temperature: float, top_k: Optional[int], top_p: Optional[float],
                     guidance_scale: Optional[float] = None) -> str:
  text = f'temperature {temperature:g}, top-k {top_k or "off"}, top-p {top_p or "off"}'
  return text + (f', guidance {guidance_scale:g}' if guidance_scale is not None else '')


def sampling_options(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return dict(temperature=float(config.sample_temperature),
              top_k=int(config.sample_top_k) or None,
              top_p=float(config.sample_top_p) if config.sample_top_p < 1 else None)


def make_decode(vqvae: VQVAE):
  """`decode(variables, codes [B, h, w]) -> images [B, H, W, C]` in model space, jitted."""
  return jax.jit(lambda variables, codes: vqvae.apply(variables, codes, method=VQVAE.decode))


def to_uint8(images: jax.Array) -> np.ndarray:
  """Model-space images (`x / 255 - 0.5`) back to uint8 pixels."""
  return np.clip(np.round((np.asarray(images) + 0.5) * 255), 0, 255).astype(np.uint8)


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
  loop.prepare_workdir(workdir)  # after the checks of the config and the VQ-VAE
  mesh = loop.data_mesh()
  vqvae_variables = jax.device_put(vqvae_variables, NamedSharding(mesh, P()))
  codes = load_or_encode_codes(config, workdir, vqvae, vqvae_variables, vqvae_step, mesh)
  conditional = bool(config.conditional and codes.class_names)
  prior = prior_from_config(config, vqvae.codebook_size, codes.train_codes.shape[1:],
                            len(codes.class_names) if conditional else None)
  if conditional and codes.eval_labels is None and not prior.label_dropout:
    raise UserError('config.model.label_dropout=0, but the held-out codes have no labels, so '
                    'their bits per code need the unconditional model; accepted: '
                    'label_dropout > 0, or --config.conditional=False.')
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
  prior = prior_from_config(config, info['num_embeddings'], info['grid_shape'],
                            len(info['class_names']) or None)
  tx = make_optimizer(config)
  example = {'codes': jax.ShapeDtypeStruct((1, *info['grid_shape']), jnp.int32)}
  if prior.num_classes:
    example['labels'] = jax.ShapeDtypeStruct((1,), jnp.int32)
  state = restore_state(workdir, functools.partial(create_train_state, prior, tx), example)
  return prior, state.params, info
