"""Training-step throughput of the seed config against the seed's PyTorch, and large codebooks.

    python -m train.bench --out benchmarks/cpu.json --markdown benchmarks/cpu.md
    python -m train.bench --batch_sizes=256 --dtypes=float32 --quantizers=ema --steps=5
    python -m train.bench --steps_per_dispatch=1,20 --out benchmarks/gpu.json  # on a GPU

For each quantizer (EMA 0.99 and plain), batch size and dtype it times the jit-compiled step of
`train.step` (`create_train_state`, `make_train_step`, `jax.jit(..., donate_argnums=0)`) after
compilation, and on the same device and batch the seed's PyTorch model (eager and
`torch.compile`) when torch is installed, on the GPU when torch sees one, in the same dtype:
float32 is the seed as written (with PyTorch's default TF32 convolutions on GPUs), bfloat16 is the
seed under `torch.autocast(dtype=torch.bfloat16)`, PyTorch's mixed precision (float32 parameters
and optimizer, bfloat16 convolutions and matmuls). Ratios compare the same dtype. It reports
images/s, peak memory, XLA's FLOP count and the fraction of the device's peak, then times
`nearest_code` with a 65,536-code codebook.

`--steps_per_dispatch=k` also times the trainer's way of running: `k` optimizer steps in one
`lax.scan` per jit call, which removes the per-step Python and launch overhead that bounds a model
this small on an accelerator. The report is rewritten after each configuration, so an interrupted
run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import cpu_tuning
from train.step import create_train_state, make_train_step
from vqvae_jax import VQVAE
from vqvae_jax.codebook import nearest_code, nearest_in_distances, squared_distances

SEED_TORCH = Path(__file__).resolve().parent.parent / 'tests' / 'golden' / 'seed_torch.py'
# The seed config: Model(128, 2, 32, 512, 64, 0.25, decay), Adam 3e-4, 32x32x3 images.
SEED_MODEL = dict(num_hiddens=128, num_residual_layers=2, num_residual_hiddens=32,
                  num_embeddings=512, embedding_dim=64, commitment_cost=0.25)
DECAYS = {'ema': 0.99, 'plain': 0.0}
LEARNING_RATE = 3e-4
IMAGE_SIZE = 32
DATA_VARIANCE = 0.06327  # CIFAR-10's, as in the seed's notebook; it does not change the speed.

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


@dataclasses.dataclass
class Measurement:
  """One timed configuration."""

  framework: str  # 'jax', 'torch eager' or 'torch.compile'
  quantizer: str
  batch_size: int
  dtype: str
  steps_per_dispatch: int = 1
  images_per_s: Optional[float] = None
  step_ms: Optional[float] = None
  peak_memory_mb: Optional[float] = None
  peak_memory_increase_mb: Optional[float] = None  # over the memory in use before it started
  # XLA's own account of the compiled step: arguments + outputs + temporaries - donated aliases.
  executable_memory_mb: Optional[float] = None
  flops_per_step: Optional[float] = None
  achieved_tflops: Optional[float] = None
  fraction_of_peak: Optional[float] = None
  compile_s: Optional[float] = None
  skipped: Optional[str] = None
  note: Optional[str] = None


# --------------------------------------------------------------------------------------------
# Device, memory and peak FLOP/s.


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


class PeakMemory:
  """Peak memory over a block of work: the device allocator's peak, else the process's RSS.

  On CPU, JAX's buffers live in the process, so the peak resident set size is the measure. Linux
  resets it on writing 5 to /proc/self/clear_refs; where that fails the value is the process's
  lifetime peak (`getrusage`), which only grows.
  """

  def __init__(self):
    self.source = ''

  def __enter__(self):
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      self.source = 'device allocator peak_bytes_in_use (lifetime peak)'
      self.baseline_bytes = stats['bytes_in_use']
    else:
      try:
        Path('/proc/self/clear_refs').write_text('5')
        self.source = 'process peak RSS (VmHWM, reset before each measurement)'
      except OSError:
        self.source = 'process lifetime peak RSS (getrusage; not resettable here)'
      self.baseline_bytes = _proc_status_bytes('VmRSS:')
    return self

  def __exit__(self, *exc):
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      self.peak_bytes = stats['peak_bytes_in_use']
    elif 'VmHWM' in self.source:
      self.peak_bytes = _proc_status_bytes('VmHWM:')
    else:
      self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return False

  @property
  def increase_mb(self) -> float:
    return (self.peak_bytes - self.baseline_bytes) / 2**20


class TorchCudaPeakMemory:
  """PyTorch's CUDA allocator peak over a block of work, reset at its start."""

  def __init__(self, torch):
    self.torch = torch

  def __enter__(self):
    self.torch.cuda.synchronize()
    self.torch.cuda.reset_peak_memory_stats()
    self.baseline_bytes = self.torch.cuda.memory_allocated()
    return self

  def __exit__(self, *exc):
    self.torch.cuda.synchronize()
    self.peak_bytes = self.torch.cuda.max_memory_allocated()
    return False

  @property
  def increase_mb(self) -> float:
    return (self.peak_bytes - self.baseline_bytes) / 2**20


