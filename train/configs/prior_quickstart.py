"""A class-conditional prior over the quickstart VQ-VAE's codes, offline, on 2 CPU cores.

    python -m train --config train/configs/quickstart.py --workdir runs/quickstart
    python -m train.prior --config train/configs/prior_quickstart.py --workdir runs/prior \
        --config.vqvae_workdir=runs/quickstart
    python -m train.sample --workdir runs/prior --num_samples 64 --out samples.png

The labels are the six training photos (`train/data.py: QUICKSTART_TRAIN_PHOTOS`), so
`--label astronaut` asks for crops of the astronaut photo. The held-out crops come from two
other photos, which have no label: their bits per code are the unconditional model's, which
label dropout trains alongside. The VQ-VAE's 8x8 code grids are 64 codes of 512.
"""

import ml_collections

from train import state


def get_config() -> ml_collections.ConfigDict:
  config = state.loop_config()  # the loop's keys: steps, batches, logs, checkpoints, data_workers
  config.vqvae_workdir = 'runs/quickstart'  # the --workdir of a trained VQ-VAE
  config.conditional = True  # class-conditional when the VQ-VAE's dataset has labels
  config.seed = 0
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.warmup_steps = 200
  config.weight_decay = 0.01
  config.num_train_steps = 3_000
  config.steps_per_dispatch = 10  # optimizer steps per jit call

  config.log_every_steps = 100
  config.eval_every_steps = 1_000
  config.eval_batch_size = 256
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  # samples.png at each evaluation: rows of 8, row r with label r mod num_classes.
  config.num_samples = 48
  config.sample_temperature = 1.0
  config.sample_top_k = 0  # 0: off
  config.sample_top_p = 1.0  # 1: off

  config.model = ml_collections.ConfigDict(dict(
      width=96,
      depth=3,
      num_heads=4,
      mlp_ratio=4,
      dropout=0.1,
      label_dropout=0.1,  # also trains the unconditional model: guidance and unlabelled codes
      dtype='float32',  # the layers; 'bfloat16' on TPU. Logits and losses stay float32.
  ))
  return config
