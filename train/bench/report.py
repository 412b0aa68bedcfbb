"""The report: ratios to PyTorch at the same dtype, the JSON report and its markdown tables."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

from train.bench.device import peak_tflops
from train.bench.measure import Measurement, PeakMemory


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
