"""Test-session environment, for tests/ and the notebook run by nbmake alike.

* Eight CPU devices, so multi-device tests run anywhere. XLA reads the flag once, when JAX
  first initialises its backend, so it is set before any test module imports jax.
* XLA:CPU aborts the process when the 8 device threads of a collective do not all arrive
  within its timeout; on an oversubscribed 2-core machine they can be slow (seen: eval steps
  aborting under load), so the tests give them minutes instead of seconds.
* Eigen ops single-threaded (`--xla_cpu_multi_thread_eigen=false`). With 8 devices sharing
  XLA:CPU's 8-thread Eigen pool, a device's program continues on the pool thread that ran its
  Eigen convolution and then waits there in an all-reduce for the other devices. Once seven
  did that, the eighth device's program never started, and the test run hung with no CPU use
  (gdb: seven `tf_XLAEigen` threads in `InProcessCommunicator::AllReduce`, the eighth launch
  in `Semaphore::Acquire`; seen once, in the second of this stop's CI runs). Single-threaded
  Eigen ops run on the device's own thread.
* VQVAE_NOTEBOOK_SMOKE=1: colab/vqvae_tpu.ipynb trains a tiny model for a few steps on the
  bundled photos instead of CIFAR-10 (the kernel inherits this environment).
"""

import os

XLA_FLAGS_FOR_DEVICES = ('--xla_force_host_platform_device_count={} '
                         '--xla_cpu_collective_call_terminate_timeout_seconds=900 '
                         '--xla_cpu_collective_timeout_seconds=900 '
                         '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('XLA_FLAGS', XLA_FLAGS_FOR_DEVICES.format(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('VQVAE_NOTEBOOK_SMOKE', '1')


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def mesh():
  """The 8 CPU devices on one `data` axis, for the multi-device tests."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 8:
    pytest.fail('needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8')
  return Mesh(np.array(jax.devices()[:8]), ('data',))


def normal(shape, seed=0, scale=1.0):
  """float32 normal samples of `shape`, scaled, from `jax.random.key(seed)`."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.normal(jax.random.key(seed), shape) * scale


def read_metrics(workdir):
  """The lines of a training run's `metrics.jsonl`, as dicts."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]
