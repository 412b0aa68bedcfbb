"""The training program end to end: data, resume, devices, hosts, signals and bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import XLA_FLAGS_FOR_DEVICES, read_metrics
from train import data, trainer
from train.checkpoints import load_model
from train.errors import UserError
from train.configs import quickstart
from vqvae_jax import VQVAE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(num_hiddens=16, num_residual_layers=1, num_residual_hiddens=4)
TINY_CODEBOOK = dict(num_embeddings=16, embedding_dim=4)  # config.model.quantizer.ema
# The same tiny run as command-line overrides, for the tests that run `python -m train`.
TINY_FLAGS = [f'--config.model.{k}={v}' for k, v in TINY_MODEL.items()] + [
    f'--config.model.quantizer.ema.{k}={v}' for k, v in TINY_CODEBOOK.items()] + [
    '--config.batch_size=8', '--config.eval_batch_size=64', '--config.steps_per_dispatch=2',
    '--config.log_every_steps=2', '--config.eval_every_steps=4',
    '--config.checkpoint_every_steps=2', '--config.num_reconstructions=4']


def tiny_config(**overrides):
  config = quickstart.get_config()
  config.model.update(TINY_MODEL)
  config.model.quantizer.ema.update(TINY_CODEBOOK)
  config.update(dict(batch_size=8, eval_batch_size=64, num_train_steps=4, steps_per_dispatch=2,
                     log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=2,
                     num_reconstructions=4))
  config.update(overrides)
  return config


def is_cut_from(crop, photo):
  """Whether `crop` `[h, w, C]` equals a window of `photo` `[H, W, C]`, compared in full at
  every position whose top-left pixel matches (a whole-photo sliding-window comparison
  materialises ~0.7 GB per 512x512 photo)."""
  h, w = crop.shape[:2]
  corners = photo[:photo.shape[0] - h + 1, :photo.shape[1] - w + 1]
  rows, cols = np.nonzero(np.all(corners == crop[0, 0], axis=-1))
  return any(np.array_equal(photo[r:r + h, c:c + w], crop) for r, c in zip(rows, cols))


def device_env(devices):
  return {'XLA_FLAGS': XLA_FLAGS_FOR_DEVICES.format(devices), 'JAX_PLATFORMS': 'cpu'}


def run_cli(workdir, *flags, devices=1, config='train/configs/quickstart.py', env=None,
            timeout=300):
  env = {**os.environ, **device_env(devices), **(env or {})}
  return subprocess.run(
      [sys.executable, '-m', 'train', f'--config={config}', f'--workdir={workdir}', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def final_params(workdir):
  _, variables = load_model(workdir)
  return variables


def test_quickstart_data_end_to_end(tmp_path):
  """The first training run of the session: over 20 s, as it compiles the tiny model's
  programs that the later runs find in the session's compilation cache."""
  workdir = str(tmp_path)
  result = trainer.train_and_evaluate(tiny_config(), workdir)
  lines = read_metrics(workdir)
  assert [line['step'] for line in lines] == [2, 4, 4]
  for key in ('eval_nmse', 'eval_psnr', 'eval_perplexity', 'eval_codes_used'):
    assert key in lines[-1] and np.isfinite(lines[-1][key])
  assert {'loss', 'nmse', 'vq_loss', 'perplexity', 'images_per_sec'} <= set(lines[0])
  assert 1 <= result['eval_codes_used'] <= 16
  assert result['eval_dead_codes'] == 16 - result['eval_codes_used']
  for name in ('reconstructions.png', 'code_usage.png', 'run.json'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) >= ['2', '4']
  # One call loads the trained model for encode/decode.
  model, variables = load_model(workdir)
  images = np.zeros((2, 32, 32, 3), np.float32)
  codes = model.apply(variables, images, method=VQVAE.encode)
  assert codes.shape == (2, 8, 8) and codes.dtype == np.int32
  assert model.apply(variables, codes, method=VQVAE.decode).shape == images.shape


