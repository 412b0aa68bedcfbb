"""The notebook's install cell: this project and its training dependencies, keeping the runtime's JAX.

Run from the repository root: `python colab/install.py`. A Colab TPU runtime ships jax with a
libtpu built for it (a GPU runtime, a jax-cuda plugin); letting pip pick the newest jax that
requirements.txt admits would replace jax and jaxlib and leave a libtpu that does not match. So
every JAX distribution already installed is pinned, as a pip constraint, to its installed
version, after checking that its jax and jaxlib lie in the ranges pyproject.toml declares.
Where no jax is installed, pip chooses one from those ranges.

TensorFlow and importlib_resources are for preparing CIFAR-10 once with tfds (TPU runtimes ship
without TensorFlow; tfds uses importlib_resources for it without declaring it).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
import tomllib

try:
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
  from packaging.version import Version
except ImportError:  # a bare environment: pip's own copy
  from pip._vendor.packaging.requirements import Requirement
  from pip._vendor.packaging.utils import canonicalize_name
  from pip._vendor.packaging.version import Version

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS_PREPARATION = ('tensorflow-cpu', 'importlib_resources')


def is_runtime_jax(name: str) -> bool:
  """The distributions a runtime's accelerator support consists of: pip must not replace them."""
  name = canonicalize_name(name)
  return (name in ('jax', 'jaxlib') or name.startswith('libtpu') or
          name.startswith(('jax-cuda', 'jax-rocm')))


def installed_runtime_jax() -> dict[str, str]:
  return {canonicalize_name(dist.metadata['Name']): dist.version
          for dist in importlib.metadata.distributions()
          if dist.metadata['Name'] and is_runtime_jax(dist.metadata['Name'])}


def declared_ranges(pyproject_path: str) -> dict[str, Requirement]:
  with open(pyproject_path, 'rb') as f:
    dependencies = tomllib.load(f)['project']['dependencies']
  requirements = [Requirement(line) for line in dependencies]
  return {canonicalize_name(r.name): r for r in requirements if is_runtime_jax(r.name)}


def out_of_range(installed: dict[str, str], ranges: dict[str, Requirement]) -> list[str]:
  """'jax 0.9.2 (supported: jax<0.13,>=0.10.0)' for each installed one outside its range."""
  return [f'{name} {version} (supported: {ranges[name]})'
          for name, version in sorted(installed.items())
          if name in ranges and not ranges[name].specifier.contains(Version(version),
                                                                     prereleases=True)]


def pip_command(constraints_path: str) -> list[str]:
  return [sys.executable, '-m', 'pip', 'install', '-q', '-r', 'requirements.txt', '-e', '.',
          *TFDS_PREPARATION, '-c', constraints_path]


def main() -> int:
  installed = installed_runtime_jax()
  bad = out_of_range(installed, declared_ranges(os.path.join(REPO_ROOT, 'pyproject.toml')))
  if bad:
    print(f'colab/install.py: this runtime has {", ".join(bad)}; choose a runtime whose JAX is '
          'in that range (pyproject.toml), or install one in it first.', file=sys.stderr)
    return 1
  with tempfile.NamedTemporaryFile('w', suffix='-runtime-jax.txt', delete=False) as f:
    f.write(''.join(f'{name}=={version}\n' for name, version in sorted(installed.items())))
  try:
    if installed:
      print('keeping the runtime\'s', ', '.join(f'{n} {v}' for n, v in sorted(installed.items())))
    return subprocess.run(pip_command(f.name), cwd=REPO_ROOT, check=False).returncode
  finally:
    os.unlink(f.name)


if __name__ == '__main__':
  sys.exit(main())
