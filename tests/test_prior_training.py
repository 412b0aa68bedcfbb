"""The prior's training program and the sampling command, end to end on tiny models."""

import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from conftest import XLA_FLAGS_FOR_DEVICES, read_metrics
from train import data, loop, prior_step, prior_training, trainer
from train.checkpoints import load_model, load_prior, read_run_info
from train.configs import prior_quickstart
from train.errors import UserError
from vqvae_jax import VQVAE
from vqvae_jax.autoregressive_prior import CodePrior

from tests.test_train import is_cut_from, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRIOR = dict(width=16, depth=1, num_heads=2, mlp_ratio=2)


def tiny_prior_config(vqvae_workdir, **overrides):
  config = prior_quickstart.get_config()
  config.vqvae_workdir = vqvae_workdir
  config.model.update(TINY_PRIOR)
  config.update(dict(batch_size=16, eval_batch_size=256, num_train_steps=4,
                     steps_per_dispatch=2, log_every_steps=2, eval_every_steps=4,
                     checkpoint_every_steps=2, warmup_steps=2, num_samples=16))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def vqvae_workdir(tmp_path_factory):
  """A tiny VQ-VAE trained for 2 steps, shared by the module's tests."""
  workdir = str(tmp_path_factory.mktemp('vqvae'))
  trainer.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2), workdir)
  return workdir


@pytest.fixture(scope='module')
def prior_workdir(vqvae_workdir, tmp_path_factory):
  """A tiny prior trained once for the module's tests: the slowest setup here, as it encodes
  the quickstart's 21,000 crops with the VQ-VAE."""
  workdir = str(tmp_path_factory.mktemp('prior'))
  prior_training.train_and_evaluate(tiny_prior_config(vqvae_workdir), workdir)
  return workdir


def test_quickstart_labels_name_the_photo_of_each_crop():
  loaded = data.load(tiny_config())
  assert loaded.class_names == data.QUICKSTART_TRAIN_PHOTOS
  assert loaded.train_labels.shape == (len(loaded.train),) and loaded.eval_labels is None
  assert set(np.unique(loaded.train_labels)) == set(range(len(data.QUICKSTART_TRAIN_PHOTOS)))
  for crop, label in zip(loaded.train[:12], loaded.train_labels[:12]):
    assert is_cut_from(crop, data.quickstart_photo(data.QUICKSTART_TRAIN_PHOTOS[label])[..., :3])
    assert not is_cut_from(crop, data.quickstart_photo(
        data.QUICKSTART_TRAIN_PHOTOS[(label + 1) % len(data.QUICKSTART_TRAIN_PHOTOS)])[..., :3])


def test_tfds_labels_come_with_the_images():
  with __import__('tensorflow_datasets').testing.mock_data(num_examples=24):
    loaded = data.load(tiny_config(dataset='cifar10'))
  assert len(loaded.class_names) == 10
  assert loaded.train_labels.shape == (24,) and loaded.eval_labels.shape == (24,)
  assert loaded.train_labels.dtype == np.int32 and loaded.train_labels.max() < 10


