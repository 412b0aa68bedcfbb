"""Image data: tfds datasets through `tfds.data_source` (no TensorFlow), the photos bundled with
scikit-image, an .npz array or a folder of images; and the deterministic order of batches.

Every dataset becomes two splits (training and held-out). A split that fits in
`config.data_on_device_max_bytes` is read into a uint8 `[N, H, W, C]` host array; a larger
folder or tfds split stays a source that `train/input_pipeline.py` decodes batch by batch in
grain's workers. The order of training examples is a pure function of `(seed, step)`, which is
what lets a resumed run continue with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from train import input_pipeline
from train.errors import UserError

# What tfds needs to prepare (download and encode) a dataset, and training does not: TensorFlow,
# and importlib_resources, which tfds 4.9 imports for it without declaring it.
PREPARE_PACKAGES = 'tensorflow-cpu importlib_resources'
IMAGE_EXTENSIONS = input_pipeline.IMAGE_EXTENSIONS
# A folder's file list, cached in the workdir (delete it to list the folder again), and the
# image files found unreadable, one per line.
FOLDER_INDEX, SKIPPED_LOG = 'folder_index.npz', 'skipped_images.txt'
# Held-out subfolders that, next to `train/`, make a folder's splits (ImageNet's layout).
FOLDER_EVAL_SPLITS = (b'val', b'validation', b'test', b'eval')
# Files whose headers say the folder's channels and size (spread over the split: a constant
# cost, whatever the folder's size), and the PIL modes that are one channel.
FOLDER_HEADER_SAMPLE = 32
GRAYSCALE_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
# Images a streamed split's variance is estimated from (a whole split in memory: all of them).
VARIANCE_SAMPLE = 1_000
ACCEPTED = ("a tfds image dataset name (e.g. 'cifar10', 'mnist'), 'quickstart', 'npz:PATH' or "
            "'folder:PATH'")
# The quickstart trains on crops of these photos and evaluates on crops of two others, so that the
# held-out split is not one scene: a single photo touches only a part of a trained codebook.
QUICKSTART_TRAIN_PHOTOS = ('astronaut', 'coffee', 'rocket', 'immunohistochemistry',
                           'hubble_deep_field', 'retina')
QUICKSTART_EVAL_PHOTOS = ('chelsea', 'motorcycle_left')
QUICKSTART_CROP = 32
QUICKSTART_TRAIN_CROPS, QUICKSTART_EVAL_CROPS = 20_000, 1_000


@dataclasses.dataclass(frozen=True)
class ImageData:
  """A dataset's splits, their labels where it has them, and the training variance.

  Attributes:
    train: training images: a uint8 `[N, H, W, C]` host array when the split is small (at most
      `config.data_on_device_max_bytes`), else a source that decodes on demand
      (`input_pipeline.FolderSource`, `TfdsSource`). Both take `len`, `[i]`, `[a:b]`.
    eval: held-out images, likewise.
    variance: variance of the training images scaled to [0, 1], the seed's `data_variance`
      (the NMSE divides by it): over the whole split when it is in memory, else over
      `VARIANCE_SAMPLE` images evenly spread over it.
    class_names: the labels' names, label `i` is `class_names[i]`; empty when the dataset has
      no labels.
    train_labels: int32 `[N]` labels of the training images, or None; None too for a streamed
      tfds split, whose labels come with its images (`TfdsSource.with_labels`).
    eval_labels: int32 `[M]` labels of the held-out images, or None (the quickstart's held-out
      photos are none of its training photos).
    skipped: `() -> paths` of the image files found unreadable so far (folders only).
  """

  train: Any
  eval: Any
  variance: float
  class_names: Tuple[str, ...] = ()
  train_labels: Optional[np.ndarray] = None
  eval_labels: Optional[np.ndarray] = None
  skipped: Callable[[], Tuple[str, ...]] = lambda: ()

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return _shape(self.train)


def pixel_variance(images) -> float:
  """Variance of uint8 images scaled to [0, 1], in float64 chunks (exact, small memory)."""
  total, total_sq, count = 0.0, 0.0, 0
  rows = max(1, 2**23 // max(1, math.prod(images.shape[1:])))  # 64 MB of float64 per chunk
  for start in range(0, len(images), rows):
    chunk = np.asarray(images[start:start + rows]).astype(np.float64) / 255.0
    total, total_sq, count = total + chunk.sum(), total_sq + np.square(chunk).sum(), count + chunk.size
  mean = total / count
  return float(total_sq / count - mean * mean)


@dataclasses.dataclass
class Splits:
  """A dataset opened but not read: each split an array or a decoding source."""
  train: Any
  eval: Any
  class_names: Tuple[str, ...] = ()
  train_labels: Optional[np.ndarray] = None
  eval_labels: Optional[np.ndarray] = None
  folder_index: Optional[Dict[str, np.ndarray]] = None

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return _shape(self.train)


def load(config) -> ImageData:
  """Opens `config.dataset` (see `ACCEPTED`), checks it and reads it (`read`)."""
  return read(open_splits(config), config)


def read(splits: Splits, config, workdir: str = '') -> ImageData:
  """Reads what is small of opened splits.

  A split of at most `config.data_on_device_max_bytes` is decoded into a host array (in
  `config.data_workers` processes); a larger one stays a source that the training and
  evaluation pipelines decode batch by batch. With a `workdir` (which must exist), a folder's
  file list is cached there (`FOLDER_INDEX`) and unreadable files are logged there
  (`SKIPPED_LOG`).
  """
  if workdir:
    if splits.folder_index is not None:
      np.savez(os.path.join(workdir, FOLDER_INDEX), **splits.folder_index)
    for source in (splits.train, splits.eval):
      if isinstance(source, input_pipeline.FolderSource):
        source.skipped_log = os.path.join(workdir, SKIPPED_LOG)
  train, held_out = (_read_if_small(source, config) for source in (splits.train, splits.eval))
  if isinstance(train, np.ndarray):
    variance = pixel_variance(train)
  else:
    sample = np.linspace(0, len(train) - 1, min(len(train), VARIANCE_SAMPLE)).astype(np.int64)
    variance = pixel_variance(train.rows(np.unique(sample)))
  folder = splits.train if isinstance(splits.train, input_pipeline.FolderSource) else None
  return ImageData(train=train, eval=held_out, variance=variance,
                   class_names=splits.class_names, train_labels=splits.train_labels,
                   eval_labels=splits.eval_labels,
                   skipped=folder.skipped if folder is not None else (lambda: ()))


def fits_in_memory(num_images: int, image_shape: Tuple[int, ...], config) -> bool:
  """Whether a split of `num_images` uint8 images is read whole rather than streamed."""
  return num_images * math.prod(image_shape) <= config.data_on_device_max_bytes


def _read_if_small(source, config):
  if isinstance(source, np.ndarray) or not fits_in_memory(len(source), source.image_shape,
                                                          config):
    return source
  return input_pipeline.materialize(source, config.data_workers)


def open_splits(config, workdir: str = '') -> Splits:
  """The dataset's splits, checked, with nothing decoded but a few headers and nothing written.

  A folder's file list comes from `workdir`'s cache when it holds one for the same folder.
  """
  name = config.dataset
  if name == 'quickstart':
    (train, train_labels), (held_out, _) = _quickstart()
    splits = Splits(train, held_out, QUICKSTART_TRAIN_PHOTOS, train_labels)
  elif name.startswith('npz:'):
    splits = Splits(*_npz(name[4:]))
  elif name.startswith('folder:'):
    splits = _folder(name[7:], config, workdir)
  else:
    splits = _tfds_splits(config)
  if isinstance(splits.train, np.ndarray):
    splits.train, splits.eval = (_fit_size(images, config.image_size)
                                 for images in (splits.train, splits.eval))
  for split, images in (('training', splits.train), ('held-out', splits.eval)):
    _check_images(name, split, images)
  train_shape, eval_shape = (_shape(s) for s in (splits.train, splits.eval))
  if train_shape != eval_shape:
    raise UserError(f'dataset {name!r}: training images are {train_shape} but held-out '
                    f'images are {eval_shape}; they must match.')
  return splits


def _shape(images) -> Tuple[int, ...]:
  return tuple(images.shape[1:]) if isinstance(images, np.ndarray) else \
      tuple(images.image_shape)


def _check_images(name: str, split: str, images) -> None:
  shape = (len(images),) + _shape(images)
  if len(shape) != 4 or shape[-1] not in (1, 3) or shape[0] == 0:
    raise UserError(f'dataset {name!r}: {split} images have shape {shape}; expected '
                    f'[N, H, W, C] with N >= 1 and C 1 (grayscale) or 3 (RGB).')
  height, width = shape[1:3]
  if height % 4 or width % 4:
    raise UserError(f'dataset {name!r}: images are {height}x{width}; the VQ-VAE downsamples by '
                    f'4, so height and width must be multiples of 4 (set --config.image_size, '
                    f'e.g. 32, to centre-crop and resize).')
  if isinstance(images, np.ndarray) and images.dtype != np.uint8:
    raise UserError(f'dataset {name!r}: {split} images have dtype {images.dtype}; expected uint8 '
                    f'pixels in [0, 255].')


def _fit_size(images: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to `size` (0 keeps the images as they are)."""
  if not size or images.shape[1:3] == (size, size):
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  channels = images.shape[-1]
  return np.stack([input_pipeline.fit_image(
      Image.fromarray(img.squeeze(-1) if channels == 1 else img), size, channels)
                   for img in images])


