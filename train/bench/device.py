"""The device a benchmark ran on, and its peak FLOP/s: data sheets for accelerators, an estimate
from /proc/cpuinfo for CPUs."""

from __future__ import annotations

import importlib.util
import os
import platform
from pathlib import Path
from typing import Any, Dict, Optional

import jax

# Dense peak TFLOP/s by device_kind substring: (float32, bfloat16), from the vendors' data
# sheets (SXM parts for NVIDIA). The float32 column is the TF32 tensor-core peak: XLA and
# PyTorch both run float32 convolutions as TF32 on these GPUs by default. TPUs run float32
# matmuls as bfloat16 passes, so only the bfloat16 peak is listed for them.
ACCELERATOR_PEAK_TFLOPS = {
    'H200': (494.7, 989.0),
    'H100': (494.7, 989.0),
    'A100': (156.0, 312.0),
    'L4': (60.0, 121.0),
    'A10G': (62.5, 125.0),
    'TPU v6': (None, 918.0),
    'TPU v5p': (None, 459.0),
    'TPU v5': (None, 197.0),  # v5e, which reports 'TPU v5 lite'
    'TPU v4': (None, 275.0),
}


def cpu_model() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _cpu_flags() -> set:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return set(line.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def _cpu_mhz() -> Optional[float]:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('cpu MHz'):
        return float(line.split(':', 1)[1])
  except (OSError, ValueError):
    pass
  return None


def device_description() -> Dict[str, Any]:
  device = jax.devices()[0]
  description = dict(platform=device.platform, device_kind=device.device_kind,
                     num_devices=jax.device_count(), cpu_model=cpu_model(),
                     cpu_count=os.cpu_count(), jax_version=jax.__version__,
                     xla_flags=os.environ.get('XLA_FLAGS', ''))
  if importlib.util.find_spec('torch') is not None:
    import torch  # pylint: disable=g-import-not-at-top
    description['torch_version'] = torch.__version__
    if torch.cuda.is_available():
      # TF32 convolutions are PyTorch's default on NVIDIA GPUs, as they are XLA's.
      description.update(torch_device=torch.cuda.get_device_name(),
                         torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                         torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                         torch_memory='torch.cuda.max_memory_allocated, reset per configuration')
  return description


def peak_tflops(dtype: str, cpu_peak_gflops: Optional[float] = None) -> tuple:
  """`(peak TFLOP/s or None, how it was obtained)` for the first device and `dtype`."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    if cpu_peak_gflops:
      return cpu_peak_gflops / 1e3, 'given by --cpu_peak_gflops'
    flags, mhz = _cpu_flags(), _cpu_mhz()
    if mhz is None:
      return None, 'unknown: /proc/cpuinfo has no cpu MHz'
    # float32 FLOPs per cycle per core, assuming two FMA units: 2 x 2 x (vector width / 32).
    lanes = 16 if 'avx512f' in flags else 8 if {'avx2', 'fma'} <= flags else 4
    per_cycle = 2 * 2 * lanes
    cores = os.cpu_count() or 1
    note = (f'estimated: {cores} cores x {mhz:.0f} MHz x {per_cycle} float32 FLOP/cycle '
            f'({lanes} lanes, 2 FMA units assumed)')
    if dtype == 'bfloat16' and 'avx512_bf16' in flags:
      # VDPBF16PS does two bfloat16 multiply-adds per float32 lane. PyTorch's oneDNN
      # convolutions use it; XLA:CPU converts bfloat16 convolutions to float32 and uses it
      # only in matmuls.
      per_cycle *= 2
      note += ', x2 for avx512_bf16 dot products'
    return cores * mhz * 1e6 * per_cycle / 1e12, note
  for name, (fp32, bf16) in ACCELERATOR_PEAK_TFLOPS.items():
    if name in device.device_kind:
      peak = bf16 if dtype == 'bfloat16' or fp32 is None else fp32
      kind = 'bfloat16' if dtype == 'bfloat16' or fp32 is None else 'TF32'
      return peak, f'data sheet, dense {kind}, {name}'
  return None, f'unknown device_kind {device.device_kind!r}'
