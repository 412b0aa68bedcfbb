"""Writes tests/golden/fsq_golden.npz: the official FSQ code's outputs on fixed inputs.

    python tests/golden/make_fsq_golden.py --notebook PATH/TO/fsq.ipynb

The reference is the FSQ class of the paper's own JAX notebook, google-research/google-research
`fsq/fsq.ipynb` (read at commit 5e786838e9825e74992a9884bc079d46734f1baf). This script runs
that notebook's code cells that define it (the imports and the FSQ class) from the notebook
file itself, so none of its code is copied here; it needs jax and numpy, never torch.
`tests/test_quantizer_families.py` compares `vqvae_jax.fsq.FSQ` with the values written.

The notebook's `codes_to_indexes` truncates a float (`.astype(uint32)`): with a level of 6 or 7
(`L // 2 = 3`, codes in thirds) or when its float32 `quantize` lands one ulp under the code,
the sum comes out just under an integer and the index is one too low, so its own
`indexes_to_codes` does not give the code back. The file holds the notebook's raw indices
(`raw_indices_*`) and their round trip through its `indexes_to_codes` (`raw_round_trip_*`),
and, as `indices_*`, the row of the notebook's own implicit codebook that each output equals.
"""

import argparse
import json
import os

import numpy as np

LEVEL_SETS = [(3, 5, 4), (8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5),
              (8, 8, 8, 5, 5, 5), (2, 2), (8, 8, 8)]


def reference_fsq_class(notebook_path):
  with open(notebook_path) as f:
    cells = json.load(f)['cells']
  namespace = {}
  for cell in cells:
    source = ''.join(cell['source'])
    if cell['cell_type'] == 'code' and ('import jax' in source or 'class FSQ' in source):
      exec(source, namespace)  # pylint: disable=exec-used  # the reference notebook's code
  return namespace['FSQ']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--notebook', required=True, help='a copy of fsq/fsq.ipynb')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__),
                                                    'fsq_golden.npz'))
  args = parser.parse_args()
  fsq_class = reference_fsq_class(args.notebook)
  rng = np.random.default_rng(0)
  arrays = {}
  for i, levels in enumerate(LEVEL_SETS):
    # Small, moderate and saturating magnitudes, and exact zeros.
    z = np.concatenate([rng.normal(0, 0.3, (64, len(levels))),
                        rng.normal(0, 3.0, (64, len(levels))),
                        rng.uniform(-20, 20, (32, len(levels))),
                        np.zeros((1, len(levels)))]).astype(np.float32)
    fsq = fsq_class(levels=list(levels))
    zhat = np.asarray(fsq.quantize(z), np.float32)
    arrays[f'levels_{i}'] = np.asarray(levels, np.int32)
    arrays[f'inputs_{i}'] = z
    arrays[f'quantized_{i}'] = zhat
    raw = np.asarray(fsq.codes_to_indexes(zhat), np.int64)
    arrays[f'raw_indices_{i}'] = raw
    arrays[f'raw_round_trip_{i}'] = np.asarray(fsq.indexes_to_codes(raw), np.float32)
    codebook = np.asarray(fsq.codebook, np.float32)
    arrays[f'indices_{i}'] = np.argmin(
        np.abs(zhat[:, None, :] - codebook[None]).max(axis=-1), axis=1).astype(np.int64)
    arrays[f'codebook_{i}'] = np.asarray(fsq.codebook, np.float32)
  np.savez_compressed(args.out, **arrays)
  print(f'wrote {args.out}: {len(LEVEL_SETS)} level sets')


if __name__ == '__main__':
  main()
