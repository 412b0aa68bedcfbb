"""colab/install.py (the notebook's install cell) and the repository URL's one source."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, 'colab'))
import install  # pylint: disable=g-import-not-at-top,wrong-import-position

with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as _f:
  PYPROJECT = tomllib.load(_f)
REPO_URL = PYPROJECT['project']['urls']['Repository']
RANGES = install.declared_ranges(os.path.join(REPO_ROOT, 'pyproject.toml'))


def _notebook_install_cell():
  with open(os.path.join(REPO_ROOT, 'colab', 'vqvae_tpu.ipynb')) as f:
    cells = json.load(f)['cells']
  return next(''.join(c['source']) for c in cells if 'REPO_URL' in ''.join(c['source']))


def test_notebook_repo_url_is_pyprojects():
  assert re.findall(r"REPO_URL = '([^']*)'", _notebook_install_cell()) == [REPO_URL]


def test_readme_colab_badge_opens_pyprojects_repository():
  with open(os.path.join(REPO_ROOT, 'README.md')) as f:
    badges = re.findall(r'https://colab\.research\.google\.com/github/([^)\s]*)', f.read())
  owner_and_name = REPO_URL.removeprefix('https://github.com/')
  assert badges, 'README has no Colab badge'
  assert badges == [f'{owner_and_name}/blob/main/colab/vqvae_tpu.ipynb'] * len(badges)


def test_install_cell_runs_the_script():
  assert _notebook_install_cell().strip().splitlines()[-1] == '!python colab/install.py'


def test_declared_ranges_are_pyprojects_jax_and_jaxlib():
  assert sorted(RANGES) == ['jax', 'jaxlib']
  assert str(RANGES['jax'].specifier) == str(RANGES['jaxlib'].specifier)
  assert RANGES['jax'].specifier.contains('0.12.0.1')
  assert not RANGES['jax'].specifier.contains('0.9.2')


def test_runtime_jax_distributions_are_pinned_and_others_are_not():
  for name in ('jax', 'jaxlib', 'libtpu', 'libtpu-nightly', 'jax-cuda12-plugin',
               'jax_cuda12_pjrt', 'jax-rocm7-plugin'):
    assert install.is_runtime_jax(name), name
  for name in ('flax', 'jaxtyping', 'optax', 'jax-dataclasses'):
    assert not install.is_runtime_jax(name), name


def test_out_of_range_names_each_bad_version():
  assert install.out_of_range({'jax': '0.12.0.1', 'jaxlib': '0.12.0.1', 'libtpu': '0.0.31'},
                              RANGES) == []
  bad = install.out_of_range({'jax': '0.9.2', 'jaxlib': '0.13.0', 'libtpu': '0.0.31'}, RANGES)
  assert bad == [f'jax 0.9.2 (supported: {RANGES["jax"]})',
                 f'jaxlib 0.13.0 (supported: {RANGES["jaxlib"]})']


def test_unsupported_runtime_jax_is_one_line_and_installs_nothing(tmp_path):
  """A runtime whose jax is 0.9.2: one line on stderr, exit 1, pip never runs."""
  site = tmp_path / 'site'
  (site / 'jax-0.9.2.dist-info').mkdir(parents=True)
  (site / 'jax-0.9.2.dist-info' / 'METADATA').write_text(
      'Metadata-Version: 2.1\nName: jax\nVersion: 0.9.2\n')
  import packaging  # pylint: disable=g-import-not-at-top
  os.symlink(os.path.dirname(packaging.__file__), site / 'packaging')
  # -S: no site-packages, so the only jax is the one above.
  result = subprocess.run([sys.executable, '-S', os.path.join('colab', 'install.py')],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, 'PYTHONPATH': str(site)})
  assert result.returncode == 1
  assert result.stdout == ''
  assert result.stderr.count('\n') == 1 and 'Traceback' not in result.stderr
  assert f'jax 0.9.2 (supported: {RANGES["jax"]})' in result.stderr


def _venv_python(path):
  return os.path.join(path, 'bin', 'python')


def _installed(python, name):
  return subprocess.run([python, '-c', f'import importlib.metadata as m; print(m.version("{name}"))'],
                        capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(os.environ.get('CI') != 'true',
                    reason='installs packages from the registry; CI runs it')
def test_install_cell_keeps_a_supported_runtime_jax(tmp_path):
  """A runtime holding jax at the supported range's lower bound, where pip alone would replace
  it (flax 0.12.9 and later need jax 0.11.1, which needs Python 3.12): after the install cell's
  command the same jax and jaxlib are there, and the project imports."""
  lowest = str(min(s.version for s in RANGES['jax'].specifier if s.operator == '>='))
  env_dir = str(tmp_path / 'runtime')
  venv.create(env_dir, with_pip=True)
  python = _venv_python(env_dir)
  pip = [python, '-m', 'pip', 'install', '-q']
  subprocess.run(pip + [f'jax=={lowest}', f'jaxlib=={lowest}'], check=True)
  clone = tmp_path / 'vqvae-jax'
  shutil.copytree(REPO_ROOT, clone, ignore=shutil.ignore_patterns(
      '.git', '.venv', '.ci-venv', 'runs', '*.egg-info', '__pycache__', '.pytest_cache'))
  report = tmp_path / 'plain_pip.json'
  subprocess.run(pip + ['--dry-run', '--report', str(report), '-r', 'requirements.txt'],
                 cwd=clone, check=True)
  with open(report) as f:
    plain_pip_jax = [i['metadata']['version'] for i in json.load(f)['install']
                     if i['metadata']['name'] == 'jax']
  if not plain_pip_jax:
    pytest.skip(f'on Python {sys.version_info[0]}.{sys.version_info[1]} pip alone keeps jax '
                f'{lowest} too (the newest flax here accepts it)')
  assert plain_pip_jax != [lowest]

  subprocess.run([python, os.path.join('colab', 'install.py')], cwd=clone, check=True)

  assert _installed(python, 'jax') == lowest
  assert _installed(python, 'jaxlib') == lowest
  subprocess.run([python, '-c', 'import vqvae_jax, flax, optax, orbax.checkpoint, '
                  'tensorflow_datasets, tensorflow'], cwd=tmp_path, check=True)
