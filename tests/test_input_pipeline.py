"""The grain input pipeline: streamed batches, folders at scale, bad files, memory, hosts.

conftest.py gives the process 8 CPU devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from test_train import (REPO, device_env, final_params, free_port, read_metrics, run_cli,
                        tiny_config)
from train import data, evaluate, input_pipeline, trainer
from train.step import model_from_config


def write_folder(folder, images, layout=lambda i: f'{i:05d}.png'):
  for i, image in enumerate(images):
    path = folder / layout(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
  return folder


def random_images(count, size=16, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def folder_config(folder, **overrides):
  return tiny_config(dataset=f'folder:{folder}', **overrides)


def rss_bytes():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


# ---- Batches ----

@pytest.mark.parametrize('workers', [0, 2])
def test_streamed_steps_are_the_batch_order_from_any_step(tmp_path, workers):
  images = random_images(50)
  config = folder_config(write_folder(tmp_path / 'f', images), data_on_device_max_bytes=0,
                         data_workers=workers)
  splits = data.open_splits(config)
  train = images[np.arange(50) % 10 != 9]  # the folder's every 10th file is held out
  order = data.BatchOrder(len(splits.train), 8, seed=3)
  rows = np.arange(8)
  from_start = list(input_pipeline.step_batches(splits.train, order, 0, 12, rows, workers))
  resumed = list(input_pipeline.step_batches(splits.train, order, 7, 12, rows, workers))
  assert len(from_start) == 12 and len(resumed) == 5
  for step, batch in enumerate(from_start):
    np.testing.assert_array_equal(batch, train[order.indices(step, 1)[0]])
  for got, want in zip(resumed, from_start[7:]):
    np.testing.assert_array_equal(got, want)
  # A process holding rows 2..5 reads exactly those.
  part = list(input_pipeline.step_batches(splits.train, order, 0, 3, np.arange(2, 6), 0))
  for step, batch in enumerate(part):
    np.testing.assert_array_equal(batch, from_start[step][2:6])


def test_streamed_evaluation_equals_in_memory_on_the_quickstart(tmp_path):
  """The quickstart's held-out crops, as PNG files decoded in 2 grain workers, give the same
  metrics as the crops in memory: 1,000 images, 8 devices, a padded last batch."""
  quick = data.load(tiny_config())
  folder = write_folder(tmp_path / 'eval', quick.eval)
  config = folder_config(folder, data_on_device_max_bytes=0)
  index = data._scan_folder(str(folder))  # pylint: disable=protected-access
  source = input_pipeline.FolderSource(str(folder), index['paths'], None, 0, (32, 32, 3))
  assert input_pipeline.MIN_IMAGES_FOR_WORKERS <= len(source) == len(quick.eval)
  model = model_from_config(config.model, 3)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  mesh = Mesh(np.asarray(jax.devices()), ('data',))
  evaluator = evaluate.Evaluator(model, mesh, batch_size=96, workers=2)
  in_memory = evaluator(variables, quick.eval, quick.variance)
  streamed = evaluator(variables, source, quick.variance)
  np.testing.assert_array_equal(streamed.pop('code_counts'), in_memory.pop('code_counts'))
  assert streamed == in_memory


def test_resume_on_the_streamed_path_continues_identically(tmp_path):
  folder = write_folder(tmp_path / 'photos', random_images(60))
  config = lambda steps: folder_config(folder, data_on_device_max_bytes=0, data_workers=2,
                                       num_train_steps=steps)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  trainer.train_and_evaluate(config(6), straight)
  trainer.train_and_evaluate(config(2), resumed)
  trainer.train_and_evaluate(config(6), resumed)
  jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(resumed))
  assert read_metrics(resumed)[-1] == read_metrics(straight)[-1]
  # The streamed run trains on the same batches as the in-memory one.
  in_memory = str(tmp_path / 'in_memory')
  trainer.train_and_evaluate(folder_config(folder, num_train_steps=6), in_memory)
  jax.tree.map(np.testing.assert_array_equal, final_params(straight), final_params(in_memory))


def test_a_large_tfds_split_streams_and_trains_like_the_in_memory_one(tmp_path):
  """Over `data_on_device_max_bytes`, a tfds split is a `TfdsSource` (mock data is patched into
  this process only, so it decodes in the main process here)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  runs = {}
  with tfds.testing.mock_data(num_examples=48):
    small = data.load(tiny_config(dataset='cifar10'))
    streamed = data.load(tiny_config(dataset='cifar10', data_on_device_max_bytes=0))
    assert isinstance(streamed.train, input_pipeline.TfdsSource)
    np.testing.assert_array_equal(streamed.train[:], small.train)
    np.testing.assert_array_equal(streamed.eval[:], small.eval)
    assert streamed.variance == pytest.approx(small.variance, rel=1e-12)  # < 1,000: all of it
    for name, max_bytes in (('small', 2**31), ('streamed', 0)):
      config = tiny_config(dataset='cifar10', data_on_device_max_bytes=max_bytes,
                           data_workers=0)
      trainer.train_and_evaluate(config, str(tmp_path / name))
      runs[name] = final_params(str(tmp_path / name))
  jax.tree.map(np.testing.assert_array_equal, runs['small'], runs['streamed'])


