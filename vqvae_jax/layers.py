"""The seed's building blocks, NHWC: convolutions with PyTorch's initialisation, the residual
stack, and an exact, fast equivalent of `ConvTranspose2d(kernel_size=4, stride=2, padding=1)`.

The modules compute with `conv2d` and `conv_transpose_4x4_s2`: XLA's own convolutions, with
XLA's own gradients on GPUs and TPUs. XLA:CPU gets other forms of the same sums, which it runs
fast inside `lax.scan` too; they and the two functions are in `vqvae_jax/convolutions.py`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqvae_jax.convolutions import conv2d, conv_transpose_4x4_s2

Array = jax.Array
Dtype = Any

RESIDUAL_SKIPS = ('relu', 'identity')


def _add_bias(y: Array, bias: Array) -> Array:
  """`y + bias`, added in float32 and rounded once to `y`'s dtype.

  The bias's gradient is then a float32 sum over every pixel of the batch. Added in bfloat16,
  it was a bfloat16 sum, which stalls once the total's spacing outgrows its terms: 512 where
  the sum was about 49,000 (32 images of 32x32). XLA:CPU also split those sums into trees of
  `reduce-window`s, 9% of the bfloat16 training step's time at batch 256.
  """
  return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(y.dtype)


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
    dtype: the computation dtype (params stay float32; the bias is added in float32).
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
    y = conv2d(x, kernel, self.stride, self.padding)
    if self.use_bias:
      y = _add_bias(y, self.param('bias', init, (self.features,)))
    return y


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
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return _add_bias(conv_transpose_4x4_s2(x, kernel), bias)


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
