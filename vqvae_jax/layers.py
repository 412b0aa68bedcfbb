"""The seed's building blocks, NHWC: convolutions with PyTorch's initialisation, the residual
stack, and an exact, fast equivalent of `ConvTranspose2d(kernel_size=4, stride=2, padding=1)`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any

RESIDUAL_SKIPS = ('relu', 'identity')


def torch_uniform_init(fan_in: int):
  """PyTorch's default conv init: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for weight and bias."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """A 2-D convolution with PyTorch's padding convention and default initialisation.

  Attributes:
    features: output channels.
    kernel_size: square kernel size.
    stride: stride in both spatial dimensions.
    padding: zero padding on every side, as `nn.Conv2d(padding=...)`.
    use_bias: add a bias.
    dtype: the computation dtype (params stay float32).
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[B, H, W, C_in]` -> `[B, H', W', features]`, with `H' = (H + 2p - k) // s + 1`."""
    init = torch_uniform_init(x.shape[-1] * self.kernel_size**2)
    kernel = self.param('kernel', init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride),
                                 ((self.padding, self.padding),) * 2,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      y = y + self.param('bias', init, (self.features,)).astype(self.dtype)
    return y


def _upsample_tap_table() -> np.ndarray:
  """Which tap of the 4x4 kernel each (row, col, phase_y, phase_x) of a 3x3 kernel holds.

  `ConvTranspose2d(k=4, s=2, p=1)` writes input pixel i to outputs `o = 2i - 1 + k`. So output
  row `2m` (phase 0) takes tap 3 from input row m-1 and tap 1 from row m, and output row
  `2m + 1` (phase 1) takes tap 2 from row m and tap 0 from row m+1. Over a 3x3 window centred
  on row m (offsets -1, 0, +1 -> rows 0, 1, 2 of the window) that is the table below; 16 marks
  a zero tap.
  """
  taps_by_phase = ({0: 3, 1: 1}, {1: 2, 2: 0})  # phase -> {window row: kernel tap}
  table = np.full((3, 3, 2, 2), 16, np.int32)
  for phase_y, rows in enumerate(taps_by_phase):
    for phase_x, cols in enumerate(taps_by_phase):
      for wy, ky in rows.items():
        for wx, kx in cols.items():
          table[wy, wx, phase_y, phase_x] = ky * 4 + kx
  return table


_UPSAMPLE_TAPS = _upsample_tap_table()


def conv_transpose_4x4_s2(x: Array, kernel: Array, precision=None) -> Array:
  """Exactly `ConvTranspose2d(kernel_size=4, stride=2, padding=1, bias=False)`, NHWC.

  Computed as one 3x3 stride-1 convolution with 4x the output channels (one group per output
  phase, each using its 2x2 taps of the 4x4 kernel and zeros elsewhere), then depth-to-space.
  XLA compiles this to ordinary convolutions whose gradients are fast on every backend, where
  `lax.conv_transpose`'s kernel gradient takes seconds on XLA:CPU.

  Args:
    x: `[B, H, W, C_in]`.
    kernel: `[4, 4, C_in, C_out]`, with `kernel[ky, kx, i, o] == torch_weight[i, o, ky, kx]`.
    precision: passed to the convolution.

  Returns:
    `[B, 2H, 2W, C_out]`.
  """
  c_in, c_out = kernel.shape[2], kernel.shape[3]
  taps = jnp.concatenate([kernel.reshape(16, c_in, c_out), jnp.zeros((1, c_in, c_out),
                                                                      kernel.dtype)])
  phase_kernel = taps[_UPSAMPLE_TAPS]  # [3, 3, 2, 2, C_in, C_out]
  phase_kernel = phase_kernel.transpose(0, 1, 4, 2, 3, 5).reshape(3, 3, c_in, 4 * c_out)
  y = lax.conv_general_dilated(x, phase_kernel, (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)
  b, h, w, _ = x.shape
  y = y.reshape(b, h, w, 2, 2, c_out).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, c_out)


class ConvTranspose4x4s2(nn.Module):
  """The seed's `ConvTranspose2d(C_in, features, kernel_size=4, stride=2, padding=1)`.

  Params: `kernel` `[4, 4, C_in, features]` (the torch weight `[C_in, features, 4, 4]`
  transposed to `(2, 3, 0, 1)`) and `bias` `[features]`, both initialised like PyTorch.

  Attributes:
    features: output channels.
    dtype: the computation dtype (params stay float32).
  """

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[B, H, W, C_in]` -> `[B, 2H, 2W, features]`."""
    # PyTorch computes a transposed conv's fan_in from weight dim 1, the output channels.
    init = torch_uniform_init(self.features * 16)
    kernel = self.param('kernel', init, (4, 4, x.shape[-1], self.features))
    bias = self.param('bias', init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv_transpose_4x4_s2(x, kernel) + bias


class ResidualStack(nn.Module):
  """The seed's `ResidualStack`: `num_residual_layers` blocks, then a ReLU.

  Each block's branch is `conv1x1(relu(conv3x3(relu(x))))`, both convs without bias. What the
  branch is added to is set by `residual_skip`:

    * `'relu'` (default): the seed as it runs. Its block starts with `nn.ReLU(inplace=True)`,
      which overwrites `x` before `x + block(x)` reads it, so the seed computes
      `relu(x) + branch(x)`. Seed checkpoints need this to reproduce the seed's outputs.
    * `'identity'`: `x + branch(x)`, the identity skip of the paper, Sonnet and Haiku.

  Attributes:
    num_hiddens: channels in and out (the seed's `num_hiddens`).
    num_residual_layers: number of blocks.
    num_residual_hiddens: channels inside each block.
    residual_skip: `'relu'` or `'identity'`, see above.
    dtype: the computation dtype.
  """

  num_hiddens: int
  num_residual_layers: int
  num_residual_hiddens: int
  residual_skip: str = 'relu'
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.residual_skip not in RESIDUAL_SKIPS:
      raise ValueError(f'residual_skip must be one of {RESIDUAL_SKIPS}, got '
                       f'{self.residual_skip!r}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """`[B, H, W, num_hiddens]` -> `[B, H, W, num_hiddens]`."""
    for i in range(self.num_residual_layers):
      h = nn.relu(x)
      branch = Conv(self.num_residual_hiddens, 3, padding=1, use_bias=False, dtype=self.dtype,
                    name=f'layers_{i}_conv3x3')(h)
      branch = Conv(self.num_hiddens, 1, use_bias=False, dtype=self.dtype,
                    name=f'layers_{i}_conv1x1')(nn.relu(branch))
      x = (h if self.residual_skip == 'relu' else x) + branch
    return nn.relu(x)

