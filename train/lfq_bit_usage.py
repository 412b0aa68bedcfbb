"""Which of LFQ's bits a trained model uses: each bit's share of +1 over the held-out codes.

    python -m train.lfq_bit_usage --bits=9 --seed=0 --steps=2000

Trains the quantizer study's LFQ model at `--bits` (`train.quantizer_study.config_for`: the
quickstart photos, batch 32, Adam 3e-4) and prints, from the held-out code counts, how many
codes were used and each bit's share of +1. A bit at 0.0 or 1.0 is dead: it takes one sign on
every held-out vector, and halves the codes in use.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train import data, evaluate, loop, trainer
from train.checkpoints import load_model
from train.configs import quantizer_families
from train.quantizer_study import config_for


def bit_shares(code_counts, num_bits: int) -> np.ndarray:
  """float64 `[num_bits]`: the share of counted codes whose bit `d` is set (+1 in LFQ)."""
  counts = np.asarray(code_counts, np.float64)
  bits = (np.arange(len(counts))[:, None] >> np.arange(num_bits)) & 1
  return counts @ bits / counts.sum()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m train.lfq_bit_usage',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--bits', type=int, default=9, choices=sorted(quantizer_families.FAMILIES))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=2000)
  args = parser.parse_args(argv)
  config = config_for('lfq', args.bits, args.seed, args.steps)
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir)
    model, variables = load_model(workdir)
  images, mesh = data.load(config), loop.data_mesh()
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  metrics = evaluate.Evaluator(model, mesh, config.eval_batch_size)(variables, images.eval,
                                                                    images.variance)
  shares = bit_shares(metrics['code_counts'], config.model.quantizer.lfq.embedding_dim)
  dead = int(np.sum((shares == 0) | (shares == 1)))
  print(f'LFQ at {args.bits} bits, seed {args.seed}, {args.steps} steps: held-out NMSE '
        f'{metrics["eval_nmse"]:.4f}, {int(metrics["eval_codes_used"])} codes used, '
        f'{dead} dead bits; share of +1 per bit: '
        + ', '.join(f'{share:.2f}' for share in shares))


if __name__ == '__main__':
  main()