def _proc_status_bytes(field: str) -> int:
  try:
    for line in Path('/proc/self/status').read_text().splitlines():
      if line.startswith(field):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class Timed:
  """A prepared (compiled, warmed-up) training step and what is known about it so far."""

  measurement: Measurement
  run: Optional[Callable[[], Any]] = None  # one training step; None when skipped
  wait: Callable[[Any], Any] = jax.block_until_ready  # blocks on what `run` returned
  peak_flops: Optional[float] = None
  steps_per_call: int = 1  # optimizer steps that one `run` does

  def record(self, step_s: float) -> Measurement:
    m = self.measurement
    m.step_ms, m.images_per_s = step_s * 1e3, m.batch_size / step_s
    if m.flops_per_step:
      m.achieved_tflops = m.flops_per_step / step_s / 1e12
      if self.peak_flops:
        m.fraction_of_peak = m.achieved_tflops / self.peak_flops
    return m


def time_interleaved(prepared: Sequence[Timed], steps: int, rounds: int) -> List[Measurement]:
  """Seconds per step of each prepared step: the fastest of `rounds` rounds of `steps` steps.

  The rounds of all frameworks alternate, so that each sees the same background load, and the
  fastest round is the one least disturbed by other processes on a shared machine. That
  matters most for PyTorch, whose OpenMP threads slow down several-fold when a core is taken.
  """
  best = [float('inf')] * len(prepared)
  for _ in range(rounds):
    for i, timed in enumerate(prepared):
      if timed.run is None:
        continue
      calls = max(1, steps // timed.steps_per_call)
      start = time.perf_counter()
      for _ in range(calls):
        out = timed.run()
      timed.wait(out)
      best[i] = min(best[i], (time.perf_counter() - start) / (calls * timed.steps_per_call))
  return [timed.record(step_s) if timed.run else timed.measurement
          for timed, step_s in zip(prepared, best)]


def _executable_mb(compiled) -> Optional[float]:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    return None
  if analysis is None:
    return None
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return total / 2**20


def _compiled_or_none_mb(lowered) -> Optional[float]:
  """The executable memory of `lowered`, or None when it cannot even be compiled: the direct
  search over 1M vectors asks XLA for more memory than most devices have."""
  try:
    return _executable_mb(lowered.compile())
  except Exception:  # pylint: disable=broad-except  # out-of-memory at compile time, per backend
    return None


def step_flops(train_steps, *args) -> Optional[float]:
  """FLOPs of one call of `train_steps(*args)`, as XLA counts them before its backend passes.

  Counted by XLA:CPU, which every JAX has, on the function lowered for TPU: that is the form
  GPUs and TPUs run, whole batches at once, so every device reports the same FLOPs. The CPU
  form computes kernel gradients and the code search over blocks in loops, and a loop body
  counts once whatever its trip count (at batch 256 it counted 43 GFLOP against 60); for the
  same reason `args` should hold one step. Not after backend passes either: there, GPU
  convolutions are cuDNN custom calls that the cost analysis does not count, and jax 0.11.2's
  GPU backend gave no analysis of lowered code at all.
  """
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  on_cpu = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
  return _cost_flops(train_steps.trace(*on_cpu).lower(lowering_platforms=('tpu',)))


def _cost_flops(stage) -> Optional[float]:
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


# --------------------------------------------------------------------------------------------
# JAX.


def prepare_jax(quantizer: str, batch_size: int, dtype: str,
                model_config: Optional[Dict[str, Any]] = None, image_size: int = IMAGE_SIZE,
                cpu_peak_gflops: Optional[float] = None, steps_per_dispatch: int = 1) -> Timed:
  """The jitted training step of `train.step`, compiled and run once; `run` does
  `steps_per_dispatch` optimizer steps in one call, and the figures are per optimizer step."""
  model = VQVAE(**(model_config or SEED_MODEL), decay=DECAYS[quantizer],
                dtype=jnp.dtype(dtype))
  tx = optax.adam(LEARNING_RATE)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(
      0, 256, (steps_per_dispatch, batch_size, image_size, image_size, 3), dtype=np.uint8))
  data_variance = jnp.float32(DATA_VARIANCE)
  with PeakMemory() as memory:
    state = create_train_state(model, tx, jax.random.key(0), images[0])
    train_steps = jax.jit(make_train_step(model, tx), donate_argnums=0)
    start = time.perf_counter()
    compiled = train_steps.lower(state, images, data_variance).compile()
    compile_s = time.perf_counter() - start
    flops_per_step = step_flops(train_steps, state, images[:1], data_variance)
    state, metrics = compiled(state, images, data_variance)  # the first run allocates
    if not np.isfinite(float(metrics['loss'])):
      raise FloatingPointError(f'non-finite loss in {quantizer} {dtype} batch {batch_size}')

  def run():
    nonlocal state
    state, metrics = compiled(state, images, data_variance)
    return metrics

  measurement = Measurement('jax', quantizer, batch_size, dtype, steps_per_dispatch,
                            peak_memory_mb=memory.peak_bytes / 2**20,
                            peak_memory_increase_mb=memory.increase_mb,
                            executable_memory_mb=_executable_mb(compiled),
                            flops_per_step=flops_per_step, compile_s=compile_s)
  return Timed(measurement, run, peak_flops=peak_tflops(dtype, cpu_peak_gflops)[0],
               steps_per_call=steps_per_dispatch)


