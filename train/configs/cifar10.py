"""The seed's VQ-VAE on CIFAR-10 with Sonnet's recipe: batch 32, Adam 3e-4, EMA decay 0.99.

The architecture and the hyperparameters are the seed's; the codebook uses the recommended
remedies for collapse (`vqvae_jax.RECOMMENDED`: zero-debiased EMA, k-means init, dead-code
restart). For the seed's quantizer exactly, add `--config.model.zero_debias=False
--config.model.codebook_init=seed --config.model.dead_code_threshold=0.0`.

    python -m train --config train/configs/cifar10.py --workdir runs/cifar10

Preparing CIFAR-10 with tfds needs TensorFlow once (`pip install tensorflow`); training reads
the prepared files through `tfds.data_source` without it. Sonnet's notebook reaches a training
NMSE of 0.061 at 5k steps and 0.056 at 10k (perplexity ~326); this project has not run the
full schedule itself (its machines cannot download CIFAR-10). Time: the step runs at ~900
images/s on a 2-core CPU with 10 steps per dispatch (benchmarks/cpu.md), so 10k steps of 32
take about 6 minutes there plus evaluation. Override any key on the command line, e.g. `--config.batch_size=256
--config.learning_rate=1e-3`.

Another quantizer family at the same 9 bits per code: `--config train/configs/cifar10.py:fsq`
(or `:lfq`, `:rvq`, `:ema_rotation`; `:fsq/16` for 16 bits), see `train/configs/quantizers.py`.
"""

import os

import ml_collections

from train.configs import quantizers
from vqvae_jax import RECOMMENDED


def get_config(quantizer_family: str = '') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data: a tfds image dataset name, 'quickstart' (bundled photos), 'npz:PATH' or 'folder:PATH'.
  config.dataset = 'cifar10'
  config.data_dir = ''  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets)
  config.train_split = 'train'
  config.eval_split = 'test'
  config.download = True  # prepare a tfds dataset that is not prepared yet (needs TensorFlow)
  config.image_size = 0  # 0 = keep the dataset's size; else centre-crop/resize to this size
  config.image_channels = 0  # folder: 1 or 3 converts every image; 0 = theirs (must agree)
  # A split of at most this many bytes is read into memory, and the training split kept on the
  # device; a larger one streams from disk, decoded in `data_workers` grain worker processes
  # (no more than the host's cores: on a laptop, more would only take CPU from the step).
  config.data_on_device_max_bytes = 2 * 1024**3
  config.data_workers = min(8, os.cpu_count() or 1)

  config.seed = 0
  config.batch_size = 32
  config.learning_rate = 3e-4
  config.num_train_steps = 10_000
  config.steps_per_dispatch = 10  # optimizer steps per jit call

  config.log_every_steps = 100
  config.eval_every_steps = 2_000
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  config.num_reconstructions = 8  # images in the reconstruction PNG
  # Perceptual evaluation (train/perceptual_eval.py, docs/metrics.md): LPIPS is cheap at small
  # sizes; rFID runs InceptionV3 at 299 px on every held-out image, so it is off on CPUs.
  config.eval_lpips = True
  config.lpips_network = 'alexnet'
  config.eval_rfid = False
  config.fid_weights = ''  # '' = ~/.cache/vqvae_jax/fid_inception_v3.npz (python -m train.fid --fetch-weights)

  config.model = ml_collections.ConfigDict(dict(
      num_hiddens=128,
      num_residual_layers=2,
      num_residual_hiddens=32,
      num_embeddings=512,
      embedding_dim=64,
      commitment_cost=0.25,
      epsilon=1e-5,
      residual_skip='relu',
      dtype='float32',  # convolutions; 'bfloat16' on TPU. Quantizer and losses stay float32.
      **RECOMMENDED,  # decay 0.99 and the codebook remedies
      rotation_trick=False,
      # The family (vqvae_jax.QUANTIZERS; None: decay picks 'ema' or 'vq') and its options.
      quantizer=ml_collections.config_dict.placeholder(str),
      fsq_levels=(8, 8, 8),
      lfq_entropy_weight=0.1,
      lfq_entropy_temperature=0.01,
      lfq_entropy_groups=ml_collections.config_dict.placeholder(int),
      num_quantizers=2,
      quantizer_dropout=0.0,
  ))
  return quantizers.apply(config, quantizer_family)
