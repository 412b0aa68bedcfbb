"""Random-access image sources and the grain pipelines that read them, shard by shard.

A source (`ArraySource`, `FolderSource`, `TfdsSource`) maps an example index to one example
and decodes nothing before it is asked to. Three pipelines read them:

  * `step_batches`: the training batches from a given step on. Element `s` is this process's
    rows of the global batch of step `s`, as `BatchOrder` orders the examples: a pure function
    of `(seed, step)`, so a resumed run, or a run over another number of processes, reads the
    same examples at the same step. The pipeline keeps no other state: it restarts at the
    restored step, and there is no iterator state to checkpoint.
  * `split_batches`: a whole split in order, padded to whole batches, with weights that are 0
    on the padding; for evaluation and for encoding a split.
  * `materialize`: a whole split into one host array (small datasets only).

Decoding sources are read in grain's worker processes (`mp_prefetch`), with a small prefetch
buffer each, so host memory holds a few batches whatever the dataset's size. In-memory arrays
are sliced in the main process: sending them to workers would copy them.

Each process reads only the rows its own devices hold (`process_rows`); `global_array` lays
those rows out as the global `jax.Array`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Optional, Sequence, Tuple

import grain
import jax
import numpy as np
from absl import flags

PyTree = Any
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# Below this many images, decoding in the main process beats starting worker processes.
MIN_IMAGES_FOR_WORKERS = 512
# Elements (batches) each worker decodes ahead, and threads per worker.
WORKER_BUFFER, WORKER_THREADS = 2, 2


# ---- Sources ----


class ArraySource:
  """The rows of in-memory arrays: a pytree of `[N, ...]` host arrays."""

  decodes = False

  def __init__(self, tree: PyTree):
    self.tree = tree
    self._length = len(jax.tree.leaves(tree)[0])

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index) -> PyTree:
    return jax.tree.map(lambda x: x[index], self.tree)

  def rows(self, indices: np.ndarray) -> PyTree:
    return jax.tree.map(lambda x: x[indices], self.tree)


class _DecodingSource:
  """What a source that decodes one example at a time shares: `rows`, slicing, `len`."""

  decodes = True
  image_shape: Tuple[int, int, int]

  def __len__(self) -> int:
    raise NotImplementedError

  def decode(self, index: int) -> np.ndarray:
    raise NotImplementedError

  def rows(self, indices: np.ndarray) -> np.ndarray:
    out = np.empty((len(indices),) + tuple(self.image_shape), np.uint8)
    for i, index in enumerate(np.asarray(indices).reshape(-1)):
      out[i] = self.decode(int(index))
    return out

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self.decode(int(index))
    return self.rows(np.arange(len(self))[index])


def fit_image(image, size: int, channels: int) -> np.ndarray:
  """A PIL image as uint8 `[size, size, channels]`: centre-cropped to a square and resized
  (bicubic), or kept at its size when `size` is 0."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = image.convert('L' if channels == 1 else 'RGB')
  if size:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
      image = image.resize((size, size), Image.BICUBIC)
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def bad_image_errors() -> Tuple[type, ...]:
  """What PIL raises for a file that is not a usable image: unreadable, truncated, not an
  image, or a decompression bomb (over twice `PIL.Image.MAX_IMAGE_PIXELS`, about 179
  megapixels; PIL's own error, not an OSError)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class FolderSource(_DecodingSource):
  """Image files under a folder, decoded one at a time on demand.

  A file that cannot be read (`bad_image_errors`, or of another size when `image_size` is 0)
  is replaced by the next readable file of the split with the same label (of the split, if it
  has no labels), so the batch order stays a pure function of `(seed, step)` and every image
  keeps its label; its path is appended to `skipped_log` once (by whichever process found it
  first) and `skipped()` reports them.

  Attributes:
    root: the folder the paths are relative to.
    paths: bytes `[N]`, the files' paths relative to `root`.
    labels: int32 `[N]` class indices, or None.
    image_size: centre-crop and resize to this square size; 0 keeps the files' size, which
      must then be `image_shape`'s.
    image_shape: `(H, W, C)` of every decoded example.
    skipped_log: the file that records skipped paths, or '' to record none.
  """

  def __init__(self, root: str, paths: np.ndarray, labels: Optional[np.ndarray],
               image_size: int, image_shape: Tuple[int, int, int], skipped_log: str = ''):
    self.root, self.paths, self.labels = root, paths, labels
    self.image_size, self.image_shape, self.skipped_log = image_size, image_shape, skipped_log
    self._logged = set()  # the paths this process knows are in skipped_log

  def __len__(self) -> int:
    return len(self.paths)

  def path(self, index: int) -> str:
    return os.path.join(self.root, os.fsdecode(self.paths[index]))

  def read(self, index: int) -> np.ndarray:
    """One file as uint8 `image_shape`; raises OSError (or ValueError) if it cannot."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(self.path(index)) as image:
      array = fit_image(image, self.image_size, self.image_shape[-1])
    if array.shape != tuple(self.image_shape):
      raise ValueError(f'{array.shape[0]}x{array.shape[1]}, not the folder\'s '
                       f'{self.image_shape[0]}x{self.image_shape[1]}')
    return array

  def decode(self, index: int) -> np.ndarray:
    candidates = (index + np.arange(len(self))) % len(self)
    if self.labels is not None:
      candidates = candidates[self.labels[candidates] == self.labels[index]]
    for candidate in candidates:
      try:
        return self.read(int(candidate))
      except bad_image_errors() as e:
        self._record_skip(int(candidate), e)
    where = '' if self.labels is None else f' of the class of {self.path(index)}'
    raise OSError(f'none of the {len(candidates)} files{where} under {self.root} could be read.')

  def _record_skip(self, index: int, error: Exception) -> None:
    path = self.path(index)
    if not self.skipped_log or path in self._logged or path in self.skipped():
      self._logged.add(path)
      return
    self._logged.add(path)
    line = f'{path}\t{type(error).__name__}: {error}'.replace('\n', ' ')
    with open(self.skipped_log, 'a') as f:  # one short append: whole lines from any process
      f.write(line + '\n')

  def skipped(self) -> Tuple[str, ...]:
    """The distinct paths skipped so far, by any process that shares `skipped_log`."""
    if not self.skipped_log or not os.path.exists(self.skipped_log):
      return ()
    with open(self.skipped_log) as f:
      return tuple(dict.fromkeys(line.split('\t')[0] for line in f if line.strip()))


