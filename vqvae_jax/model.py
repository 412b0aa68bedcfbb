"""The seed's VQ-VAE (`Model` in `seed_torch.py`) as a Flax Linen module, NHWC."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from vqvae_jax import quantizer_api
from vqvae_jax.layers import Conv, ConvTranspose4x4s2, ResidualStack
from vqvae_jax.quantizer_api import QuantizerOutput, check_number

Array = jax.Array
Dtype = Any

# The codebook settings new training runs should use:
# `VQVAE(**architecture, quantizer=dict(family='ema', **RECOMMENDED))`.
# The seed's defaults collapse (docs/codebook_health.md: 11 to 66 of 512 codes used); these fix
# it:
#   * the zero-debiased EMA quantizer (Sonnet's and Haiku's), which has no cold-start jump;
#   * k-means init of the codebook on the first training batch, so codes start on the data;
#   * dead-code restart: a code that catches fewer than 0.25 vectors per batch on average (EMA
#     over ~100 steps) is moved to a vector of the current batch. The threshold is in vectors
#     per batch: at the seed's batch 32 of 8x8 latents a code's fair share is 2048/512 = 4.
#     Higher thresholds churn live codes when a batch has few vectors per code (measured in
#     tests/test_codebook.py: 1.0 kept 41 of 64 codes where 0.1 to 0.3 kept 61).
# Needs `rngs={'codebook': key}` on training calls (train/step.py passes it). The `'ema'` and
# `'rvq'` families take it as it is; `'vq'` takes all but `decay` and `zero_debias`.
RECOMMENDED = dict(decay=0.99, zero_debias=True, codebook_init='kmeans', kmeans_iters=10,
                   dead_code_threshold=0.25, usage_decay=0.99)

# The quantizer families `VQVAE(quantizer=dict(family=...))` takes.
QUANTIZERS = tuple(quantizer_api.FAMILIES)

# The seed's quantizer arguments: they build the quantizer only when `quantizer` is None.
SEED_QUANTIZER_FIELDS = ('num_embeddings', 'embedding_dim', 'commitment_cost', 'decay')


class Encoder(nn.Module):
  """The seed's `Encoder`: two 4x4 stride-2 convs with ReLU, a 3x3 conv, the residual stack.

  `[B, H, W, C]` -> `[B, H/4, W/4, num_hiddens]`.
  """

  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  residual_skip: str = 'relu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.relu(Conv(self.num_hiddens // 2, 4, stride=2, padding=1, dtype=self.dtype,
                     name='conv_1')(x))
    x = nn.relu(Conv(self.num_hiddens, 4, stride=2, padding=1, dtype=self.dtype,
                     name='conv_2')(x))
    x = Conv(self.num_hiddens, 3, padding=1, dtype=self.dtype, name='conv_3')(x)
    return ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                         self.residual_skip, self.dtype, name='residual_stack')(x)


class Decoder(nn.Module):
  """The seed's `Decoder`: a 3x3 conv, the residual stack, two 4x4 stride-2 transposed convs.

  `[B, h, w, D]` -> `[B, 4h, 4w, out_channels]`, with no output activation.
  """

  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  out_channels: int = 3
  residual_skip: str = 'relu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = Conv(self.num_hiddens, 3, padding=1, dtype=self.dtype, name='conv_1')(x)
    x = ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                      self.residual_skip, self.dtype, name='residual_stack')(x)
    x = nn.relu(ConvTranspose4x4s2(self.num_hiddens // 2, self.dtype, name='conv_trans_1')(x))
    return ConvTranspose4x4s2(self.out_channels, self.dtype, name='conv_trans_2')(x)


class VQVAE(nn.Module):
  """The seed's VQ-VAE: encoder, 1x1 pre-quantization conv, quantizer, decoder.

  With `quantizer=None` this is the seed's `Model(num_hiddens, num_residual_layers,
  num_residual_hiddens, num_embeddings, embedding_dim, commitment_cost, decay)` and gives its
  outputs for its converted weights (see `vqvae_jax.convert`): `decay == 0` selects
  `VectorQuantizer` (codebook in `params`), `decay > 0` `VectorQuantizerEMA` (codebook in
  `batch_stats`).

  `quantizer` picks any family instead, as one config: `{'family': name, **fields}`, the
  fields being the family module's (`vqvae_jax.quantizer_api.build`), e.g.
  `dict(family='fsq', levels=(8, 5, 5, 5))`, `dict(family='lfq', embedding_dim=9)` or
  `dict(family='ema', num_embeddings=512, embedding_dim=64, **RECOMMENDED)`. The seed's
  quantizer fields must then keep their defaults: the config holds the quantizer whole.
  `axis_name` is the model's, passed on to the quantizer.

  Attributes:
    num_hiddens: channels of the encoder and decoder (the seed's 128).
    num_residual_layers: residual blocks in each stack (2).
    num_residual_hiddens: channels inside a residual block (32).
    num_embeddings: the seed quantizer's K, codebook size (512).
    embedding_dim: the seed quantizer's D, code size (64).
    commitment_cost: the seed quantizer's beta (0.25).
    decay: the seed quantizer's EMA decay; 0.0 selects the plain quantizer.
    residual_skip: `'relu'` (the seed as it runs) or `'identity'` (the paper); see
      `ResidualStack`.
    image_channels: channels of the images (3 in the seed; 1 for grayscale).
    dtype: computation dtype of the convolutions, e.g. `jnp.bfloat16` on TPU. The quantizer,
      the losses and the returned reconstructions are float32 regardless.
    axis_name: inside `shard_map`, the batch axis for the quantizer's statistics.
    quantizer: None for the seed's quantizer, or a family's config (see above). Training
      calls with k-means init, restarts or quantizer dropout need `rngs={'codebook': key}`.
  """

  num_hiddens: int = 128
  num_residual_layers: int = 2
  num_residual_hiddens: int = 32
  num_embeddings: int = 512
  embedding_dim: int = 64
  commitment_cost: float = 0.25
  decay: float = 0.0
  residual_skip: str = 'relu'
  image_channels: int = 3
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  quantizer: Optional[Mapping[str, Any]] = None

  def __post_init__(self):
    for name in ('num_hiddens', 'num_residual_hiddens', 'image_channels'):
      check_number(name, getattr(self, name), 1, integer=True)
    check_number('num_residual_layers', self.num_residual_layers, 0, integer=True)
    if self.num_hiddens < 2:
      raise ValueError(f'num_hiddens must be >= 2 (the first conv has num_hiddens // 2 '
                       f'channels), got {self.num_hiddens!r}.')
    check_number('decay (0 selects the plain quantizer)', self.decay, 0, 1, high_open=True)
    if self.quantizer is not None:
      if not isinstance(self.quantizer, Mapping):
        raise ValueError(f"quantizer must be None (the seed's) or a mapping "
                         f"{{'family': one of {QUANTIZERS}, **fields}}, got {self.quantizer!r}.")
      for name in SEED_QUANTIZER_FIELDS:
        default = VQVAE.__dataclass_fields__[name].default
        if getattr(self, name) != default:
          raise ValueError(f"{name}={getattr(self, name)!r} sets the seed's quantizer; with "
                           f'quantizer={dict(self.quantizer)!r}, set it in that config.')
      # Hashable, as a module's fields must be; lists (FSQ's levels from JSON) as tuples.
      object.__setattr__(self, 'quantizer', FrozenDict(
          {k: tuple(v) if isinstance(v, list) else v for k, v in self.quantizer.items()}))
    # The quantizer and the residual stacks check their own fields when they are built, at the
    # first init or apply; detached copies built here report a bad value at construction.
    self._detached_quantizer()
    ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                  self.residual_skip, parent=None)
    super().__post_init__()

  @property
  def quantizer_config(self) -> Dict[str, Any]:
    """The quantizer's config, `{'family': ..., **fields}`: `quantizer`, or the seed's."""
    if self.quantizer is not None:
      return dict(self.quantizer)
    config = dict(family='ema' if self.decay > 0 else 'vq', num_embeddings=self.num_embeddings,
                  embedding_dim=self.embedding_dim, commitment_cost=self.commitment_cost)
    if self.decay > 0:
      config['decay'] = self.decay
    return config

  def _detached_quantizer(self) -> quantizer_api.Quantizer:
    return quantizer_api.build(self.quantizer_config, axis_name=self.axis_name, parent=None)

  def setup(self):
    common = dict(num_hiddens=self.num_hiddens, num_residual_layers=self.num_residual_layers,
                  num_residual_hiddens=self.num_residual_hiddens,
                  residual_skip=self.residual_skip, dtype=self.dtype)
    self.encoder = Encoder(**common)
    self.pre_vq_conv = Conv(self._detached_quantizer().embedding_dim, 1, dtype=self.dtype)
    self.vq = quantizer_api.build(self.quantizer_config, axis_name=self.axis_name)
    self.decoder = Decoder(out_channels=self.image_channels, **common)

  def _check_images(self, images: Array) -> None:
    if (images.ndim != 4 or images.shape[-1] != self.image_channels or images.shape[1] % 4 or
        images.shape[2] % 4):
      raise ValueError(
          f'VQVAE expects images of shape [B, H, W, {self.image_channels}] (NHWC, image_channels='
          f'{self.image_channels}) with H and W divisible by 4, got shape {tuple(images.shape)}.')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(f'VQVAE expects float images (the seed scales pixels to [-0.5, 0.5]: '
                      f'uint8 / 255 - 0.5), got dtype {images.dtype}.')

  def latents(self, images: Array) -> Array:
    """Encoder and pre-quantization conv: `[B, H, W, C]` -> `[B, H/4, W/4, D]`."""
    self._check_images(images)
    return self.pre_vq_conv(self.encoder(images.astype(self.dtype)))

  def __call__(self, images: Array, train: bool = False) -> Tuple[Array, QuantizerOutput]:
    """Reconstructs `images`.

    Args:
      images: float `[B, H, W, image_channels]`, H and W divisible by 4; the seed scales pixels
        to [-0.5, 0.5].
      train: update the EMA quantizer's `batch_stats` (pass `mutable=['batch_stats']`).

    Returns:
      `(reconstructions, vq)`: float32 `[B, H, W, image_channels]` and the quantizer's
      `QuantizerOutput` (`vq.indices` is int32 `[B, H/4, W/4]`, `vq.loss` the VQ loss to add
      to the reconstruction loss).
    """
    vq = self.vq(self.latents(images), train=train)
    return self.decoder(vq.quantized).astype(jnp.float32), vq

  @property
  def quantizer_family(self) -> str:
    """The quantizer family in use, one of `QUANTIZERS`."""
    return self.quantizer_config['family']

  @property
  def codebook_size(self) -> int:
    """How many values one code takes (the quantizer's `codebook_size`)."""
    return self._detached_quantizer().codebook_size

  @property
  def codes_per_position(self) -> int:
    """Codes at each grid position (the quantizer's: `num_quantizers` for residual VQ)."""
    return self._detached_quantizer().codes_per_position

  def encode(self, images: Array) -> Array:
    """Images `[B, H, W, C]` -> int32 code grid `[B, H/4, W/4]` (`[B, H/4, W/4, Q]` for
    residual VQ). Never updates state.

    Raises:
      TypeError: `images` are not floats (uint8 pixels must be scaled first).
      ValueError: the shape is not `[B, H, W, image_channels]` with H and W divisible by 4;
        or concrete `images` (not traced) hold NaN or an infinity, which has no nearest code.
        Traced ones are not checked (that would need a device sync), and such a position's
        code is unspecified there.
    """
    images = jnp.asarray(images) if not hasattr(images, 'dtype') else images
    self._check_images(images)
    if not isinstance(images, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(images))):
      bad = int(jnp.sum(~jnp.isfinite(images)))
      raise ValueError(f'VQVAE.encode: images hold {bad} NaN or infinite values; accepted: '
                       f'finite pixels in [-0.5, 0.5].')
    return self.vq(self.latents(images), train=False).indices

  def decode(self, codes: Array) -> Array:
    """Images from a code grid.

    Args:
      codes: integer `[B, h, w]` (`[B, h, w, Q]` for residual VQ), each in
        `[0, codebook_size)`.

    Returns:
      float32 `[B, 4h, 4w, image_channels]`.

    Raises:
      TypeError: `codes` are not integers.
      ValueError: concrete `codes` (not traced) hold a value outside `[0, codebook_size)`;
        the message names it. Under `jit` the values are not checked (that would need a device
        sync): an out-of-range code, negative ones included, is looked up as a NaN vector and
        the pixels it reaches decode to NaN, never to a valid image (see `embed` of the
        quantizers).
    """
    codes = jnp.asarray(codes) if not hasattr(codes, 'dtype') else codes
    rank = 4 if self.codes_per_position > 1 else 3
    if codes.ndim != rank:
      grid = '[B, h, w, Q]' if rank == 4 else '[B, h, w]'
      raise ValueError(f'VQVAE.decode expects codes of shape {grid}, got shape '
                       f'{tuple(codes.shape)}.')
    return self.decoder(self.vq.embed(codes).astype(self.dtype)).astype(jnp.float32)
