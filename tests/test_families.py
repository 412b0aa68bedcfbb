"""Every quantizer family inside `VQVAE` and through the training program, at equal bits."""

import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import read_metrics
from train import cli, evaluate, trainer
from train.checkpoints import load_model
from train.configs import quantizer_families, quickstart
from train.errors import UserError
from train.step import model_from_config
from vqvae_jax import VQVAE, quantizer_api
from vqvae_jax.fsq import FSQ
from vqvae_jax.lfq import LFQ
from vqvae_jax.quantizers import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.residual import ResidualVQ

SMALL = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=4)
# Small models of each family, all at 4 bits per code (per position for residual VQ).
FAMILY_MODELS = {
    'vq': (dict(family='vq', num_embeddings=16, embedding_dim=4), VectorQuantizer),
    'ema': (dict(family='ema', decay=0.9, num_embeddings=16, embedding_dim=4),
            VectorQuantizerEMA),
    'fsq': (dict(family='fsq', levels=(4, 4)), FSQ),
    'lfq': (dict(family='lfq', embedding_dim=4), LFQ),
    'rvq': (dict(family='rvq', num_quantizers=2, num_embeddings=4, embedding_dim=4),
            ResidualVQ),
}
RUN_BEFORE_QUANTIZER_CONFIG = os.path.join(os.path.dirname(__file__), 'data',
                                           'run_before_quantizer_config.json')


def same_model(a, b):
  """The same architecture and the same quantizer module (a field left at its default equals
  it given)."""
  quantizer = lambda model: quantizer_api.build(model.quantizer_config, parent=None)
  return a.clone(quantizer=None) == b.clone(quantizer=None) and quantizer(a) == quantizer(b)


def images(batch=4, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3)) - 0.5


@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_vqvae_builds_each_family_and_round_trips_its_codes(family):
  fields, quantizer_class = FAMILY_MODELS[family]
  model = VQVAE(**SMALL, quantizer=fields)
  assert model.quantizer_family == family
  assert model.codebook_size == (4 if family == 'rvq' else 16)
  x = images()
  variables = model.init(jax.random.key(1), x)
  (recon, vq), _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                               rngs={'codebook': jax.random.key(2)})
  stages = model.codes_per_position
  chex.assert_shape(recon, x.shape)
  chex.assert_type([recon, vq.loss], jnp.float32)
  expected_indices = (4, 4, 4) if stages == 1 else (4, 4, 4, stages)
  chex.assert_shape(vq.indices, expected_indices)
  codes = model.apply(variables, x, method=VQVAE.encode)
  np.testing.assert_array_equal(codes, vq.indices)
  assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
  # decode(encode(x)) is the forward pass's reconstruction.
  decoded = model.apply(variables, codes, method=VQVAE.decode)
  recon_eval, _ = model.apply(variables, x)
  np.testing.assert_allclose(decoded, recon_eval, rtol=1e-5, atol=1e-5)
  bound = model.bind(variables)
  assert isinstance(bound.vq, quantizer_class)


def test_the_seed_rule_still_picks_the_quantizer():
  assert VQVAE(**SMALL, decay=0.0).quantizer_family == 'vq'
  assert VQVAE(**SMALL, decay=0.99).quantizer_family == 'ema'


@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_the_family_is_one_command_line_key(family):
  """`--config.model.quantizer.family=NAME` alone switches the family: the model gets that
  family's own section of `config.model.quantizer`."""
  config = cli._load_config('train/configs/quickstart.py')
  config.model.quantizer.family = family
  model = model_from_config(config.model, image_channels=3)
  assert model.quantizer_family == family
  assert model.quantizer_config == dict(family=family, **config.model.quantizer[family])
  assert model.codebook_size == {'vq': 512, 'ema': 512, 'fsq': 512, 'lfq': 512, 'rvq': 8}[family]


