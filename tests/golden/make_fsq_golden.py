"""Writes tests/golden/fsq_golden.npz: the official FSQ code's outputs on fixed inputs.

    python tests/golden/make_fsq_golden.py --notebook PATH/TO/fsq.ipynb

The reference is the `FSQ` class of the paper's own JAX notebook, google-research/google-research
`fsq/fsq.ipynb`, read at commit 5e786838e9825e74992a9884bc079d46734f1baf
(https://github.com/google-research/google-research/blob/master/fsq/fsq.ipynb). This script runs
that notebook's own code cells, the imports and the cell with `round_ste` and `class FSQ`, from
the notebook file, and refuses a file whose code differs from that commit's (a sha256 of the
cells' source below). The notebook's code is not copied into this repository. It needs only
jax and numpy. `tests/test_fsq.py` compares `vqvae_jax.fsq.FSQ` with the values written.

Per level set `i` (odd and even levels, the paper's recommended sets, 2 and 16 levels), with
float32 inputs from 1e-6 to 1e30 in magnitude, exact zeros and +-inf:
  levels_i    int32 [d]
  inputs_i    float32 [N, d]
  quantized_i float32 [N, d]: the notebook's `quantize(inputs)` (eager, float32).
  indices_i   int64 [N]: its `codes_to_indexes(quantize(inputs))`, used as the notebook does
              (on the jax array). The script checks that its `indexes_to_codes` maps them back
              to `quantized_i` and that `quantize` under `jax.jit` gives the same values.
  codebook_i  float32 [prod(levels), d]: its implicit codebook, `indexes_to_codes(arange)`.
"""

import argparse
import hashlib
import json
import os

import numpy as np

LEVEL_SETS = [(3, 5, 4), (8, 6, 5), (8, 5, 5, 5), (7, 5, 5, 5, 5), (8, 8, 8, 6, 5),
              (8, 8, 8, 5, 5, 5), (2, 2), (8, 8, 8), (16, 3, 7)]

# sha256 of the source of the notebook's two code cells that define FSQ (imports; round_ste and
# class FSQ), joined by '\n# ---\n', at commit 5e786838e9825e74992a9884bc079d46734f1baf.
REFERENCE_SHA256 = '7c8746254b8e2a9eb664e1019f4729f0e784c4603aa75b5c3261da2df290c7b7'


def reference_source(notebook_path):
  """The notebook's code cells that define `FSQ`, checked against `REFERENCE_SHA256`."""
  with open(notebook_path) as f:
    cells = json.load(f)['cells']
  sources = [''.join(cell['source']) for cell in cells if cell['cell_type'] == 'code']
  sources = [s for s in sources if s.startswith('import itertools') or 'class FSQ' in s]
  joined = '\n# ---\n'.join(sources)
  digest = hashlib.sha256(joined.encode()).hexdigest()
  if digest != REFERENCE_SHA256:
    raise SystemExit(f'{notebook_path}: its FSQ code cells (sha256 {digest}) are not those of '
                     f'commit 5e786838 ({REFERENCE_SHA256}).')
  return sources


def reference_fsq_class(notebook_path):
  namespace = {}
  for source in reference_source(notebook_path):
    exec(source, namespace)  # pylint: disable=exec-used  # the reference notebook's own code
  return namespace['FSQ']


def inputs_for(d, rng):
  """float32 [N, d]: small, moderate and saturating inputs, large magnitudes, specials."""
  magnitudes = 10.0**rng.uniform(-6, 6, (48, d)) * rng.choice([-1.0, 1.0], (48, d))
  special = np.array([[0.0] * d, [np.inf] * d, [-np.inf] * d, [1e30] * d, [-1e30] * d,
                      [np.float32(3.4e38) * (-1)**j for j in range(d)],
                      [-1e-30 * (-1)**j for j in range(d)]])
  return np.concatenate([rng.normal(0, 0.3, (64, d)), rng.normal(0, 3.0, (64, d)),
                         rng.uniform(-20, 20, (32, d)), magnitudes, special]).astype(np.float32)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--notebook', required=True, help='a copy of fsq/fsq.ipynb')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__),
                                                    'fsq_golden.npz'))
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  fsq_class = reference_fsq_class(args.notebook)
  rng = np.random.default_rng(0)
  arrays = {}
  for i, levels in enumerate(LEVEL_SETS):
    z = inputs_for(len(levels), rng)
    fsq = fsq_class(levels=list(levels))
    zhat = fsq.quantize(jnp.asarray(z))
    assert zhat.dtype == jnp.float32, zhat.dtype
    np.testing.assert_array_equal(jax.jit(fsq.quantize)(jnp.asarray(z)), zhat)
    indices = fsq.codes_to_indexes(zhat)
    np.testing.assert_array_equal(
        np.float32(fsq.indexes_to_codes(np.asarray(indices, np.int64))), zhat)
    codebook = np.asarray(fsq.codebook, np.float32)
    np.testing.assert_array_equal(codebook[np.asarray(indices)], zhat)
    zhat = np.asarray(zhat, np.float32)
    # Fed numpy float32, `codes_to_indexes` sums in float64, where f32(-1/3) * 3 + 3 =
    # 1.99999997 truncates to 1: with a level of 6 or 7 some indices come out one too low.
    raw = np.asarray(fsq.codes_to_indexes(zhat), np.int64)
    arrays[f'levels_{i}'] = np.asarray(levels, np.int32)
    arrays[f'inputs_{i}'] = z
    arrays[f'quantized_{i}'] = zhat
    arrays[f'indices_{i}'] = np.asarray(indices, np.int64)
    arrays[f'codebook_{i}'] = codebook
    print(f'levels {levels}: {len(z)} inputs; on the numpy path, '
          f'{int(np.sum(raw != np.asarray(indices)))} indices are off')
  arrays['jax_version'] = np.asarray(jax.__version__)
  np.savez_compressed(args.out, **arrays)
  print(f'wrote {args.out}: {len(LEVEL_SETS)} level sets, jax {jax.__version__}')


if __name__ == '__main__':
  main()
