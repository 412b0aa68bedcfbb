"""ResidualVQ: stages against a single quantizer and against a hand-computed chain, embed and
its dropped-stage marker, gradients (straight-through and the rotation trick per stage, against
dense matrices), each stage's EMA equations, quantizer dropout (jit, 8 devices), k-means and
restarts per stage. Shapes, dtypes, jit, devices and bad input: test_quantizer_contract.py."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import normal
from vqvae_jax import ResidualVQ, VectorQuantizerEMA
from vqvae_jax.codebook import perplexity_from_counts

K, D = 8, 4


@functools.partial(jax.jit, static_argnames=('module', 'train'))
def _apply(module, variables, x, key, train):
  rngs = {} if key is None else {'codebook': key}
  if train:
    out, updates = module.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
    return out, updates.get('batch_stats', {})
  return module.apply(variables, x, rngs=rngs)


def apply(module, variables, x, train=False, key=None):
  """Jitted `module.apply` (compiled once per module); a training call returns `(out, new
  batch_stats)`."""
  return _apply(module, variables, x, None if key is None else jax.random.key(key), train)


def embed(module, variables, indices):
  return module.apply(variables, indices, method=ResidualVQ.embed)


def codebooks(variables, num_stages):
  """float32 numpy `[K, C]` codebook of each stage (EMA: batch_stats; plain: params)."""
  books = []
  for i in range(num_stages):
    stage = f'stage_{i}'
    if stage in variables.get('params', {}):
      books.append(np.asarray(variables['params'][stage]['embedding']))
    else:
      books.append(np.asarray(variables['batch_stats'][stage]['embedding']))
  return books


def nearest(x, codebook):
  """float64 argmin of squared distances."""
  x, codebook = np.asarray(x, np.float64), np.asarray(codebook, np.float64)
  return np.argmin(((x[:, None] - codebook[None]) ** 2).sum(-1), axis=1)


def hand_chain(x, books, depth=None):
  """The chain in float32 numpy: (indices [N, Q], stage codes [Q, N, D], residuals [Q, N, D]);
  with `depth` [N], stage i's codes count only where depth > i (indices -1 elsewhere)."""
  residual = np.asarray(x, np.float32)
  indices, codes, residuals = [], [], []
  for i, book in enumerate(books):
    idx = nearest(residual, book)
    code = book[idx]
    residuals.append(residual)
    kept = np.ones(len(idx), bool) if depth is None else depth > i
    indices.append(np.where(kept, idx, -1))
    codes.append(np.where(kept[:, None], code, np.float32(0)))
    residual = residual - code
  return np.stack(indices, -1), np.stack(codes), np.stack(residuals)


def dense_rotation(e, q):
  """float64 lambda * R, R = I - 2 r r^T + 2 q^ e^^T for one row."""
  e, q = np.asarray(e, np.float64), np.asarray(q, np.float64)
  e_hat, q_hat = e / np.linalg.norm(e), q / np.linalg.norm(q)
  r = (e_hat + q_hat) / np.linalg.norm(e_hat + q_hat)
  rotation = np.eye(len(e)) - 2 * np.outer(r, r) + 2 * np.outer(q_hat, e_hat)
  return np.linalg.norm(q) / np.linalg.norm(e) * rotation


# ---- Counts, one stage ----

@pytest.mark.parametrize('decay', [0.9, 0.0], ids=['ema', 'plain'])
def test_counts_per_stage(decay):
  shape = (2, 3, 5, D)
  rvq = ResidualVQ(3, K, D, decay=decay)
  x = normal(shape)
  variables = rvq.init(jax.random.key(1), x)
  out = apply(rvq, variables, x)
  np.testing.assert_array_equal(out.code_counts.sum(1), np.prod(shape[:-1]))
  counts = np.stack([np.bincount(np.asarray(out.indices)[..., i].ravel(), minlength=K)
                     for i in range(3)])
  np.testing.assert_array_equal(out.code_counts, counts)
  np.testing.assert_allclose(out.perplexity,
                             np.mean([perplexity_from_counts(c) for c in out.code_counts]),
                             rtol=1e-6)
  assert ('params' in variables) == (decay == 0)


