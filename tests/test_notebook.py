"""The Colab notebook is committed without outputs (nbmake executes it in the same run)."""

import json
import os
import sys

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'colab', 'vqvae_tpu.ipynb')


def test_notebook_outputs_are_stripped():
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  code_cells = [cell for cell in notebook['cells'] if cell['cell_type'] == 'code']
  assert code_cells
  for cell in code_cells:
    assert cell['outputs'] == [] and cell['execution_count'] is None, cell['source'][:80]


def test_install_cells_are_skipped_in_ci():
  with open(NOTEBOOK) as f:
    notebook = json.load(f)
  for cell in notebook['cells']:
    source = ''.join(cell['source'])
    installs = 'pip install' in source and not source.lstrip().startswith('#')
    if installs or 'install.py' in source or '!git clone' in source:
      assert 'skip-execution' in cell['metadata'].get('tags', []), source[:80]


def test_notebook_kernel_is_this_python():
  """nbmake starts the notebook's kernel (python3) with this command: CI's two runs each test
  their own virtual environment only if it is this interpreter."""
  from jupyter_client.manager import KernelManager  # pylint: disable=g-import-not-at-top
  with open(NOTEBOOK) as f:
    kernel_name = json.load(f)['metadata']['kernelspec']['name']
  manager = KernelManager(kernel_name=kernel_name)
  assert manager.format_kernel_cmd()[0] == sys.executable
