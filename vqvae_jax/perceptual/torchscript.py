"""Reads the tensors and attributes of a TorchScript file without torch.

A TorchScript file is a zip archive: ``<root>/data.pkl`` pickles the module tree (each module an
object of a ``__torch__...`` class whose state is a dict of its attributes), and each tensor's
storage is a raw little-endian file ``<root>/data/<key>``. The unpickler below builds plain Python
objects and numpy arrays from it and refuses every other global, so a file cannot run code.
"""

import collections
import pickle
import zipfile

import numpy as np

_STORAGE_DTYPES = {
  'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
  'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
  'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class ScriptModule:
  """A module of the file: ``type_name`` and its attributes (``vars(m)``) as plain values."""

  type_name = '?'

  def __repr__(self):
    return f'ScriptModule({self.type_name})'


def _rebuild_tensor(storage, offset, size, stride, *unused):
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive, self._root = archive, root
    self._classes = {}

  def find_class(self, module, name):
    if module.startswith('__torch__'):
      key = f'{module}.{name}'
      if key not in self._classes:
        self._classes[key] = type(name, (ScriptModule,), {'type_name': key})
      return self._classes[key]
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _STORAGE_DTYPES[name]
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch.jit._pickle' and name in ('build_intlist', 'build_doublelist',
                            'build_boollist', 'build_tensorlist'):
      return list
    raise pickle.UnpicklingError(f'TorchScript reader: unexpected global {module}.{name}')

  def persistent_load(self, pid):
    kind, dtype, key, unused_location, numel = pid
    if kind != 'storage':
      raise pickle.UnpicklingError(f'TorchScript reader: unexpected persistent id {pid!r}')
    raw = self._archive.read(f'{self._root}/data/{key}')
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder('<'), count=numel)


def read_torchscript(path) -> ScriptModule:
  """The module tree pickled in TorchScript file ``path``, tensors as numpy arrays.

  Returns:
   The root ScriptModule; submodules, tensors, ints and lists are its attributes.
  Raises:
   ValueError: ``path`` is not a TorchScript zip archive.
  """
  with zipfile.ZipFile(path) as archive:
    roots = [n[:-len('/data.pkl')] for n in archive.namelist() if n.endswith('/data.pkl')]
    if len(roots) != 1:
      raise ValueError(f'{path}: not a TorchScript file (no single <root>/data.pkl)')
    with archive.open(f'{roots[0]}/data.pkl') as file:
      return _Unpickler(file, archive, roots[0]).load()
