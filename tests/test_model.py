"""VQVAE, its layers and the seed converter."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from vqvae_jax import VQVAE
from vqvae_jax.convert import from_seed_state_dict, seed_architecture, to_seed_state_dict
from vqvae_jax.layers import Conv, ConvTranspose4x4s2, ResidualStack, conv_transpose_4x4_s2

SMALL = dict(num_hiddens=16, num_residual_layers=2, num_residual_hiddens=8, num_embeddings=32,
             embedding_dim=8)
ARCHITECTURE = ('num_hiddens', 'num_residual_layers', 'num_residual_hiddens')


def images(batch=2, size=16, channels=3, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels)) - 0.5


@pytest.mark.parametrize('c_in,c_out,h,w', [(3, 5, 4, 6), (8, 3, 7, 5), (16, 8, 8, 8)])
def test_conv_transpose_equals_the_transposed_convolution(c_in, c_out, h, w):
  """Against the textbook definition: out[2i - 1 + k] += x[i] * w[k]."""
  x = np.random.default_rng(0).normal(size=(2, h, w, c_in)).astype(np.float32)
  kernel = np.random.default_rng(1).normal(size=(4, 4, c_in, c_out)).astype(np.float32)
  expected = np.zeros((2, 2 * h + 2, 2 * w + 2, c_out))  # one extra row/col of padding per side
  for i in range(h):
    for j in range(w):
      expected[:, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum('bc,yxco->byxo', x[:, i, j],
                                                                 kernel)
  expected = expected[:, 1:-1, 1:-1]
  np.testing.assert_allclose(conv_transpose_4x4_s2(x, kernel), expected, rtol=1e-5, atol=1e-5)
  # And against XLA's own transposed convolution.
  reference = lax.conv_transpose(x, kernel[::-1, ::-1], (2, 2), ((2, 2), (2, 2)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(conv_transpose_4x4_s2(x, kernel), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('c_in,c_out,h,w', [(3, 5, 4, 6), (8, 3, 7, 5), (16, 12, 8, 8)])
def test_conv_transpose_gradients_equal_xlas_transposed_convolution(c_in, c_out, h, w):
  """The CPU backward pass (the gradients of the convolution it transposes) against JAX's own
  gradients of `lax.conv_transpose`, in float32 and bfloat16."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, h, w, c_in)).astype(np.float32)
  kernel = rng.normal(size=(4, 4, c_in, c_out)).astype(np.float32)
  cotangent = rng.normal(size=(2, 2 * h, 2 * w, c_out)).astype(np.float32)
  reference = lambda x, kernel: lax.conv_transpose(
      x, kernel[::-1, ::-1], (2, 2), ((2, 2), (2, 2)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = jax.vjp(reference, x, kernel)[1](cotangent)
  got = jax.vjp(conv_transpose_4x4_s2, x, kernel)[1](cotangent)
  for mine, theirs in zip(got, expected):
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
  as_bf16 = lambda *arrays: [jnp.asarray(a, jnp.bfloat16) for a in arrays]
  x16, kernel16, cotangent16 = as_bf16(x, kernel, cotangent)
  grad_x16, grad_kernel16 = jax.vjp(conv_transpose_4x4_s2, x16, kernel16)[1](cotangent16)
  chex.assert_type([grad_x16, grad_kernel16], jnp.bfloat16)
  for mine, theirs in zip((grad_x16, grad_kernel16), expected):
    scale = float(np.max(np.abs(theirs)))
    np.testing.assert_allclose(np.asarray(mine, np.float32), theirs, atol=0.05 * scale)


def test_conv_transpose_module_init_is_pytorchs():
  layer = ConvTranspose4x4s2(features=64)
  params = layer.init(jax.random.key(0), jnp.zeros((1, 2, 2, 128)))['params']
  bound = 1 / np.sqrt(64 * 16)  # torch: fan_in from weight dim 1 (the output channels)
  for value in params.values():
    assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound


@pytest.mark.parametrize('skip', ['relu', 'identity'])
def test_residual_skip(skip):
  stack = ResidualStack(4, 1, 3, residual_skip=skip)
  x = jax.random.normal(jax.random.key(0), (1, 3, 3, 4))
  params = stack.init(jax.random.key(1), x)['params']
  branch_params = params['layers_0_conv3x3']['kernel'], params['layers_0_conv1x1']['kernel']

  def conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  branch = conv(jax.nn.relu(conv(jax.nn.relu(x), branch_params[0])), branch_params[1])
  skip_value = jax.nn.relu(x) if skip == 'relu' else x
  np.testing.assert_allclose(stack.apply({'params': params}, x),
                             jax.nn.relu(skip_value + branch), atol=1e-6)


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_model_shapes_dtypes_and_collections(decay):
  model = VQVAE(**SMALL, decay=decay)
  x = images()
  variables = model.init(jax.random.key(0), x)
  assert ('batch_stats' in variables) == (decay > 0)
  recon, vq = model.apply(variables, x)
  chex.assert_shape(recon, x.shape)
  chex.assert_shape(vq.indices, (2, 4, 4))
  chex.assert_shape(vq.quantized, (2, 4, 4, SMALL['embedding_dim']))
  chex.assert_type([recon, vq.loss, vq.perplexity], jnp.float32)
  codes = model.apply(variables, x, method=VQVAE.encode)
  np.testing.assert_array_equal(codes, vq.indices)
  decoded = model.apply(variables, codes, method=VQVAE.decode)
  np.testing.assert_allclose(decoded, recon, atol=1e-6)


def test_seed_initialisation():
  model = VQVAE(**SMALL)
  plain = model.init(jax.random.key(0), images())['params']['vq']['embedding']
  assert np.abs(plain).max() <= 1 / 32 and np.abs(plain).max() > 0.9 / 32
  stats = VQVAE(**SMALL, decay=0.99).init(jax.random.key(0), images())['batch_stats']['vq']
  np.testing.assert_array_equal(stats['ema_cluster_size'], 0.0)
  for name in ('embedding', 'ema_w'):  # N(0, 1), independently
    assert 0.7 < np.std(stats[name]) < 1.3
  assert not np.allclose(stats['embedding'], stats['ema_w'])


def test_bfloat16_convolutions_float32_quantizer():
  model = VQVAE(**SMALL, decay=0.99, dtype=jnp.bfloat16)
  x = images()
  variables = model.init(jax.random.key(0), x)
  chex.assert_trees_all_equal_dtypes(variables, jax.tree.map(lambda a: a.astype(jnp.float32)
                                                             if a.dtype != jnp.int32 else a,
                                                             variables))
  (recon, vq), updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert vq.quantized.dtype == jnp.bfloat16
  chex.assert_type([recon, vq.loss, vq.perplexity], jnp.float32)
  chex.assert_type(jax.tree.leaves(updates), jnp.float32)
  f32_recon, _ = VQVAE(**SMALL, decay=0.99).apply(variables, x)
  assert np.abs(recon - f32_recon).max() < 0.05  # bf16 convs, same function


@pytest.mark.parametrize('shape', [(2, 16, 16), (2, 15, 16, 3), (2, 16, 16, 1)])
def test_bad_image_shape_is_named(shape):
  with pytest.raises(ValueError, match=r'got shape \(' + ', '.join(map(str, shape)) + r'\)'):
    VQVAE(**SMALL).init(jax.random.key(0), jnp.zeros(shape))


def test_grayscale_images():
  model = VQVAE(**SMALL, image_channels=1)
  x = images(channels=1)
  recon, _ = model.apply(model.init(jax.random.key(0), x), x)
  chex.assert_shape(recon, x.shape)


@pytest.mark.parametrize('kwargs,match', [
    (dict(decay=1.0), r'decay \(0 selects the plain quantizer\) must be a number in \[0, 1\), got '
                      r'1.0'),
    (dict(num_hiddens=0), 'num_hiddens must be an integer >= 1, got 0'),
    (dict(residual_skip='sum'), "residual_skip must be one of \\('relu', 'identity'\\), got 'sum'"),
    (dict(num_embeddings=0), 'num_embeddings must be an integer >= 1, got 0'),
    (dict(quantizer=dict(family='ema', num_embeddings=8, embedding_dim=4, epsilon=-1.0)),
     'epsilon must be a number >= 0, got -1.0'),
    (dict(quantizer='fsq'), "quantizer must be None \\(the seed's\\) or a mapping"),
    (dict(quantizer=dict(family='vq', num_embeddings=8, embedding_dim=4, codebook_init='zeros')),
     "codebook_init must be one of \\('seed', 'kmeans'\\)"),
])
def test_bad_model_arguments_fail_at_construction(kwargs, match):
  # At construction, not at the first init: the submodules' checks run on detached copies.
  with pytest.raises(ValueError, match=match):
    fields = {**SMALL, **kwargs}
    if 'quantizer' in kwargs:  # the seed's quantizer fields keep their defaults
      fields = {k: v for k, v in fields.items() if k in ARCHITECTURE or k == 'quantizer'}
    VQVAE(**fields)


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_seed_state_dict_round_trip(decay):
  model = VQVAE(**SMALL, decay=decay)
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), images()))
  arch = {**{k: SMALL[k] for k in SMALL}, 'ema': decay > 0}
  state_dict = to_seed_state_dict(variables, arch)
  assert seed_architecture(state_dict) == arch
  chex.assert_trees_all_equal(from_seed_state_dict(state_dict, model), variables)