def quickstart_photo(name: str) -> np.ndarray:
  """A photo that scikit-image ships, by its `skimage.data` name, as uint8 `[H, W, C]`."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  if name == 'motorcycle_left':  # the left view of a stereo pair, returned with two more arrays
    return skimage.data.stereo_motorcycle()[0]
  return getattr(skimage.data, name)()


def _quickstart() -> Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
  """Random 32x32 crops of scikit-image's bundled photos, training and held-out photos apart.

  Returns:
    `(train_crops, train_photo_index), (eval_crops, eval_photo_index)`: each crop with the
    index of its photo in `QUICKSTART_TRAIN_PHOTOS` or `QUICKSTART_EVAL_PHOTOS`.
  """
  rng = np.random.default_rng(0)  # the same crops for every run: they are the dataset

  def crops(photo_names, count):
    photos = [quickstart_photo(name) for name in photo_names]
    out = np.empty((count, QUICKSTART_CROP, QUICKSTART_CROP, 3), np.uint8)
    sources = rng.integers(len(photos), size=count)
    for i, which in enumerate(sources):
      photo = photos[which]
      top = rng.integers(photo.shape[0] - QUICKSTART_CROP + 1)
      left = rng.integers(photo.shape[1] - QUICKSTART_CROP + 1)
      out[i] = photo[top:top + QUICKSTART_CROP, left:left + QUICKSTART_CROP, :3]
    return out, sources.astype(np.int32)

  return (crops(QUICKSTART_TRAIN_PHOTOS, QUICKSTART_TRAIN_CROPS),
          crops(QUICKSTART_EVAL_PHOTOS, QUICKSTART_EVAL_CROPS))


def _holdout(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Every 10th image held out: deterministic, and spread over the whole set."""
  held_out = np.arange(len(images)) % 10 == 9
  return images[~held_out], images[held_out]


