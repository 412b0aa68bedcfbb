"""The VQ-VAE paper's ImageNet model: 128x128x3 images into a 32x32 grid of K = 512 codes.

van den Oord et al. 2017, section 4.1: "the encoder has 2 strided convolutional layers with
stride 2 and window size 4 x 4, followed by two residual 3 x 3 blocks (implemented as ReLU,
3x3 conv, ReLU, 1x1 conv), all having 256 hidden units. The decoder similarly has two residual
3 x 3 blocks, followed by two transposed convolutions with stride 2 and window size 4 x 4. We
use the ADAM optimiser with learning rate 2e-4 and evaluate the performance after 250,000
steps with batch-size 128." This config follows that: `num_hiddens = num_residual_hiddens =
256`, 2 residual layers, K = 512, beta = 0.25, Adam 2e-4, batch 128, 250k steps. The paper
does not state the code dimension D; it keeps the seed's 64. Where this config departs from
the paper: the codebook uses the recommended remedies for collapse (`vqvae_jax.RECOMMENDED`:
EMA, zero-debiased, k-means init, dead-code restart) as every config here does; the paper's
plain VQ is `--config.model.quantizer.family=vq
--config.model.quantizer.vq.codebook_init=seed
--config.model.quantizer.vq.dead_code_threshold=0.0`. The convolutions run in bfloat16; the
quantizer and the losses stay float32.

Data: `imagenet2012` from tfds, prepared beforehand (tfds needs ImageNet's tar files placed
by hand: https://www.tensorflow.org/datasets/catalog/imagenet2012), or a folder in ImageNet's
layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`):

    python -m train --config train/configs/imagenet128.py --workdir runs/imagenet128
    python -m train --config train/configs/imagenet128.py --workdir runs/imagenet128 \\
        --config.dataset=folder:/data/imagenet

Either way it streams: ImageNet at 128x128 is ~63 GB of pixels, far over
`data_on_device_max_bytes`, so each host decodes only its own rows of every batch, in
`data_workers` grain processes, and lists a folder once (cached in the workdir).

On a TPU pod slice (every host runs the same command; the workdir must be a path all hosts
share, e.g. an NFS or gcsfuse mount):

    gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd vqvae-jax && \\
        python -m train --config train/configs/imagenet128.py --workdir /mnt/shared/imagenet128 \\
        --config.dataset=folder:/mnt/shared/imagenet --multihost"

Step rate on an accelerator: not measured yet (docs/data.md).
"""

import os

from train.configs import cifar10


def get_config(quantizer_family: str = ''):
  config = cifar10.get_config(quantizer_family)
  config.dataset = 'imagenet2012'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.download = False  # tfds cannot download ImageNet: prepare it by hand first
  config.image_size = 128
  config.image_channels = 3  # a few ImageNet JPEGs are grayscale or CMYK: all become RGB
  config.data_workers = min(16, os.cpu_count() or 1)

  config.batch_size = 128
  config.learning_rate = 2e-4
  config.num_train_steps = 250_000
  config.steps_per_dispatch = 10
  config.log_every_steps = 500
  config.eval_every_steps = 25_000
  config.eval_batch_size = 512
  config.checkpoint_every_steps = 5_000

  config.model.num_hiddens = 256
  config.model.num_residual_layers = 2
  config.model.num_residual_hiddens = 256
  for family in ('vq', 'ema'):  # the paper's K, D (the seed's) and beta
    config.model.quantizer[family].update(num_embeddings=512, embedding_dim=64,
                                          commitment_cost=0.25)
  config.model.dtype = 'bfloat16'
  config.eval_rfid = True  # InceptionV3 over the held-out split: cheap on an accelerator
  return config
