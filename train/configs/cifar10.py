"""The seed's VQ-VAE on CIFAR-10 with Sonnet's recipe: batch 32, Adam 3e-4, EMA decay 0.99.

The architecture and the hyperparameters are the seed's; the codebook uses the recommended
remedies for collapse (`vqvae_jax.RECOMMENDED`: zero-debiased EMA, k-means init, dead-code
restart). For the seed's quantizer exactly, add `--config.model.quantizer.ema.zero_debias=False
--config.model.quantizer.ema.codebook_init=seed
--config.model.quantizer.ema.dead_code_threshold=0.0`.

    python -m train --config train/configs/cifar10.py --workdir runs/cifar10

Preparing CIFAR-10 with tfds needs TensorFlow once (`pip install tensorflow`); training reads
the prepared files through `tfds.data_source` without it. Sonnet's notebook reaches a training
NMSE of 0.061 at 5k steps and 0.056 at 10k (perplexity ~326); this project has not run the
full schedule itself (its machines cannot download CIFAR-10). Time: the step runs at ~900
images/s on a 2-core CPU with 10 steps per dispatch (benchmarks/cpu.md), so 10k steps of 32
take about 6 minutes there plus evaluation. Override any key on the command line, e.g. `--config.batch_size=256
--config.learning_rate=1e-3`.

Another quantizer family at the same 9 bits per code: `--config train/configs/cifar10.py:fsq`
(or `:lfq`, `:rvq`, `:ema_rotation`; `:fsq/16` for 16 bits), or
`--config.model.quantizer.family=fsq`; see `train/configs/quantizer_families.py`.
"""

import ml_collections

from train import state
from train.configs import quantizer_families


def get_config(quantizer_family: str = '') -> ml_collections.ConfigDict:
  config = state.loop_config()  # the loop's keys: steps, batches, logs, checkpoints, data_workers
  # Data: a tfds image dataset name, 'quickstart' (bundled photos), 'npz:PATH' or 'folder:PATH'.
  config.dataset = 'cifar10'
  config.data_dir = ''  # tfds data_dir; '' = tfds' default (~/tensorflow_datasets)
  config.train_split = 'train'
  config.eval_split = 'test'
  config.download = True  # prepare a tfds dataset that is not prepared yet (needs TensorFlow)
  config.image_size = 0  # 0 = keep the dataset's size; else centre-crop/resize to this size
  config.image_channels = 0  # folder: 1 or 3 converts every image; 0 = theirs (must agree)
  # A split of at most `data_on_device_max_bytes` is read into memory, and the training split
  # kept on the device; a larger one streams from disk in `data_workers` grain processes.
  # The loop's keys keep their defaults: Sonnet's batch 32 and Adam 3e-4, 10k steps, 10 per
  # dispatch; logs every 100 steps, evaluation every 2k, checkpoints every 1k (3 kept).
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
      residual_skip='relu',
      dtype='float32',  # convolutions; 'bfloat16' on TPU. Quantizer and losses stay float32.
      # `family` (vqvae_jax.QUANTIZERS) and each family's fields: train/configs/quantizer_families.py.
      # 'ema': the seed's VQ-EMA, 512 x 64 codes, with the codebook remedies.
      quantizer=quantizer_families.quantizer_config('ema'),
  ))
  return quantizer_families.apply(config, quantizer_family)