def _npz(path: str) -> Tuple[np.ndarray, np.ndarray]:
  """`train` and `eval` (or `test`) arrays; or a single array, of which 10% is held out."""
  if not os.path.isfile(path):
    raise UserError(f'dataset npz:{path}: no such file; expected an .npz with uint8 arrays '
                    f"'train' and 'eval' (or 'test'), or a single array.")
  with np.load(path) as arrays:
    arrays: Dict[str, np.ndarray] = dict(arrays)
  eval_key = 'eval' if 'eval' in arrays else 'test'
  if 'train' in arrays and eval_key in arrays:
    train, held_out = arrays['train'], arrays[eval_key]
  elif len(arrays) == 1:
    train, held_out = _holdout(next(iter(arrays.values())))
  else:
    raise UserError(f"dataset npz:{path} has arrays {sorted(arrays)}; expected 'train' and "
                    f"'eval' (or 'test'), or a single array.")
  return _with_channels(train), _with_channels(held_out)


def _with_channels(images: np.ndarray) -> np.ndarray:
  return images[..., None] if images.ndim == 3 else images


def _scan_folder(root: str) -> Dict[str, np.ndarray]:
  """Every image file under `root`, sorted by path: relative paths (bytes), sizes, mtimes."""
  found = []
  pending = ['']
  while pending:
    relative = pending.pop()
    with os.scandir(os.path.join(root, relative)) as entries:
      for entry in entries:
        path = os.path.join(relative, entry.name)
        if entry.is_dir():
          pending.append(path)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
          stat = entry.stat()
          found.append((os.fsencode(path), stat.st_size, stat.st_mtime))
  found.sort()
  return {'root': np.asarray(os.path.abspath(root)),
          'paths': np.asarray([f[0] for f in found], dtype=np.bytes_),
          'sizes': np.asarray([f[1] for f in found], np.int64),
          'mtimes': np.asarray([f[2] for f in found], np.float64)}


