"""The rotation trick (Fifty et al. 2024) on both VQ quantizers: forward values the codes exactly
with everything else as the default estimator gives it, gradients against a dense rotation built
by hand per row (through codebook_dim projections and the cosine normalisation too), degenerate
rows, float32 range. Shapes, dtypes, jit, devices and bad input: test_quantizer_contract.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import normal
from vqvae_jax import VectorQuantizer, VectorQuantizerEMA
from vqvae_jax.quantizers import ROTATION_ANTIPODAL_TOLERANCE, rotation_trick

K, D = 16, 6
QUANTIZERS = [VectorQuantizer, VectorQuantizerEMA]


def make(cls, rotation, **kwargs):
  return cls(K, D, rotation_trick=rotation, **kwargs)


def init(cls, x, **kwargs):
  """Variables of `cls(K, D, **kwargs)`; the plain codebook scaled to U(-1, 1) (its U(-1/K,
  1/K) init sends every input to the few codes nearest 0)."""
  variables = make(cls, False, **kwargs).init(jax.random.key(2), x)
  if cls is VectorQuantizer:
    params = dict(variables['params'])
    params['embedding'] = params['embedding'] * K
    variables = {**variables, 'params': params}
  return variables


@functools.partial(jax.jit, static_argnames=('module', 'train'))
def call(module, variables, x, train=False):
  """The output (and, in training calls, the new batch_stats), jitted once per module."""
  if train:
    return module.apply(variables, x, train=True, mutable=['batch_stats'])
  return module.apply(variables, x)


def input_grad(module, variables, x, g):
  """d sum(g * quantized) / d inputs, float32."""
  loss = lambda x: jnp.sum(g * module.apply(variables, x).quantized.astype(jnp.float32))
  return jax.jit(jax.grad(loss))(x)


def rotation(e, q):
  """float64 `(R, lambda)` for one row: R = I - 2 r r^T + 2 q^ e^^T as a dense matrix."""
  e, q = np.asarray(e, np.float64), np.asarray(q, np.float64)
  e_hat, q_hat = e / np.linalg.norm(e), q / np.linalg.norm(q)
  r = (e_hat + q_hat) / np.linalg.norm(e_hat + q_hat)
  dense = np.eye(len(e)) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, e_hat)
  return dense, np.linalg.norm(q) / np.linalg.norm(e)


def codes_of(module, variables, indices):
  """float64 `[N, C]`: the codebook rows in use (in the code space) at `indices`."""
  codebook = module.apply(variables, method=lambda m: m.codebook)
  return np.asarray(codebook, np.float64)[np.asarray(indices).reshape(-1)]


# ---- Forward values ----

@pytest.mark.parametrize('options', [{}, {'codebook_dim': 3}, {'cosine_codes': True},
                                     {'codebook_dim': 4, 'cosine_codes': True}],
                         ids=['plain', 'codebook_dim', 'cosine', 'both'])
@pytest.mark.parametrize('cls', QUANTIZERS)
def test_forward_is_the_code_and_the_rest_is_the_default(cls, options):
  """Indices, counts, losses and perplexity equal the default estimator's bitwise; `quantized`
  is the code bitwise (`embed(indices)`; within 4 ulps where the code is computed from the
  codebook). The default's `e + sg(q - e)` rounds: it is within a
  few ulps of the code, not always the code, so it cannot be the bitwise reference."""
  x = normal((3, 20, D))
  variables = init(cls, x, **options)
  default = call(make(cls, False, **options), variables, x)
  rotated = call(make(cls, True, **options), variables, x)
  for field in ('indices', 'code_counts', 'loss', 'perplexity'):
    np.testing.assert_array_equal(getattr(rotated, field), getattr(default, field))
  assert len(np.unique(default.indices)) > 4
  codes = make(cls, True, **options).apply(variables, rotated.indices, method='embed')
  if options:  # codes computed from the codebook (normalised, projected) in two programs:
    # XLA may round them an ulp apart (seen with jax 0.12, cosine codes)
    np.testing.assert_allclose(rotated.quantized, codes, rtol=4 * np.finfo(np.float32).eps)
  else:
    np.testing.assert_array_equal(rotated.quantized, codes)
  scale = np.maximum(np.abs(np.asarray(x)), np.abs(np.asarray(codes)))
  assert np.all(np.abs(default.quantized - codes) <= 4 * np.finfo(np.float32).eps * scale + 1e-7)


@pytest.mark.parametrize('options', [{}, {'codebook_init': 'kmeans', 'dead_code_threshold': 1.0}])
@pytest.mark.parametrize('cls', QUANTIZERS)
def test_training_calls_update_the_same_state(cls, options):
  x = normal((64, D))
  variables = init(cls, x, **options)
  rngs = {'codebook': jax.random.key(5)}
  outs = []
  for rotation_on in (False, True):
    module = make(cls, rotation_on, **options)
    outs.append(jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=['batch_stats'],
                                                  rngs=rngs))(variables, x))
  (default, default_state), (rotated, rotated_state) = outs
  chex.assert_trees_all_equal(rotated_state, default_state)
  np.testing.assert_array_equal(rotated.indices, default.indices)
  np.testing.assert_array_equal(rotated.loss, default.loss)


# ---- Gradients against the dense rotation ----

@pytest.mark.parametrize('cls', QUANTIZERS)
def test_input_gradient_is_lambda_r_transpose_g(cls):
  x = normal((24, D))
  g = normal((24, D), seed=1)
  variables = init(cls, x)
  module = make(cls, True)
  out = call(module, variables, x)
  codes = codes_of(module, variables, out.indices)
  grad = input_grad(module, variables, x, g)
  for n in range(len(x)):
    dense, scale = rotation(x[n], codes[n])
    e_hat = np.asarray(x[n], np.float64) / np.linalg.norm(x[n])
    np.testing.assert_allclose(dense @ e_hat, codes[n] / np.linalg.norm(codes[n]), atol=1e-12)
    np.testing.assert_allclose(scale * dense @ np.asarray(x[n], np.float64), codes[n],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dense.T @ dense, np.eye(D), atol=1e-12)  # orthogonal
    np.testing.assert_allclose(np.linalg.det(dense), 1.0, atol=1e-9)  # a rotation
    np.testing.assert_allclose(grad[n], scale * dense.T @ np.asarray(g[n], np.float64),
                               rtol=1e-4, atol=1e-5)
  # Not the straight-through gradient, and not R g: the transpose matters.
  assert not np.allclose(grad, g, atol=1e-2)
  dense, scale = rotation(x[0], codes[0])
  assert not np.allclose(grad[0], scale * dense @ np.asarray(g[0], np.float64), atol=1e-3)


def test_codebook_gradient_is_unchanged():
  """The plain codebook learns from `q_latent` only, with or without the rotation trick."""
  x = normal((40, D))
  g = normal((40, D), seed=1)
  variables = init(VectorQuantizer, x)

  def param_grad(module):
    def total(params):
      out = module.apply({'params': params}, x)
      return jnp.sum(g * out.quantized) + out.loss
    return jax.jit(jax.grad(total))(variables['params'])

  chex.assert_trees_all_close(param_grad(make(VectorQuantizer, True)),
                              param_grad(make(VectorQuantizer, False)), rtol=1e-6, atol=1e-8)
  assert np.abs(param_grad(make(VectorQuantizer, True))['embedding']).sum() > 0


def l2_normalize_jacobian(y):
  """float64 d(y/|y|)/dy for one row."""
  norm = np.linalg.norm(y)
  return (np.eye(len(y)) - np.outer(y, y) / norm**2) / norm


@pytest.mark.parametrize('options', [{'codebook_dim': 3}, {'cosine_codes': True},
                                     {'codebook_dim': 4, 'cosine_codes': True}],
                         ids=['codebook_dim', 'cosine', 'both'])
def test_gradient_through_projections_and_normalisation(options):
  """The rotation acts in the lookup's code space: x -> e = [normalise](x K_in + b_in),
  quantized = sg-rotated(e) K_out + b_out, so the input gradient is
  J_e^T lambda R^T (K_out g), R built from e and its code."""
  x = normal((20, D))
  g = normal((20, D), seed=1)
  module = make(VectorQuantizerEMA, True, **options)
  variables = init(VectorQuantizerEMA, x, **options)
  out = call(module, variables, x)
  codes = codes_of(module, variables, out.indices)
  grad = input_grad(module, variables, x, g)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables.get('params', {}))
  for n in range(len(x)):
    y = np.asarray(x[n], np.float64)
    jacobian = np.eye(D)
    if 'codebook_dim' in options:
      kernel_in = params['project_in']['kernel']
      y = y @ kernel_in + params['project_in']['bias']
      jacobian = kernel_in.T  # d y / d x, [C, D]
    e = y
    if options.get('cosine_codes'):
      e = y / np.linalg.norm(y)
      jacobian = l2_normalize_jacobian(y) @ jacobian
    g_code = np.asarray(g[n], np.float64)
    if 'codebook_dim' in options:
      g_code = params['project_out']['kernel'] @ g_code
    dense, scale = rotation(e, codes[n])
    np.testing.assert_allclose(grad[n], jacobian.T @ (scale * dense.T @ g_code),
                               rtol=2e-4, atol=2e-5)


def test_rotation_trick_function_on_random_rows():
  """The function alone, rows of any scale: value the codes, gradient lambda R^T g; scales
  whose squares overflow or underflow float32 included."""
  e = np.asarray(normal((6, 5)), np.float64)
  q = np.asarray(normal((6, 5), seed=1), np.float64)
  scales = np.array([1.0, 1e-25, 1e25, 3e-3, 1e18, 1e-18])[:, None]
  e, q = e * scales, q * scales * np.array([1, 2, 3, 4, 5, 6])[:, None]
  g = np.asarray(normal((6, 5), seed=2))
  latents, codes = jnp.asarray(e, jnp.float32), jnp.asarray(q, jnp.float32)
  np.testing.assert_array_equal(jax.jit(rotation_trick)(latents, codes), codes)
  grad = jax.jit(jax.grad(lambda e: jnp.sum(g * rotation_trick(e, codes))))(latents)
  for n in range(6):
    dense, scale = rotation(np.asarray(latents[n]), np.asarray(codes[n]))
    np.testing.assert_allclose(grad[n], scale * dense.T @ g[n], rtol=1e-4, atol=1e-6)
  # The codes get no gradient from the output.
  code_grad = jax.grad(lambda q: jnp.sum(g * rotation_trick(latents, q)))(codes)
  np.testing.assert_array_equal(code_grad, 0.0)


# ---- Degenerate rows ----

def test_degenerate_rows_fall_back_to_straight_through():
  near = np.array([1.0, 2e-4, 0.0, 0.0])  # e^ + q^ ~ 2e-4 < the tolerance
  far = np.array([1.0, 5e-3, 0.0, 0.0])  # ~ 5e-3: rotated
  assert np.linalg.norm(near / np.linalg.norm(near) + [-1, 0, 0, 0]) < ROTATION_ANTIPODAL_TOLERANCE
  assert np.linalg.norm(far / np.linalg.norm(far) + [-1, 0, 0, 0]) > ROTATION_ANTIPODAL_TOLERANCE
  latents = np.array([[0.0, 0.0, 0.0, 0.0],       # e = 0
                      [1.0, 2.0, 0.0, -1.0],      # e^ = -q^ exactly
                      [2.0, 1.0, 3.0, 1.0],       # q = 0
                      near,                       # nearly antipodal
                      [1e-30, 0.0, 0.0, 0.0],     # lambda = 1e60: not finite in float32
                      far,
                      [1.0, 0.0, 0.0, 0.0]])
  codes = np.array([[1.0, 1.0, 0.0, 0.0],
                    [-3.0, -6.0, 0.0, 3.0],
                    [0.0, 0.0, 0.0, 0.0],
                    [-2.0, 0.0, 0.0, 0.0],
                    [0.0, 1e30, 0.0, 0.0],
                    [-2.0, 0.0, 0.0, 0.0],
                    [0.0, 2.0, 0.0, 0.0]])
  latents, codes = jnp.asarray(latents, jnp.float32), jnp.asarray(codes, jnp.float32)
  g = np.asarray(normal((7, 4), seed=3))
  np.testing.assert_array_equal(jax.jit(rotation_trick)(latents, codes), codes)
  grad = np.asarray(jax.jit(jax.grad(lambda e: jnp.sum(g * rotation_trick(e, codes))))(latents))
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(grad[:5], g[:5])  # straight-through, exactly
  for n in (5, 6):  # well-defined rotations, the 90-degree one and the nearly antipodal one
    dense, scale = rotation(np.asarray(latents[n]), np.asarray(codes[n]))
    np.testing.assert_allclose(grad[n], scale * dense.T @ g[n], rtol=1e-3, atol=1e-4)
    assert not np.allclose(grad[n], g[n], atol=1e-2)


def test_degenerate_rows_inside_the_quantizer():
  """A zero input and one whose nearest code points the opposite way: straight-through rows;
  the others rotate."""
  codebook = jnp.array([[-1.0, 0.0], [5.0, 5.0], [0.0, 3.0]])
  x = jnp.array([[1.0, 0.0], [0.0, 0.0], [0.5, 2.0]])
  module = VectorQuantizer(3, 2, rotation_trick=True)
  variables = {'params': {'embedding': codebook}}
  out = module.apply(variables, x)
  np.testing.assert_array_equal(out.indices, [0, 0, 2])  # [1, 0] -> [-1, 0]: antipodal
  np.testing.assert_array_equal(out.quantized, codebook[np.array([0, 0, 2])])
  g = np.asarray(normal((3, 2), seed=4))
  grad = np.asarray(input_grad(module, variables, x, g))
  np.testing.assert_array_equal(grad[:2], g[:2])
  dense, scale = rotation(x[2], codebook[2])
  np.testing.assert_allclose(grad[2], scale * dense.T @ g[2], rtol=1e-5)
