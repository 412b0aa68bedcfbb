"""Sampling speed of the prior: the KV-cached sampler against recomputing the whole prefix.

    python -m train.bench.prior_sampling --out benchmarks/prior_sampling_cpu.json \
        --markdown benchmarks/prior_sampling_cpu.md

For each grid, both samplers run the same jitted `vqvae_jax.autoregressive_prior.sample` (`use_cache=True` and
`False`) on the same key, after compilation, in interleaved rounds; the table gives codes/s
(batch x positions / seconds, the best round) and checks that the samples are identical. The
prior has `train/configs/prior_quickstart.py`'s shape (or `--workdir`'s trained one); its
weights do not change the cost.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

import jax
import numpy as np

from train.checkpoints import load_prior
from train.prior_step import prior_from_config
from train.bench.device import device_description
from vqvae_jax.autoregressive_prior import CodePrior, sample


def _grid(text: str):
  rows, columns = text.lower().split('x')
  return int(rows), int(columns)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m train.bench.prior_sampling',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--grids', type=lambda t: [_grid(g) for g in t.split(',')],
                      default=[(8, 8), (16, 16)], help='comma-separated HxW code grids')
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--workdir', default='', help='a trained prior (its grid only)')
  parser.add_argument('--out', default='', help='JSON results')
  parser.add_argument('--markdown', default='', help='markdown table')
  return parser.parse_args(argv)


def _priors(args) -> List[tuple]:
  if args.workdir:
    prior, params, _ = load_prior(args.workdir)
    return [(prior, params)]
  from train.configs import prior_quickstart  # pylint: disable=g-import-not-at-top
  config = prior_quickstart.get_config()
  out = []
  for grid in args.grids:  # unconditional: labels do not change the cost
    prior = prior_from_config(config, 512, grid, num_classes=None)
    codes = np.zeros((1, *grid), np.int32)
    out.append((prior, prior.init(jax.random.key(0), codes)['params']))
  return out


def _time(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def measure(prior: CodePrior, params: Any, batch_size: int, rounds: int) -> Dict[str, Any]:
  labels = None if prior.num_classes is None else np.arange(batch_size) % prior.num_classes
  run = {cached: (lambda cached=cached: sample(prior, params, jax.random.key(0),
                                               num_samples=batch_size, labels=labels,
                                               use_cache=cached))
         for cached in (True, False)}
  compile_seconds = {cached: _time(fn) for cached, fn in run.items()}
  seconds = {True: [], False: []}
  for _ in range(rounds):
    for cached, fn in run.items():
      seconds[cached].append(_time(fn))
  codes = batch_size * prior.length
  cached_rate, uncached_rate = (codes / min(seconds[c]) for c in (True, False))
  return {
      'grid': list(prior.grid_shape), 'positions': prior.length, 'batch_size': batch_size,
      'width': prior.width, 'depth': prior.depth, 'num_embeddings': prior.num_embeddings,
      'cached_codes_per_sec': cached_rate, 'uncached_codes_per_sec': uncached_rate,
      'speedup': cached_rate / uncached_rate,
      'cached_seconds': seconds[True], 'uncached_seconds': seconds[False],
      'first_call_seconds': {'cached': compile_seconds[True], 'uncached': compile_seconds[False]},
      'identical_samples': bool(np.array_equal(run[True](), run[False]())),
  }


def markdown(results: List[Dict[str, Any]], device: Dict[str, Any], command: str) -> str:
  machine = (f'{device["device_kind"]} ({device["platform"]}; {device["cpu_model"]}, '
             f'{device["cpu_count"]} cores; jax {device["jax_version"]})')
  lines = [f'Prior sampling on {machine}: `{command}`', '',
           '| grid | positions | batch | cached codes/s | uncached codes/s | cached / uncached |'
           ' identical samples |', '|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f'| {r["grid"][0]}x{r["grid"][1]} | {r["positions"]} | {r["batch_size"]} | '
                 f'{r["cached_codes_per_sec"]:,.0f} | {r["uncached_codes_per_sec"]:,.0f} | '
                 f'{r["speedup"]:.1f}x | {r["identical_samples"]} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  args = parse_args(argv)
  device = device_description()
  results = [measure(prior, params, args.batch_size, args.rounds)
             for prior, params in _priors(args)]
  import sys  # pylint: disable=g-import-not-at-top
  command = 'python -m train.bench.prior_sampling ' + ' '.join(sys.argv[1:] if argv is None
                                                              else argv)
  table = markdown(results, device, command.strip())
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'device': device, 'command': command.strip(), 'results': results}, f, indent=2)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(table)


if __name__ == '__main__':
  main()
