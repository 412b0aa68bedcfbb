"""CIFAR-10 on a TPU: a Colab v5e chip or a pod slice. bfloat16 convolutions, batch 256.

    python -m train --config train/configs/tpu.py --workdir gs://BUCKET/vqvae  # or a local dir

On a pod slice run the same command on every host; `jax.distributed` connects them and each
host feeds its share of every global batch. The quantizer's statistics are float32 and global.
"""

from train.configs import cifar10


def get_config(quantizer_family: str = ''):
  config = cifar10.get_config(quantizer_family)
  config.batch_size = 256
  config.learning_rate = 1e-3  # zalando's recipe for batch 256
  config.num_train_steps = 15_000
  config.steps_per_dispatch = 50
  config.eval_every_steps = 2_500
  config.checkpoint_every_steps = 2_500
  config.model.dtype = 'bfloat16'
  config.eval_rfid = True  # InceptionV3 over the held-out split: cheap on an accelerator
  return config
