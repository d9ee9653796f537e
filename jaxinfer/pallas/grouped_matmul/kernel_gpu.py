"""Pallas GPU (Triton lowering) kernel of the grouped matmul.

Path: runner -> model (MoE layer) -> grouped_matmul op -> **this kernel** on GPUs (or
in interpret mode on CPU, for tests).

Dimension codes as in reference.py: M rows, K contraction, N columns, E groups, V
visits; bm, bk, bn the tiles.

Grid (V visits, N tiles): one program per *visit*, a (row tile, group) pair that holds
rows (reference.tile_visits; empty groups have none) and one column tile. It computes
lhs[tile rows, K] @ rhs[group][K, bn] in bk steps with float32 accumulation and stores
only the rows of its group (a masked store). A tile that group boundaries cut is
computed once per group in it, by separate programs that write disjoint rows, so
programs never write the same element and need no atomics; a decode step's few row
tiles still spread over one program per (expert, column tile). Padding visits (past
the real count) return at once; rows that no group owns (the tail past
sum(group_sizes)) are zeroed by the wrapper.

Triton needs power-of-two tensor shapes of at least 16 per dot side: M is padded to
bm, and K and N are padded to bk / bn only when they are not multiples already (real
MoE shapes are multiples of 128, so the weights are not copied).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jaxinfer.pallas.grouped_matmul import reference
from jaxinfer.pallas.tiling import pow2_block, round_up

MAX_BLOCK_M = 64  # row tile; decode-sized M uses a 16-row tile
MAX_BLOCK_K = 64  # contraction step
MAX_BLOCK_N = 128  # output columns per program


def _kernel(visit_group_ref, visit_tile_ref, num_visits_ref, offsets_ref, lhs_ref, rhs_ref, out_ref, *,
            block_m: int, block_k: int, num_k_blocks: int):
    # visit_group_ref: [V]         group of each visit (reference.tile_visits)
    # visit_tile_ref:  [V]         row tile of each visit
    # num_visits_ref:  [1]         real visits; the rest is padding
    # offsets_ref:     [E + 1]     group e owns rows [offsets[e], offsets[e + 1])
    # lhs_ref:         [Mp, Kp]    all rows (the visit's bm rows are read, bk columns at a time)
    # rhs_ref:         [E, Kp, bn] every group's weights for this column tile
    # out_ref:         [Mp, bn]    this column tile (the visit writes its group's rows of one row tile)
    v = pl.program_id(0)
    block_n = out_ref.shape[1]

    @pl.when(v < num_visits_ref[0])
    def _visit():
        group = visit_group_ref[v]
        first_row = visit_tile_ref[v] * block_m

        def k_step(k, acc):
            x = lhs_ref[pl.ds(first_row, block_m), pl.ds(k * block_k, block_k)]  # [bm, bk]
            w = rhs_ref[group, pl.ds(k * block_k, block_k), :]  # [bk, bn]
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, num_k_blocks, k_step, jnp.zeros((block_m, block_n), jnp.float32))
        rows = first_row + jax.lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)  # [bm, bn]
        is_mine = (rows >= offsets_ref[group]) & (rows < offsets_ref[group + 1])
        pltr.store(out_ref.at[pl.ds(first_row, block_m), :], acc.astype(out_ref.dtype), mask=is_mine)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype,
                   interpret: bool = False) -> jax.Array:
    """See reference.grouped_matmul. Shapes are validated by the public op."""
    num_rows, num_in = lhs.shape
    num_groups, _, num_cols = rhs.shape
    block_m = pow2_block(num_rows, MAX_BLOCK_M)
    block_k = pow2_block(num_in, MAX_BLOCK_K)
    block_n = pow2_block(num_cols, MAX_BLOCK_N)
    padded_rows, padded_in, padded_cols = (round_up(num_rows, block_m), round_up(num_in, block_k),
                                           round_up(num_cols, block_n))
    if (padded_rows, padded_in) != (num_rows, num_in):
        lhs = jnp.pad(lhs, ((0, padded_rows - num_rows), (0, padded_in - num_in)))
    if (padded_in, padded_cols) != (num_in, num_cols):
        rhs = jnp.pad(rhs, ((0, 0), (0, padded_in - num_in), (0, padded_cols - num_cols)))
    offsets = reference.group_offsets(group_sizes, num_rows)  # [E + 1]
    visit_group, visit_tile, num_visits = reference.tile_visits(offsets, padded_rows // block_m, block_m)
    num_visit_slots = visit_group.shape[0]
    kernel = functools.partial(_kernel, block_m=block_m, block_k=block_k, num_k_blocks=padded_in // block_k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, padded_cols), out_dtype),
        grid=(num_visit_slots, padded_cols // block_n),
        in_specs=[
            pl.BlockSpec((num_visit_slots,), lambda v, j: (0,)),  # visit_group: [V]
            pl.BlockSpec((num_visit_slots,), lambda v, j: (0,)),  # visit_tile: [V]
            pl.BlockSpec((1,), lambda v, j: (0,)),  # num_visits: [1]
            pl.BlockSpec((num_groups + 1,), lambda v, j: (0,)),  # offsets: [E + 1]
            pl.BlockSpec((padded_rows, padded_in), lambda v, j: (0, 0)),  # lhs: [Mp, Kp]
            pl.BlockSpec((num_groups, padded_in, block_n), lambda v, j: (0, 0, j)),  # rhs: [E, Kp, bn]
        ],
        out_specs=pl.BlockSpec((padded_rows, block_n), lambda v, j: (0, j)),  # out: [Mp, bn]
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="grouped_matmul_gpu",
    )(visit_group, visit_tile, num_visits.reshape(1), offsets, lhs, rhs)
    # Rows past the groups were never written.
    rows = jnp.arange(padded_rows, dtype=jnp.int32)[:, None]  # [Mp, 1]
    return jnp.where(rows < offsets[-1], out, jnp.zeros((), out_dtype))[:num_rows, :num_cols]
