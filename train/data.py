"""Image data: tfds datasets through `tfds.data_source` (no TensorFlow), the photos bundled with
scikit-image, an .npz array or a folder of images; and the deterministic order of batches.

Every source becomes two uint8 `[N, H, W, C]` arrays (training and held-out) in host memory.
The order of training examples is a pure function of `(seed, step)`, which is what lets a
resumed run continue with exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from train.errors import UserError

# What tfds needs to prepare (download and encode) a dataset, and training does not: TensorFlow,
# and importlib_resources, which tfds 4.9 imports for it without declaring it.
PREPARE_PACKAGES = 'tensorflow-cpu importlib_resources'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')
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
  """A dataset's images, uint8 `[N, H, W, C]`, their labels where it has them, and the training
  variance.

  Attributes:
    train: training images.
    eval: held-out images.
    variance: variance of the training images scaled to [0, 1], the seed's `data_variance`
      (the NMSE divides by it).
    class_names: the labels' names, label `i` is `class_names[i]`; empty when the dataset has
      no labels.
    train_labels: int32 `[N]` labels of the training images, or None.
    eval_labels: int32 `[M]` labels of the held-out images, or None (the quickstart's held-out
      photos are none of its training photos).
  """

  train: np.ndarray
  eval: np.ndarray
  variance: float
  class_names: Tuple[str, ...] = ()
  train_labels: Optional[np.ndarray] = None
  eval_labels: Optional[np.ndarray] = None

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(self.train.shape[1:])


def pixel_variance(images: np.ndarray) -> float:
  """Variance of uint8 images scaled to [0, 1], in float64 chunks (exact, small memory)."""
  total, total_sq, count = 0.0, 0.0, 0
  for start in range(0, len(images), 4096):
    chunk = images[start:start + 4096].astype(np.float64) / 255.0
    total, total_sq, count = total + chunk.sum(), total_sq + np.square(chunk).sum(), count + chunk.size
  mean = total / count
  return float(total_sq / count - mean * mean)


def load(config) -> ImageData:
  """Loads `config.dataset` (see `ACCEPTED`), checks the images and computes the variance."""
  name = config.dataset
  labels = dict(class_names=())
  if name == 'quickstart':
    (train, train_labels), (held_out, _) = _quickstart()
    labels = dict(class_names=QUICKSTART_TRAIN_PHOTOS, train_labels=train_labels)
  elif name.startswith('npz:'):
    train, held_out = _npz(name[4:])
  elif name.startswith('folder:'):
    train, held_out = _folder(name[7:], config.image_size)
  else:
    (train, train_labels), (held_out, eval_labels), class_names = (
        *(_tfds(config, split) for split in (config.train_split, config.eval_split)),
        _tfds_class_names(config))
    if class_names:
      labels = dict(class_names=class_names, train_labels=train_labels, eval_labels=eval_labels)
  train, held_out = (_fit_size(images, config.image_size) for images in (train, held_out))
  for split, images in (('training', train), ('held-out', held_out)):
    _check_images(name, split, images)
  if train.shape[1:] != held_out.shape[1:]:
    raise UserError(f'dataset {name!r}: training images are {train.shape[1:]} but held-out '
                    f'images are {held_out.shape[1:]}; they must match.')
  return ImageData(train=train, eval=held_out, variance=pixel_variance(train), **labels)


def _check_images(name: str, split: str, images: np.ndarray) -> None:
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
    raise UserError(f'dataset {name!r}: {split} images have shape {images.shape}; expected '
                    f'[N, H, W, C] with N >= 1 and C 1 (grayscale) or 3 (RGB).')
  height, width = images.shape[1:3]
  if height % 4 or width % 4:
    raise UserError(f'dataset {name!r}: images are {height}x{width}; the VQ-VAE downsamples by '
                    f'4, so height and width must be multiples of 4 (set --config.image_size, '
                    f'e.g. 32, to centre-crop and resize).')
  if images.dtype != np.uint8:
    raise UserError(f'dataset {name!r}: {split} images have dtype {images.dtype}; expected uint8 '
                    f'pixels in [0, 255].')


def _fit_size(images: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to `size` (0 keeps the images as they are)."""
  if not size or images.shape[1:3] == (size, size):
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([_square(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img), size)
                   for img in images]).reshape(len(images), size, size, images.shape[-1])


def _square(image, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  image = image.crop((left, top, left + side, top + side))
  return np.asarray(image.resize((size, size), Image.BICUBIC))


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


def _folder(path: str, size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Every image file under `path` (sorted), as RGB; sizes must agree unless `size` is set."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UserError(f'dataset folder:{path}: no such directory.')
  files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if len(files) < 2:
    raise UserError(f'dataset folder:{path} holds {len(files)} images ({", ".join(IMAGE_EXTENSIONS)}'
                    f'); at least 2 are needed (every 10th is held out).')
  images = []
  for file in files:
    with Image.open(file) as image:
      image = image.convert('RGB')
      images.append(_square(image, size) if size else np.asarray(image))
  shapes = {image.shape for image in images}
  if len(shapes) > 1:
    raise UserError(f'dataset folder:{path} has images of {len(shapes)} different sizes, e.g. '
                    f'{sorted(shapes)[:2]}; set --config.image_size (e.g. 32) to centre-crop and '
                    f'resize them all.')
  return _holdout(np.stack(images))


def _tfds(config, split: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """A tfds split read through `tfds.data_source`, which needs no TensorFlow: its images, and
  its int32 labels when the dataset has a `label` class feature (else None)."""
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
  examples = [source[i] for i in range(len(source))]
  images = np.stack([np.asarray(example[image_key]) for example in examples])
  if not _class_names(builder):
    return images, None
  return images, np.asarray([example['label'] for example in examples], np.int32)


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
