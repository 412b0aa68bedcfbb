"""Offline quickstart: the seed's model on 32x32 crops of the photos that scikit-image ships.

    python -m train --config train/configs/quickstart.py --workdir runs/quickstart
    python -m train --config train/configs/quickstart.py:fsq --workdir runs/quickstart_fsq

The second trains another quantizer family at the same 9 bits per code (`:fsq`, `:lfq`, `:rvq`,
`:ema_rotation`; `:fsq/16` for 16 bits), see `train/configs/quantizer_families.py`.

Needs no download. Trains on crops of six photos and evaluates on crops of two others
(`skimage.data.chelsea` and the left photo of `skimage.data.stereo_motorcycle`), so the held-out
numbers are on unseen photos. Finishes on 2 CPU cores in a few minutes; `runs/quickstart/reconstructions.png` shows originals above their
reconstructions.
"""

from train.configs import cifar10


def get_config(quantizer_family: str = ''):
  config = cifar10.get_config(quantizer_family)
  config.dataset = 'quickstart'
  config.train_split = 'train'
  config.eval_split = 'test'
  config.num_train_steps = 1_000
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
