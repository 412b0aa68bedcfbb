"""The streaming input pipeline at scale: a synthetic folder of JPEGs, read alone and by training.

    python -m train.bench.input_pipeline --root /tmp/jpegs --sizes 100000,200000 \\
        --out benchmarks/input_pipeline

For each size N it writes (once) a folder in ImageNet's layout: `train/` with N JPEGs of
160x160 in 100 class folders, `val/` with 500. Then:
  * the pipeline alone: `input_pipeline.step_batches` at batch 128, decoding, centre-cropping
    and resizing to 128x128 in `--workers` grain processes; images/s after the first batch;
  * feeding training: `python -m train` on the folder, streamed (`data_on_device_max_bytes=0`)
    at 128x128, batch 32, with a small model (`num_hiddens=16`) so that the input pipeline
    rather than the step is what a 2-core machine measures: the time from launching the
    process to the end of its first step, images/s between steps 10 and `--steps`, and the peak
    resident memory of the trainer and of the trainer with its grain workers;
  * the same training on a folder of 5,000 images read into memory first: the images/s the
    training step itself allows on this machine, against which the streamed figure reads.
The JPEGs are 256 distinct pictures (smooth random fields) repeated: decoding costs the same,
and the files sit in the page cache once written, as on a warm local disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
from absl import app, flags

_ROOT = flags.DEFINE_string('root', '/tmp/vqvae_jax_jpegs', 'Where the folders are written.')
_SIZES = flags.DEFINE_list('sizes', ['100000', '200000'], 'Training images per folder.')
_WORKERS = flags.DEFINE_integer('workers', 2, 'grain worker processes.')
_STEPS = flags.DEFINE_integer('steps', 60, 'Training steps per run.')
_OUT = flags.DEFINE_string('out', 'benchmarks/input_pipeline', 'Output path, no extension.')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES, VAL_IMAGES, SIDE, DISTINCT = 100, 500, 160, 256
BASELINE_IMAGES = 5_000


def make_folder(root: str, count: int) -> str:
  """ImageNet's layout with `count` training JPEGs; kept when it already exists."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  done = os.path.join(root, 'COMPLETE')
  if os.path.exists(done):
    return root
  rng = np.random.default_rng(0)
  pictures = []
  for _ in range(DISTINCT):
    coarse = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    picture = Image.fromarray(coarse).resize((SIDE, SIDE), Image.BICUBIC)
    path = os.path.join(root, 'tmp.jpg')
    os.makedirs(root, exist_ok=True)
    picture.save(path, quality=90)
    with open(path, 'rb') as f:
      pictures.append(f.read())
  for split, total in (('train', count), ('val', VAL_IMAGES)):
    for c in range(CLASSES):
      os.makedirs(os.path.join(root, split, f'n{c:08d}'), exist_ok=True)
    for i in range(total):
      with open(os.path.join(root, split, f'n{i % CLASSES:08d}', f'{i:07d}.JPEG'), 'wb') as f:
        f.write(pictures[i % DISTINCT])
  os.remove(os.path.join(root, 'tmp.jpg'))
  open(done, 'w').close()
  return root


def pipeline_alone(folder: str, workers: int, steps: int = 40) -> float:
  """Images/s of the training pipeline by itself, after its first batch."""
  from train import data, input_pipeline  # pylint: disable=g-import-not-at-top
  from train.configs import imagenet128  # pylint: disable=g-import-not-at-top
  config = imagenet128.get_config()
  config.update(dataset=f'folder:{folder}', data_on_device_max_bytes=0)
  splits = data.open_splits(config)
  order = data.BatchOrder(len(splits.train), 128, seed=0)
  batches = input_pipeline.step_batches(splits.train, order, 0, steps + 1, np.arange(128),
                                        workers)
  next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    next(batches)
  rate = steps * 128 / (time.perf_counter() - start)
  batches.close()
  return rate


def _tree_rss(pid: int) -> int:
  """Resident bytes of a process and its descendants, from /proc."""
  total, pending = 0, [pid]
  while pending:
    current = pending.pop()
    try:
      with open(f'/proc/{current}/statm') as f:
        total += int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
      for thread in os.listdir(f'/proc/{current}/task'):  # grain starts workers from threads
        with open(f'/proc/{current}/task/{thread}/children') as f:
          pending.extend(int(child) for child in f.read().split())
    except OSError:
      continue
  return total


def _high_water_mark(pid: int) -> int:
  with open(f'/proc/{pid}/status') as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM'))


