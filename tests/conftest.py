"""Eight CPU devices for every test, so multi-device tests run on a laptop and in CI.

XLA reads the flag once, when JAX first initialises its backend, so it is set before any test
module imports jax."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