def bench_jax(quantizer: str, batch_size: int, dtype: str, steps: int, rounds: int = 1,
              **kwargs) -> Measurement:
  """`prepare_jax`, timed alone."""
  return time_interleaved([prepare_jax(quantizer, batch_size, dtype, **kwargs)], steps,
                          rounds)[0]


# --------------------------------------------------------------------------------------------
# The seed's PyTorch.


# The seed's one-hot: an integer 1 scattered into a float tensor. Inductor (torch 2.11 on CUDA)
# infers int64 for it and fails to compile; a float 1.0 is the same one-hot.
SEED_SCATTER, FLOAT_SCATTER = 'scatter_(1, encoding_indices, 1)', 'scatter_(1, encoding_indices, 1.0)'


def _import_seed_torch(float_scatter: bool = False):
  """`tests/golden/seed_torch.py` as a module; `float_scatter` swaps in `FLOAT_SCATTER`."""
  source = SEED_TORCH.read_text(encoding='utf-8')
  if float_scatter:
    assert source.count(SEED_SCATTER) == 2, 'the seed no longer has its two scatter_ calls'
    source = source.replace(SEED_SCATTER, FLOAT_SCATTER)
  module = types.ModuleType('seed_torch')
  exec(compile(source, str(SEED_TORCH), 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


def prepare_torch(quantizer: str, batch_size: int, compile_model: bool,
                  dtype: str = 'float32') -> Timed:
  """The seed's training step, eager or `torch.compile`d, warmed up: Adam on
  `mse(recon, x) / var + vq_loss`, on the GPU when torch sees one. With `dtype='bfloat16'` the
  forward pass and loss run under `torch.autocast(dtype=torch.bfloat16)`. Skipped, with the
  reason, when torch or the compiler fails. Where `torch.compile` fails on the seed as written,
  it is tried once more with `FLOAT_SCATTER`, and the measurement's note says so."""
  result = _prepare_torch(quantizer, batch_size, compile_model, dtype, float_scatter=False)
  if compile_model and result.run is None and 'failed' in (result.measurement.skipped or ''):
    retry = _prepare_torch(quantizer, batch_size, compile_model, dtype, float_scatter=True)
    if retry.run is not None:
      retry.measurement.note = (f'with {FLOAT_SCATTER!r}: as written, '
                                f'{result.measurement.skipped}')[:300]
      return retry
  return result


def _prepare_torch(quantizer: str, batch_size: int, compile_model: bool, dtype: str,
                   float_scatter: bool) -> Timed:
  framework = 'torch.compile' if compile_model else 'torch eager'
  result = Timed(Measurement(framework, quantizer, batch_size, dtype))
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as error:
    result.measurement.skipped = f'torch is not installed ({error})'
    return result
  if not SEED_TORCH.exists():
    result.measurement.skipped = f'the seed model {SEED_TORCH} is missing'
    return result
  seed = _import_seed_torch(float_scatter)
  torch.manual_seed(0)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = seed.Model(SEED_MODEL['num_hiddens'], SEED_MODEL['num_residual_layers'],
                     SEED_MODEL['num_residual_hiddens'], SEED_MODEL['num_embeddings'],
                     SEED_MODEL['embedding_dim'], SEED_MODEL['commitment_cost'],
                     DECAYS[quantizer]).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
  images = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device) - 0.5
  forward = torch.compile(model) if compile_model else model

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      vq_loss, recon, _ = forward(images)
      loss = F.mse_loss(recon, images) / DATA_VARIANCE + vq_loss
    loss.backward()
    optimizer.step()
    return loss

  memory = PeakMemory() if device.type == 'cpu' else TorchCudaPeakMemory(torch)
  with memory:
    start = time.perf_counter()
    try:
      for _ in range(3):  # torch.compile compiles again once the optimizer has state
        step().item()
    except Exception as error:  # torch.compile raises many types; all mean "not available".
      result.measurement.skipped = f'{framework} failed: {type(error).__name__}: {error}'[:300]
      return result
  result.measurement.compile_s = time.perf_counter() - start
  result.measurement.peak_memory_mb = memory.peak_bytes / 2**20
  result.measurement.peak_memory_increase_mb = memory.increase_mb
  result.run, result.wait = step, lambda loss: loss.item()
  return result


# --------------------------------------------------------------------------------------------
# Large codebooks.


def bench_large_codebook(num_vectors: int, num_codes: int, dim: int, chunk_size: int,
                         subset: int) -> Dict[str, Any]:
  """`nearest_code` over `num_vectors` with `num_codes` codes, chunked, against the direct
  `[N, K]` computation on the first `subset` vectors (the full direct matrix does not fit)."""
  keys = jax.random.split(jax.random.key(1), 2)
  codebook = jax.random.normal(keys[0], (num_codes, dim), jnp.float32)
  vectors = jax.random.normal(keys[1], (num_vectors, dim), jnp.float32)
  jax.block_until_ready((codebook, vectors))
  # The whole [N, K] matrix at once: `nearest_code` without a chunk size works in blocks on CPU.
  direct_search = jax.jit(lambda x, e: nearest_in_distances(squared_distances(x, e)))
  direct_full = direct_search.lower(vectors, codebook)
  with PeakMemory() as chunked_memory:
    start = time.perf_counter()
    chunked = jax.jit(lambda x, e: nearest_code(x, e, chunk_size)).lower(vectors,
                                                                         codebook).compile()
    indices = jax.block_until_ready(chunked(vectors, codebook))
    chunked_s = time.perf_counter() - start  # includes compilation, which is ~1 s of it
  with PeakMemory() as direct_memory:
    direct = direct_search.lower(vectors[:subset], codebook).compile()
    direct_indices = jax.block_until_ready(direct(vectors[:subset], codebook))
  # Distances tie to the last bit only by chance; count them rather than fail on them.
  distances = squared_distances(vectors[:subset], codebook)
  picked = jnp.take_along_axis(distances, indices[:subset, None], axis=1)[:, 0]
  best = jnp.min(distances, axis=1)
  return dict(
      num_vectors=num_vectors, num_codes=num_codes, dim=dim, chunk_size=chunk_size,
      subset=subset, seconds_chunked_with_compile=chunked_s,
      vectors_per_s=num_vectors / chunked_s,
      indices_equal_on_subset=int(jnp.sum(indices[:subset] == direct_indices)),
      indices_at_min_distance_on_subset=int(jnp.sum(picked == best)),
      peak_memory_mb_chunked_full=chunked_memory.peak_bytes / 2**20,
      peak_memory_increase_mb_chunked_full=chunked_memory.increase_mb,
      peak_memory_mb_direct_subset=direct_memory.peak_bytes / 2**20,
      peak_memory_increase_mb_direct_subset=direct_memory.increase_mb,
      executable_memory_mb_chunked_full=_executable_mb(chunked),
      executable_memory_mb_direct_subset=_executable_mb(direct),
      executable_memory_mb_direct_full=_compiled_or_none_mb(direct_full),
      distance_matrix_mb_chunk=chunk_size * num_codes * 4 / 2**20,
      distance_matrix_mb_direct_subset=subset * num_codes * 4 / 2**20,
      distance_matrix_mb_direct_full_theoretical=num_vectors * num_codes * 4 / 2**20,
      memory_source=chunked_memory.source)


# --------------------------------------------------------------------------------------------
# Report.


def ratios(measurements: Sequence[Measurement]) -> List[Dict[str, Any]]:
  """One row per JAX measurement, with its ratios to PyTorch at the same quantizer, batch and
  dtype."""
  torch_ips = {(m.framework, m.quantizer, m.batch_size, m.dtype): m.images_per_s
               for m in measurements if m.framework != 'jax'}
  rows = []
  for m in measurements:
    if m.framework != 'jax':
      continue
    eager = torch_ips.get(('torch eager', m.quantizer, m.batch_size, m.dtype))
    compiled = torch_ips.get(('torch.compile', m.quantizer, m.batch_size, m.dtype))
    rows.append(dict(quantizer=m.quantizer, batch_size=m.batch_size, dtype=m.dtype,
                     steps_per_dispatch=m.steps_per_dispatch, jax_images_per_s=m.images_per_s,
                     torch_eager_images_per_s=eager,
                     torch_compile_images_per_s=compiled,
                     jax_over_torch_eager=m.images_per_s / eager if eager else None,
                     jax_over_torch_compile=m.images_per_s / compiled if compiled else None))
  return rows


def _fmt(value, spec='.1f'):
  return '-' if value is None else format(value, spec)


def markdown(report: Dict[str, Any]) -> str:
  device = report['device']
  lines = [f"Device: {device['platform']} / {device['device_kind']} / {device['cpu_model']} "
           f"({device['cpu_count']} CPUs), jax {device['jax_version']}, torch "
           f"{device.get('torch_version', '-')} on {device.get('torch_device', 'the CPU')}.",
           f"CPU settings (train/cpu_tuning.py; keep_freed_memory's glibc setting applies to "
           f"both frameworks, its synchronous dispatch to JAX): {device.get('cpu_tuning')}; "
           f"XLA_FLAGS: "
           f"`{device.get('xla_flags') or '(none)'}`.",
           f"Peak FLOP/s: {report['peak_note']}.", f"Memory: {report['memory_source']}"
           f"{'; PyTorch: ' + device['torch_memory'] if 'torch_memory' in device else ''}.",
           f"Load average (1 min) before and after: "
           f"{report.get('load_average_1min_before_after')}; each number is the fastest of "
           f"several rounds, and the rounds of all frameworks alternate.", '',
           'JAX steps per dispatch: k optimizer steps in one jit call (the trainer\'s '
           '`steps_per_dispatch`); PyTorch runs one step per call, its bfloat16 under '
           '`torch.autocast`. Ratios compare the same dtype.', '',
           '| quantizer | batch | dtype | JAX k | JAX img/s | torch eager | torch.compile | '
           'JAX/eager | JAX/compile |', '|---|---|---|---|---|---|---|---|---|']
  for row in report['ratios']:
    lines.append(
        f"| {row['quantizer']} | {row['batch_size']} | {row['dtype']} | "
        f"{row['steps_per_dispatch']} | "
        f"{_fmt(row['jax_images_per_s'])} | {_fmt(row['torch_eager_images_per_s'])} | "
        f"{_fmt(row['torch_compile_images_per_s'])} | {_fmt(row['jax_over_torch_eager'], '.2f')}"
        f" | {_fmt(row['jax_over_torch_compile'], '.2f')} |")
  lines += ['', '| framework | quantizer | batch | dtype | k | step ms | peak MB (+increase) | '
            'XLA executable MB | GFLOP/step | TFLOP/s | of peak | compile s | note |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for m in report['measurements']:
    flops = m['flops_per_step'] / 1e9 if m['flops_per_step'] else None
    lines.append(
        f"| {m['framework']} | {m['quantizer']} | {m['batch_size']} | {m['dtype']} | "
        f"{m.get('steps_per_dispatch', 1)} | "
        f"{_fmt(m['step_ms'])} | {_fmt(m['peak_memory_mb'], '.0f')} "
        f"({_fmt(m['peak_memory_increase_mb'], '+.0f')}) | "
        f"{_fmt(m.get('executable_memory_mb'), '.0f')} | {_fmt(flops)} | "
        f"{_fmt(m['achieved_tflops'], '.3f')} | {_fmt(m['fraction_of_peak'], '.1%')} | "
        f"{_fmt(m['compile_s'])} | {m['skipped'] or m.get('note') or ''} |")
  large = report.get('large_codebook')
  if large:
    lines += ['', f"Large codebook: K={large['num_codes']}, D={large['dim']}, "
              f"N={large['num_vectors']}, chunk {large['chunk_size']}: "
              f"{large['seconds_chunked_with_compile']:.1f} s with compilation; indices equal to "
              f"the direct computation on {large['indices_equal_on_subset']} of "
              f"{large['subset']} vectors ({large['indices_at_min_distance_on_subset']} at the "
              f"minimum distance). Peak memory increase: chunked over all N "
              f"{large['peak_memory_increase_mb_chunked_full']:.0f} MB (its [chunk, K] distances: "
              f"{large['distance_matrix_mb_chunk']:.0f} MB), direct over the subset "
              f"{large['peak_memory_increase_mb_direct_subset']:.0f} MB (distances "
              f"{large['distance_matrix_mb_direct_subset']:.0f} MB); the direct [N, K] float32 "
              f"distances over all N would need "
              f"{large['distance_matrix_mb_direct_full_theoretical'] / 1024:.1f} GiB. "
              f"XLA's executable memory: chunked over all N "
              f"{_fmt(large.get('executable_memory_mb_chunked_full'), '.0f')} MB, direct over "
              f"all N {_fmt(large.get('executable_memory_mb_direct_full'), '.0f')} MB "
              f"('-': could not be compiled)."]
  return '\n'.join(lines) + '\n'


def _csv(kind):
  return lambda text: [kind(item) for item in text.split(',') if item]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quantizers', type=_csv(str), default=['ema', 'plain'],
                      help='comma-separated: ema, plain')
  parser.add_argument('--batch_sizes', type=_csv(int), default=[32, 256])
  parser.add_argument('--dtypes', type=_csv(str), default=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=5, help='timed steps per round')
  parser.add_argument('--steps_per_dispatch', type=_csv(int), default=[1],
                      help='comma-separated k: JAX optimizer steps per jit call (lax.scan)')
  parser.add_argument('--rounds', type=int, default=3,
                      help='interleaved rounds per configuration; the fastest is reported')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True,
                      help='time the seed PyTorch model (eager)')
  parser.add_argument('--torch_compile', action=argparse.BooleanOptionalAction, default=True,
                      help='also time torch.compile')
  parser.add_argument('--large_n', type=int, default=1 << 20,
                      help='vectors for the large-codebook search; 0 skips it')
  parser.add_argument('--large_k', type=int, default=65536)
  parser.add_argument('--large_chunk_size', type=int, default=1024)
  parser.add_argument('--large_subset', type=int, default=2048,
                      help='vectors checked against the direct [N, K] computation')
  parser.add_argument('--xla_cpu_fusions', action=argparse.BooleanOptionalAction, default=True,
                      help="JAX: the trainer's XLA:CPU fusion option (train/cpu_tuning.py)")
  parser.add_argument('--keep_freed_memory', action=argparse.BooleanOptionalAction,
                      default=False, help="the trainer's glibc setting and synchronous CPU "
                      'dispatch (train/cpu_tuning.py); the glibc setting applies to the whole '
                      'process, so to PyTorch as well')
  parser.add_argument('--cpu_peak_gflops', type=float, default=None,
                      help='the CPU peak to report utilisation against (default: estimated)')
  parser.add_argument('--out', type=str, default=None, help='write the report as JSON here')
  parser.add_argument('--markdown', type=str, default=None, help='write a markdown table here')
  args = parser.parse_args(argv)
  for quantizer in args.quantizers:
    if quantizer not in DECAYS:
      parser.error(f'--quantizers: {quantizer!r} is not one of {sorted(DECAYS)}')
  for dtype in args.dtypes:
    if dtype not in ('float32', 'bfloat16'):
      parser.error(f'--dtypes: {dtype!r} is not float32 or bfloat16')
  return args