@pytest.mark.parametrize('zero_debias', [False, True])
def test_one_stage_equals_a_single_ema_quantizer(zero_debias):
  x = normal((32, D))
  rvq = ResidualVQ(1, K, D, decay=0.9, zero_debias=zero_debias)
  single = VectorQuantizerEMA(K, D, decay=0.9, zero_debias=zero_debias)
  variables = rvq.init(jax.random.key(0), x)
  stage_variables = {'batch_stats': variables['batch_stats']['stage_0']}
  out, state = apply(rvq, variables, x, train=True)
  expected, expected_state = apply(single, stage_variables, x, train=True)
  chex.assert_trees_all_equal(state['stage_0'], expected_state)
  np.testing.assert_array_equal(out.indices[..., 0], expected.indices)
  for field in ('loss', 'perplexity'):
    np.testing.assert_array_equal(getattr(out, field), getattr(expected, field))
  np.testing.assert_array_equal(out.code_counts[0], expected.code_counts)
  # The code exactly; the single quantizer's `e + sg(q - e)` is within rounding of it.
  np.testing.assert_array_equal(
      out.quantized, single.apply(stage_variables, expected.indices, method='embed'))
  np.testing.assert_allclose(out.quantized, expected.quantized, atol=1e-6)


# ---- The chain by hand ----

@pytest.mark.parametrize('decay', [0.9, 0.0], ids=['ema', 'plain'])
def test_two_stages_by_hand(decay):
  x = normal((64, D))
  rvq = ResidualVQ(2, K, D, decay=decay, commitment_cost=0.3)
  variables = rvq.init(jax.random.key(0), x)
  books = codebooks(variables, 2)
  out = apply(rvq, variables, x)
  indices, codes, residuals = hand_chain(x, books)
  np.testing.assert_array_equal(out.indices, indices)
  assert len(np.unique(indices[:, 1])) > 3
  np.testing.assert_array_equal(out.quantized, codes[0] + codes[1])  # float32 sums, bitwise
  np.testing.assert_array_equal(out.code_counts,
                                [np.bincount(indices[:, i], minlength=K) for i in range(2)])
  errors = [np.mean((residuals[i].astype(np.float64) - codes[i]) ** 2) for i in range(2)]
  per_stage = 0.3 if decay else 1.3  # EMA: beta * e_latent; plain: q_latent + beta * e_latent
  np.testing.assert_allclose(out.loss, per_stage * sum(errors), rtol=1e-5)
  # Stage 1 saw the residuals: its indices are not what it would give x itself.
  assert not np.array_equal(indices[:, 1], nearest(x, books[1]))


def test_perplexity_is_the_mean_of_the_stages():
  x = normal((64, D))
  rvq = ResidualVQ(3, K, D)
  variables = rvq.init(jax.random.key(0), x)
  out = apply(rvq, variables, x)
  per_stage = [np.exp(-np.sum(p * np.log(p + 1e-10)))
               for p in np.asarray(out.code_counts, np.float64) / 64]
  assert np.ptp(per_stage) > 0.1  # the stages differ, so the mean is a real test
  np.testing.assert_allclose(out.perplexity, np.mean(per_stage), rtol=1e-5)


@pytest.mark.parametrize('options', [{}, {'codebook_dim': 3}, {'cosine_codes': True},
                                     {'rotation_trick': True}, {'decay': 0.0}],
                         ids=['ema', 'codebook_dim', 'cosine', 'rotation', 'plain'])
