"""Quantizer families side by side at equal bits per code, on the quickstart photos.

    python -m train.quantizer_study --bits=9 --seeds=0,1,2 --out=benchmarks/quantizer_families_9bits
    python -m train.quantizer_study --bits=16 --seeds=0 --out=benchmarks/quantizer_families_16bits

Trains the seed's encoder and decoder (train/configs/quickstart.py: batch 32, Adam 3e-4) with
each family of `train/configs/quantizer_families.py: FAMILIES[bits]`, once per seed, and reports over
the whole held-out split: NMSE, PSNR, codes used (a count and a share of the codebook, per stage
for residual VQ), perplexity and the relative quantization error `sum |z - q|^2 / sum |z|^2`.
Then it times each family's training step (batch 32, float32, 10 steps per dispatch, rounds
interleaved so that all see the same load) relative to the VQ-EMA step, and counts the
quantizer's trainable parameters and state. JSON and a markdown table go to `--out`.
"""

import json
import math
import os
import tempfile
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from train import cli, cpu_tuning, trainer
from train.bench.jax_side import prepare_model_step
from train.bench.measure import time_interleaved
from train.configs import quantizer_families, quickstart
from train.step import model_from_config

_BITS = flags.DEFINE_enum('bits', '9', [str(b) for b in quantizer_families.FAMILIES],
                          'Bits per code (one code per grid position, or all stages of one).')
_FAMILIES = flags.DEFINE_list('families', [], 'Families to run; default: all at --bits.')
_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps per run.', lower_bound=1)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds, one run each per family.')
_TIMING_STEPS = flags.DEFINE_integer('timing_steps', 50, 'Steps per timing round.', lower_bound=1)
_TIMING_ROUNDS = flags.DEFINE_integer('timing_rounds', 3, 'Interleaved timing rounds.',
                                      lower_bound=1)
_OUT = flags.DEFINE_string('out', 'benchmarks/quantizer_families', 'Output path, no extension.')

METRICS = ('eval_nmse', 'eval_psnr', 'eval_codes_used', 'eval_perplexity',
           'eval_quantization_error')
# What each family adds to the reconstruction loss (a description of the code, not a result).
AUXILIARY_LOSSES = {
    'vq': 'codebook + commitment',
    'ema': 'commitment (codebook by EMA)',
    'ema_rotation': 'commitment (codebook by EMA)',
    'fsq': 'none',
    'lfq': 'commitment + entropy',
    'rvq': 'commitment per stage (codebooks by EMA)',
}
BASELINE = 'ema'