class TfdsSource(_DecodingSource):
  """A split of a prepared tfds dataset, read through `tfds.data_source` (no TensorFlow).

  The tfds reader is opened lazily in each process that reads, so the source pickles small.
  A split this large has its labels read with its images, never on their own: reading a
  label means reading its whole record (`with_labels`).

  Attributes:
    label_key: the examples' class-label feature, or None when the dataset has none.
  """

  def __init__(self, name: str, split: str, data_dir: Optional[str], image_key: str,
               image_size: int, image_shape: Tuple[int, int, int], length: int,
               label_key: Optional[str] = None):
    self.name, self.split, self.data_dir, self.image_key = name, split, data_dir, image_key
    self.image_size, self.image_shape, self._length = image_size, image_shape, length
    self.label_key = label_key
    self._reader = None

  def __getstate__(self):
    return {**self.__dict__, '_reader': None}

  def __len__(self) -> int:
    return self._length

  def _source(self):
    if self._reader is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      self._reader = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                      download=False)
    return self._reader

  def example(self, index: int):
    return self._source()[index]

  def decode(self, index: int) -> np.ndarray:
    return self.fit(self.example(index)[self.image_key])

  def fit(self, image) -> np.ndarray:
    """A decoded image feature as uint8 `image_shape`."""
    image = np.asarray(image)
    if image.shape == tuple(self.image_shape):
      return image
    from PIL import Image  # pylint: disable=g-import-not-at-top
    return fit_image(Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image),
                     self.image_size, self.image_shape[-1])

  def with_labels(self) -> 'LabeledTfdsSource':
    if self.label_key is None:
      raise ValueError(f'tfds dataset {self.name!r} has no class labels.')
    return LabeledTfdsSource(self)