def test_embed_equals_quantized(options):
  x = normal((2, 5, 3, D))
  rvq = ResidualVQ(3, K, D, **options)
  variables = rvq.init(jax.random.key(0), x)
  out = apply(rvq, variables, x)
  for got in (embed(rvq, variables, out.indices),
              jax.jit(lambda i: embed(rvq, variables, i))(out.indices)):
    if 'cosine_codes' in options or 'codebook_dim' in options:
      # Codes computed from the codebook (normalised, projected) are rounded as each
      # compiled program does it: an ulp apart at most.
      np.testing.assert_allclose(got, out.quantized, rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(got, out.quantized)


def test_embed_marks_and_bad_codes():
  x = normal((6, D))
  rvq = ResidualVQ(3, K, D)
  variables = rvq.init(jax.random.key(0), x)
  books = codebooks(variables, 3)
  codes = np.array([[1, 2, 3], [4, -1, -1], [-1, -1, -1], [0, -1, 5]])
  got = embed(rvq, variables, codes)
  np.testing.assert_array_equal(got[0], books[0][1] + books[1][2] + books[2][3])
  np.testing.assert_array_equal(got[1], books[0][4])
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_array_equal(got[3], books[0][0] + books[2][5])
  for bad in (K, -2, 100):
    with pytest.raises(ValueError, match=rf'ResidualVQ.embed: got code {bad} \(1 of 6 codes '
                                         rf'are out of range\); codes must be in \[0, {K}\)'):
      embed(rvq, variables, np.array([[0, 1, 2], [3, bad, 4]]))
  traced = jax.jit(lambda i: embed(rvq, variables, i))(
      jnp.array([[0, 1, 2], [3, K, 4], [-2, -1, -1], [0, -1, 1]], jnp.int32))
  assert np.isnan(traced[1:3]).all()  # out of range under jit: NaN, never a valid code
  np.testing.assert_array_equal(traced[0], books[0][0] + books[1][1] + books[2][2])
  np.testing.assert_array_equal(traced[3], books[0][0] + books[2][1])
  with pytest.raises(ValueError, match=r'codes of shape \[\.\.\., 3\] \(num_quantizers\), got '
                                       r'shape \(2, 2\)'):
    embed(rvq, variables, np.zeros((2, 2), np.int32))


def test_unsigned_codes_have_no_dropped_marker():
  """-1 marks a dropped stage only in signed codes: uint8 255 and uint16 65535 are codes (they
  compared equal to -1 and decoded as dropped)."""
  x = normal((6, D))
  for dtype, k in ((np.uint8, 256), (np.uint16, 65_536)):
    rvq = ResidualVQ(2, k, D)
    variables = rvq.init(jax.random.key(0), x)
    books = codebooks(variables, 2)
    codes = np.array([[k - 1, 3]])
    want = books[0][k - 1] + books[1][3]
    for got in (embed(rvq, variables, codes.astype(dtype)),
                jax.jit(lambda i: embed(rvq, variables, i))(codes.astype(dtype))):
      np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(embed(rvq, variables, np.array([[-1, 3]]))[0], books[1][3])


# ---- Gradients ----

@pytest.mark.parametrize('decay', [0.9, 0.0], ids=['ema', 'plain'])
def test_straight_through_gradients(decay):
  """d sum(g * quantized)/dx = g; the loss reaches x through stage 0's commitment term only
  (r_1 = x - (x + sg(c_0 - x)) has no gradient): beta * 2 (x - c_0) / (N D)."""
  x = normal((40, D))
  g = normal((40, D), seed=1)
  rvq = ResidualVQ(3, K, D, decay=decay, commitment_cost=0.4)
  variables = rvq.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(g * rvq.apply(variables, x).quantized)))(x)
  np.testing.assert_array_equal(grad, g)
  loss_grad = jax.jit(jax.grad(lambda x: rvq.apply(variables, x).loss))(x)
  _, codes, _ = hand_chain(x, codebooks(variables, 3))
  np.testing.assert_allclose(loss_grad, 0.4 * 2 * (np.asarray(x) - codes[0]) / x.size,
                             rtol=1e-5, atol=1e-8)


