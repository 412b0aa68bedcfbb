"""Every quantizer family inside `VQVAE` and through the training program, at equal bits."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import cli, evaluate, trainer
from train.checkpoints import load_model
from train.configs import quantizer_families, quickstart
from train.errors import UserError
from train.step import model_from_config
from vqvae_jax import VQVAE
from vqvae_jax.fsq import FSQ
from vqvae_jax.lfq import LFQ
from vqvae_jax.quantizers import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.residual import ResidualVQ

SMALL = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=4)
# Small models of each family, all at 4 bits per code (per position for residual VQ).
FAMILY_MODELS = {
    'vq': (dict(quantizer='vq', num_embeddings=16, embedding_dim=4), VectorQuantizer),
    'ema': (dict(quantizer='ema', decay=0.9, num_embeddings=16, embedding_dim=4),
            VectorQuantizerEMA),
    'fsq': (dict(quantizer='fsq', fsq_levels=(4, 4), embedding_dim=2), FSQ),
    'lfq': (dict(quantizer='lfq', embedding_dim=4), LFQ),
    'rvq': (dict(quantizer='rvq', num_quantizers=2, num_embeddings=4, embedding_dim=4),
            ResidualVQ),
}


def images(batch=4, size=16, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3)) - 0.5


@pytest.mark.parametrize('family', sorted(FAMILY_MODELS))
def test_vqvae_builds_each_family_and_round_trips_its_codes(family):
  fields, quantizer_class = FAMILY_MODELS[family]
  model = VQVAE(**SMALL, **fields)
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
  assert VQVAE(**SMALL, decay=0.99, quantizer='vq').quantizer_family == 'vq'


@pytest.mark.parametrize('kwargs, match', [
    (dict(quantizer='pq'), r"quantizer must be one of .*'fsq'.* got 'pq'"),
    (dict(quantizer='ema', decay=0.0), r"quantizer='ema' needs decay in \(0, 1\), got 0.0"),
    (dict(quantizer='fsq', fsq_levels=(8, 8, 8), embedding_dim=64),
     r'embedding_dim must be len\(fsq_levels\)=3 .* got embedding_dim=64'),
    (dict(quantizer='fsq', fsq_levels=(8, 8), embedding_dim=2, codebook_init='kmeans'),
     r"quantizer='fsq' has no codebook to remedy: codebook_init must stay 'seed', got 'kmeans'"),
    (dict(quantizer='lfq', embedding_dim=4, dead_code_threshold=0.25),
     r'dead_code_threshold must stay 0.0, got 0.25'),
    (dict(quantizer='rvq', num_quantizers=0), r'num_quantizers'),
])
def test_bad_family_fields_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    VQVAE(**SMALL, **kwargs)


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
  model = VQVAE(**SMALL, **FAMILY_MODELS['rvq'][0])
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
  config.model.update(SMALL, num_embeddings=4, embedding_dim=4)
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
  assert model.quantizer_family == 'rvq' and model.num_quantizers == 3
  assert os.path.getsize(os.path.join(workdir, 'code_usage.png')) > 0
  from train import prior_training  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match=r"quantizer='rvq', 3 codes per grid position"):
    prior_training.load_vqvae(workdir)