def test_a_run_json_from_before_the_quantizer_config_loads_and_resumes(tmp_path):
  """A workdir written when the quantizer's fields sat beside the architecture in
  `config.model` (tests/data/run_before_quantizer_config.json, the quickstart at 9af913e):
  its model section reads as today's, the same model, and today's config resumes it."""
  with open(RUN_BEFORE_QUANTIZER_CONFIG) as f:
    stored = json.load(f)
  assert stored['config']['model']['quantizer'] is None  # the older layout
  old_model = model_from_config(stored['config']['model'], image_channels=3)
  config = quickstart.get_config()
  assert same_model(old_model, model_from_config(config.model, image_channels=3))
  assert old_model.quantizer_config['dead_code_threshold'] == 0.25
  # Resume: a checkpoint written under the old run.json, then today's config in that workdir.
  config.model.update(SMALL)
  config.update(batch_size=8, eval_batch_size=64, num_train_steps=2, steps_per_dispatch=2,
                log_every_steps=2, eval_every_steps=0, checkpoint_every_steps=2,
                num_reconstructions=0)
  workdir = str(tmp_path)
  trainer.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'run.json')) as f:
    written = json.load(f)
  written['config']['model'] = {**stored['config']['model'], **SMALL}  # the older layout
  with open(os.path.join(workdir, 'run.json'), 'w') as f:
    json.dump(written, f)
  model, variables = load_model(workdir)
  assert same_model(model, model_from_config(config.model, image_channels=3))
  config.num_train_steps = 4
  trainer.train_and_evaluate(config, workdir)  # resumes from step 2
  assert read_metrics(workdir)[-1]['step'] == 4
  with open(os.path.join(workdir, 'run.json')) as f:
    assert json.load(f)['config']['model']['quantizer']['family'] == 'ema'  # today's layout
  mismatch = quickstart.get_config()
  mismatch.model.update(SMALL)
  mismatch.model.quantizer.ema.num_embeddings = 64
  with pytest.raises(UserError, match=r'config.model.quantizer.ema.num_embeddings=512.*=64'):
    trainer.train_and_evaluate(mismatch, workdir)


@pytest.mark.parametrize('bits', sorted(quantizer_families.FAMILIES))
def test_every_config_family_builds_at_its_bits(bits):
  for name in quantizer_families.FAMILIES[bits]:
    config = quickstart.get_config(name if bits == 9 else f'{name}/{bits}')
    model = model_from_config(config.model, image_channels=3)
    total_bits = model.codes_per_position * math.log2(model.codebook_size)
    # FSQ's 16-bit levels (8, 8, 8, 5, 5, 5) give 64,000 codes, 15.97 bits.
    assert abs(total_bits - bits) < 0.05, (name, bits, total_bits)


def test_unknown_family_in_the_config_path_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli._load_config('train/configs/quickstart.py:pq')
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert "unknown quantizer family 'pq'" in err and 'fsq/16' in err


def test_evaluator_counts_each_stage_and_the_quantization_error():
  model = VQVAE(**SMALL, quantizer=FAMILY_MODELS['rvq'][0])
  x_uint8 = np.asarray(jax.random.randint(jax.random.key(0), (6, 16, 16, 3), 0, 256),
                       np.uint8)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  metrics = evaluate.Evaluator(model, mesh, batch_size=4)(variables, x_uint8, variance=0.06)
  # By hand: the latents, their codes per stage and |z - q|^2 / |z|^2 over all 6 images.
  x = jnp.asarray(x_uint8, jnp.float32) / 255 - 0.5
  latents = model.apply(variables, x, method=VQVAE.latents)
  _, vq = model.apply(variables, x)
  expected_error = float(jnp.sum((vq.quantized - latents)**2) / jnp.sum(latents**2))
  np.testing.assert_allclose(metrics['eval_quantization_error'], expected_error, rtol=1e-5)
  counts = metrics['code_counts']
  assert counts.shape == (2, 4)
  for stage in range(2):
    np.testing.assert_array_equal(
        counts[stage], np.bincount(np.asarray(vq.indices[..., stage]).ravel(), minlength=4))
    assert metrics[f'eval_codes_used_stage{stage}'] == int((counts[stage] > 0).sum())
  assert metrics['eval_codes_used'] == int((counts > 0).sum())


def test_quickstart_trains_residual_vq_and_the_prior_refuses_it(tmp_path):
  config = quickstart.get_config('rvq')
  config.model.update(SMALL)
  config.model.quantizer.rvq.update(num_embeddings=4, embedding_dim=4)
  config.update(batch_size=8, eval_batch_size=64, num_train_steps=2, steps_per_dispatch=2,
                log_every_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                num_reconstructions=2)
  workdir = str(tmp_path / 'rvq')
  metrics = trainer.train_and_evaluate(config, workdir)
  assert 0 < metrics['eval_quantization_error'] < 10
  assert metrics['eval_codes_used'] == (metrics['eval_codes_used_stage0'] +
                                        metrics['eval_codes_used_stage1'] +
                                        metrics['eval_codes_used_stage2'])
  model, _ = load_model(workdir)
  assert model.quantizer_family == 'rvq' and model.codes_per_position == 3
  assert os.path.getsize(os.path.join(workdir, 'code_usage.png')) > 0
  from train import prior_training  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"quantizer='rvq', 3 codes per grid position"):
    prior_training.load_vqvae(workdir)
