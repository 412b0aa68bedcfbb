"""The prior's evaluation: held-out bits per code beside the baselines, and `samples.png`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from train import input_pipeline
from train import pictures
from train.prior_samples import describe_options, make_decode, row_labels, sample_image_rows, \
    sampling_options
from train.state import TrainState
from vqvae_jax import VQVAE
from vqvae_jax.autoregressive_prior import CodePrior, baseline_bits_per_code

if TYPE_CHECKING:
  from train.prior_training import CodeData


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
        pictures.write_image_grid(os.path.join(self.workdir, 'samples.png'), grid_rows,
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
