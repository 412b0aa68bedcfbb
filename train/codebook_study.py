"""Codebook health: the seed's quantizer against the recommended options, at equal steps.

    python -m train.codebook_study --steps=2000 --seeds=0,1,2 --out=benchmarks/codebook_health

Trains the seed's model on the offline quickstart photos (train/configs/quickstart.py: the seed's
hyperparameters, batch 32, Adam 3e-4) once per variant and seed, and reports held-out NMSE,
PSNR, codes used and perplexity over the whole held-out split, as JSON and a markdown table.
"""

import json
import os
import tempfile

import numpy as np
from absl import app, flags

from train import cpu_tuning, trainer
from train.configs import quickstart
from vqvae_jax import RECOMMENDED

_STEPS = flags.DEFINE_integer('steps', 2000, 'Training steps per run.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds, one run each per variant.')
_VARIANTS = flags.DEFINE_list('variants', ['seed_ema', 'recommended', 'seed_plain',
                                           'plain_restart'], 'Variants to run (see VARIANTS).')
_OUT = flags.DEFINE_string('out', 'benchmarks/codebook_health', 'Output path, no extension.')

# The seed's own quantizers, exactly; and the remedies on top of the same architecture. Each
# variant is (family, fields of config.model.quantizer.<family>).
SEED_CODEBOOK = dict(codebook_init='seed', dead_code_threshold=0.0)
VARIANTS = {
    'seed_ema': ('ema', dict(SEED_CODEBOOK, decay=0.99, zero_debias=False)),
    'recommended': ('ema', dict(RECOMMENDED)),
    'seed_plain': ('vq', SEED_CODEBOOK),
    'plain_restart': ('vq', dict(codebook_init='kmeans',
                                 dead_code_threshold=RECOMMENDED['dead_code_threshold'])),
    # Further options on top of the recommended preset.
    'recommended_dim16': ('ema', dict(RECOMMENDED, codebook_dim=16)),
    'recommended_dim8': ('ema', dict(RECOMMENDED, codebook_dim=8)),
    'recommended_dim16_entropy': ('ema', dict(RECOMMENDED, codebook_dim=16,
                                              entropy_weight=0.02)),
    'recommended_cosine': ('ema', dict(RECOMMENDED, cosine_codes=True)),
    'recommended_entropy': ('ema', dict(RECOMMENDED, entropy_weight=0.1)),
    'recommended_threshold1': ('ema', dict(RECOMMENDED, dead_code_threshold=1.0)),
}
METRICS = ('eval_nmse', 'eval_psnr', 'eval_codes_used', 'eval_perplexity')


def run(variant: str, seed: int, steps: int, workdir: str):
  config = quickstart.get_config()
  family, fields = VARIANTS[variant]
  config.model.quantizer.family = family
  config.model.quantizer[family].update(fields)
  config.update(seed=seed, num_train_steps=steps, eval_every_steps=0,
                checkpoint_every_steps=0, log_every_steps=max(steps // 10, 1))
  return trainer.train_and_evaluate(config, workdir)


def main(argv):
  del argv
  cpu_tuning.apply()  # the trainer's CPU settings, before JAX starts its backend
  results = {}
  for variant in _VARIANTS.value:
    for seed in map(int, _SEEDS.value):
      with tempfile.TemporaryDirectory() as workdir:
        metrics = run(variant, seed, _STEPS.value, workdir)
      results.setdefault(variant, []).append({'seed': seed, **{k: metrics[k] for k in METRICS}})
      print(variant, results[variant][-1], flush=True)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump({'steps': _STEPS.value, 'variants': {k: VARIANTS[k] for k in results},
               'runs': results}, f, indent=2)
  lines = [f'Quickstart photos, {_STEPS.value} steps, batch 32, Adam 3e-4; held-out split; '
           f'mean ± std over seeds {",".join(_SEEDS.value)}.', '',
           '| variant | held-out NMSE | PSNR (dB) | codes used (of 512) | perplexity |',
           '|---|---|---|---|---|']
  for variant, runs in results.items():
    cells = []
    for key in METRICS:
      values = np.array([r[key] for r in runs], np.float64)
      digits = 4 if key == 'eval_nmse' else 1
      cells.append(f'{values.mean():.{digits}f} ± {values.std():.{digits}f}')
    lines.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  with open(_OUT.value + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
