"""Trains a VQ-VAE: `python -m train --config train/configs/quickstart.py --workdir runs/quick`.

Any config key can be overridden: `--config.batch_size=64 --config.model.decay=0.0`.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

import importlib.util
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from train import cpu_tuning
from train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-host: host:port of process 0, for jax.distributed.initialize. On TPU pods and SLURM, '
    'pass --multihost instead and JAX finds the rest itself.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() with auto-detection.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_file(argv):
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(path):
  try:
    spec = importlib.util.spec_from_file_location('config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None  # the message then names the key without listing the accepted ones


def _unknown_key_message(argv) -> str:
  """Names the `--config.*` override that points at a key the config lacks, and the keys it has."""
  config = _load_config(_config_file(argv))
  for arg in argv:
    if arg.startswith('--config.') and config is not None:
      path = arg[len('--config.'):].split('=', 1)[0]
      node = config
      for depth, part in enumerate(path.split('.')):
        if not hasattr(node, 'keys') or part not in node:
          accepted = (f'; accepted: {", ".join(sorted(node.keys()))}'
                      if hasattr(node, 'keys') else '')
          bad = '.'.join(path.split('.')[:depth + 1])
          return f'unknown config key {bad!r} (in {arg}){accepted}.'
        node = node[part]
  return 'unknown config key in the --config.* overrides.'


def _parse_flags(argv):
  """absl's flag parsing, with every user error as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError):  # ml_collections: --config.<unknown key>=...
    _fail(_unknown_key_message(argv))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value or _MULTIHOST.value:
    if _COORDINATOR.value:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cpu_tuning.apply()  # before JAX starts its backend
  from train import trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
