"""The quantizer section of the VQ-VAE configs, and the families at equal bits per code.

    python -m train --config train/configs/quickstart.py:fsq --workdir runs/quickstart_fsq
    python -m train --config train/configs/cifar10.py:rvq --workdir runs/cifar10_rvq
    python -m train --config train/configs/quickstart.py:lfq/16 --workdir runs/lfq16
    python -m train --config train/configs/quickstart.py --config.model.quantizer.family=fsq ...

`config.model.quantizer` holds `family` (one of `vqvae_jax.QUANTIZERS`) and one section of
fields per family (`quantizer.ema.num_embeddings`, `quantizer.fsq.levels`, ...): the model is
built with `family` and its own section, so switching `family` on the command line needs no
other key. Each section's fields are its module's (`vqvae_jax.quantizer_api.build`); the
defaults are the 9-bit families (the seed's K = 512). `FAMILIES[bits][name]` holds the
presets after the config path, `(family, section overrides)`; `train.quantizer_study` compares
them. The VQ families keep the recommended codebook remedies (`vqvae_jax.RECOMMENDED`, per
stage for residual VQ); FSQ and LFQ have no codebook to remedy.
"""

from typing import Any, Dict, Tuple

import ml_collections

from vqvae_jax import RECOMMENDED

_EMA_ONLY = ('decay', 'zero_debias')


def quantizer_config(family: str = 'ema') -> ml_collections.ConfigDict:
  """`config.model.quantizer`: `family` and every family's section, at 9 bits per code."""
  codebook = dict(num_embeddings=512, embedding_dim=64, commitment_cost=0.25,
                  distance_chunk_size=ml_collections.config_dict.placeholder(int),
                  **{k: v for k, v in RECOMMENDED.items() if k not in _EMA_ONLY},
                  rotation_trick=False)
  ema = dict(codebook, decay=RECOMMENDED['decay'], epsilon=1e-5,
             zero_debias=RECOMMENDED['zero_debias'])
  return ml_collections.ConfigDict(dict(
      family=family,
      vq=codebook,
      ema=ema,
      fsq=dict(levels=(8, 8, 8)),
      lfq=dict(embedding_dim=9, commitment_cost=0.25, entropy_weight=0.1,
               entropy_temperature=0.01,
               entropy_groups=ml_collections.config_dict.placeholder(int)),
      rvq=dict(ema, num_quantizers=3, num_embeddings=8, quantizer_dropout=0.0),
  ))


FAMILIES: Dict[int, Dict[str, Tuple[str, Dict[str, Any]]]] = {
    9: {
        'ema': ('ema', {}),
        'ema_rotation': ('ema', dict(rotation_trick=True)),
        'fsq': ('fsq', {}),
        'lfq': ('lfq', {}),
        'rvq': ('rvq', {}),
    },
    16: {
        # 65,536 codes: the nearest-code search runs 1,024 vectors at a time.
        'ema': ('ema', dict(num_embeddings=65_536, distance_chunk_size=1_024)),
        'ema_rotation': ('ema', dict(num_embeddings=65_536, distance_chunk_size=1_024,
                                     rotation_trick=True)),
        'fsq': ('fsq', dict(levels=(8, 8, 8, 5, 5, 5))),
        # Entropy over 2 groups of 8 bits: the exact one would hold [N, 65536] probabilities.
        'lfq': ('lfq', dict(embedding_dim=16, entropy_groups=2)),
        'rvq': ('rvq', dict(num_quantizers=2, num_embeddings=256)),
    },
}


def apply(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Sets `config.model.quantizer` to the preset named by `arg`: `'fsq'` (9 bits) or `'fsq/16'`.

  An empty `arg` leaves the config as it is. An unknown name raises a ValueError naming it
  and the accepted ones.
  """
  if not arg:
    return config
  name, _, bits = arg.partition('/')
  accepted = [f'{n}/{b}' if b != 9 else n for b in FAMILIES for n in FAMILIES[b]]
  if (bits and not bits.isdigit()) or int(bits or 9) not in FAMILIES or \
      name not in FAMILIES[int(bits or 9)]:
    raise ValueError(f'unknown quantizer family {arg!r} after the config path; accepted: '
                     f'{", ".join(accepted)}.')
  family, overrides = FAMILIES[int(bits or 9)][name]
  config.model.quantizer.family = family
  config.model.quantizer[family].update(overrides)
  return config
