"""A class-conditional prior over a CIFAR-10 VQ-VAE's codes, sized for a TPU or a GPU.

    python -m train --config train/configs/tpu.py --workdir runs/cifar10
    python -m train.prior --config train/configs/prior_cifar10.py --workdir runs/prior_cifar10 \
        --config.vqvae_workdir=runs/cifar10
    python -m train.sample --workdir runs/prior_cifar10 --label cat --guidance_scale 2

Labels are CIFAR-10's ten classes; label dropout trains the unconditional model alongside, for
classifier-free guidance (`--guidance_scale`). The VQ-VAE's 8x8 grids of 512 codes make 64
positions. Width 384, depth 8 is 14M parameters: a step at batch 256 is about
6 x 14M x 256 x 64 = 1.4 TFLOP, so 30k steps are about 4e16 FLOP, roughly 10 minutes at
60 TFLOP/s (a third of a v5e chip's bfloat16 peak). Not yet run on an accelerator by this
project; the 2-core CPU would take days.
"""

from train.configs import prior_quickstart


def get_config():
  config = prior_quickstart.get_config()
  config.vqvae_workdir = 'runs/cifar10'
  config.batch_size = 256
  config.learning_rate = 5e-4
  config.warmup_steps = 1_000
  config.num_train_steps = 30_000
  config.steps_per_dispatch = 50
  config.log_every_steps = 500
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_500
  config.num_samples = 80  # a row of 8 per class
  config.model.update(width=384, depth=8, num_heads=6, dropout=0.1, label_dropout=0.1,
                      dtype='bfloat16')
  return config