def test_a_streamed_tfds_split_gives_the_conditional_prior_its_labels(tmp_path):
  """A tfds split over `data_on_device_max_bytes` streams, with no labels read up front.
  Encoding it reads each record's label with its image: the cached codes and labels equal
  those of the same split read into memory, and the prior trains on the 10 classes. Over 20 s:
  a VQ-VAE and a prior trained end to end, the first through grain's streamed pipeline."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  vqvae_dir, prior_dir = str(tmp_path / 'vqvae'), str(tmp_path / 'prior')
  with tfds.testing.mock_data(num_examples=48):
    in_memory = data.load(tiny_config(dataset='cifar10'))
    trainer.train_and_evaluate(
        tiny_config(dataset='cifar10', data_on_device_max_bytes=0, data_workers=0,
                    num_train_steps=2, eval_every_steps=2), vqvae_dir)
    streamed = data.load(ml_collections.ConfigDict(read_run_info(vqvae_dir)['config']))
    assert streamed.train_labels is None and streamed.class_names == in_memory.class_names
    prior_training.train_and_evaluate(
        tiny_prior_config(vqvae_dir, num_train_steps=2, eval_every_steps=2, num_samples=0),
        prior_dir)
  with np.load(os.path.join(prior_dir, prior_training.CODES_FILE)) as cached:
    np.testing.assert_array_equal(cached['train_labels'], in_memory.train_labels)
    np.testing.assert_array_equal(cached['eval_labels'], in_memory.eval_labels)
    model, variables = load_model(vqvae_dir)
    mesh = loop.data_mesh()
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
    codes, labels = prior_training.encode_codes(model, variables, in_memory.train, mesh, 32)
    np.testing.assert_array_equal(cached['train_codes'], codes)
    assert labels is None and len(np.unique(cached['train_labels'])) > 1
  assert len(read_run_info(prior_dir)['class_names']) == 10


def test_prior_trains_logs_baselines_and_writes_samples(vqvae_workdir, prior_workdir):
  lines = read_metrics(prior_workdir)
  assert [line['step'] for line in lines] == [2, 4, 4]
  assert {'loss', 'bits_per_code', 'grids_per_sec'} <= set(lines[0])
  final = lines[-1]
  assert final['uniform_bits_per_code'] == pytest.approx(4.0)  # K = 16
  for key in ('eval_bits_per_code', 'unigram_bits_per_code', 'bigram_bits_per_code'):
    assert 0 < final[key] < 8, key
  # The cache holds the VQ-VAE's own codes of the held-out images.
  with np.load(os.path.join(prior_workdir, 'codes.npz')) as cached:
    eval_codes, train_labels = cached['eval_codes'], cached['train_labels']
    assert list(cached['class_names']) == list(data.QUICKSTART_TRAIN_PHOTOS)
  model, variables = load_model(vqvae_workdir)
  images = data.load(tiny_config()).eval[:32]
  expected = model.apply(variables, images.astype(np.float32) / 255 - 0.5, method=VQVAE.encode)
  np.testing.assert_array_equal(eval_codes[:32], expected)
  assert eval_codes.shape == (1000, 8, 8) and train_labels.shape == (20_000,)
  with Image.open(os.path.join(prior_workdir, 'samples.png')) as samples:
    assert samples.width >= 8 * 32 and samples.height >= 2 * 32
  info = read_run_info(prior_workdir)
  assert info['grid_shape'] == [8, 8] and info['class_names'] == list(data.QUICKSTART_TRAIN_PHOTOS)


def test_eval_bits_per_code_is_the_priors_mean_over_the_held_out_codes(prior_workdir):
  prior, params, _ = load_prior(prior_workdir)
  with np.load(os.path.join(prior_workdir, 'codes.npz')) as cached:
    eval_codes = cached['eval_codes']
  bits = prior.apply({'params': params}, eval_codes, method=CodePrior.bits_per_code)
  assert read_metrics(prior_workdir)[-1]['eval_bits_per_code'] == pytest.approx(
      float(np.mean(bits)), rel=1e-5)


def test_prior_resume_after_sigterm_continues_identically(vqvae_workdir, tmp_path,
                                                          monkeypatch):
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  config = tiny_prior_config(vqvae_workdir, num_samples=0)
  prior_training.train_and_evaluate(config, straight)
  write = loop._Logs.write  # pylint: disable=protected-access

  def preempt_at_step_2(self, step, metrics):
    write(self, step, metrics)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption would, mid-run

  monkeypatch.setattr(loop._Logs, 'write', preempt_at_step_2)  # pylint: disable=protected-access
  prior_training.train_and_evaluate(config, resumed)
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['2']
  monkeypatch.undo()
  prior_training.train_and_evaluate(config, resumed)
  a, b = (load_prior(w)[1] for w in (straight, resumed))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert (read_metrics(straight)[-1]['eval_bits_per_code'] ==
          read_metrics(resumed)[-1]['eval_bits_per_code'])


@pytest.mark.parametrize('num_train_steps', [0, 1, 200, 201, 1_000])
def test_the_schedule_warms_up_then_decays_at_any_run_length(num_train_steps):
  """Runs as long as their warmup (200) or shorter raised in optax before: no decay steps."""
  config = prior_quickstart.get_config()
  config.update(num_train_steps=num_train_steps, learning_rate=1.0)
  schedule = prior_step.learning_rate_schedule(config)
  warmup = min(200, num_train_steps)
  assert float(schedule(0)) == (0.0 if warmup else 1.0)
  if warmup:
    assert float(schedule(warmup // 2)) == pytest.approx((warmup // 2) / warmup)
    assert float(schedule(warmup)) == pytest.approx(1.0)
  if num_train_steps > warmup:
    halfway = (warmup + num_train_steps) / 2
    assert float(schedule(halfway)) == pytest.approx(0.55, abs=0.01)
    assert float(schedule(num_train_steps)) == pytest.approx(0.1)
  prior_step.make_optimizer(config)


def test_prior_refuses_a_missing_vqvae_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'prior'
  with pytest.raises(UserError, match=r"config.vqvae_workdir='nowhere' is not a directory"):
    prior_training.train_and_evaluate(tiny_prior_config('nowhere'), str(workdir))
  assert not workdir.exists()


def run_module(module, *args, devices=1, timeout=300):
  env = {**os.environ, 'XLA_FLAGS': XLA_FLAGS_FOR_DEVICES.format(devices), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_sample_command_writes_the_grid_and_the_codes(prior_workdir, tmp_path):
  out = str(tmp_path / 'grid.png')
  result = run_module('train.sample', f'--workdir={prior_workdir}', '--num_samples=16',
                      f'--out={out}', '--label=astronaut', '--top_k=8', '--seed=3')
  assert result.returncode == 0, result.stderr
  with np.load(str(tmp_path / 'grid.npz')) as saved:
    codes, labels = saved['codes'], saved['labels']
  assert codes.shape == (16, 8, 8) and codes.dtype == np.int32
  np.testing.assert_array_equal(labels, np.zeros(16))  # astronaut is label 0
  with Image.open(out) as image:
    assert image.width >= 8 * 32 and image.height >= 2 * 32
  prior, params, _ = load_prior(prior_workdir)
  from vqvae_jax.autoregressive_prior import sample  # pylint: disable=g-import-not-at-top
  expected = sample(prior, params, jax.random.key(3), labels=np.zeros(16, np.int32), top_k=8)
  np.testing.assert_array_equal(codes, expected)  # the same samples as the library's


@pytest.mark.parametrize('flags, message', [
    (['--temperature=0'], 'temperature must be a finite number > 0, got 0.0'),
    (['--top_p=1.5'], r'top_p must be in \(0, 1\], got 1.5'),
    (['--label=dog'], "--label 'dog' is not a label of this prior; accepted: none, 0 to 5, or "
                      'one of astronaut'),
])
def test_sample_command_bad_input_is_one_line(prior_workdir, tmp_path, flags, message):
  result = run_module('train.sample', f'--workdir={prior_workdir}',
                      f'--out={tmp_path / "x.png"}', *flags)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert __import__('re').search(message, lines[0]), lines[0]
  assert not (tmp_path / 'x.png').exists()


def test_sample_command_on_a_workdir_without_a_prior(vqvae_workdir, tmp_path):
  for workdir, message in ((vqvae_workdir, 'holds a VQ-VAE run, not a prior'),
                           (str(tmp_path), 'holds no training run')):
    result = run_module('train.sample', f'--workdir={workdir}')
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_prior_command_bad_input_is_one_line(tmp_path):
  result = run_module('train.prior', '--config=train/configs/prior_quickstart.py',
                      f'--workdir={tmp_path / "p"}', '--config.sample_top_p=2.0')
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines == ['error: config.sample_top_p=2.0; accepted: a number in (0, 1] '
                   '(1 turns it off).'], result.stderr
  assert not (tmp_path / 'p').exists()


def test_sampling_bench_times_both_samplers_on_the_same_samples(tmp_path):
  from train.bench import prior_sampling  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'bench.json'
  prior_sampling.main(['--grids=2x3', '--batch_size=4', '--rounds=1', f'--out={out}',
                       f'--markdown={tmp_path / "bench.md"}'])
  result, = json.loads(out.read_text())['results']
  assert result['grid'] == [2, 3] and result['positions'] == 6 and result['identical_samples']
  assert result['cached_codes_per_sec'] > 0 and result['uncached_codes_per_sec'] > 0
  assert '| 2x3 | 6 | 4 |' in (tmp_path / 'bench.md').read_text()


def test_the_prior_keeps_the_vqvae_checkpoint_its_codes_came_from(vqvae_workdir, prior_workdir):
  assert prior_training.cached_vqvae_step(prior_workdir) == 2
  _, _, step = prior_training.load_vqvae(vqvae_workdir, 2)
  assert step == 2
  with pytest.raises(UserError, match=r'at step 7, and that checkpoint is gone \(it holds '
                                      r'steps \[2\]\)'):
    prior_training.load_vqvae(vqvae_workdir, 7)
