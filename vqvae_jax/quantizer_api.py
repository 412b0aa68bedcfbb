"""The quantizer contract: what every family returns and offers, the checks they share, and the
registry that builds a family from a config.

A quantizer family is a Flax module that meets `Quantizer`. `build({'family': 'lfq',
'embedding_dim': 9})` builds one by name; `VQVAE(quantizer=...)` and `ResidualVQ`'s stages are
built this way. Adding a family touches its own module, `FAMILIES` below and the docs
(`docs/architecture.md` shows it with FSQ).

The code-range contract, for every family: `embed` takes integer codes in
`[0, codebook_size)`. A concrete code outside it is a `ValueError` naming it (`check_codes`);
under `jit`, where the values are not known without a device sync, it embeds to a row of NaN,
never to a valid code (`nan_outside_range`). `ResidualVQ` adds one marker: -1, in a signed
integer dtype, is a stage that quantizer dropout left out and embeds to zeros.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

Array = jax.Array

# family name -> 'module:class'. Imported when first built, so that a family's module may
# itself build other families (`ResidualVQ` builds its stages here).
FAMILIES = {
    'vq': 'vqvae_jax.quantizers:VectorQuantizer',
    'ema': 'vqvae_jax.quantizers:VectorQuantizerEMA',
    'fsq': 'vqvae_jax.fsq:FSQ',
    'lfq': 'vqvae_jax.lfq:LFQ',
    'rvq': 'vqvae_jax.residual:ResidualVQ',
}


@struct.dataclass
class QuantizerOutput:
  """What a quantizer returns.

  Attributes:
    quantized: `[..., D]`, the inputs' dtype: the codes in the forward pass, with a gradient
      to the inputs (straight-through, or the rotation trick's); see each family.
    loss: float32 scalar, the family's auxiliary loss (0 for FSQ). Inside `shard_map` its
      squared-error terms are means over this device's inputs: `lax.pmean` it over
      `axis_name` for the global one.
    perplexity: float32 scalar, `exp(entropy)` of the batch's code distribution.
    indices: int32 `[...]` (`[..., Q]` for `codes_per_position = Q > 1`), each vector's code.
    code_counts: float32 `[codebook_size]` (`[Q, codebook_size]`), how many vectors got each
      code in this batch (summed over `axis_name` when given).
    encodings: float32 `[N, K]` one-hot codes, `N = prod(inputs.shape[:-1])`; only from the VQ
      families built with `return_encodings=True`, else None.
    distances: float32 `[N, K]` squared distances to every code; only with
      `return_distances=True`, else None.
  """

  quantized: Array
  loss: Array
  perplexity: Array
  indices: Array
  code_counts: Array
  encodings: Optional[Array] = None
  distances: Optional[Array] = None


@runtime_checkable
class Quantizer(Protocol):
  """What every family offers (a Flax module; its fields are its config).

  Attributes:
    embedding_dim: D, the inputs' last dimension.
    codebook_size: how many values one code takes; codes are in `[0, codebook_size)`.
    codes_per_position: codes per input vector (1, or Q stages for residual VQ).
  """

  embedding_dim: int

  @property
  def codebook_size(self) -> int:
    ...

  @property
  def codes_per_position(self) -> int:
    ...

  def __call__(self, inputs: Array, train: bool = False) -> QuantizerOutput:
    """Quantizes float `[..., D]` inputs; `train=True` updates state where the family keeps
    any (then `mutable=['batch_stats']`)."""
    ...

  def embed(self, indices: Array) -> Array:
    """float32 `[..., D]` codes of integer `indices` (`[..., Q]` when Q > 1), under the
    code-range contract of this module's docstring."""
    ...


def family_class(family: str) -> type:
  """The module class registered as `family` in `FAMILIES`; a ValueError names the accepted."""
  if family not in FAMILIES:
    raise ValueError(f'quantizer family must be one of {tuple(FAMILIES)}, got {family!r}.')
  module_name, class_name = FAMILIES[family].split(':')
  return getattr(importlib.import_module(module_name), class_name)


def config_fields(family: str) -> Sequence[str]:
  """The fields a `family`'s config may set (its module's fields)."""
  return tuple(field.name for field in dataclasses.fields(family_class(family))
               if field.name not in ('parent', 'name'))


def build(config: Mapping[str, Any], **module_kwargs) -> Any:
  """The quantizer a config describes.

  Args:
    config: `{'family': one of FAMILIES, **fields}`, the fields being the family module's
      (e.g. `{'family': 'fsq', 'levels': (8, 5, 5, 5)}`).
    **module_kwargs: set by the caller, not by the config: `name`, `parent`, `axis_name`.

  Returns:
    The family's module, its fields checked.

  Raises:
    ValueError: no or an unknown family, a field the family does not have (the message names
      the accepted ones), a field the caller sets, or a bad field value.
  """
  fields = dict(config)
  family = fields.pop('family', None)
  accepted = config_fields(family)
  for key in fields:
    if key in module_kwargs:
      raise ValueError(f'quantizer config key {key!r} is set by the quantizer\'s owner, not '
                       f'the config.')
    if key not in accepted:
      raise ValueError(f'quantizer family {family!r} has no field {key!r}; accepted: '
                       f'{", ".join(accepted)}.')
  return family_class(family)(**fields, **module_kwargs)


# ---- Checks every family shares. ----


def check_number(name: str, value: Any, low: Optional[float] = None,
                 high: Optional[float] = None, *, low_open: bool = False,
                 high_open: bool = False, integer: bool = False) -> None:
  """Raises a ValueError naming `name` and `value` unless it is a finite real (an integer if
  `integer`, bools refused) within the bounds (`>` / `<` where open, else `>=` / `<=`)."""
  kind = numbers.Integral if integer else numbers.Real
  ok = isinstance(value, (kind, np.integer) if integer else (kind, np.integer, np.floating))
  ok = ok and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
  ok = ok and (low is None or (value > low if low_open else value >= low))
  ok = ok and (high is None or (value < high if high_open else value <= high))
  if not ok:
    if low is not None and high is not None:
      bounds = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    elif low is not None:
      bounds = f'{">" if low_open else ">="} {low}'
    elif high is not None:
      bounds = f'{"<" if high_open else "<="} {high}'
    else:
      bounds = 'finite'
    raise ValueError(f'{name} must be {"an integer" if integer else "a number"} {bounds}, got '
                     f'{value!r}.')


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises a ValueError naming `name`, `value` and the `choices` unless `value` is one."""
  is_bool = isinstance(value, (bool, np.bool_))
  ok = any(is_bool == isinstance(c, bool) and value == c for c in choices)
  if not ok:
    raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}.')


def check_inputs(inputs: Array, embedding_dim: int, who: str) -> None:
  """Raises unless `inputs` are floating point `[..., embedding_dim]`.

  Raises:
    ValueError: `inputs` do not end in `embedding_dim` (the message names the shape).
    TypeError: `inputs` are not floating point.
  """
  if inputs.ndim < 1 or inputs.shape[-1] != embedding_dim:
    raise ValueError(f'{who} expects inputs of shape [..., {embedding_dim}] (embedding_dim), '
                     f'got shape {tuple(inputs.shape)}.')
  if not jnp.issubdtype(inputs.dtype, jnp.floating):
    raise TypeError(f'{who} expects floating-point inputs, got {inputs.dtype}.')


def flatten_inputs(inputs: Array, embedding_dim: int, who: str) -> Array:
  """float32 `[N, D]` from `[..., D]` float inputs, checked by `check_inputs`."""
  check_inputs(inputs, embedding_dim, who)
  return inputs.reshape(-1, embedding_dim).astype(jnp.float32)


def count_codes(indices: Array, num_codes: int, axis_name: Optional[str] = None,
                weights: Optional[Array] = None) -> Array:
  """float32 `[num_codes]`: how many of `indices` (`[N]`) are each code, `weights` (`[N]`)
  counting for each where given; indices outside `[0, num_codes)` count nowhere. Summed over
  `axis_name` inside `shard_map`."""
  inside = in_range(indices, num_codes)
  counts = jnp.zeros((num_codes,), jnp.float32).at[jnp.where(inside, indices, num_codes)].add(
      1.0 if weights is None else weights, mode='drop')
  return counts if axis_name is None else lax.psum(counts, axis_name)


def in_range(indices: Array, num_codes: int) -> Array:
  """bool, `indices`' shape: whether each lies in `[0, num_codes)`, compared in the indices'
  own dtype (no wrap-around for narrow unsigned ones)."""
  inside = indices >= 0
  if jnp.iinfo(indices.dtype).max >= num_codes:  # else every value is below it
    inside = inside & (indices < num_codes)
  return inside


def nan_outside_range(codes: Array, indices: Array, num_codes: int) -> Array:
  """`codes` (`indices.shape + [D]`) with a row of NaN where an index is outside
  `[0, num_codes)`: under `jit` a bad code never embeds to a valid one."""
  return jnp.where(in_range(indices, num_codes)[..., None], codes, jnp.nan)


def check_codes(indices: Any, num_codes: int, where: str) -> Array:
  """`indices` as an integer array, checked as every quantizer's `embed` documents.

  Args:
    indices: integer array-like `[...]`.
    num_codes: the codes must lie in `[0, num_codes)`.
    where: who is checking, for the messages (e.g. `'FSQ.embed'`).

  Returns:
    `indices` as a JAX or numpy integer array, unchanged.

  Raises:
    TypeError: `indices` are not integers.
    ValueError: concrete `indices` (not traced) hold a value outside `[0, num_codes)`; the
      message names it. Traced ones cannot be checked without a device sync: there the
      caller embeds an out-of-range code to NaN (`nan_outside_range`).
  """
  indices = jnp.asarray(indices) if not hasattr(indices, 'dtype') else indices
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f'{where}: codes must be integers in [0, {num_codes}), got dtype '
                    f'{indices.dtype}.')
  concrete = _concrete_value(indices)
  if concrete is not None and concrete.size:
    out_of_range = (concrete < 0) | (concrete >= num_codes)
    if out_of_range.any():
      bad = concrete[out_of_range]
      raise ValueError(f'{where}: got code {int(bad[0])} ({bad.size} of {concrete.size} codes '
                       f'are out of range); codes must be in [0, {num_codes}).')
  return indices


def _concrete_value(array: Any) -> Optional[np.ndarray]:
  """`array` as numpy if its values are known here, None for a tracer (or an array spread over
  other processes), whose values would need a device sync or are not known at all."""
  if isinstance(array, np.ndarray):
    return array
  try:  # a tracer raises on both
    if not getattr(array, 'is_fully_addressable', True):
      return None
    return np.asarray(array)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