def _folder_index(root: str, workdir: str) -> Dict[str, np.ndarray]:
  """The folder's file list: from the workdir's cache when it lists this folder, else scanned."""
  cache = os.path.join(workdir, FOLDER_INDEX) if workdir else ''
  if cache and os.path.exists(cache):
    with np.load(cache) as index:
      if str(index['root']) == os.path.abspath(root):
        return dict(index)
  return _scan_folder(root)


def _folder(path: str, config, workdir: str) -> Splits:
  """Image files under `path`, decoded lazily.

  With `train/` and `val/` (or `validation/`, `test/`, `eval/`) subfolders, those are the
  splits (ImageNet's layout); otherwise every 10th file (sorted by path) is held out. When
  every file of the training split lies in a subfolder, the first-level subfolders are the
  classes (sorted names), and each file's label is its class.
  """
  if not os.path.isdir(path):
    raise UserError(f'dataset folder:{path}: no such directory.')
  index = _folder_index(path, workdir)
  paths = index['paths']
  if len(paths) < 2:
    raise UserError(f'dataset folder:{path} holds {len(paths)} images '
                    f'({", ".join(IMAGE_EXTENSIONS)}); at least 2 are needed.')
  top = np.asarray([p.split(b'/', 1)[0] if b'/' in p else b'' for p in paths])
  eval_name = next((n for n in FOLDER_EVAL_SPLITS if np.any(top == n)), None)
  if np.any(top == b'train') and eval_name is not None:
    train_paths, eval_paths = (np.char.partition(paths[top == n], b'/')[:, 2]
                               for n in (b'train', eval_name))
    roots = (os.path.join(path, 'train'), os.path.join(path, os.fsdecode(eval_name)))
  else:
    held_out = np.arange(len(paths)) % 10 == 9
    train_paths, eval_paths, roots = paths[~held_out], paths[held_out], (path, path)
  class_names, train_labels, eval_labels = _folder_classes(train_paths, eval_paths)
  image_shape = _folder_image_shape(path, roots[0], train_paths, config)
  sources = [input_pipeline.FolderSource(root, split_paths, labels, config.image_size,
                                         image_shape)
             for root, split_paths, labels in zip(roots, (train_paths, eval_paths),
                                                  (train_labels, eval_labels))]
  return Splits(*sources, class_names, train_labels, eval_labels, folder_index=index)