def test_seed_state_dict_errors_name_the_key():
  model = VQVAE(**SMALL, decay=0.99)
  arch = {**SMALL, 'ema': True}
  state_dict = to_seed_state_dict(model.init(jax.random.key(0), images()), arch)
  missing = {k: v for k, v in state_dict.items() if k != '_decoder._conv_trans_1.bias'}
  with pytest.raises(ValueError, match="missing key '_decoder._conv_trans_1.bias'"):
    from_seed_state_dict(missing, model)
  wrong = {**state_dict, '_pre_vq_conv.bias': np.zeros(5)}
  with pytest.raises(ValueError, match=r"'_pre_vq_conv.bias' has shape \(5,\), expected \(8,\)"):
    from_seed_state_dict(wrong, model)
  with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
    from_seed_state_dict({**state_dict, 'extra.weight': np.zeros(1)}, model)
  with pytest.raises(ValueError, match='num_embeddings=32 but the model has num_embeddings=64'):
    from_seed_state_dict(state_dict, VQVAE(**{**SMALL, 'num_embeddings': 64}, decay=0.99))
  with pytest.raises(ValueError, match="missing key '_vq_vae._embedding.weight'"):
    from_seed_state_dict({k: v for k, v in state_dict.items() if 'embedding' not in k})


def test_library_imports_no_training_dependencies():
  """The house rule: vqvae_jax never imports tfds, TensorFlow, orbax, torch or train/."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys, vqvae_jax, vqvae_jax.convert, vqvae_jax.codebook; '
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'tensorflow_datasets', 'tensorflow', 'orbax', 'train', 'torch'}))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('k,stride,padding,c_in,c_out,size,batch', [
    # Kernel gradients by one matmul over stacked taps: 1x1, 2x2 and 3-channel inputs.
    (4, 2, 1, 3, 5, 16, 2), (1, 1, 0, 8, 5, 8, 2), (2, 1, 1, 16, 5, 8, 2),
    # As a convolution with the batch as features; 64 images are two blocks of 32, 48 one.
    (4, 2, 1, 8, 5, 15, 2), (4, 2, 1, 8, 5, 8, 64), (3, 1, 0, 8, 16, 8, 48),
    (3, 1, 1, 72, 80, 4, 2),  # a 'same' convolution too wide for the matmul form
    # Stride 1 with C_out < C_in, as a convolution with dy as the image.
    (3, 1, 0, 16, 5, 9, 2), (5, 1, 1, 16, 5, 9, 64),
    # Narrow 'same' convolutions on up to 64 images: matmuls over shifted copies, forward too.
    (3, 1, 1, 8, 16, 8, 2), (3, 1, 1, 16, 5, 8, 2), (3, 1, 1, 16, 5, 8, 64),
    (5, 1, 2, 6, 9, 7, 64)])
def test_conv2d_cpu_passes_equal_xlas_own(k, stride, padding, c_in, c_out, size, batch):
  """conv2d's CPU forward and backward passes compute JAX's own convolution and its
  gradients, which are what GPUs and TPUs run, on every path they take."""
  from vqvae_jax.layers import conv2d  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, c_in)).astype(np.float32)
  kernel = rng.normal(size=(k, k, c_in, c_out)).astype(np.float32)
  native = lambda x, kernel: lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding),) * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=lax.Precision.HIGHEST)
  out, native_vjp = jax.vjp(native, x, kernel)
  ours, our_vjp = jax.vjp(lambda x, kernel: conv2d(x, kernel, stride, padding), x, kernel)
  np.testing.assert_allclose(ours, out, rtol=1e-5, atol=1e-4)
  cotangent = rng.normal(size=out.shape).astype(np.float32)
  for mine, theirs in zip(our_vjp(cotangent), native_vjp(cotangent)):
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('c_in,c_out', [(16, 5), (8, 16)])
def test_narrow_same_conv_keeps_bfloat16_and_sums_in_float32(c_in, c_out):
  """The matmul form returns bfloat16 for bfloat16 operands, and its error is one rounding of
  the float32 result, as for XLA's own bfloat16 convolution."""
  from vqvae_jax.layers import conv2d  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 8, 8, c_in)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)), jnp.bfloat16)
  exact = lax.conv_general_dilated(x.astype(jnp.float32), kernel.astype(jnp.float32), (1, 1),
                                   ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=lax.Precision.HIGHEST)
  y, vjp = jax.vjp(lambda x, kernel: conv2d(x, kernel, 1, 1), x, kernel)
  grad_x, grad_kernel = vjp(jnp.ones_like(y))
  chex.assert_type([y, grad_x, grad_kernel], jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize('kernel_size,stride,c_out', [(4, 2, 8), (3, 1, 8), (3, 1, 24)])
def test_bfloat16_kernel_gradients_round_once(kernel_size, stride, c_out):
  """A bfloat16 kernel gradient is its float32 sum rounded once to bfloat16, also where XLA:CPU
  sums it over blocks of images (batch 256: 8 blocks). Operands are positive, so no sum
  cancels and one rounding is within 2**-8 of each element; summed in bfloat16 across the
  blocks, they were up to 1.1% off."""
  from vqvae_jax.layers import conv2d  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (256, 4, 4, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.uniform(0, 1, (kernel_size, kernel_size, 16, c_out)), jnp.bfloat16)
  conv = lambda x, kernel: conv2d(x, kernel, stride, 1)
  y, vjp = jax.vjp(conv, x, kernel)
  cotangent = jnp.asarray(rng.uniform(1, 2, y.shape), jnp.bfloat16)
  grad_kernel = vjp(cotangent)[1]
  chex.assert_type(grad_kernel, jnp.bfloat16)
  as_float32 = lambda a: a.astype(jnp.float32)
  exact = jax.vjp(conv, as_float32(x), as_float32(kernel))[1](as_float32(cotangent))[1]
  np.testing.assert_allclose(as_float32(grad_kernel), exact, rtol=2**-8)


@pytest.mark.parametrize('layer', [Conv(4, 3, padding=1, dtype=jnp.bfloat16),
                                   ConvTranspose4x4s2(4, dtype=jnp.bfloat16)])
def test_bfloat16_layers_sum_their_bias_gradient_in_float32(layer):
  """The bias gradient of a bfloat16 layer is the float32 sum of its bfloat16 output gradient
  over all pixels. Summed in bfloat16, it stalled once the total's spacing outgrew the terms:
  512 for all 4 channels of the 3x3 convolution, whose sums are about 49,000."""
  x = images(batch=32, size=32, channels=3).astype(jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)['params']
  y, vjp = jax.vjp(lambda params: layer.apply({'params': params}, x), params)
  assert y.dtype == jnp.bfloat16
  cotangent = jax.random.uniform(jax.random.key(1), y.shape, jnp.float32, 1.0, 2.0)
  grads = vjp(cotangent.astype(jnp.bfloat16))[0]
  chex.assert_type(grads['bias'], jnp.float32)
  exact = np.asarray(cotangent.astype(jnp.bfloat16), np.float64).sum((0, 1, 2))
  np.testing.assert_allclose(grads['bias'], exact, rtol=1e-5)


def test_the_quantizer_config_reaches_the_quantizer():
  """`VQVAE(quantizer=...)` builds that family with every field it names; the seed's fields
  build the seed's quantizer when it is None, and must keep their defaults otherwise."""
  options = dict(codebook_init='kmeans', kmeans_iters=3, dead_code_threshold=0.5,
                 usage_decay=0.9, track_usage=True, cosine_codes=True, codebook_dim=4,
                 entropy_weight=0.1, entropy_temperature=2.0, rotation_trick=True)
  configs = [dict(family='vq', num_embeddings=8, embedding_dim=6, **options),
             dict(family='ema', num_embeddings=8, embedding_dim=6, decay=0.9, zero_debias=True,
                  **options),
             dict(family='fsq', levels=[4, 3, 3]),  # a list, as JSON gives it
             dict(family='lfq', embedding_dim=5, entropy_weight=0.3, entropy_groups=5),
             dict(family='rvq', num_quantizers=3, num_embeddings=8, embedding_dim=6,
                  quantizer_dropout=0.5, **options)]
  for config in configs:
    model = VQVAE(**{k: SMALL[k] for k in ARCHITECTURE}, quantizer=config)
    assert hash(model) == hash(model.clone())
    vq = model.bind(model.init(jax.random.key(0), images(), train=False)).vq
    fields = {k: v for k, v in config.items() if k != 'family'}
    assert {name: getattr(vq, name) for name in fields} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}, config
    assert type(vq).__name__ == {'vq': 'VectorQuantizer', 'ema': 'VectorQuantizerEMA',
                                 'fsq': 'FSQ', 'lfq': 'LFQ', 'rvq': 'ResidualVQ'}[config['family']]
    assert model.codebook_size == vq.codebook_size
    assert model.codes_per_position == vq.codes_per_position
  seed = VQVAE(**SMALL, decay=0.99)
  assert seed.quantizer_config == dict(family='ema', num_embeddings=SMALL['num_embeddings'],
                                       embedding_dim=SMALL['embedding_dim'],
                                       commitment_cost=0.25, decay=0.99)
  with pytest.raises(ValueError, match=r"num_embeddings=32 sets the seed's quantizer; with "
                                       r"quantizer=\{'family': 'fsq'"):
    VQVAE(**SMALL, quantizer=dict(family='fsq', levels=(4, 4)))
  with pytest.raises(ValueError,
                     match="quantizer config key 'axis_name' is set by the quantizer's owner"):
    VQVAE(quantizer=dict(family='fsq', levels=(4, 4), axis_name='data'))


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_converted_variables_share_no_memory_with_the_state_dict(decay):
  """A torch state_dict's `.numpy()` values are views that torch's optimizer updates in place;
  the converted variables must not move with them. (The converter once returned views.)"""
  model = VQVAE(**SMALL, decay=decay)
  arch = {**SMALL, 'ema': decay > 0}
  state_dict = {key: np.array(value) for key, value in
                to_seed_state_dict(model.init(jax.random.key(0), images()), arch).items()}
  variables = from_seed_state_dict(state_dict, model)
  before = jax.tree.map(np.copy, variables)
  for value in state_dict.values():
    value += 1.0  # in place, as an optimizer step changes a torch tensor's numpy view
  chex.assert_trees_all_equal(variables, before)
  for key, value in state_dict.items():
    for leaf in jax.tree.leaves(variables):
      assert not np.shares_memory(np.asarray(leaf), value), key


