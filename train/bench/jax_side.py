"""The JAX side: the jitted training step of `train.step`, its FLOPs and memory, and the
nearest-code search with a large codebook."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.bench import DATA_VARIANCE, DECAYS, IMAGE_SIZE, LEARNING_RATE, SEED_MODEL
from train.bench.device import peak_tflops
from train.bench.measure import Measurement, PeakMemory, Timed, time_interleaved
from train.step import create_train_state, make_train_step
from vqvae_jax import VQVAE
from vqvae_jax.codebook import nearest_code, nearest_in_distances, squared_distances


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


def prepare_jax(quantizer: str, batch_size: int, dtype: str,
                model_config: Optional[Dict[str, Any]] = None, image_size: int = IMAGE_SIZE,
                cpu_peak_gflops: Optional[float] = None, steps_per_dispatch: int = 1) -> Timed:
  """The jitted training step of `train.step`, compiled and run once; `run` does
  `steps_per_dispatch` optimizer steps in one call, and the figures are per optimizer step."""
  model = VQVAE(**(model_config or SEED_MODEL), decay=DECAYS[quantizer],
                dtype=jnp.dtype(dtype))
  return prepare_model_step(model, quantizer, batch_size, image_size, cpu_peak_gflops,
                            steps_per_dispatch)


def prepare_model_step(model: VQVAE, label: str, batch_size: int, image_size: int = IMAGE_SIZE,
                       cpu_peak_gflops: Optional[float] = None,
                       steps_per_dispatch: int = 1) -> Timed:
  """`prepare_jax` for any `VQVAE`; `label` names it in the measurement's `quantizer`."""
  quantizer, dtype = label, jnp.dtype(model.dtype).name
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