def test_quickstart_holds_out_whole_photos():
  assert not set(data.QUICKSTART_TRAIN_PHOTOS) & set(data.QUICKSTART_EVAL_PHOTOS)
  for name in data.QUICKSTART_TRAIN_PHOTOS + data.QUICKSTART_EVAL_PHOTOS:
    photo = data.quickstart_photo(name)
    assert photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] >= 3, name
    assert min(photo.shape[:2]) >= data.QUICKSTART_CROP, name
  # Every held-out crop is cut from one of the held-out photos, from each of them.
  _, (eval_crops, _) = data._quickstart()  # pylint: disable=protected-access
  sources = [data.quickstart_photo(name)[..., :3] for name in data.QUICKSTART_EVAL_PHOTOS]
  found = [0] * len(sources)
  for crop in eval_crops[:20]:
    matches = [is_cut_from(crop, photo) for photo in sources]
    assert any(matches)
    found = [f + m for f, m in zip(found, matches)]
  assert all(found)


def test_tfds_mock_data_end_to_end(tmp_path):
  config = tiny_config(dataset='cifar10', num_train_steps=2, eval_every_steps=2)
  with tfds.testing.mock_data(num_examples=48):
    result = trainer.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(result['eval_nmse']) and result['eval_psnr'] > 0
  info = json.loads((tmp_path / 'run.json').read_text())
  assert info['image_shape'] == [32, 32, 3]
  assert 0.01 < info['data_variance'] < 0.2  # random uint8 pixels: ~1/12


def test_preparing_without_tfds_preparation_packages_names_them(tmp_path, monkeypatch):
  def prepare_without_importlib_resources(self, **kwargs):
    raise ModuleNotFoundError("No module named 'importlib_resources'", name='importlib_resources')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      prepare_without_importlib_resources)
  config = tiny_config(dataset='mnist', data_dir=str(tmp_path), download=True)
  with pytest.raises(UserError, match="preparing dataset 'mnist' needs importlib_resources, "
                     'which is not installed: pip install tensorflow-cpu importlib_resources,'):
    data.load(config)


def test_grayscale_tfds_dataset(tmp_path):
  """Over 20 s: a one-channel 28x28 model trained end to end, compiled for itself."""
  config = tiny_config(dataset='mnist', num_train_steps=2, eval_every_steps=2)
  with tfds.testing.mock_data(num_examples=24):
    trainer.train_and_evaluate(config, str(tmp_path))
  model, variables = load_model(str(tmp_path))
  assert model.image_channels == 1
  recon, _ = model.apply(variables, np.zeros((1, 28, 28, 1), np.float32))
  assert recon.shape == (1, 28, 28, 1)


