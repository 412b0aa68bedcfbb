"""Weights of the seed's PyTorch `Model` (`seed_torch.py`) as Flax variables for `VQVAE`, and back.

    import torch
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = from_seed_state_dict(state_dict)
    model = VQVAE(**seed_architecture(state_dict), commitment_cost=0.25, decay=0.99)
    recon, vq = model.apply(variables, images_nhwc)

Torch is never imported here: the state_dict's values only need to convert with `np.asarray`.
The converted model computes what the seed computes only with the default
`residual_skip='relu'`, which reproduces the seed's in-place ReLU.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from vqvae_jax.quantizers import merge_codebook_offset

# torch conv weight [O, I, kh, kw] -> HWIO; transposed-conv weight [I, O, kh, kw] -> HWIO.
_CONV = (2, 3, 1, 0)
_CONV_TRANSPOSE = (2, 3, 0, 1)


def seed_architecture(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The `VQVAE` architecture arguments that a seed state_dict was made with.

  Returns:
    A dict with `num_hiddens`, `num_residual_layers`, `num_residual_hiddens`,
    `num_embeddings`, `embedding_dim` and `ema` (True if it holds a `VectorQuantizerEMA`; build
    the model with `decay > 0` then). `commitment_cost` and `decay` are not stored in a
    state_dict and must come from the user.

  Raises:
    ValueError: a key needed to read the architecture is missing.
  """
  def shape(key):
    if key not in state_dict:
      raise ValueError(f'seed state_dict is missing key {key!r}; is it the state_dict of '
                       f'seed_torch.Model?')
    return np.shape(state_dict[key])

  num_residual_layers = 0
  while f'_encoder._residual_stack._layers.{num_residual_layers}._block.1.weight' in state_dict:
    num_residual_layers += 1
  num_embeddings, embedding_dim = shape('_vq_vae._embedding.weight')
  architecture = dict(
      num_hiddens=shape('_encoder._conv_2.weight')[0],
      num_residual_layers=num_residual_layers,
      num_residual_hiddens=(shape('_encoder._residual_stack._layers.0._block.1.weight')[0]
                            if num_residual_layers else 1),
      num_embeddings=num_embeddings,
      embedding_dim=embedding_dim,
      ema='_vq_vae._ema_w' in state_dict)
  return {k: (int(v) if k != 'ema' else v) for k, v in architecture.items()}