def _folder_classes(train_paths: np.ndarray, eval_paths: np.ndarray):
  """`(class_names, train_labels, eval_labels)` from first-level subfolders, or `((), None,
  None)` when some training file lies directly in the split's folder."""
  if not all(b'/' in p for p in train_paths):
    return (), None, None
  names = sorted(set(np.char.partition(train_paths, b'/')[:, 0]))
  lookup = {n: i for i, n in enumerate(names)}
  label = lambda p: lookup.get(p.split(b'/', 1)[0], -1) if b'/' in p else -1
  train_labels = np.asarray([label(p) for p in train_paths], np.int32)
  eval_labels = np.asarray([label(p) for p in eval_paths], np.int32)
  if np.any(eval_labels < 0):  # held-out files outside the training classes: no eval labels
    eval_labels = None
  return tuple(os.fsdecode(n) for n in names), train_labels, eval_labels


def _folder_image_shape(path: str, root: str, paths: np.ndarray, config):
  """`(H, W, C)` from the headers of up to `FOLDER_HEADER_SAMPLE` files spread over the
  split; their channels (and sizes, without `image_size`) must agree."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  headers = {}
  for i in np.unique(np.linspace(0, len(paths) - 1, FOLDER_HEADER_SAMPLE).astype(int)):
    file = os.path.join(root, os.fsdecode(paths[i]))
    try:
      with Image.open(file) as image:
        headers[file] = (image.size[1], image.size[0],
                         1 if image.mode in GRAYSCALE_MODES else 3)
    except input_pipeline.bad_image_errors():
      continue  # decoding skips it too, and says so
  if not headers:
    raise UserError(f'dataset folder:{path}: none of the sampled image files could be read; '
                    f'accepted: a folder of readable images.')
  channels = config.image_channels or _agreed(
      path, headers, 2, 'channels', 'set --config.image_channels=3 (or 1) to convert every '
      'image')
  if config.image_size:
    return (config.image_size, config.image_size, channels)
  height, width = _agreed(path, headers, slice(0, 2), 'sizes', 'set --config.image_size '
                          '(e.g. 32) to centre-crop and resize them all')
  return (height, width, channels)


def _agreed(path: str, headers, key, what: str, remedy: str):
  values = {}
  for file, header in headers.items():
    values.setdefault(header[key], file)
  if len(values) > 1:
    examples = '; '.join(f'{os.path.relpath(file, path)}: {value}'
                         for value, file in list(values.items())[:2])
    raise UserError(f'dataset folder:{path} has images of different {what} ({examples}); '
                    f'{remedy}.')
  return next(iter(values))


def _tfds_splits(config) -> Splits:
  """The training and held-out splits of a tfds dataset (see `_tfds`), with their labels."""
  (train, train_labels), (held_out, eval_labels) = (
      _tfds(config, split) for split in (config.train_split, config.eval_split))
  class_names = _tfds_class_names(config)
  if not class_names:
    return Splits(train, held_out)
  return Splits(train, held_out, class_names, train_labels, eval_labels)


def _tfds(config, split: str) -> Tuple[Any, Optional[np.ndarray]]:
  """A tfds split read through `tfds.data_source`, which needs no TensorFlow.

  A split of at most `config.data_on_device_max_bytes` is read whole: its images, and its
  int32 labels when the dataset has a `label` class feature (else None). A larger one is a
  `TfdsSource` that decodes on demand; its labels (None here) are read with its images, by
  whatever needs them (`TfdsSource.with_labels`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  try:
    builder = tfds.builder(config.dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(f'unknown dataset {config.dataset!r}; accepted: {ACCEPTED}.') from None
  image_key = _image_feature(builder, config.dataset)
  if not builder.is_prepared() and not _readable(config, split):
    if not config.download:
      raise UserError(f'dataset {config.dataset!r} is not prepared in {builder.data_dir}; run '
                      f'with --config.download=True, or set --config.data_dir.')
    try:
      builder.download_and_prepare(file_format='array_record')
    except ModuleNotFoundError as e:
      raise UserError(f'preparing dataset {config.dataset!r} needs {e.name}, which is not '
                      f'installed: pip install {PREPARE_PACKAGES}, run once to prepare, then '
                      f'training reads it without them.') from None
    except OSError as e:
      raise UserError(f'could not download dataset {config.dataset!r}: {e}') from None
  try:
    source = tfds.data_source(config.dataset, split=split, data_dir=data_dir, download=False)
  except NotImplementedError:
    raise UserError(f'dataset {config.dataset!r} in {builder.data_dir} was prepared as TFRecord, '
                    f'which tfds cannot read without TensorFlow; prepare it again with '
                    f"file_format='array_record' (or use another --config.data_dir).") from None
  except ValueError as e:
    raise UserError(f'dataset {config.dataset!r} has no split {split!r}: {e}') from None
  shape = _tfds_image_shape(builder, image_key, source, config)
  label_key = 'label' if _class_names(builder) else None
  if not fits_in_memory(len(source), shape, config):
    return input_pipeline.TfdsSource(config.dataset, split, data_dir, image_key,
                                     config.image_size, shape, len(source), label_key), None
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(example[image_key]) for example in examples])
  if label_key is None:
    return images, None
  return images, np.asarray([example[label_key] for example in examples], np.int32)


