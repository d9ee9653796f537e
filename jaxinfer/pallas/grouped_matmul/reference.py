"""XLA reference of the grouped matmul, and the row-tile schedule both kernels share.

Path: runner -> model (MoE layer) -> grouped_matmul op -> **reference** (CPU default,
and the oracle of the kernels' tests).

Dimension codes: M rows, K contraction, N output columns, E groups (experts), bm the
row tile, V visits (see `tile_visits`).

The contract: the rows of `lhs` are sorted by group, group e owning the rows
[offsets[e], offsets[e + 1]) with offsets = (0, cumsum(group_sizes)); row r of the
result is lhs[r] @ rhs[e] for the group e that owns it. Rows past sum(group_sizes) (the
tail a caller pads to a fixed shape) are zero; groups are cut at M if the sizes add up
to more. This is the contract of `jax.lax.ragged_dot`, which the reference calls.

NOTE: on CPU, jax 0.10.2 lowers `ragged_dot` to one masked dense dot over every group
(an [E, M, K] select, then a contraction over (E, K)): E times the flops of the grouped
product. Exact, and cheap for the tiny models tests run, but not a serving path: on
GPU and TPU the op defaults to the Pallas kernels, which visit only the (row tile,
group) pairs that hold rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype) -> jax.Array:
    """out[r] = lhs[r] @ rhs[group of r], float32 accumulation; see the module docstring.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [E, K, N] one weight matrix per group.
      group_sizes: [E] int32 rows per group (non-negative).
      out_dtype: dtype of the result.
    Returns:
      [M, N] in out_dtype; rows past sum(group_sizes) are zero.
    """
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def group_offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[E + 1] int32: group e owns rows [offsets[e], offsets[e + 1]), cut at num_rows."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)  # [E]
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def num_visits_bound(num_tiles: int, num_groups: int) -> int:
    """V: a static bound on the (row tile, group) pairs that hold rows.

    Each non-empty group covers a run of consecutive tiles, and two consecutive groups
    share at most their boundary tile, so the pairs number at most
    num_tiles + num_groups - 1.
    """
    return num_tiles + num_groups - 1


def tile_visits(offsets: jax.Array, num_tiles: int, block_m: int):
    """The (row tile, group) pairs that hold rows, in row order.

    A kernel walks these *visits* instead of every (tile, group) pair: a tile inside
    one group is visited once, a tile that a group boundary cuts is visited once per
    group that has rows in it (each visit keeps only its group's rows), and empty
    groups are never visited.

    Args:
      offsets: [E + 1] int32 from `group_offsets`.
      num_tiles: row tiles of bm rows (the padded M / bm).
      block_m: bm.
    Returns:
      (visit_group [V] int32, visit_tile [V] int32, num_visits [] int32), V =
      num_visits_bound(num_tiles, E). Visits are sorted by tile (so a tile's visits are
      consecutive); entries from num_visits on are padding that repeat the last real
      visit (tile 0, group 0 when there is none), so that a pipelined kernel that skips
      them fetches no new blocks.
    """
    num_groups = offsets.shape[0] - 1
    starts, ends = offsets[:-1], offsets[1:]  # [E]
    first_tile = starts // block_m  # [E]
    last_tile = (ends - 1) // block_m  # [E]
    per_group = jnp.where(ends > starts, last_tile - first_tile + 1, 0)  # [E] visits of each group
    cumulative = jnp.cumsum(per_group)  # [E]
    num_visits = cumulative[-1]
    visit = jnp.arange(num_visits_bound(num_tiles, num_groups), dtype=jnp.int32)  # [V]
    # Visit v belongs to the first group whose cumulative count exceeds v.
    clipped = jnp.minimum(visit, jnp.maximum(num_visits - 1, 0))
    group = jnp.minimum(jnp.searchsorted(cumulative, clipped, side="right"), num_groups - 1).astype(jnp.int32)
    tile = first_tile[group] + clipped - (cumulative[group] - per_group[group])
    tile = jnp.where(num_visits > 0, tile, 0).astype(jnp.int32)
    group = jnp.where(num_visits > 0, group, 0).astype(jnp.int32)
    return group, tile, num_visits.astype(jnp.int32)
