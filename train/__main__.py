"""Trains a VQ-VAE: `python -m train --config train/configs/quickstart.py --workdir runs/quick`.

Any config key can be overridden: `--config.batch_size=64 --config.model.quantizer.family=vq`.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from train import cli


def _train_and_evaluate(config, workdir):
  from train import trainer  # pylint: disable=g-import-not-at-top  # after cpu_tuning.apply()
  return trainer.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run_training(_train_and_evaluate)