def config_for(family: str, bits: int, seed: int, steps: int):
  config = quickstart.get_config(f'{family}/{bits}')
  config.update(seed=seed, num_train_steps=steps, eval_every_steps=0,
                checkpoint_every_steps=0, log_every_steps=max(steps // 10, 1))
  return config


def quantizer_sizes(model) -> Dict[str, int]:
  """Floats the quantizer keeps: trainable parameters and `batch_stats` state."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
  return {'quantizer_params': count(shapes.get('params', {}).get('vq', {})),
          'quantizer_state': count(shapes.get('batch_stats', {}).get('vq', {}))}


def train_runs(families: List[str], bits: int, seeds: List[int], steps: int):
  runs = {}
  for family in families:
    for seed in seeds:
      with tempfile.TemporaryDirectory() as workdir:
        metrics = trainer.train_and_evaluate(config_for(family, bits, seed, steps), workdir)
      stages = sorted(k for k in metrics if k.startswith('eval_codes_used_stage'))
      runs.setdefault(family, []).append(
          {'seed': seed, **{k: metrics[k] for k in METRICS + tuple(stages)}})
      print(family, runs[family][-1], flush=True)
  return runs


def time_steps(families: List[str], bits: int) -> Dict[str, float]:
  """Milliseconds per training step of each family, fastest of interleaved rounds."""
  prepared = []
  for family in families:
    model = model_from_config(config_for(family, bits, 0, 1).model, image_channels=3)
    prepared.append(prepare_model_step(model, family, batch_size=32, image_size=32,
                                       steps_per_dispatch=10))
  measured = time_interleaved(prepared, _TIMING_STEPS.value, _TIMING_ROUNDS.value)
  return {m.quantizer: m.step_ms for m in measured}


def mean_std(values, digits: int) -> str:
  values = np.asarray(values, np.float64)
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{values.mean():.{digits}f} ± {values.std():.{digits}f}'


def markdown(result: Dict[str, Any]) -> str:
  bits, seeds = result['bits'], result['seeds']
  lines = [f'Quickstart photos, {result["steps"]} steps, batch 32, Adam 3e-4, {bits} bits per '
           f'code; held-out split; mean ± std over seeds {",".join(map(str, seeds))}. Step time: '
           f'batch 32, float32, 10 steps per dispatch, relative to `{BASELINE}` in the same run '
           f'({result["machine"]}).', '',
           '| family | model fields | held-out NMSE | PSNR (dB) | codes used | % of codebook | '
           'perplexity | quantization error | step time vs ema | quantizer params | '
           'quantizer state | auxiliary losses |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for family, runs in result['runs'].items():
    info = result['families'][family]
    used = [r['eval_codes_used'] for r in runs]
    per_stage = sorted(k for k in runs[0] if k.startswith('eval_codes_used_stage'))
    used_cell = mean_std(used, 1)
    if per_stage:
      used_cell += ' (stages: ' + ', '.join(mean_std([r[k] for r in runs], 1)
                                            for k in per_stage) + ')'
    share = 100 * np.asarray(used, np.float64) / info['codebook_entries']
    fields = ', '.join(f'{k}={v}' for k, v in info['fields'].items())
    lines.append(' | '.join([
        f'| {family}', f'`{fields}`', mean_std([r['eval_nmse'] for r in runs], 4),
        mean_std([r['eval_psnr'] for r in runs], 2), used_cell,
        f'{mean_std(share, 1)} of {info["codebook_entries"]:,}',
        mean_std([r['eval_perplexity'] for r in runs], 1),
        mean_std([r['eval_quantization_error'] for r in runs], 3),
        f'{info["step_ms"] / result["families"][BASELINE]["step_ms"]:.2f}'
        if BASELINE in result['families'] else f'{info["step_ms"]:.1f} ms',
        f'{info["quantizer_params"]:,}', f'{info["quantizer_state"]:,}',
        AUXILIARY_LOSSES.get(family, '')]) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; accepted: flags only (see --help).')
  bits = int(_BITS.value)
  families = _FAMILIES.value or list(quantizer_families.FAMILIES[bits])
  unknown = sorted(set(families) - set(quantizer_families.FAMILIES[bits]))
  if unknown:
    cli.fail(f'--families: unknown {unknown} at {bits} bits; accepted: '
             f'{sorted(quantizer_families.FAMILIES[bits])}.')
  if not all(s.isdigit() for s in _SEEDS.value) or not _SEEDS.value:
    cli.fail(f'--seeds={",".join(_SEEDS.value)!r}; accepted: integers >= 0, comma-separated.')
  seeds = [int(s) for s in _SEEDS.value]
  cpu_tuning.apply()  # the trainer's CPU settings, before JAX starts its backend
  with cli.user_errors_in_one_line():
    runs = train_runs(families, bits, seeds, _STEPS.value)
  step_ms = time_steps(families, bits)
  info = {}
  for family in families:
    model = model_from_config(config_for(family, bits, 0, 1).model, image_channels=3)
    preset_family, overrides = quantizer_families.FAMILIES[bits][family]
    info[family] = {'fields': dict(family=preset_family, **overrides), 'step_ms': step_ms[family],
                    'codebook_entries': model.codebook_size * model.codes_per_position,
                    **quantizer_sizes(model)}
  result = {'bits': bits, 'steps': _STEPS.value, 'seeds': seeds,
            'machine': f'{os.cpu_count()}-core {jax.devices()[0].device_kind}, jax '
                       f'{jax.__version__}',
            'families': info, 'runs': runs}
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(result, f, indent=2)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  cli.run(main)
