"""The training programs' command line: absl flags with a config file, where every user error
(a config file that cannot be loaded, a bad override, a stray argument, a `UserError`) is one
`error:` line and exit status 2, without a traceback.

`python -m train` (the VQ-VAE) and `python -m train.prior` (the prior) share it.
"""

import contextlib
import importlib.util
import re
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from train import cpu_tuning
from train.errors import UserError

def fail(message: str):
  """Prints one `error:` line and exits with status 2: how every user error ends."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _config_file(argv):
  """The `--config` file's path; absl takes the last of repeated flags, and so does this."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _load_config(path: str):
  """The config file's `get_config()`, loaded as ml_collections loads it (which would fail with
  a traceback); a file that cannot be loaded is a user error."""
  # ml_collections passes what follows a ':' to get_config, e.g. 'quickstart.py:fsq'.
  file_path, has_arg, arg = path.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('config', file_path)
    if spec is None:
      raise ImportError('not a Python file')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if has_arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # the user's file, whatever it raises
    fail(f'--config {file_path} could not be loaded ({type(e).__name__}: {e}); accepted: a '
          f'Python file with a get_config() that returns a ConfigDict, such as '
          f'train/configs/quickstart.py.')


def _unknown_key_message(argv, config) -> str:
  """Names the `--config.*` override that points at a key the config lacks, and the keys it has."""
  for arg in argv:
    if arg.startswith('--config.'):
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
  path = _config_file(argv)
  # A file ml_collections cannot load fails here, in one line; the config names what is accepted.
  config = _load_config(path) if path else None
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}{_accepted_type(config, str(e))}')
  except (AttributeError, KeyError):  # ml_collections: --config.<unknown key>=...
    fail(_unknown_key_message(argv, config))


_ACCEPTED_TYPES = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}


def _accepted_type(config, message: str) -> str:
  """'; accepted: <type>.' for a `--config.<key>=<value>` whose value has the wrong type."""
  match = re.match(r'flag --config\.([\w.]+)=', message)
  if not match or config is None:
    return ''
  value = config
  for part in match.group(1).split('.'):
    value = value[part]
  accepted = _ACCEPTED_TYPES.get(type(value))
  return f'; accepted: {accepted}.' if accepted else ''


def run_training(train_and_evaluate: Callable[[Any, str], Any]) -> None:
  """A training program's command line: `--config FILE --workdir DIR` and the multi-host flags.

  Args:
    train_and_evaluate: `(config, workdir) -> metrics`, called once JAX is set up; it should
      import what starts JAX's backend only when called (after `cpu_tuning.apply`).
  """
  config = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                           lock_config=True)
  workdir = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and images.')
  coordinator = flags.DEFINE_string(
      'coordinator_address', None,
      'Multi-host: host:port of process 0, for jax.distributed.initialize. On TPU pods and '
      'SLURM, pass --multihost instead and JAX finds the rest itself.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
  process_id = flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')
  multihost = flags.DEFINE_bool('multihost', False,
                                'Call jax.distributed.initialize() with auto-detection.')
  flags.mark_flags_as_required(['config', 'workdir'])

  def main(argv):
    if len(argv) > 1:
      fail(f'unexpected arguments {argv[1:]}; accepted: flags only, such as --config=FILE '
           f'--workdir=DIR --config.batch_size=64 (see --help).')
    logging.set_verbosity(logging.WARNING)  # before JAX logs which backends it tried
    import jax  # pylint: disable=g-import-not-at-top
    if coordinator.value or multihost.value:
      if coordinator.value:
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
    cpu_tuning.apply()  # before JAX starts its backend
    with user_errors_in_one_line():
      train_and_evaluate(config.value, workdir.value)

  run(main)


@contextlib.contextmanager
def user_errors_in_one_line():
  """A `UserError` raised inside becomes `error: <message>` and exit status 2."""
  try:
    yield
  except UserError as e:
    fail(str(e))


def run(main: Callable[[Any], None]) -> None:
  """`app.run` with the `--config` file's errors and bad overrides as one line each."""
  app.run(main, flags_parser=_parse_flags)
