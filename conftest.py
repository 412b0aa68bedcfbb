"""Test-session environment, for tests/ and the notebook run by nbmake alike.

* Eight CPU devices, so multi-device tests run anywhere. XLA reads the flag once, when JAX
  first initialises its backend, so it is set before any test module imports jax.
* Collective timeouts of minutes, not seconds: XLA:CPU aborts the process when the 8 device
  threads of a collective do not all arrive in time, and on an oversubscribed 2-core machine
  they can be slow.
* Eigen ops single-threaded (`--xla_cpu_multi_thread_eigen=false`): with 8 devices sharing
  XLA:CPU's 8-thread Eigen pool, a device's program can continue on the pool thread that ran
  its convolution and wait there in an all-reduce; once seven do, the eighth never starts and
  the run hangs. Single-threaded Eigen ops run on the device's own thread (docs/performance.md
  tells how the hang was found).
* VQVAE_NOTEBOOK_SMOKE=1: colab/vqvae_tpu.ipynb trains a tiny model for a few steps on the
  bundled photos instead of CIFAR-10 (the kernel inherits this environment).
* A persistent compilation cache in a fresh directory per test session, every program cached:
  the tests compile the same tiny programs many times (each run builds new jit functions, and
  the command-line tests start new processes, which inherit the directory), and a cached one
  loads in a fraction of its compile time. The cache is keyed by the program, the jax version
  and the XLA flags, so it never serves a different program; a fresh directory keeps each
  session's compiles its own.
* XLA's C++ logs only fatal errors (TF_CPP_MIN_LOG_LEVEL=3), in the tests and the programs they
  start: jaxlib 0.10.1 logs an error line for each program it loads from that cache (it reads
  the compiling machine's tuning features, `+prefer-no-gather`, as missing on the same
  machine), and the command-line tests check that a user error is the only line on stderr.
"""

import atexit
import os
import shutil
import tempfile

XLA_FLAGS_FOR_DEVICES = ('--xla_force_host_platform_device_count={} '
                         '--xla_cpu_collective_call_terminate_timeout_seconds=900 '
                         '--xla_cpu_collective_timeout_seconds=900 '
                         '--xla_cpu_multi_thread_eigen=false')
os.environ.setdefault('XLA_FLAGS', XLA_FLAGS_FOR_DEVICES.format(8))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('VQVAE_NOTEBOOK_SMOKE', '1')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='vqvae-jax-compiled-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


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