def feeding_training(folder: str, workers: int, steps: int, workdir: str,
                     streamed: bool = True) -> Dict[str, float]:
  """Time to the first step, images/s and peak memory of a training run: streamed, or with
  the folder read into memory first (the baseline for the images/s)."""
  max_bytes = 0 if streamed else 2**31
  command = [sys.executable, '-m', 'train', '--config=train/configs/imagenet128.py',
             f'--workdir={workdir}', f'--config.dataset=folder:{folder}',
             f'--config.data_on_device_max_bytes={max_bytes}', f'--config.data_workers={workers}',
             '--config.batch_size=32', f'--config.num_train_steps={steps}',
             '--config.steps_per_dispatch=1', '--config.log_every_steps=1',
             '--config.eval_every_steps=0', '--config.checkpoint_every_steps=0',
             '--config.num_reconstructions=0', '--config.eval_batch_size=64',
             '--config.model.num_hiddens=16', '--config.model.num_residual_layers=1',
             '--config.model.num_residual_hiddens=4', '--config.model.quantizer.ema.embedding_dim=8',
             '--config.model.dtype=float32']
  metrics = os.path.join(workdir, 'metrics.jsonl')
  launched = time.perf_counter()
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  seen: Dict[int, float] = {}
  peak_tree, peak_main = 0, 0
  while proc.poll() is None:
    peak_tree = max(peak_tree, _tree_rss(proc.pid))
    try:
      peak_main = max(peak_main, _high_water_mark(proc.pid))
    except (OSError, StopIteration):
      pass
    if os.path.exists(metrics):
      with open(metrics) as f:
        for line in f:
          step = json.loads(line)['step']
          seen.setdefault(step, time.perf_counter())
    time.sleep(0.05)
  if proc.returncode:
    raise RuntimeError(f'training failed: {proc.stderr.read()[-2000:]}')
  return {'seconds_to_first_step': seen[1] - launched,
          'images_per_s': (steps - 10) * 32 / (seen[steps] - seen[10]),
          'peak_rss_trainer_mb': peak_main / 2**20,
          'peak_rss_with_workers_mb': peak_tree / 2**20}


def main(argv):
  del argv
  # The same training step on data already in memory: the images/s the step allows.
  folder = make_folder(os.path.join(_ROOT.value, str(BASELINE_IMAGES)), BASELINE_IMAGES)
  baseline = feeding_training(folder, _WORKERS.value, _STEPS.value,
                              os.path.join(_ROOT.value, f'run_memory_{int(time.time())}'),
                              streamed=False)
  print('in memory', baseline, flush=True)
  results: List[Dict[str, float]] = []
  for size in (int(s) for s in _SIZES.value):
    start = time.perf_counter()
    folder = make_folder(os.path.join(_ROOT.value, str(size)), size)
    print(f'{size} images: folder ready in {time.perf_counter() - start:.0f} s', flush=True)
    workdir = os.path.join(_ROOT.value, f'run_{size}_{int(time.time())}')
    row = {'train_images': size, 'workers': _WORKERS.value,
           'pipeline_images_per_s': pipeline_alone(folder, _WORKERS.value),
           **feeding_training(folder, _WORKERS.value, _STEPS.value, workdir)}
    print(row, flush=True)
    results.append(row)
  machine = f'{os.cpu_count()}-core {os.uname().machine} Linux, Python {sys.version.split()[0]}'
  lines = [f'Synthetic JPEG folders (160x160, ImageNet layout) read at 128x128 by '
           f'`{_WORKERS.value}` grain workers; {machine}. Command: `python -m '
           f'train.bench.input_pipeline --sizes {",".join(_SIZES.value)}`.', '',
           '| training images | pipeline alone (images/s, batch 128) | feeding training '
           '(images/s, batch 32) | time to first step (s) | peak RSS, trainer (MB) | '
           'peak RSS, trainer + workers (MB) |', '|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r["train_images"]:,} | {r["pipeline_images_per_s"]:.0f} | '
                 f'{r["images_per_s"]:.0f} | {r["seconds_to_first_step"]:.1f} | '
                 f'{r["peak_rss_trainer_mb"]:.0f} | {r["peak_rss_with_workers_mb"]:.0f} |')
  lines.append(f'| {BASELINE_IMAGES:,}, read into memory first | - | '
               f'{baseline["images_per_s"]:.0f} | {baseline["seconds_to_first_step"]:.1f} | '
               f'{baseline["peak_rss_trainer_mb"]:.0f} | '
               f'{baseline["peak_rss_with_workers_mb"]:.0f} |')
  if len(results) > 1:
    first, last = results[0], results[-1]
    lines += ['', f'{last["train_images"]:,} against {first["train_images"]:,} images: time '
              f'to first step x{last["seconds_to_first_step"] / first["seconds_to_first_step"]:.2f}'
              f', peak RSS (trainer + workers) '
              f'x{last["peak_rss_with_workers_mb"] / first["peak_rss_with_workers_mb"]:.2f}.']
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump({'machine': machine, 'results': results, 'in_memory': baseline}, f, indent=2)
  with open(_OUT.value + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