def build_report(args, argv, device, load_before, measurements, large) -> Dict[str, Any]:
  with PeakMemory() as probe:
    pass
  # Other processes' load is what makes a shared machine's numbers move; record it.
  return dict(device=device, load_average_1min_before_after=(load_before[0], os.getloadavg()[0]),
              peak_note='; '.join(f'{dtype}: {peak_tflops(dtype, args.cpu_peak_gflops)[1]}'
                                  for dtype in args.dtypes),
              memory_source=probe.source, argv=sys.argv[1:] if argv is None else list(argv),
              measurements=[dataclasses.asdict(m) for m in measurements],
              ratios=ratios(measurements), large_codebook=large)


def write_report(args, report: Dict[str, Any]) -> str:
  table = markdown(report)
  for path, text in ((args.out, json.dumps(report, indent=2) + '\n'), (args.markdown, table)):
    if path:
      Path(path).parent.mkdir(parents=True, exist_ok=True)
      Path(path).write_text(text)
  return table


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  tuning = cpu_tuning.apply(args.xla_cpu_fusions, args.keep_freed_memory)  # before the backend
  device = dict(device_description(), cpu_tuning=tuning)
  load_before = os.getloadavg()
  print(f"device: {device}", flush=True)
  measurements: List[Measurement] = []
  for quantizer in args.quantizers:
    for batch_size in args.batch_sizes:
      # PyTorch is prepared first, so that JAX's buffers do not sit under its RSS peak.
      prepared = [prepare_torch(quantizer, batch_size, compile_model, dtype)
                  for dtype in args.dtypes
                  for compile_model in ((False, True) if args.torch_compile else (False,))
                  if args.torch]
      prepared += [prepare_jax(quantizer, batch_size, dtype, steps_per_dispatch=k,
                               cpu_peak_gflops=args.cpu_peak_gflops)
                   for dtype in args.dtypes for k in args.steps_per_dispatch]
      for measurement in time_interleaved(prepared, args.steps, args.rounds):
        measurements.append(measurement)
        print(measurement, flush=True)
      del prepared  # frees this configuration's device buffers before the next one
      write_report(args, build_report(args, argv, device, load_before, measurements, None))
  large = None
  if args.large_n:
    large = bench_large_codebook(args.large_n, args.large_k, 64, args.large_chunk_size,
                                 min(args.large_subset, args.large_n))
    print(large, flush=True)
  report = build_report(args, argv, device, load_before, measurements, large)
  print(write_report(args, report))
  return report


if __name__ == '__main__':
  main()
