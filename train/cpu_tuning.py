"""Process settings that make training faster on XLA:CPU; the library itself sets none.

Two measured changes, both numerics-neutral, applied by the training programs
(`python -m train`, `train.bench`, `train.codebook_study`):

* `use_measured_cpu_fusions`: XLA:CPU hands each convolution, matmul and reduction to YNNPACK
  by default, and leaves the elementwise ops around them (bias, ReLU, their gradients, Adam) to
  its own loop emitter. The option hands YNNPACK the elementwise ops too, and no longer the
  convolutions on their own: a convolution that feeds an elementwise op joins that op's YNNPACK
  fusion, and the others (most of the gradients' convolutions) run in XLA's own Eigen kernels.
  - Elementwise ops: the seed's float32 step at batch 256 went from 313/332/319 to 301/303/304
    ms (three alternating runs each, 10 steps per call); batch 32 and bfloat16 within noise.
  - Convolutions: a lone 3x3 128 -> 128 convolution at batch 256 on 16x16 runs at 310 GFLOP/s
    in Eigen against 248 in YNNPACK. The float32 step, 10 per call, the two compiled in one
    process and alternated, allocator setting on: batch 256 from 268.5 to 241.0 ms (+11%),
    batch 32 from 31.7 to 30.1 ms (+5%); bfloat16 within 1% (its convolutions run in float32
    either way).
  Both measured on jaxlib 0.10.2, the 2-core CPU.
  XLA reads `XLA_FLAGS` once, when JAX starts its backend, so this must run before the first
  array is made. The option is experimental: it is set only for the jaxlib versions it was
  measured with (an unknown flag aborts XLA), and never over a user's own value.

* `keep_freed_memory`: each call of a compiled step allocates XLA's temporary buffers (42 MB at
  batch 32, 255 MB at 256) and frees them on return. glibc hands blocks over 32 MB to `mmap` and
  returns them to the OS on free, so every call page-faults them in again. With mmap off and
  trimming off, a block that fits a thread's malloc arena (heaps of 64 MB at most) is reused
  instead: at batch 32, one step per call, no faults against 10,790 a call, and 812 to 894
  images/s (processes alternated, jaxlib 0.10.2, the 2-core CPU); at 10 steps per call, which
  amortise the faults, within noise (1,088/1,092 against 1,058/1,111).
  The batch-256 temporaries are larger than a thread arena can hold, and glibc maps those
  afresh whatever the setting. So `apply` also turns off JAX's asynchronous CPU dispatch: a
  computation then runs on the calling thread, whose main arena grows without that limit, and
  its temporaries are reused too (65,400 faults a call before, about 40 after). EMA float32,
  processes alternated, setting on, images/s without and with synchronous dispatch:
  - batch 256: 906-920 against 1,060-1,159 at one step per call; 1,051-1,107 against
    1,118-1,126 at 10;
  - batch 32: 1,116-1,128 against 1,076-1,080 at one step per call (-4%, presumably because
    Python no longer prepares a call while the previous one runs); 872-1,122 against
    1,086-1,132 at 10.
  The trainer runs 10 steps per call. Sharing one arena among all threads (`M_ARENA_MAX` 1)
  keeps the large temporaries as well, but XLA's threads contend for it: at 10 steps per call
  930 against 1,090 images/s at batch 32 and 1,005 against 1,095 at 256. The cost of the
  setting is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import MutableMapping, Optional

import jaxlib

YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
# Exact names replace XLA's default list, which has LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_FUSION_TYPES = ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT', 'LIBRARY_FUSION_TYPE_ELTWISE',
                    'LIBRARY_FUSION_TYPE_REDUCE')
# Not 0.10.0 or 0.10.1: there the option's test fails (0.10.0's default already leaves a lone
# convolution to XLA; on 0.10.1 the option splits convolution, bias and ReLU across two fusions).
MEASURED_JAXLIB_VERSIONS = ('0.10.2',)
ASYNC_CPU_DISPATCH = 'jax_cpu_enable_async_dispatch'

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
# (parameter, value): no mmap for large blocks, never trim the heap, grow it 256 MB at a time.
# Threads keep their own arenas (the module docstring says why).
KEEP_FREED_MEMORY = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 28))


def use_measured_cpu_fusions(environ: Optional[MutableMapping[str, str]] = None,
                             jaxlib_version: str = jaxlib.__version__) -> bool:
  """Adds the YNNPACK fusion option to `XLA_FLAGS`; returns whether it did.

  Nothing changes when the user's `XLA_FLAGS` already sets the option, or when this jaxlib
  is not one the option was measured with.
  """
  environ = os.environ if environ is None else environ
  flags = environ.get('XLA_FLAGS', '')
  if YNN_FUSION_FLAG in flags or not jaxlib_version.startswith(MEASURED_JAXLIB_VERSIONS):
    return False
  environ['XLA_FLAGS'] = f'{flags} --{YNN_FUSION_FLAG}={",".join(YNN_FUSION_TYPES)}'.strip()
  return True


def keep_freed_memory(libc: Optional[ctypes.CDLL] = None) -> bool:
  """Makes glibc keep freed memory for reuse (see the module docstring); returns whether it did.

  Does nothing where the C library is not glibc. Call it when the step runs on the CPU.
  """
  if libc is None:
    if platform.libc_ver()[0] != 'glibc':
      return False
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  # mallopt returns 1 on success, 0 on error.
  return all([libc.mallopt(parameter, value) == 1 for parameter, value in KEEP_FREED_MEMORY])


def apply(cpu_fusions: bool = True, keep_memory: bool = True) -> dict:
  """The chosen settings (both by default, as the training programs use them); returns which
  took effect.

  Call it before anything starts JAX's backend (`jax.distributed.initialize` may come first).
  Freed memory is kept only when the backend is the CPU; with it, JAX's CPU client runs
  computations on the calling thread (see the module docstring).
  """
  applied = dict(xla_cpu_fusions=cpu_fusions and use_measured_cpu_fusions())
  import jax  # pylint: disable=g-import-not-at-top
  if keep_memory:
    # Read when the CPU client is made, so before `default_backend` makes it. Computations
    # over several devices are dispatched asynchronously whatever its value.
    jax.config.update(ASYNC_CPU_DISPATCH, False)
  applied['keep_freed_memory'] = (keep_memory and jax.default_backend() == 'cpu' and
                                  keep_freed_memory())
  return applied
