"""Test-session environment, for tests/ and the notebook run by nbmake alike.

* Eight CPU devices, so multi-device tests run anywhere. XLA reads the flag once, when JAX
  first initialises its backend, so it is set before any test module imports jax.
* VQVAE_NOTEBOOK_SMOKE=1: colab/vqvae_tpu.ipynb trains a tiny model for a few steps on the
  bundled photos instead of CIFAR-10 (the kernel inherits this environment).
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('VQVAE_NOTEBOOK_SMOKE', '1')