# ---- Folders ----

def test_imagenet_layout_gives_splits_labels_and_a_cached_list(tmp_path):
  images = random_images(24, size=20)
  classes = ['n02', 'n01', 'n03']
  root = tmp_path / 'imagenet'
  write_folder(root, images[:18], lambda i: f'train/{classes[i % 3]}/{i:03d}.JPEG')
  write_folder(root, images[18:], lambda i: f'val/{classes[i % 3]}/{i:03d}.jpeg')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = folder_config(root, image_size=16)
  loaded = data.read(data.open_splits(config, str(workdir)), config, str(workdir))
  assert loaded.class_names == ('n01', 'n02', 'n03')
  assert (len(loaded.train), len(loaded.eval)) == (18, 6)
  # Sorted paths: n01's files, then n02's, then n03's.
  np.testing.assert_array_equal(loaded.train_labels, np.repeat([0, 1, 2], 6))
  np.testing.assert_array_equal(loaded.eval_labels, np.repeat([0, 1, 2], 2))
  assert loaded.image_shape == (16, 16, 3)
  # The list is cached: a file added later is not seen until the cache is deleted.
  cached = np.load(workdir / data.FOLDER_INDEX)
  assert len(cached['paths']) == 24 and cached['sizes'].min() > 0
  write_folder(root, images[:1], lambda i: 'train/n01/zzz.JPEG')
  assert len(data.open_splits(config, str(workdir)).train) == 18
  os.remove(workdir / data.FOLDER_INDEX)
  assert len(data.open_splits(config, str(workdir)).train) == 19