def test_rotation_trick_per_stage_gradient():
  """The chain with each stage's lambda R held constant: quantized = M_0 r_0 + M_1 r_1,
  r_1 = (I - M_0) r_0, so d quantized/dx = M_0 + M_1 (I - M_0) and the gradient is its
  transpose times g. The forward value is the default's exactly."""
  x = normal((12, D))
  g = normal((12, D), seed=1)
  rvq = ResidualVQ(2, K, D, rotation_trick=True)
  variables = rvq.init(jax.random.key(0), x)
  out = apply(rvq, variables, x)
  np.testing.assert_array_equal(out.quantized, apply(ResidualVQ(2, K, D), variables, x).quantized)
  _, codes, residuals = hand_chain(x, codebooks(variables, 2))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(g * rvq.apply(variables, x).quantized)))(x)
  for n in range(12):
    m0 = dense_rotation(residuals[0][n], codes[0][n])
    m1 = dense_rotation(residuals[1][n], codes[1][n])
    jacobian = m0 + m1 @ (np.eye(D) - m0)
    np.testing.assert_allclose(grad[n], jacobian.T @ np.asarray(g[n], np.float64),
                               rtol=1e-4, atol=1e-5)
  assert not np.allclose(grad, g, atol=1e-2)


# ---- EMA state per stage ----

@pytest.mark.parametrize('zero_debias', [False, True])
def test_each_stage_follows_the_ema_equations(zero_debias):
  decay, eps = 0.8, 1e-3
  x = normal((48, D))
  rvq = ResidualVQ(2, K, D, decay=decay, epsilon=eps, zero_debias=zero_debias)
  variables = rvq.init(jax.random.key(0), x)
  out, state = apply(rvq, variables, x, train=True)
  indices, _, residuals = hand_chain(x, codebooks(variables, 2))  # the codebooks before
  np.testing.assert_array_equal(out.indices, indices)
  for i in range(2):
    old = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['batch_stats'][f'stage_{i}'])
    onehot = np.eye(K)[indices[:, i]]
    size = decay * old['ema_cluster_size'] + (1 - decay) * onehot.sum(0)
    ema_w = decay * old['ema_w'] + (1 - decay) * onehot.T @ residuals[i].astype(np.float64)
    if zero_debias:
      expected = {'ema_cluster_size': size, 'ema_w': ema_w, 'counter': 1}
      size, ema_w = size / (1 - decay), ema_w / (1 - decay)
    total = size.sum()
    smoothed = (size + eps) / (total + K * eps) * total
    if not zero_debias:
      expected = {'ema_cluster_size': smoothed, 'ema_w': ema_w}
    expected['embedding'] = ema_w / smoothed[:, None]
    new = state[f'stage_{i}']
    assert set(new) == set(expected)
    for name, value in expected.items():
      np.testing.assert_allclose(new[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ---- Quantizer dropout ----

def depths_of(indices):
  """int `[B]`: the stages each example used (the -1s must be a suffix, shared by all of an
  example's vectors)."""
  indices = np.asarray(indices)
  used = indices != -1
  per_example = used.reshape(len(indices), -1, used.shape[-1])
  assert (per_example == per_example[:, :1]).all()  # one draw per example
  depth = used.reshape(len(indices), -1, used.shape[-1])[:, 0].sum(-1)
  np.testing.assert_array_equal(used.reshape(len(indices), -1, used.shape[-1])[:, 0],
                                np.arange(used.shape[-1])[None] < depth[:, None])  # a prefix
  return depth


def test_quantizer_dropout_uses_the_first_n_stages_per_example():
  decay, beta = 0.9, 0.25
  x = normal((16, 3, 2, D))
  rvq = ResidualVQ(3, K, D, decay=decay, quantizer_dropout=1.0, commitment_cost=beta)
  variables = rvq.init(jax.random.key(0), x)
  out, state = apply(rvq, variables, x, train=True, key=7)
  again, state_again = apply(rvq, variables, x, train=True, key=7)
  chex.assert_trees_all_equal((out, state), (again, state_again))  # a function of the key
  other, _ = apply(rvq, variables, x, train=True, key=8)
  depth = depths_of(out.indices)
  assert set(depth) == {1, 2, 3}
  assert not np.array_equal(depths_of(other.indices), depth)

  flat_depth = np.repeat(depth, 6)
  indices, codes, residuals = hand_chain(np.asarray(x).reshape(-1, D), codebooks(variables, 3),
                                         flat_depth)
  np.testing.assert_array_equal(out.indices.reshape(-1, 3), indices)
  np.testing.assert_array_equal(out.quantized.reshape(-1, D), codes[0] + codes[1] + codes[2])
  np.testing.assert_array_equal(embed(rvq, variables, out.indices), out.quantized)
  # Counts, losses and EMA sums of the kept vectors only; the means divide by every vector.
  counts = [np.bincount(indices[:, i][indices[:, i] >= 0], minlength=K) for i in range(3)]
  np.testing.assert_array_equal(out.code_counts, counts)
  full_indices, full_codes, _ = hand_chain(np.asarray(x).reshape(-1, D), codebooks(variables, 3))
  errors = [np.sum((flat_depth > i)[:, None] * (residuals[i] - full_codes[i]).astype(np.float64)
                   ** 2) / x.size for i in range(3)]
  np.testing.assert_allclose(out.loss, beta * sum(errors), rtol=1e-5)
  np.testing.assert_allclose(
      out.perplexity, np.mean([perplexity_from_counts(jnp.asarray(c, jnp.float32))
                               for c in counts]), rtol=1e-5)
  for i in range(3):  # zero-debiased: the stored sizes and sums are (1 - decay) times them
    kept = flat_depth > i
    np.testing.assert_allclose(state[f'stage_{i}']['ema_cluster_size'],
                               (1 - decay) * np.asarray(counts[i]), rtol=1e-6)
    sums = np.eye(K)[full_indices[:, i]][kept].T @ residuals[i][kept].astype(np.float64)
    np.testing.assert_allclose(state[f'stage_{i}']['ema_w'], (1 - decay) * sums, rtol=1e-5,
                               atol=1e-6)
  # Every example keeps stage 0, whose straight-through gradient is the identity.
  g = normal(x.shape, seed=3)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(g * rvq.apply(
      variables, x, train=True, mutable=['batch_stats'],
      rngs={'codebook': jax.random.key(7)})[0].quantized)))(x)
  np.testing.assert_array_equal(grad, g)


