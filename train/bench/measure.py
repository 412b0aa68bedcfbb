"""What one measurement holds and how it is taken: interleaved timing rounds and peak memory."""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import jax


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


def best_seconds(fn: Callable[[], Any], rounds: int) -> float:
  """The fastest of `rounds` calls of `fn` (waited for), after one call that compiles it."""
  jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best
