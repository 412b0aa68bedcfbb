"""The quantizer families at equal bits per code, as `config.model` overrides.

    python -m train --config train/configs/quickstart.py:fsq --workdir runs/quickstart_fsq
    python -m train --config train/configs/cifar10.py:rvq --workdir runs/cifar10_rvq
    python -m train --config train/configs/quickstart.py:lfq/16 --workdir runs/lfq16

`FAMILIES[bits][name]` holds each family's model fields at 9 bits (the seed's K = 512) and at
16 bits; `train.quantizer_study` compares them. The VQ families keep the recommended codebook
remedies (`vqvae_jax.RECOMMENDED`, per stage for residual VQ); FSQ and LFQ have no codebook to
remedy, so those options go back to their defaults.
"""

from typing import Any, Dict

import dataclasses

import ml_collections

from vqvae_jax import RECOMMENDED
from vqvae_jax.quantizers import CodebookOptions

NO_CODEBOOK_OPTIONS = {field.name: field.default
                       for field in dataclasses.fields(CodebookOptions)
                       if field.name in RECOMMENDED}

FAMILIES: Dict[int, Dict[str, Dict[str, Any]]] = {
    9: {
        'ema': dict(quantizer='ema', num_embeddings=512),
        'ema_rotation': dict(quantizer='ema', num_embeddings=512, rotation_trick=True),
        'fsq': dict(quantizer='fsq', fsq_levels=(8, 8, 8), embedding_dim=3,
                    **NO_CODEBOOK_OPTIONS),
        'lfq': dict(quantizer='lfq', embedding_dim=9, **NO_CODEBOOK_OPTIONS),
        'rvq': dict(quantizer='rvq', num_quantizers=3, num_embeddings=8),
    },
    16: {
        # 65,536 codes: the nearest-code search runs 1,024 vectors at a time.
        'ema': dict(quantizer='ema', num_embeddings=65_536, distance_chunk_size=1_024),
        'ema_rotation': dict(quantizer='ema', num_embeddings=65_536, distance_chunk_size=1_024,
                             rotation_trick=True),
        'fsq': dict(quantizer='fsq', fsq_levels=(8, 8, 8, 5, 5, 5), embedding_dim=6,
                    **NO_CODEBOOK_OPTIONS),
        # Entropy over 2 groups of 8 bits: the exact one would hold [N, 65536] probabilities.
        'lfq': dict(quantizer='lfq', embedding_dim=16, lfq_entropy_groups=2,
                    **NO_CODEBOOK_OPTIONS),
        'rvq': dict(quantizer='rvq', num_quantizers=2, num_embeddings=256),
    },
}


def apply(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
  """Sets `config.model` to the family named by `arg`: `'fsq'` (9 bits) or `'fsq/16'`.

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
  config.model.update(FAMILIES[int(bits or 9)][name])
  return config