@dataclasses.dataclass(frozen=True)
class LabeledTfdsSource:
  """A `TfdsSource`'s images and labels, each record read once (e.g. to encode a split for a
  class-conditional prior): `rows` gives `{'images': uint8 [n, H, W, C], 'labels': int32 [n]}`."""

  source: TfdsSource
  decodes = True

  def __len__(self) -> int:
    return len(self.source)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return self.source.image_shape

  def rows(self, indices: np.ndarray) -> PyTree:
    indices = np.asarray(indices).reshape(-1)
    images = np.empty((len(indices),) + tuple(self.image_shape), np.uint8)
    labels = np.empty(len(indices), np.int32)
    for i, index in enumerate(indices):
      example = self.source.example(int(index))
      images[i], labels[i] = self.source.fit(example[self.source.image_key]), \
          example[self.source.label_key]
    return {'images': images, 'labels': labels}


# ---- Which rows this process reads ----


def process_rows(sharding: jax.sharding.Sharding, shape: Sequence[int],
                 axis: int) -> np.ndarray:
  """int64, sorted: the positions along `axis` of an array of `shape` laid out by `sharding`
  that this process's devices hold."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    rows.update(range(*index[axis].indices(shape[axis])))
  return np.asarray(sorted(rows), np.int64)


def global_array(local: PyTree, rows: np.ndarray, sharding: jax.sharding.Sharding,
                 global_shape_of, axis: int) -> PyTree:
  """The global arrays whose rows `rows` along `axis` are `local` (one leaf per leaf).

  Args:
    local: a pytree of host arrays holding, along `axis`, the rows `rows` in that order.
    rows: sorted positions along `axis` (`process_rows`).
    sharding: the result's sharding; this process's devices must hold only `rows`.
    global_shape_of: `leaf -> global shape`.
    axis: the batch axis.
  """

  def one(leaf):
    shape = global_shape_of(leaf)

    def callback(index):
      wanted = np.arange(shape[axis])[index[axis]]
      picked = np.take(leaf, np.searchsorted(rows, wanted), axis=axis)
      rest = tuple(s if i != axis else slice(None) for i, s in enumerate(index))
      return picked[rest]

    return jax.make_array_from_callback(shape, sharding, callback)

  return jax.tree.map(one, local)


# ---- Pipelines ----


def _read(dataset: grain.MapDataset, source, workers: int) -> Iterator[PyTree]:
  """Reads `dataset` ahead: in `workers` processes for a decoding source, else in threads.

  Closing the generator (or running it to the end) stops the threads and worker processes
  at once, rather than whenever the iterator is garbage-collected.
  """
  if source.decodes and workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags: in tests, a notebook
      flags.FLAGS.mark_as_parsed()
    ahead = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=WORKER_THREADS, prefetch_buffer_size=WORKER_BUFFER)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=WORKER_BUFFER))
  else:
    ahead = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  iterator = iter(ahead)
  try:
    yield from iterator
  finally:
    iterator.close()


@dataclasses.dataclass(frozen=True)
class _StepRows:
  """grain map: step -> this process's rows of that step's global batch."""
  source: Any
  order: Any
  rows: np.ndarray

  def __call__(self, step: int) -> PyTree:
    return self.source.rows(self.order.indices(int(step), 1)[0][self.rows])


def step_batches(source, order, first_step: int, last_step: int, rows: np.ndarray,
                 workers: int) -> Iterator[PyTree]:
  """This process's rows of the batches of steps `first_step .. last_step - 1`, in order.

  Args:
    source: a source (`ArraySource`, `FolderSource`, `TfdsSource`).
    order: a `train.data.BatchOrder` over `len(source)` examples.
    first_step, last_step: the steps to read.
    rows: the batch positions this process holds (`process_rows`).
    workers: worker processes for a decoding source (0: decode in the main process).

  Yields:
    `source.rows` of each step's examples at `rows`: `[len(rows), ...]`.
  """
  dataset = grain.MapDataset.range(first_step, last_step).map(_StepRows(source, order, rows))
  return _read(dataset, source, workers)


@dataclasses.dataclass(frozen=True)
class _SplitRows:
  """grain map: batch number -> (this process's rows of it, their weights)."""
  source: Any
  batch_size: int
  rows: np.ndarray

  def __call__(self, batch: int):
    indices = int(batch) * self.batch_size + self.rows
    weights = (indices < len(self.source)).astype(np.float32)
    return self.source.rows(np.minimum(indices, len(self.source) - 1)), weights


def split_batches(source, batch_size: int, rows: np.ndarray,
                  workers: int) -> Iterator[Tuple[PyTree, np.ndarray]]:
  """A whole split in order, in batches of `batch_size` (the last padded with its last
  example): this process's `rows` of each, and float32 weights, 0 on the padding."""
  num_batches = -(-len(source) // batch_size)
  dataset = grain.MapDataset.range(num_batches).map(_SplitRows(source, batch_size, rows))
  workers = workers if len(source) >= MIN_IMAGES_FOR_WORKERS else 0
  return _read(dataset, source, workers)


def materialize(source, workers: int, batch_size: int = 256) -> np.ndarray:
  """Every example of a decoding source, in order, as one host array."""
  out = np.empty((len(source),) + tuple(source.image_shape), np.uint8)
  everything = np.arange(batch_size)
  with contextlib.closing(split_batches(source, batch_size, everything, workers)) as batches:
    for batch, (images, _) in enumerate(batches):
      start = batch * batch_size
      out[start:start + batch_size] = images[:len(source) - start]
  return out


def as_source(data):
  """A source as it is; a pytree of `[N, ...]` host arrays as an `ArraySource`."""
  return data if hasattr(data, 'rows') else ArraySource(data)


def sharded_split(data, batch_size: int, sharding: jax.sharding.Sharding,
                  workers: int = 0) -> Iterator[Tuple[PyTree, jax.Array]]:
  """A whole split in order as global batches laid out by `sharding` (batch axis 0).

  Args:
    data: a source, or a pytree of `[N, ...]` host arrays.
    batch_size: the global batch; the last one is padded with the split's last example.
    sharding: of each `[batch_size, ...]` batch; each process reads only its rows.
    workers: worker processes for a decoding source.

  Yields:
    `(batch, weights)`: the batch's pytree, and float32 `[batch_size]` weights, 0 on padding.
  """
  rows = process_rows(sharding, (batch_size,), 0)
  shape = lambda leaf: (batch_size,) + leaf.shape[1:]
  with contextlib.closing(split_batches(as_source(data), batch_size, rows, workers)) as batches:
    for local, weights in batches:
      yield (global_array(local, rows, sharding, shape, 0),
             global_array(weights, rows, sharding, shape, 0))


def sharded_batch(images: np.ndarray, indices: np.ndarray, sharding) -> jax.Array:
  """The global array `images[indices]`, laid out by `sharding`, built shard by shard.

  Each process gathers only the rows its own devices hold, so on a pod slice every host reads
  just its share of the global batch.

  Args:
    images: uint8 `[N, H, W, C]` in host memory.
    indices: int `[...]` global example indices, e.g. `[k, B]` for k steps of batch B.
    sharding: a `jax.sharding.Sharding` for the result, of shape `indices.shape + (H, W, C)`.
  """
  shape = indices.shape + images.shape[1:]
  return jax.make_array_from_callback(
      shape, sharding, lambda index: images[indices[index[:indices.ndim]]])