def _layout(arch: Mapping[str, Any]) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...],
                                                         Optional[Tuple[int, ...]]]]:
  """torch key -> (flax path, torch shape, transpose to apply)."""
  h, r, rh = arch['num_hiddens'], arch['num_residual_layers'], arch['num_residual_hiddens']
  k, d = arch['num_embeddings'], arch['embedding_dim']
  layout = {}

  def conv(torch_name, path, out_ch, in_ch, size, bias=True, transpose=False):
    shape = (in_ch, out_ch, size, size) if transpose else (out_ch, in_ch, size, size)
    layout[f'{torch_name}.weight'] = (('params',) + path + ('kernel',), shape,
                                      _CONV_TRANSPOSE if transpose else _CONV)
    if bias:
      layout[f'{torch_name}.bias'] = (('params',) + path + ('bias',), (out_ch,), None)

  def residual_stack(torch_name, path):
    for i in range(r):
      conv(f'{torch_name}._layers.{i}._block.1', path + (f'layers_{i}_conv3x3',), rh, h, 3,
           bias=False)
      conv(f'{torch_name}._layers.{i}._block.3', path + (f'layers_{i}_conv1x1',), h, rh, 1,
           bias=False)

  conv('_encoder._conv_1', ('encoder', 'conv_1'), h // 2, 3, 4)
  conv('_encoder._conv_2', ('encoder', 'conv_2'), h, h // 2, 4)
  conv('_encoder._conv_3', ('encoder', 'conv_3'), h, h, 3)
  residual_stack('_encoder._residual_stack', ('encoder', 'residual_stack'))
  conv('_pre_vq_conv', ('pre_vq_conv',), d, h, 1)
  if arch['ema']:
    layout['_vq_vae._embedding.weight'] = (('batch_stats', 'vq', 'embedding'), (k, d), None)
    layout['_vq_vae._ema_cluster_size'] = (('batch_stats', 'vq', 'ema_cluster_size'), (k,),
                                           None)
    layout['_vq_vae._ema_w'] = (('batch_stats', 'vq', 'ema_w'), (k, d), None)
  else:
    layout['_vq_vae._embedding.weight'] = (('params', 'vq', 'embedding'), (k, d), None)
  conv('_decoder._conv_1', ('decoder', 'conv_1'), h, d, 3)
  residual_stack('_decoder._residual_stack', ('decoder', 'residual_stack'))
  conv('_decoder._conv_trans_1', ('decoder', 'conv_trans_1'), h // 2, h, 4, transpose=True)
  conv('_decoder._conv_trans_2', ('decoder', 'conv_trans_2'), 3, h // 2, 4, transpose=True)
  return layout


def _to_numpy(value: Any, what: str) -> np.ndarray:
  """`value` as a float32 array; anything else is a ValueError naming `what`."""
  if hasattr(value, 'detach'):  # a torch tensor, accepted without importing torch
    value = value.detach().cpu().numpy()
  try:
    array = np.asarray(value)
    if array.dtype.kind not in 'fiu':
      raise TypeError(f'dtype {array.dtype}')
    return array.astype(np.float32)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{what} holds {type(value).__name__} ({e}); accepted: a float array or '
                     f'a CPU tensor.') from None


def _private_copy(value: np.ndarray, transpose: Optional[Tuple[int, ...]]) -> np.ndarray:
  """A C-contiguous float32 copy of `value` (transposed if asked) that shares no memory with it.

  A state_dict's values are usually views of the torch model's parameters (`v.numpy()`, or a
  CPU tensor's `.numpy()` above), which torch's optimizer updates in place: an uncopied result
  would keep changing after conversion.
  """
  return np.array(value.transpose(transpose) if transpose else value, dtype=np.float32,
                  order='C', copy=True)


def from_seed_state_dict(state_dict: Mapping[str, Any], model: Any = None) -> Dict[str, Any]:
  """Flax variables for `VQVAE` from the state_dict of the seed's PyTorch `Model`.

  Args:
    state_dict: `torch_model.state_dict()`, with values as numpy arrays (or CPU tensors).
    model: optional `VQVAE`; if given, its architecture must match the state_dict's.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (no `batch_stats` for the plain quantizer), float32
    numpy arrays in NHWC/HWIO layout, ready for `VQVAE(...).apply`. They are copies that share
    no memory with `state_dict`'s values: training the torch model afterwards (which updates
    its tensors, and their `.numpy()` views, in place) leaves them unchanged.

  Raises:
    ValueError: naming the key that is missing, unexpected or of the wrong shape, or the model
      field that differs from the state_dict.
  """
  arch = seed_architecture(state_dict)
  if model is not None:
    for name, value in arch.items():
      model_value = model.decay > 0 if name == 'ema' else getattr(model, name)
      if model_value != value:
        raise ValueError(f'the seed state_dict has {name}={value!r} but the model has '
                         f'{"decay > 0" if name == "ema" else name}={model_value!r}.')
  layout = _layout(arch)
  unexpected = sorted(set(state_dict) - set(layout))
  if unexpected:
    raise ValueError(f'seed state_dict has unexpected key {unexpected[0]!r} (and '
                     f'{len(unexpected) - 1} more); expected the keys of seed_torch.Model.')
  variables: Dict[str, Any] = {}
  for key, (path, shape, transpose) in layout.items():
    if key not in state_dict:
      raise ValueError(f'seed state_dict is missing key {key!r} (expected shape {shape}).')
    value = _to_numpy(state_dict[key], f'seed state_dict key {key!r}')
    if value.shape != shape:
      raise ValueError(f'seed state_dict key {key!r} has shape {value.shape}, expected {shape} '
                       f'for architecture {arch}.')
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = _private_copy(value, transpose)
  return variables


def to_seed_state_dict(variables: Mapping[str, Any], architecture: Mapping[str, Any]
                       ) -> Dict[str, np.ndarray]:
  """The inverse of `from_seed_state_dict`: numpy arrays keyed like the seed's state_dict.

  Args:
    variables: `VQVAE` variables of the seed's architecture (`residual_skip='relu'`, 3 image
      channels, no zero-debias).
    architecture: as returned by `seed_architecture`.

  Raises:
    ValueError: naming the variable that is missing, of the wrong shape, or not a float array.
  """
  # A plain quantizer trained with k-means init or restarts keeps part of its codes in
  # batch_stats['vq']['codebook_offset']: the seed's codebook is their sum.
  variables = merge_codebook_offset(variables)
  state_dict = {}
  for key, (path, shape, transpose) in _layout(architecture).items():
    value = variables
    for part in path:
      if not hasattr(value, 'keys') or part not in value:
        raise ValueError(f'variables lack {"/".join(path)} (for the seed\'s {key!r}); accepted: '
                         f'the variables of a VQVAE with architecture {dict(architecture)}.')
      value = value[part]
    value = _to_numpy(value, f'variable {"/".join(path)}')
    value = value.transpose(np.argsort(transpose)) if transpose else value
    if value.shape != shape:
      raise ValueError(f'variable {"/".join(path)} has shape {value.shape} in the seed\'s layout, '
                       f'expected {shape} for architecture {dict(architecture)}.')
    state_dict[key] = value
  return state_dict