def _tfds_image_shape(builder, image_key: str, source, config) -> Tuple[int, int, int]:
  """`(H, W, C)` of the split's images after `image_size`; from the feature's shape, or the
  first example's when the feature leaves the size open (ImageNet)."""
  height, width, channels = builder.info.features[image_key].shape
  if config.image_size:
    return (config.image_size, config.image_size, channels)
  if height is None or width is None:
    if not fits_in_memory(len(source), (256, 256, 3), config):  # a guess at typical photos
      raise UserError(f'dataset {config.dataset!r} has images of varying sizes; set '
                      f'--config.image_size (e.g. 128) to centre-crop and resize them.')
    return tuple(np.asarray(source[0][image_key]).shape)
  return (height, width, channels)


def _tfds_class_names(config) -> Tuple[str, ...]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return _class_names(tfds.builder(config.dataset, data_dir=config.data_dir or None))


def _class_names(builder) -> Tuple[str, ...]:
  """The names of a tfds dataset's `label` classes; empty when it has no such feature."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  label = features['label'] if 'label' in features.keys() else None
  return tuple(label.names) if isinstance(label, tfds.features.ClassLabel) else ()


def _readable(config, split: str) -> bool:
  """Whether tfds can already serve the split (prepared, or mocked in tests)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tfds.data_source(config.dataset, split=split, data_dir=config.data_dir or None,
                     download=False)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _image_feature(builder, name: str) -> str:
  features = builder.info.features
  keys = [key for key, feature in features.items()
          if type(feature).__name__ == 'Image']
  if 'image' in keys:
    return 'image'
  if not keys:
    raise UserError(f'dataset {name!r} has no image feature (features: {sorted(features)}); '
                    f'accepted: {ACCEPTED}.')
  return keys[0]


class BatchOrder:
  """Which training examples each step sees: epoch-wise permutations seeded by `(seed, epoch)`.

  The order depends only on `(seed, step)`, never on how the run was split into processes,
  dispatches or restarts.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self._permutations: Dict[int, np.ndarray] = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._permutations:
      if len(self._permutations) > 2:
        self._permutations.pop(min(self._permutations))
      rng = np.random.default_rng([self.seed, epoch])
      self._permutations[epoch] = rng.permutation(self.num_examples).astype(np.int32)
    return self._permutations[epoch]

  def indices(self, first_step: int, num_steps: int) -> np.ndarray:
    """int32 `[num_steps, batch_size]`: example indices for steps `first_step...`."""
    positions = (first_step * self.batch_size +
                 np.arange(num_steps * self.batch_size, dtype=np.int64))
    epochs, offsets = np.divmod(positions, self.num_examples)
    out = np.empty(positions.shape, np.int32)
    for epoch in np.unique(epochs):
      mask = epochs == epoch
      out[mask] = self._permutation(int(epoch))[offsets[mask]]
    return out.reshape(num_steps, self.batch_size)