def test_converted_variables_do_not_follow_a_torch_training_step():
  """With torch: convert a seed `Model`, train it one Adam step, and the Flax variables stay."""
  torch = pytest.importorskip('torch')
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'golden'))
  import seed_torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch_model = seed_torch.Model(**SMALL, commitment_cost=0.25, decay=0.99)
  variables = from_seed_state_dict(
      {key: value.numpy() for key, value in torch_model.state_dict().items()})
  before = jax.tree.map(np.copy, variables)
  optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-2)
  torch_model.train()
  loss, recon, _ = torch_model(torch.rand(4, 3, 16, 16) - 0.5)[:3]
  (loss + recon.square().mean()).backward()
  optimizer.step()
  moved = from_seed_state_dict(
      {key: value.numpy() for key, value in torch_model.state_dict().items()})
  assert not np.allclose(moved['params']['pre_vq_conv']['kernel'],
                         before['params']['pre_vq_conv']['kernel'])  # the step did train
  assert not np.allclose(moved['batch_stats']['vq']['ema_w'], before['batch_stats']['vq']['ema_w'])
  chex.assert_trees_all_equal(variables, before)


@pytest.mark.parametrize('decay', [0.0, 0.99])
def test_decode_of_out_of_range_codes(decay):
  """`decode` of a code outside [0, K): a ValueError naming it when the codes are concrete; NaN
  pixels under jit (the code is not clamped to a valid one); in-range grids decode as before,
  i.e. as the decoder of the codebook rows."""
  model = VQVAE(**SMALL, decay=decay)
  variables = model.init(jax.random.key(0), images())
  decode = lambda codes: model.apply(variables, codes, method=VQVAE.decode)
  k = SMALL['num_embeddings']
  codes = np.random.default_rng(0).integers(0, k, (2, 4, 4)).astype(np.int32)
  with pytest.raises(ValueError, match=rf'got code {k + 568} .*codes must be in \[0, {k}\)'):
    decode(np.where(codes == codes[0, 1, 2], k + 568, codes))
  with pytest.raises(ValueError, match=rf'got code -1 .*codes must be in \[0, {k}\)'):
    decode(np.where(codes == codes[1, 0, 0], -1, codes))
  with pytest.raises(TypeError, match='codes must be integers'):
    decode(codes.astype(np.float32))
  valid = decode(codes)
  chex.assert_shape(valid, (2, 16, 16, 3))
  bound = model.bind(variables)
  by_hand = model.apply(variables, bound.vq.codebook[codes], method=lambda m, z: m.decoder(z))
  np.testing.assert_allclose(valid, by_hand, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(decode)(codes), valid, rtol=1e-6, atol=1e-6)
  bad = codes.copy()
  bad[0, 1, 2] = k
  got = jax.jit(decode)(bad)
  assert np.isnan(got[0, 4:8, 8:12]).all()  # the pixels of the bad code
  np.testing.assert_allclose(got[1], valid[1], rtol=1e-6, atol=1e-6)  # the other image
