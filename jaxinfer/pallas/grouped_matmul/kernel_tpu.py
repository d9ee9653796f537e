"""Pallas TPU (Mosaic) kernel of the grouped matmul.

Path: runner -> model (MoE layer) -> grouped_matmul op -> **this kernel** on TPUs (or
under `pltpu.force_tpu_interpret_mode` on CPU, for tests).

Dimension codes as in reference.py: M rows, K contraction, N columns, E groups, V
visits; bm, bk, bn the tiles.

Grid (N tiles, V visits, K tiles), K innermost and sequential. A *visit* is a (row
tile, group) pair that holds rows (reference.tile_visits; scalar-prefetched, so the
BlockSpec index maps pick the visit's lhs tile and its group's weight tile): each K
step adds one MXU dot lhs[bm, bk] @ rhs[group][bk, bn] into a float32 VMEM
accumulator, and the last K step writes the rows of the visit's group into the output
tile, keeping the rows other visits wrote (a select, as the TPU interpreter has no
masked store). Visits are sorted by tile, so a tile cut by group boundaries is
revisited on consecutive steps and its output block stays in VMEM between them; its
first visit starts from zeros. Padding visits (past the real count) repeat the last
real visit's block indices, so they fetch nothing, and are skipped. Tiles that no
group reaches (the tail past sum(group_sizes)) are zeroed by the wrapper.

Tiles: bm = 128 rows at most (multiples of 16, the bf16 sublane tiling); bk and bn
are 512 / 256 / 128 when they divide K / N, else the whole dimension (tiny models).
Written for what the TPU interpreter supports: no ref reshapes or strided ref slices,
no masked stores.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.pallas.grouped_matmul import reference
from jaxinfer.pallas.tiling import lane_block, row_block

MAX_BLOCK_M = 128



def _kernel(visit_group_ref, visit_tile_ref, num_visits_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
    # Scalar prefetch (SMEM): visit_group [V], visit_tile [V], num_visits [1], offsets [E + 1].
    # lhs_ref: [bm, bk]  the visit's row tile, K step k
    # rhs_ref: [bk, bn]  the visit's group's weights, K step k, column tile n
    # out_ref: [bm, bn]  the visit's output tile (revisited by the tile's next visit)
    # acc_ref: [bm, bn]  float32 VMEM scratch accumulator
    v, k = pl.program_id(1), pl.program_id(2)
    is_real = v < num_visits_ref[0]

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(is_real)
    def _accumulate():
        acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

    @pl.when(is_real & (k == pl.num_programs(2) - 1))
    def _store():
        block_m, block_n = out_ref.shape
        tile, group = visit_tile_ref[v], visit_group_ref[v]
        rows = tile * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)  # [bm, bn]
        is_mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        is_first = (v == 0) | (visit_tile_ref[jnp.maximum(v - 1, 0)] != tile)
        kept = jnp.where(is_first, jnp.zeros(out_ref.shape, out_ref.dtype), out_ref[...])
        out_ref[...] = jnp.where(is_mine, acc_ref[...].astype(out_ref.dtype), kept)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype) -> jax.Array:
    """See reference.grouped_matmul. Shapes are validated by the public op.

    Runs in TPU interpret mode when traced under `pltpu.force_tpu_interpret_mode(...)`.
    """
    num_rows, num_in = lhs.shape
    num_cols = rhs.shape[2]
    block_m, block_k, block_n = row_block(num_rows, MAX_BLOCK_M), lane_block(num_in), lane_block(num_cols)
    padded_rows = -(-num_rows // block_m) * block_m
    if padded_rows != num_rows:
        lhs = jnp.pad(lhs, ((0, padded_rows - num_rows), (0, 0)))
    num_tiles = padded_rows // block_m
    offsets = reference.group_offsets(group_sizes, num_rows)  # [E + 1]
    visit_group, visit_tile, num_visits = reference.tile_visits(offsets, num_tiles, block_m)
    grid = (num_cols // block_n, visit_group.shape[0], num_in // block_k)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=grid,
        in_specs=[
            pl.BlockSpec((block_m, block_k), lambda n, v, k, vg, vt, nv, off: (vt[v], k)),  # lhs: [bm, bk]
            pl.BlockSpec((None, block_k, block_n),
                         lambda n, v, k, vg, vt, nv, off: (vg[v], k, n)),  # rhs: [bk, bn] of one group
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda n, v, k, vg, vt, nv, off: (vt[v], n)),  # [bm, bn]
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
    )
    out = pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, num_cols), out_dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        name="grouped_matmul_tpu",
    )(visit_group, visit_tile, num_visits.reshape(1), offsets, lhs, rhs)
    # Tiles no visit reached hold whatever the buffer held: the rows past the groups.
    rows = jnp.arange(padded_rows, dtype=jnp.int32)[:, None]  # [Mp, 1]
    return jnp.where(rows < offsets[-1], out, jnp.zeros((), out_dtype))[:num_rows]
