"""Samples images from a trained prior:

    python -m train.sample --workdir runs/prior --num_samples 64 --out samples.png

Writes the decoded samples as a PNG grid (rows of 8, named by their label) and their code
grids as an .npz beside it (`samples.npz`: `codes` int32 [B, h, w], `labels`). Samples are a
pure function of `--seed`. A class-conditional prior samples each row from the next label in
turn, or every sample from `--label` (a name or an index; `none` for the unconditional model).
"""

import os
import sys

from absl import app, flags, logging

from train import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The --workdir of python -m train.prior.')
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 64, 'How many samples.', lower_bound=1)
_OUT = flags.DEFINE_string('out', 'samples.png', 'The PNG to write (a .png path); the codes go to '
                           'the .npz beside it.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature, > 0.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Keep the k most likely codes at each position; 0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass, in (0, 1]; 1: off.')
_LABEL = flags.DEFINE_string('label', None, 'A class-conditional prior: the label of every '
                             'sample, by name or index, or "none" for the unconditional model.')
_GUIDANCE_SCALE = flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale '
                                     '(needs a prior trained with label dropout).')
_SEED = flags.DEFINE_integer('seed', 0, 'The samples are a pure function of it.')
flags.mark_flags_as_required(['workdir'])


def _labels(class_names, num_samples):
  """int32 `[num_samples]` labels from `--label`, or None for the unconditional model."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from train import prior_samples  # pylint: disable=g-import-not-at-top
  label = _LABEL.value
  if not class_names:
    if label is not None and label != 'none':
      cli.fail(f'--label {label!r}: the prior in {_WORKDIR.value} is unconditional; accepted: '
               f'no --label.')
    return None
  if label is None:
    return prior_samples.row_labels(num_samples, len(class_names))
  if label == 'none':
    return None
  index = class_names.index(label) if label in class_names else (
      int(label) if label.isdigit() and int(label) < len(class_names) else None)
  if index is None:
    cli.fail(f'--label {label!r} is not a label of this prior; accepted: none, 0 to '
             f'{len(class_names) - 1}, or one of {", ".join(class_names)}.')
  return np.full((num_samples,), index, np.int32)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; accepted: flags only (see --help).')
  if os.path.splitext(_OUT.value)[1].lower() != '.png':
    cli.fail(f'--out {_OUT.value!r}; accepted: a .png path (the codes go to the .npz beside '
             f'it).')
  logging.set_verbosity(logging.WARNING)  # before JAX logs which backends it tried
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from train import pictures  # pylint: disable=g-import-not-at-top
  from train import prior_samples, prior_training  # pylint: disable=g-import-not-at-top
  from train.checkpoints import load_prior  # pylint: disable=g-import-not-at-top
  with cli.user_errors_in_one_line():
    prior, params, info = load_prior(_WORKDIR.value)
    class_names = tuple(info['class_names'])
    labels = _labels(class_names, _NUM_SAMPLES.value)
    options = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value or None,
                   top_p=_TOP_P.value,
                   guidance_scale=_GUIDANCE_SCALE.value)
    vqvae, vqvae_variables, _ = prior_training.load_vqvae(info['config']['vqvae_workdir'],
                                                          info['vqvae_step'])
    try:
      codes, rows, names = prior_samples.sample_image_rows(
          prior, params, prior_samples.make_decode(vqvae), vqvae_variables,
          jax.random.key(_SEED.value), _NUM_SAMPLES.value, labels, class_names, **options)
    except ValueError as e:  # the sampler names the bad option and what it accepts
      cli.fail(str(e))
    title = (f'{_NUM_SAMPLES.value} samples from {_WORKDIR.value}: '
             f'{prior_samples.describe_options(**options)}, seed {_SEED.value}')
    pictures.write_image_grid(_OUT.value, rows, names, title)
    codes_path = os.path.splitext(_OUT.value)[0] + '.npz'
    np.savez(codes_path, codes=codes, labels=np.asarray([] if labels is None else labels))
  print(f'Wrote {_OUT.value} and {codes_path}.', file=sys.stderr)


if __name__ == '__main__':
  cli.run(main)
