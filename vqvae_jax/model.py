"""The seed's VQ-VAE (`Model` in `seed_torch.py`) as a Flax Linen module, NHWC."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqvae_jax.fsq import FSQ
from vqvae_jax.layers import Conv, ConvTranspose4x4s2, ResidualStack
from vqvae_jax.lfq import LFQ
from vqvae_jax.quantizers import (CODEBOOK_OPTIONS, CodebookOptions, QuantizerOutput,
                                  VectorQuantizer, VectorQuantizerEMA)
from vqvae_jax.residual import ResidualVQ

Array = jax.Array
Dtype = Any

# The codebook settings new training runs should use: `VQVAE(**architecture, **RECOMMENDED)`.
# The seed's defaults collapse (FACTS.md: 11 to 66 of 512 codes used); these fix it:
#   * the zero-debiased EMA quantizer (Sonnet's and Haiku's), which has no cold-start jump;
#   * k-means init of the codebook on the first training batch, so codes start on the data;
#   * dead-code restart: a code that catches fewer than 0.25 vectors per batch on average (EMA
#     over ~100 steps) is moved to a vector of the current batch. The threshold is in vectors
#     per batch: at the seed's batch 32 of 8x8 latents a code's fair share is 2048/512 = 4.
#     Higher thresholds churn live codes when a batch has few vectors per code (measured in
#     tests/test_codebook.py: 1.0 kept 41 of 64 codes where 0.1 to 0.3 kept 61).
# Needs `rngs={'codebook': key}` on training calls (train/step.py passes it). A bare
# `VectorQuantizerEMA` takes it as it is; `VectorQuantizer` takes all but `decay` and
# `zero_debias`, which are EMA settings.
RECOMMENDED = dict(decay=0.99, zero_debias=True, codebook_init='kmeans', kmeans_iters=10,
                   dead_code_threshold=0.25, usage_decay=0.99)

# `VQVAE.quantizer`: the quantizer families. None keeps the seed's rule (`decay`).
QUANTIZERS = ('vq', 'ema', 'fsq', 'lfq', 'rvq')


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


class VQVAE(CodebookOptions):
  """The seed's VQ-VAE: encoder, 1x1 pre-quantization conv, quantizer, decoder.

  With the defaults and `decay > 0` this is the seed's `Model(..., decay)` and gives its outputs
  for its converted weights (see `vqvae_jax.convert`). `decay == 0` selects `VectorQuantizer`
  (codebook in `params`), `decay > 0` selects `VectorQuantizerEMA` (codebook in `batch_stats`).

  `quantizer` picks another family instead; each reads only the fields listed for it:
    * `'vq'`, `'ema'`: `VectorQuantizer` / `VectorQuantizerEMA` (`num_embeddings`,
      `embedding_dim`, `commitment_cost`, and for `'ema'` `decay > 0`, `epsilon`,
      `zero_debias`; the codebook options).
    * `'fsq'`: `FSQ(fsq_levels)`; `embedding_dim` must be `len(fsq_levels)`. No codebook, no
      auxiliary loss; the codebook options must stay off.
    * `'lfq'`: `LFQ(embedding_dim, commitment_cost, lfq_entropy_weight,
      lfq_entropy_temperature, lfq_entropy_groups)`: `2^embedding_dim` implied codes. The
      codebook options must stay off.
    * `'rvq'`: `ResidualVQ(num_quantizers, num_embeddings, embedding_dim, ...)`: EMA stages when
      `decay > 0`, else plain ones; `quantizer_dropout`; the codebook options apply per stage.
      Its code grids are `[B, h, w, num_quantizers]`.

  Attributes:
    num_hiddens: channels of the encoder and decoder (the seed's 128).
    num_residual_layers: residual blocks in each stack (2).
    num_residual_hiddens: channels inside a residual block (32).
    num_embeddings: K, codebook size (512).
    embedding_dim: D, code size (64).
    commitment_cost: beta (0.25).
    decay: EMA decay; 0.0 selects the plain quantizer.
    epsilon: Laplace smoothing of the EMA quantizer.
    zero_debias: Sonnet's and Haiku's zero-debiased EMA instead of the seed's
      (see `VectorQuantizerEMA`).
    residual_skip: `'relu'` (the seed as it runs) or `'identity'` (the paper); see
      `ResidualStack`.
    image_channels: channels of the images (3 in the seed; 1 for grayscale).
    dtype: computation dtype of the convolutions, e.g. `jnp.bfloat16` on TPU. The quantizer,
      the losses and the returned reconstructions are float32 regardless.
    axis_name: inside `shard_map`, the batch axis for the quantizer's statistics.
    distance_chunk_size: see `VectorQuantizer`.
    quantizer: one of `QUANTIZERS`, or None for the seed's rule (`decay`).
    fsq_levels: FSQ's levels per dimension (`vqvae_jax.fsq.RECOMMENDED_LEVELS`).
    lfq_entropy_weight, lfq_entropy_temperature, lfq_entropy_groups: see `LFQ`.
    num_quantizers: residual VQ's stages.
    quantizer_dropout: residual VQ's per-example stage dropout in training (see `ResidualVQ`).
    The keyword-only codebook options (`codebook_init`, `dead_code_threshold`, ...): the
      quantizer's remedies for codebook collapse, all off by default (see `CodebookOptions` and
      `RECOMMENDED`). Training calls with k-means init or restarts need
      `rngs={'codebook': key}`.
  """

  num_hiddens: int = 128
  num_residual_layers: int = 2
  num_residual_hiddens: int = 32
  num_embeddings: int = 512
  embedding_dim: int = 64
  commitment_cost: float = 0.25
  decay: float = 0.0
  epsilon: float = 1e-5
  zero_debias: bool = False
  residual_skip: str = 'relu'
  image_channels: int = 3
  dtype: Dtype = jnp.float32
  axis_name: Optional[str] = None
  distance_chunk_size: Optional[int] = None
  quantizer: Optional[str] = None
  fsq_levels: Tuple[int, ...] = (8, 8, 8)
  lfq_entropy_weight: float = 0.1
  lfq_entropy_temperature: float = 0.01
  lfq_entropy_groups: Optional[int] = None
  num_quantizers: int = 2
  quantizer_dropout: float = 0.0

  def __post_init__(self):
    for name in ('num_hiddens', 'num_residual_layers', 'num_residual_hiddens',
                 'image_channels'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name == 'num_residual_layers' else 1):
        raise ValueError(f'{name} must be a positive integer, got {value!r}.')
    if self.num_hiddens < 2:
      raise ValueError(f'num_hiddens must be >= 2 (the first conv has num_hiddens // 2 '
                       f'channels), got {self.num_hiddens!r}.')
    if not 0.0 <= self.decay < 1.0:
      raise ValueError(f'decay must be in [0, 1) (0 selects the plain quantizer), got '
                       f'{self.decay!r}.')
    if self.quantizer is not None and self.quantizer not in QUANTIZERS:
      raise ValueError(f'quantizer must be one of {QUANTIZERS} or None (the seed\'s rule: '
                       f'decay), got {self.quantizer!r}.')
    if self.quantizer == 'ema' and self.decay <= 0:
      raise ValueError(f"quantizer='ema' needs decay in (0, 1), got {self.decay!r}.")
    if self.quantizer == 'fsq' and self.embedding_dim != len(self.fsq_levels):
      raise ValueError(f"quantizer='fsq' quantizes one dimension per level: embedding_dim must "
                       f'be len(fsq_levels)={len(self.fsq_levels)} (fsq_levels='
                       f'{tuple(self.fsq_levels)}), got embedding_dim={self.embedding_dim!r}.')
    if self.quantizer_family in ('fsq', 'lfq'):
      for name in CODEBOOK_OPTIONS:
        default = CodebookOptions.__dataclass_fields__[name].default
        if getattr(self, name) != default:
          raise ValueError(f'quantizer={self.quantizer!r} has no codebook to remedy: '
                           f'{name} must stay {default!r}, got {getattr(self, name)!r}.')
    # The quantizer and the residual stacks check their own fields when they are built, at the
    # first init or apply; detached copies built here report a bad value at construction.
    _quantizer(self, parent=None)
    ResidualStack(self.num_hiddens, self.num_residual_layers, self.num_residual_hiddens,
                  self.residual_skip, parent=None)
    super().__post_init__()

  def setup(self):
    common = dict(num_hiddens=self.num_hiddens, num_residual_layers=self.num_residual_layers,
                  num_residual_hiddens=self.num_residual_hiddens,
                  residual_skip=self.residual_skip, dtype=self.dtype)
    self.encoder = Encoder(**common)
    self.pre_vq_conv = Conv(self.embedding_dim, 1, dtype=self.dtype)
    self.vq = _quantizer(self)
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
    """The quantizer in use, one of `QUANTIZERS` (`quantizer`, or the seed's rule)."""
    if self.quantizer is not None:
      return self.quantizer
    return 'ema' if self.decay > 0 else 'vq'

  @property
  def codebook_size(self) -> int:
    """How many values one code takes: K, `prod(fsq_levels)`, `2^embedding_dim` for LFQ."""
    family = self.quantizer_family
    if family == 'fsq':
      return math.prod(self.fsq_levels)
    if family == 'lfq':
      return 2**self.embedding_dim
    return self.num_embeddings

  @property
  def codes_per_position(self) -> int:
    """Codes at each grid position: `num_quantizers` for residual VQ, else 1."""
    return self.num_quantizers if self.quantizer_family == 'rvq' else 1

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


def _quantizer(model: VQVAE, **module_kwargs) -> nn.Module:
  """The quantizer of `model` (see `VQVAE`'s docstring for which fields each family reads)."""
  family = model.quantizer_family
  if family == 'fsq':
    return FSQ(tuple(model.fsq_levels), axis_name=model.axis_name, **module_kwargs)
  if family == 'lfq':
    return LFQ(model.embedding_dim, commitment_cost=model.commitment_cost,
               entropy_weight=model.lfq_entropy_weight,
               entropy_temperature=model.lfq_entropy_temperature,
               entropy_groups=model.lfq_entropy_groups, axis_name=model.axis_name,
               **module_kwargs)
  fields = dict(num_embeddings=model.num_embeddings, embedding_dim=model.embedding_dim,
                commitment_cost=model.commitment_cost, axis_name=model.axis_name,
                distance_chunk_size=model.distance_chunk_size,
                **{name: getattr(model, name) for name in CODEBOOK_OPTIONS}, **module_kwargs)
  if family == 'rvq':
    return ResidualVQ(model.num_quantizers, decay=model.decay, epsilon=model.epsilon,
                      zero_debias=model.zero_debias, quantizer_dropout=model.quantizer_dropout,
                      **fields)
  if family == 'ema':
    return VectorQuantizerEMA(decay=model.decay, epsilon=model.epsilon,
                              zero_debias=model.zero_debias, **fields)
  return VectorQuantizer(**fields)
