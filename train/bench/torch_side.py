"""The seed's PyTorch side: its training step from `tests/golden/seed_torch.py`, eager or
`torch.compile`d, on the GPU when torch sees one."""

from __future__ import annotations

import time
import types
from pathlib import Path

from train.bench import DATA_VARIANCE, DECAYS, IMAGE_SIZE, LEARNING_RATE, SEED_MODEL
from train.bench.measure import Measurement, PeakMemory, Timed

SEED_TORCH = Path(__file__).resolve().parents[2] / 'tests' / 'golden' / 'seed_torch.py'

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
