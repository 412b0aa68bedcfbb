"""Loops over strided blocks of rows, which give XLA:CPU the cache locality that whole batches
lose: the convolutions' kernel gradients on XLA:CPU (`convolutions`) and the nearest-code search
(`codebook.nearest_code`'s `chunk_size` on every backend, `xla_cpu.search_in_blocks` on the CPU).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


# Blocks are strided: of `num_blocks` blocks, block `j` holds rows `j, j + num_blocks,
# j + 2 * num_blocks, ...`. A batch sharded over devices in contiguous slices (the trainer's
# `P('data')`) so stays sharded within every block, and each device loops over its own rows.
# Contiguous blocks would each live on one device, and XLA gathered the whole batch onto every
# device: on 8 CPU devices the seed's step at batch 256 took 1.04 s with them against 0.42 s
# without blocks.


def map_over_blocks(fn: Callable[..., Array], operands: Sequence[Array],
                    rows_per_block: int) -> Array:
  """`fn` applied to blocks of `rows_per_block` rows of every operand, one block at a time.

  Args:
    fn: maps one block of each operand, `[rows_per_block, ...]`, to one array
      `[rows_per_block, ...]` whose rows correspond to the block's rows.
    operands: arrays with the same number of rows (leading axis).
    rows_per_block: rows per block. Zero rows pad the operands to whole blocks; a single block
      (`rows_per_block >= rows`) is not padded and runs without a loop.

  Returns:
    `fn`'s rows for every row of the operands, in their order: `[rows, ...]`.
  """
  num_rows = operands[0].shape[0]
  if rows_per_block >= num_rows:
    return fn(*operands)
  num_blocks, strided = _strided_blocks(operands, rows_per_block)
  first = jax.eval_shape(fn, *(_block(a, 0) for a in strided))
  out = jnp.zeros((rows_per_block, num_blocks) + first.shape[1:], first.dtype)

  def map_block(j, out):
    return lax.dynamic_update_index_in_dim(out, fn(*(_block(a, j) for a in strided)), j, axis=1)

  out = lax.fori_loop(0, num_blocks, map_block, out)
  return out.reshape(-1, *first.shape[1:])[:num_rows]


def sum_over_blocks(fn: Callable[..., Any], operands: Sequence[Array],
                    rows_per_block: int) -> Any:
  """The sum of `fn` over blocks of `rows_per_block` rows of every operand.

  For an `fn` that sums over rows, such as a kernel gradient over images, this is `fn` of the
  whole operands, with the sum taken block by block in the loop's carry: stacking the blocks'
  results and reducing them afterwards cost XLA:CPU about 17 ms of the seed's 270 ms training
  step at batch 256. Blocks are formed as in `map_over_blocks`; the zero padding rows must add
  nothing to `fn`.

  Returns:
    a pytree shaped like `fn`'s outputs.
  """
  if rows_per_block >= operands[0].shape[0]:
    return fn(*operands)
  num_blocks, strided = _strided_blocks(operands, rows_per_block)
  shapes = jax.eval_shape(fn, *(_block(a, 0) for a in strided))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def add_block(j, total):
    return jax.tree.map(jnp.add, total, fn(*(_block(a, j) for a in strided)))

  return lax.fori_loop(0, num_blocks, add_block, zeros)


def _strided_blocks(operands: Sequence[Array], rows_per_block: int):
  """`num_blocks` and each operand zero-padded to whole blocks, as
  `[rows_per_block, num_blocks, ...]`: block `j` is `[:, j]`."""
  num_rows = operands[0].shape[0]
  num_blocks = -(-num_rows // rows_per_block)

  def strided(a):
    padding = [(0, num_blocks * rows_per_block - num_rows)] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, padding).reshape(rows_per_block, num_blocks, *a.shape[1:])

  return num_blocks, [strided(a) for a in operands]


def _block(strided: Array, j) -> Array:
  return lax.dynamic_index_in_dim(strided, j, axis=1, keepdims=False)