def test_npz_and_folder_datasets(tmp_path):
  """Over 20 s: two runs end to end, one per dataset kind."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / 'data.npz', train=images[:30], eval=images[30:])
  result = trainer.train_and_evaluate(
      tiny_config(dataset=f'npz:{tmp_path}/data.npz', num_train_steps=2, eval_every_steps=2),
      str(tmp_path / 'npz_run'))
  assert np.isfinite(result['eval_nmse'])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i, image in enumerate(rng.integers(0, 256, (20, 24, 20, 3), dtype=np.uint8)):
    Image.fromarray(image).save(folder / f'{i:02d}.png')
  trainer.train_and_evaluate(
      tiny_config(dataset=f'folder:{folder}', image_size=16, num_train_steps=2,
                  eval_every_steps=2), str(tmp_path / 'folder_run'))
  assert json.loads((tmp_path / 'folder_run' / 'run.json').read_text())['image_shape'] == [16, 16, 3]


def test_resume_continues_identically(tmp_path):
  """4 steps straight == 2 steps, a restart, and 2 more: same params, bit for bit."""
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  trainer.train_and_evaluate(tiny_config(), straight)
  trainer.train_and_evaluate(tiny_config(num_train_steps=2), resumed)
  trainer.train_and_evaluate(tiny_config(), resumed)
  a, b = final_params(straight), final_params(resumed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert [line['step'] for line in read_metrics(resumed)] == [2, 2, 4, 4]
  assert read_metrics(resumed)[-1] == {**read_metrics(straight)[-1]}


def test_resume_refuses_a_different_model(tmp_path):
  trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  config = tiny_config()
  config.model.quantizer.ema.num_embeddings = 32
  with pytest.raises(trainer.UserError,
                     match=r'config.model.quantizer.ema.num_embeddings=16.*=32'):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  """Over 20 s: a run in this process, then a `python -m train` process that resumes it."""
  workdir = str(tmp_path)
  trainer.train_and_evaluate(tiny_config(), workdir)
  state_dir = tmp_path / 'checkpoints' / '4' / 'state'
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  result = run_cli(workdir, *TINY_FLAGS, '--config.num_train_steps=6')
  assert result.returncode == 0, result.stderr
  assert 'checkpoint at step 4 is unreadable' in result.stdout
  assert 'Resuming' in result.stdout and 'from step 2' in result.stdout
  assert read_metrics(workdir)[-1]['step'] == 6


def test_eight_devices_give_the_same_metrics_as_one(tmp_path):
  """Over 20 s: two `python -m train` processes (1 and 8 devices), each starting JAX and
  compiling its own programs."""
  runs = {}
  for devices in (1, 8):
    workdir = str(tmp_path / f'devices{devices}')
    result = run_cli(workdir, *TINY_FLAGS, '--config.num_train_steps=4', devices=devices)
    assert result.returncode == 0, result.stderr
    runs[devices] = read_metrics(workdir)
  for one, eight in zip(runs[1], runs[8]):
    assert one.keys() == eight.keys()
    for key in one:
      if key != 'images_per_sec':
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-4, err_msg=key)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
  """jax.distributed over 127.0.0.1: 2 processes x 1 device == 1 process x 2 devices. Over
  20 s: three `python -m train` processes, each starting JAX and compiling."""
  flags = [*TINY_FLAGS, '--config.num_train_steps=4']
  single = str(tmp_path / 'single')
  result = run_cli(single, *flags, devices=2)
  assert result.returncode == 0, result.stderr
  multi = str(tmp_path / 'multi')
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, **device_env(1)}
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'train', '--config=train/configs/quickstart.py',
       f'--workdir={multi}', *flags, f'--coordinator_address={address}', '--num_processes=2',
       f'--process_id={i}'], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  a, b = final_params(single), final_params(multi)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  assert read_metrics(multi)[-1]['step'] == 4


def test_sigterm_saves_a_checkpoint(tmp_path):
  workdir = str(tmp_path)
  env = {**os.environ, **device_env(1)}
  proc = subprocess.Popen(
      [sys.executable, '-m', 'train', '--config=train/configs/quickstart.py',
       f'--workdir={workdir}', *TINY_FLAGS, '--config.num_train_steps=100000',
       '--config.checkpoint_every_steps=0', '--config.eval_every_steps=0'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert 'SIGTERM: saved a checkpoint at step' in out
  step = int(out.split('SIGTERM: saved a checkpoint at step ')[1].split(';')[0])
  assert 0 < step < 100000
  assert str(step) in os.listdir(os.path.join(workdir, 'checkpoints'))


@pytest.mark.parametrize('flags,devices,message', [
    (['--config.dataset=no_such_dataset'], 1, "unknown dataset 'no_such_dataset'; accepted: "),
    (['--config.batchsize=8'], 1, "unknown config key 'batchsize'"),
    (['--config.model.num_codes=8'], 1, "unknown config key 'model.num_codes'"),
    (['--config.batch_size=eight'], 1, '--config.batch_size=eight: invalid literal'),
    (['--config.batch_size=0'], 1, 'config.batch_size=0; accepted: a positive integer'),
    (['--config.batch_size=-4'], 1, 'config.batch_size=-4; accepted: a positive integer'),
    (['--config.batch_size=12'], 8, 'config.batch_size=12 is not divisible by the 8 devices'),
    (['--config.model.quantizer.ema.decay=1.5'], 1, 'decay must be a number in [0, 1)'),
    (['--config.model.quantizer.family=pq'], 1,
     "config.model.quantizer.family='pq'; accepted: ('vq', 'ema', 'fsq', 'lfq', 'rvq')."),
    (['--config.model.residual_skip=foo'], 1,
     "config.model: residual_skip must be one of ('relu', 'identity'), got 'foo'."),
    (['--config.model.quantizer.ema.num_embeddings=0'], 1,
     'num_embeddings must be an integer >= 1, got 0'),
    (['--config.batch_size=3.5'], 1, "'3.5'; accepted: an integer."),
    (['--config.download=maybe'], 1, "'maybe'); accepted: true or false."),
    (['--config.num_train_steps=-1'], 1, 'config.num_train_steps=-1; accepted: an integer >= 0.'),
    (['--config=train/configs/no_such_config.py'], 1,
     '--config train/configs/no_such_config.py could not be loaded (FileNotFoundError'),
    (['--config=README.md'], 1, '--config README.md could not be loaded (ImportError: not a '
     'Python file); accepted: a Python file with a get_config()'),
    (['stray_argument'], 1, "unexpected arguments ['stray_argument']; accepted: flags only"),
])
def test_bad_input_is_one_line_and_keeps_the_workdir(tmp_path, flags, devices, message):
  (tmp_path / 'precious.txt').write_text('keep me')
  result = run_cli(str(tmp_path), *flags, devices=devices)
  assert result.returncode == 2
  assert result.stdout == '' and result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith('error: ') and message in result.stderr, result.stderr
  assert os.listdir(tmp_path) == ['precious.txt']
  assert (tmp_path / 'precious.txt').read_text() == 'keep me'


def test_bad_input_creates_no_workdir_and_prints_no_backend_log(tmp_path):
  # With every platform allowed, JAX logs the backends it could not start; not on an error line.
  result = run_cli(str(tmp_path / 'run'), '--config.dataset=no_such_dataset',
                   env={'JAX_PLATFORMS': ''})
  assert result.returncode == 2
  assert result.stderr.startswith("error: unknown dataset 'no_such_dataset'"), result.stderr
  assert result.stderr.count('\n') == 1, result.stderr
  assert not (tmp_path / 'run').exists()


def test_unwritable_workdir(tmp_path):
  not_a_dir = tmp_path / 'file'
  not_a_dir.write_text('')
  result = run_cli(str(not_a_dir / 'run'))
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f"workdir '{not_a_dir / 'run'}' is not writable" in result.stderr


def _png(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB'))


def _non_white_rows(pixels):
  return np.flatnonzero((pixels < 200).any(axis=(1, 2)))


def test_image_grid_labels_its_rows_under_a_title(tmp_path):
  """Each image appears once, upscaled; the title and the row labels take their own bands of
  drawn (dark) pixels above the images; a longer title wraps onto more lines."""
  from train.pictures import write_image_grid  # pylint: disable=g-import-not-at-top
  red = np.zeros((3, 8, 8, 3), np.uint8)
  red[..., 0] = 255
  green = np.zeros((2, 8, 8, 3), np.uint8)
  green[..., 1] = 255
  path = str(tmp_path / 'grid.png')
  size = write_image_grid(path, [red, green], ['held-out originals', 'reconstructions'],
                          'Title, step 7', scale=4)
  pixels = _png(path)
  assert pixels.shape[:2] == (size[1], size[0])
  is_color = lambda color: np.all(pixels == color, axis=-1)
  assert is_color((255, 0, 0)).sum() == 3 * 32 * 32  # every image once, at scale 4
  assert is_color((0, 255, 0)).sum() == 2 * 32 * 32
  red_rows = np.flatnonzero(is_color((255, 0, 0)).any(axis=1))
  green_rows = np.flatnonzero(is_color((0, 255, 0)).any(axis=1))
  assert len(red_rows) == len(green_rows) == 32 and red_rows[-1] < green_rows[0]
  text_rows = [row for row in _non_white_rows(pixels) if not is_color((255, 0, 0))[row].any()
               and not is_color((0, 255, 0))[row].any()]
  above_red = [row for row in text_rows if row < red_rows[0]]
  between = [row for row in text_rows if red_rows[-1] < row < green_rows[0]]
  assert above_red and between  # the title and first label; the second label
  assert np.ptp(above_red) > 2 * np.ptp(between)  # a title and a label, not one line
  unlabelled = write_image_grid(str(tmp_path / 'bare.png'), [red, green], ['', ''],
                                'Title, step 7', scale=4)
  assert unlabelled[0] == size[0] and size[1] - unlabelled[1] >= 2 * 12  # two label strips
  long_title = ' '.join(['a long title'] * 30)
  wrapped = write_image_grid(str(tmp_path / 'long.png'), [red, green], ['a', 'b'], long_title)
  assert wrapped[0] == size[0] and wrapped[1] >= size[1] + 3 * 12  # more title lines


def test_image_grid_rejects_bad_rows_with_one_clear_line(tmp_path):
  from train.pictures import write_image_grid  # pylint: disable=g-import-not-at-top
  images = np.zeros((2, 8, 8, 3), np.uint8)
  path = str(tmp_path / 'grid.png')
  with pytest.raises(ValueError, match='got 2 rows but 1 row_labels; give one label per row'):
    write_image_grid(path, [images, images], ['only one'], 'title')
  with pytest.raises(ValueError, match=r'row 1 is float32 of shape \(2, 8, 8, 3\); expected '
                                       r'uint8 \[n, H, W, C\]'):
    write_image_grid(path, [images, images.astype(np.float32)], ['a', 'b'], 'title')
  with pytest.raises(ValueError, match=r'row 1 holds images of shape \(4, 4, 3\), row 0 of '
                                       r'\(8, 8, 3\)'):
    write_image_grid(path, [images, images[:, :4, :4]], ['a', 'b'], 'title')
  with pytest.raises(ValueError, match='got no rows'):
    write_image_grid(path, [], [], 'title')
  with pytest.raises(ValueError, match='scale must be an integer >= 1, got 0'):
    write_image_grid(path, [images], ['a'], 'title', scale=0)
  assert not os.path.exists(path)


def test_trainer_pngs_say_what_they_show(tmp_path):
  """The reconstruction grid is the labelled two-row grid; the usage chart has a title band,
  axes, and one bar per code: blue for used codes, red for dead ones, in proportion."""
  from train import pictures  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  originals = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  path = str(tmp_path / 'reconstructions.png')
  size = pictures.write_reconstruction_grid(path, originals, originals // 2, step=12)
  pixels = _png(path)
  assert pixels.shape[:2] == (size[1], size[0])
  assert size[0] >= 4 * 128 and size[1] >= 2 * 128 + 40  # two rows of 4 images, plus text
  counts = np.array([5, 0, 3, 9, 0, 1, 2, 7, 0, 4, 4, 1, 0, 0, 6, 2], np.float32)
  path = str(tmp_path / 'code_usage.png')
  pictures.write_usage_histogram(path, counts, step=12)
  pixels = _png(path)
  columns = lambda color: np.all(pixels == color, axis=-1).any(axis=0).sum()
  used_columns, dead_columns = columns((40, 90, 200)), columns((220, 40, 40))
  assert used_columns > 0 and dead_columns > 0
  assert used_columns * 5 == dead_columns * 11  # 11 codes used, 5 dead, equal widths
  bars = np.flatnonzero(np.all(pixels == (40, 90, 200), axis=-1).any(axis=1))
  assert len(_non_white_rows(pixels[:bars[0]])) > 20  # title, subtitle, axis label above
  assert len(_non_white_rows(pixels[bars[-1] + 2:])) > 10  # tick labels, axis label below