def test_unreadable_files_are_skipped_named_and_never_stop_a_run(tmp_path):
  folder = write_folder(tmp_path / 'photos', random_images(40))
  (folder / '00003.png').write_bytes(b'not an image')
  truncated = (folder / '00011.png').read_bytes()
  (folder / '00011.png').write_bytes(truncated[:len(truncated) // 3])
  workdir = tmp_path / 'run'
  result = run_cli(str(workdir), f'--config.dataset=folder:{folder}',
                   '--config.data_on_device_max_bytes=0', '--config.data_workers=2',
                   '--config.batch_size=32', '--config.num_train_steps=4',
                   '--config.eval_every_steps=4', '--config.log_every_steps=2',
                   '--config.model.num_hiddens=16', '--config.model.num_residual_hiddens=4',
                   '--config.model.quantizer.ema.num_embeddings=16',
                   '--config.model.quantizer.ema.embedding_dim=4')
  assert result.returncode == 0, result.stderr
  warnings = [line for line in result.stdout.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 1, result.stdout
  assert warnings[0].startswith('warning: 2 unreadable image file(s) skipped')
  assert '00003.png' in warnings[0] and '00011.png' in warnings[0]
  logged = (workdir / data.SKIPPED_LOG).read_text().splitlines()
  assert {line.split('\t')[0] for line in logged} == {str(folder / '00003.png'),
                                                      str(folder / '00011.png')}
  assert read_metrics(str(workdir))[-1]['step'] == 4


def test_a_bad_file_is_replaced_by_the_next_readable_one(tmp_path):
  images = random_images(5)
  folder = write_folder(tmp_path / 'f', images)
  (folder / '00001.png').write_bytes(b'')
  index = data._scan_folder(str(folder))  # pylint: disable=protected-access
  log = tmp_path / 'skipped.txt'
  source = input_pipeline.FolderSource(str(folder), index['paths'], None, 0, (16, 16, 3),
                                       skipped_log=str(log))
  np.testing.assert_array_equal(source.rows(np.arange(5)), images[[0, 2, 2, 3, 4]])
  assert source.skipped() == (str(folder / '00001.png'),)


@pytest.mark.parametrize('make, flags, message', [
    (lambda f: f.mkdir(), [], 'holds 0 images'),
    (lambda f: (write_folder(f, random_images(6)), write_folder(
        f, random_images(6, channels=1), lambda i: f'gray{i}.png')), [],
     'has images of different channels'),
    (lambda f: write_folder(f, random_images(6)), ['--config.image_size=30'],
     'images are 30x30; the VQ-VAE downsamples by 4'),
])
def test_bad_folders_are_one_line_and_keep_the_workdir(tmp_path, make, flags, message):
  folder = tmp_path / 'photos'
  make(folder)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'precious.txt').write_text('keep me')
  result = run_cli(str(workdir), f'--config.dataset=folder:{folder}', *flags)
  assert result.returncode == 2, result.stderr
  assert result.stdout == '' and result.stderr.count('\n') == 1, result.stderr
  assert result.stderr.startswith('error: ') and message in result.stderr, result.stderr
  assert os.listdir(workdir) == ['precious.txt']


def test_image_channels_converts_a_mixed_folder(tmp_path):
  folder = write_folder(tmp_path / 'photos', random_images(6))
  write_folder(folder, random_images(6, channels=1), lambda i: f'gray{i}.png')
  loaded = data.load(folder_config(folder, image_channels=3))
  assert loaded.image_shape == (16, 16, 3)
  assert loaded.train.shape[0] + loaded.eval.shape[0] == 12


# ---- Memory ----

def test_streaming_keeps_host_memory_flat(tmp_path):
  """Streaming a 36 MB training split through 2 workers grows the host's memory by a small
  fraction of it; reading the same split into memory grows it by the split's size.

  The split is over glibc's largest mmap threshold (32 MiB), so its array always gets fresh
  pages: it cannot hide in heap memory that earlier tests freed, and the check can fail."""
  count, size = 3300, 64
  folder = tmp_path / 'big'
  images = random_images(200, size=size)
  write_folder(folder, images[np.arange(count) % 200])
  dataset_bytes = count * size * size * 3 * 0.9  # 90% is the training split
  splits = data.open_splits(folder_config(folder, data_on_device_max_bytes=0))
  order = data.BatchOrder(len(splits.train), 64, seed=0)
  batches = input_pipeline.step_batches(splits.train, order, 0, 50, np.arange(64), 2)
  next(batches)  # the workers have started
  before = rss_bytes()
  for batch in batches:  # 49 more steps of 64: more than an epoch
    assert batch.shape == (64, size, size, 3)
  streamed_growth = rss_bytes() - before
  batches.close()
  before = rss_bytes()
  in_memory = input_pipeline.materialize(splits.train, workers=2)
  materialized_growth = rss_bytes() - before
  assert in_memory.nbytes >= 0.99 * dataset_bytes
  assert materialized_growth > 0.8 * dataset_bytes, materialized_growth
  assert streamed_growth < 0.2 * dataset_bytes, (streamed_growth, dataset_bytes)


# ---- Two processes ----

READS_SCRIPT = '''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from train import data, input_pipeline

class CountingSource(input_pipeline.ArraySource):
  read = []
  def rows(self, indices):
    self.read.extend(int(i) for i in indices)
    return super().rows(indices)

images = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
source = CountingSource(images)
mesh = Mesh(np.asarray(jax.devices()), ('data',))
sharding = NamedSharding(mesh, P(None, 'data'))
rows = input_pipeline.process_rows(sharding, (1, 8), axis=1)
order = data.BatchOrder(40, 8, seed=1)
sums = []
for step, local in enumerate(input_pipeline.step_batches(source, order, 0, 6, rows, 0)):
  batch = input_pipeline.global_array(local[None], rows, sharding,
                                      lambda leaf: (1, 8) + leaf.shape[2:], axis=1)
  total = jax.jit(lambda x: x.sum(axis=(0, 1)), out_shardings=NamedSharding(mesh, P()))(batch)
  sums.append(np.asarray(jax.device_get(total)).tolist())
print(json.dumps({'rows': rows.tolist(), 'read': source.read, 'sums': sums}))
'''


def test_two_processes_each_read_only_their_half(tmp_path):
  script = tmp_path / 'reads.py'
  script.write_text(READS_SCRIPT)
  address = f'127.0.0.1:{free_port()}'
  env = {**os.environ, **device_env(1), 'PYTHONPATH': REPO}
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  order = data.BatchOrder(40, 8, seed=1)
  images = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
  assert [r['rows'] for r in results] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for process, result in enumerate(results):
    want = order.indices(0, 6)[:, 4 * process:4 * process + 4].reshape(-1)
    # Its half of each batch and nothing else (grain's threads may read two steps at once).
    assert sorted(result['read']) == sorted(want.tolist())
    np.testing.assert_allclose(result['sums'], images[order.indices(0, 6)].sum(axis=1))
