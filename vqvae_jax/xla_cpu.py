"""What exists only for XLA:CPU: the form of the nearest-code search that it runs fast, which
`codebook` gives the CPU through `lax.platform_dependent` (GPUs and TPUs search whole batches at
once). The convolutions' XLA:CPU gradients are in `convolutions`, the blocked loops in `blocks`;
docs/performance.md tells how the figures were measured.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vqvae_jax.blocks import map_over_blocks

Array = jax.Array


# Rows per block of XLA:CPU's nearest-code search. Its two row reductions over a `[2048, 512]`
# block take 0.4 ms; over `[16384, 512]` at once, 25 ms (8,192 rows: 3x slower than 4,096).
_SEARCH_ROWS_PER_BLOCK = 2048


def argmin_rows(distances: Array) -> Array:
  """`jnp.argmin(distances, axis=1)` as int32, in the form XLA:CPU runs fast: `_first_minimum`
  in blocks of `_SEARCH_ROWS_PER_BLOCK` rows."""
  return map_over_blocks(_first_minimum, (distances,), _SEARCH_ROWS_PER_BLOCK)


def _first_minimum(distances: Array) -> Array:
  """`argmin` over the last axis as a `min` and then a `min` of indices.

  XLA:CPU runs `argmin`'s (value, index) reduction one element at a time: 18 ms for
  `[16384, 512]`, against 4 ms for these two vectorised reductions in blocks of 2,048 rows
  (`_SEARCH_ROWS_PER_BLOCK`), about 4% of the seed's training step at batch 256.
  """
  num_codes = distances.shape[-1]
  lowest = jnp.min(distances, axis=-1, keepdims=True)  # NaN if the row has one
  is_first_choice = (distances == lowest) | jnp.isnan(distances)
  return jnp.min(jnp.where(is_first_choice, jnp.arange(num_codes, dtype=jnp.int32), num_codes),
                 axis=-1)


def search_in_blocks(search: Callable[[Array], Array], rows: Array) -> Array:
  """`search(rows)`, `_SEARCH_ROWS_PER_BLOCK` rows at a time, for a `search` whose rows are
  independent: with the distances computed a block at a time too, XLA:CPU's nearest-code
  search took 7 against 18 ms at `[16384, 512]`."""
  return map_over_blocks(search, (rows,), _SEARCH_ROWS_PER_BLOCK)