def test_quantizer_dropout_rate_and_when_it_is_off():
  x = normal((400, D))
  rvq = ResidualVQ(3, K, D, decay=0.0, quantizer_dropout=0.5)
  variables = rvq.init(jax.random.key(0), x)
  out, _ = apply(rvq, variables, x, train=True, key=1)
  depth = depths_of(out.indices)
  full = np.mean(depth == 3)  # 0.5 + 0.5 / 3
  assert abs(full - 2 / 3) < 0.12 and np.mean(depth == 1) > 0.08 and np.mean(depth == 2) > 0.08
  # Not in eval calls (no rng needed), nor at rate 0.
  evaluated = apply(rvq, variables, x)
  assert (evaluated.indices >= 0).all()
  np.testing.assert_array_equal(evaluated.indices, apply(ResidualVQ(3, K, D, decay=0.0),
                                                         variables, x).indices)
  plain, _ = apply(ResidualVQ(3, K, D, decay=0.0), variables, x, train=True)
  assert (plain.indices >= 0).all()
  with pytest.raises(ValueError, match=r"quantizer_dropout > 0 draws the stages.*pass "
                                       r"rngs=\{'codebook': key\}"):
    rvq.apply(variables, x, train=True, mutable=['batch_stats'])


def test_quantizer_dropout_edge_shapes():
  """A single vector is one example; a batch whose later stages nobody uses keeps a finite
  perplexity (the mean over the used stages)."""
  rvq = ResidualVQ(3, K, D, quantizer_dropout=1.0)
  x = normal((D,))
  variables = rvq.init(jax.random.key(0), x)
  seen = set()
  for key in range(12):
    out, _ = apply(rvq, variables, x, train=True, key=key)
    depth = int(np.sum(np.asarray(out.indices) >= 0))
    seen.add(depth)
    assert np.isfinite(out.perplexity)
    np.testing.assert_allclose(out.perplexity, 1.0)  # one vector per used stage
    np.testing.assert_array_equal(out.code_counts.sum(1), [1] * depth + [0] * (3 - depth))
    np.testing.assert_array_equal(embed(rvq, variables, out.indices), out.quantized)
  assert seen == {1, 2, 3}


