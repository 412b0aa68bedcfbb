"""`python -m train.bench`: the flags, and the runs in the order that keeps them comparable."""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Optional, Sequence

from train import bench, cpu_tuning
from train.bench import DECAYS
from train.bench.device import device_description
from train.bench.jax_side import bench_large_codebook, prepare_jax
from train.bench.measure import Measurement, time_interleaved
from train.bench.report import build_report, write_report
from train.bench.torch_side import prepare_torch


def _csv(kind):
  return lambda text: [kind(item) for item in text.split(',') if item]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m train.bench',
                                   description=bench.__doc__.split('\n')[0])
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
