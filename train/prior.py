"""Trains a prior over a VQ-VAE's code grids, to generate images:

    python -m train.prior --config train/configs/prior_quickstart.py --workdir runs/prior \
        --config.vqvae_workdir=runs/quickstart

The VQ-VAE's images are encoded once and cached in the workdir (`codes.npz`). Any config key
can be overridden (`--config.model.depth=6`); rerunning the same command resumes.
"""

from train import cli


def _train_and_evaluate(config, workdir):
  from train import prior_training  # pylint: disable=g-import-not-at-top  # after cpu_tuning
  return prior_training.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  cli.run_training(_train_and_evaluate)