# ---- k-means init and restarts per stage ----

@pytest.mark.parametrize('decay', [0.9, 0.0], ids=['ema', 'plain'])
def test_kmeans_init_clusters_each_stages_residuals(decay):
  """x = A[a] + B[b] + noise: four coarse centres 100 apart, four fine offsets (mean 0) about
  1.4 apart. Stage 0's k-means finds A, stage 1's (on x - A[a]) finds B, not anything of x."""
  a_centres = 100.0 * np.array([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  b_offsets = np.array([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0, 0]], float)
  a, b = np.meshgrid(np.arange(4), np.arange(4), indexing='ij')
  a, b = np.tile(a.ravel(), 8), np.tile(b.ravel(), 8)
  x = jnp.asarray(a_centres[a] + b_offsets[b] + 1e-3 * np.asarray(normal((128, 4))),
                  jnp.float32)
  rvq = ResidualVQ(2, 4, 4, decay=decay, codebook_init='kmeans', kmeans_iters=5)
  variables = rvq.init(jax.random.key(0), x)
  out, state = apply(rvq, variables, x, train=True, key=3)
  new_variables = {**variables, 'batch_stats': state}
  books = [rvq.apply(new_variables, method=lambda m, i=i: m.stages[i].codebook)
           for i in range(2)]
  for book, truth in zip(books, (a_centres, b_offsets)):
    distance = np.abs(np.asarray(book)[:, None] - truth[None]).max(-1)
    np.testing.assert_array_less(distance.min(0), 1e-2)  # every true centre has a code
  # The call's lookup already used the centres: stage 0 groups by a, stage 1 by b.
  indices = np.asarray(out.indices)
  for stage, truth in ((0, a), (1, b)):
    assert len({(i, t) for i, t in zip(indices[:, stage], truth)}) == 4
  np.testing.assert_allclose(out.quantized, a_centres[a] + b_offsets[b], atol=1e-2)
  for i in range(2):
    assert int(state[f'stage_{i}']['counter']) == 1


def test_restarts_draw_from_each_stages_residuals():
  """Every code dead (threshold 1e9): each stage's new codes are rows of its own input,
  stage 1's the residuals x - c_0 of the call's lookup."""
  x = normal((64, D))
  rvq = ResidualVQ(2, K, D, decay=0.0, dead_code_threshold=1e9)
  variables = rvq.init(jax.random.key(0), x)
  _, state = apply(rvq, variables, x, train=True, key=2)
  _, _, residuals = hand_chain(x, codebooks(variables, 2))
  new_variables = {**variables, 'batch_stats': state}
  for i in range(2):
    book = np.asarray(rvq.apply(new_variables, method=lambda m, i=i: m.stages[i].codebook))
    distance = np.abs(book[:, None] - residuals[i][None]).max(-1)
    np.testing.assert_array_less(distance.min(1), 1e-5)
    np.testing.assert_array_equal(state[f'stage_{i}']['code_usage'], 1e9)
  stage_1 = np.asarray(rvq.apply(new_variables, method=lambda m: m.stages[1].codebook))
  assert np.abs(stage_1[:, None] - np.asarray(x)[None]).max(-1).min() > 1e-3


# ---- Dropout under jit and on 8 devices ----

def test_dropout_jit_equals_eager():
  x = normal((6, 5, D))
  rvq = ResidualVQ(3, K, D, quantizer_dropout=0.5)
  variables = rvq.init(jax.random.key(0), x)
  rngs = {'codebook': jax.random.key(4)}
  eager = rvq.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
  jitted = jax.jit(lambda v, x: rvq.apply(v, x, train=True, mutable=['batch_stats'],
                                          rngs=rngs))(variables, x)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(jitted[0].indices, eager[0].indices)


def test_sharded_jit_dropout_equals_one_device(mesh):
  x = normal((64, D))
  g = normal((64, D), seed=1)
  rvq = ResidualVQ(2, K, D, decay=0.9, quantizer_dropout=0.5)
  variables = rvq.init(jax.random.key(1), x)
  rngs = {'codebook': jax.random.key(2)}

  def stats(module, variables, x):
    out, updates = module.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
    return out.perplexity, out.code_counts, updates['batch_stats'], out.loss, out.indices

  def objective(module, variables, x, g, axis=None):
    """sum(g * quantized) + loss; inside shard_map (`axis`) each device's loss is the mean
    over its vectors and the pmean over devices the global one."""
    out = module.apply(variables, x)
    if axis is None:
      return jnp.sum(g * out.quantized) + out.loss
    return jax.lax.psum(jnp.sum(g * out.quantized), axis) + jax.lax.pmean(out.loss, axis)

  # Sharded jit, quantizer dropout included: the draw is global, as on one device.
  single = jax.jit(lambda v, x, g: (stats(rvq, v, x), jax.grad(
      lambda x: objective(rvq, v, x, g))(x)))(variables, x, g)
  assert (np.asarray(single[0][4]) == -1).any()
  replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  sharded = jax.jit(lambda v, x, g: (stats(rvq, v, x), jax.grad(
      lambda x: objective(rvq, v, x, g))(x)),
                    out_shardings=((replicated,) * 4 + (by_row,), by_row))(
                        jax.device_put(variables, replicated), jax.device_put(x, by_row),
                        jax.device_put(g, by_row))
  assert len(sharded[1].sharding.device_set) == 8
  chex.assert_trees_all_close(sharded, single, rtol=1e-5, atol=1e-6)


def test_shard_map_dropout_draws_differ_per_device(mesh):
  """Each device folds its axis index into the key: the devices' examples do not all get the
  same depths; the global counts are those of the returned indices."""
  x = normal((64, D))
  per_device = ResidualVQ(3, K, D, decay=0.9, quantizer_dropout=1.0, axis_name='data')
  variables = ResidualVQ(3, K, D).init(jax.random.key(1), x)  # axis_name needs shard_map

  def fields(v, x):
    out = per_device.apply(v, x, train=True, mutable=['batch_stats'],
                           rngs={'codebook': jax.random.key(2)})[0]
    return out.indices, out.code_counts

  indices, counts = jax.jit(jax.shard_map(fields, mesh=mesh, in_specs=(P(), P('data')),
                                          out_specs=(P('data'), P())))(variables, x)
  depth = depths_of(indices).reshape(8, 8)
  assert len({tuple(row) for row in depth}) > 1
  indices = np.asarray(indices)
  np.testing.assert_array_equal(
      counts, [np.bincount(indices[:, i][indices[:, i] >= 0], minlength=K) for i in range(3)])


def test_positional_fields():
  rvq = ResidualVQ(3, 16, 5, 0.5, 0.8, 1e-4, False, 0.25, 'data', 64)
  assert (rvq.num_quantizers, rvq.num_embeddings, rvq.embedding_dim, rvq.commitment_cost,
          rvq.decay, rvq.epsilon, rvq.zero_debias, rvq.quantizer_dropout, rvq.axis_name,
          rvq.distance_chunk_size) == (3, 16, 5, 0.5, 0.8, 1e-4, False, 0.25, 'data', 64)
