"""The XLA:CPU option that the training programs set; the library itself sets none.

XLA:CPU hands convolutions, matmuls and reductions to its YNNPACK backend by default, and
leaves the elementwise ops around them (bias, ReLU, their gradients, Adam) to its own loop
emitter. Handing YNNPACK the elementwise ops too made the seed's float32 training step at
batch 256 5-9% faster (three alternating runs each: 313/332/319 against 301/303/304 ms with
jaxlib 0.10.2 on the 2-core CPU); batch 32 and bfloat16 stayed within noise.

XLA reads `XLA_FLAGS` once, when JAX starts its backend, so `use_measured_cpu_fusions` must
run before the first array is made. The option is experimental: it is set only for the jaxlib
versions it was measured with (an unknown flag aborts XLA), and never over a user's own value.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

import jaxlib

YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
YNN_FUSION_TYPES = ('LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION',
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT', 'LIBRARY_FUSION_TYPE_ELTWISE',
                    'LIBRARY_FUSION_TYPE_REDUCE')
MEASURED_JAXLIB_VERSIONS = ('0.10.',)


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
