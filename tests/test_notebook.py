"""The Colab notebook is committed without outputs (nbmake executes it in the same run)."""

import json
import os

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
    if 'pip install' in source and not source.lstrip().startswith('#') or '!git clone' in source:
      assert 'skip-execution' in cell['metadata'].get('tags', []), source[:80]
