"""Pallas TPU (Mosaic) kernel of the grouped LoRA matmul.

Path: runner -> model (relaxed recursive block) -> grouped_lora op -> **this kernel** on
TPUs (or under `pltpu.force_tpu_interpret_mode` on CPU, for tests).

Dimension codes as in reference.py: T rows, I inputs, O outputs, G depths, r rank,
R = G*r the stacked rank; bm, bk, bn the tiles, Rp the padded stacked rank.

Two steps. (1) The wrapper computes the down projection of every depth at once,
h = x @ A_cat ([T, R], reference.down_projection: one skinny XLA matmul, done once
rather than once per column tile). (2) The kernel, grid (O tiles, T tiles, I tiles), I
innermost and sequential: each I step adds one MXU dot x[bm, bk] @ W[bk, bn] into a
float32 VMEM accumulator; the last step keeps in h[bm, Rp] only the r columns of each
row's own depth (a row mask per depth from the group offsets, scalar-prefetched into
SMEM: a tile that depth boundaries cut needs nothing more, and rows past the groups
keep no column), adds scale * h_masked @ B_cat[Rp, bn] and writes the output tile once.
The LoRA term never goes through HBM as a [T, O] tensor.

Tiles: bm = 128 rows at most (multiples of 16, the bf16 sublane tiling); bk and bn are
512 / 256 / 128 when they divide I / O, else the whole dimension (tiny models); R is
padded to a multiple of 128 lanes with zero columns / rows (the MXU pads a short
contraction anyway; the mask drops them). Written for what the TPU interpreter
supports: no ref reshapes or strided ref slices, no masked stores; the mask's select
runs in float32 (no bf16 VPU on older TPUs).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.pallas.grouped_lora import reference
from jaxinfer.pallas.tiling import lane_block, row_block

MAX_BLOCK_M = 128
LANES = 128



def _kernel(offsets_ref, x_ref, w_ref, h_ref, b_ref, out_ref, acc_ref, *, num_groups: int, rank: int,
            scale: float):
    # Scalar prefetch (SMEM): offsets [G + 1].
    # x_ref:   [bm, bk]  row tile i, I step k
    # w_ref:   [bk, bn]  the shared weight, I step k, column tile n
    # h_ref:   [bm, Rp]  row tile i's down projections, every depth (unmasked)
    # b_ref:   [Rp, bn]  B_cat, column tile n
    # out_ref: [bm, bn]
    # acc_ref: [bm, bn]  float32 VMEM scratch accumulator
    i, k = pl.program_id(1), pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    acc_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        block_m, stacked_rank = h_ref.shape
        rows = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, stacked_rank), 0)  # [bm, Rp]
        cols = jax.lax.broadcasted_iota(jnp.int32, (block_m, stacked_rank), 1)  # [bm, Rp]
        mine = cols < 0  # all False
        for g in range(num_groups):  # G is small (loop depths): unrolled
            mine = mine | ((cols >= g * rank) & (cols < (g + 1) * rank)
                           & (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1]))
        h = jnp.where(mine, h_ref[...].astype(jnp.float32), 0.0).astype(h_ref.dtype)  # [bm, Rp]
        lora = jnp.dot(h, b_ref[...], preferred_element_type=jnp.float32)  # [bm, bn]
        out_ref[...] = (acc_ref[...] + scale * lora).astype(out_ref.dtype)


def grouped_lora_matmul(x: jax.Array, w: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                        group_sizes: jax.Array, *, scale: float) -> jax.Array:
    """See reference.grouped_lora_matmul. Shapes are validated by the public op.

    Runs in TPU interpret mode when traced under `pltpu.force_tpu_interpret_mode(...)`.
    """
    num_rows, num_in = x.shape
    num_out = w.shape[1]
    num_groups, rank, _ = lora_a.shape
    a_cat, b_cat = reference.stack_lora(lora_a, lora_b)  # [I, R], [R, O]
    h = reference.down_projection(x, a_cat)  # [T, R]
    block_m, block_k, block_n = row_block(num_rows, MAX_BLOCK_M), lane_block(num_in), lane_block(num_out)
    padded_rows = -(-num_rows // block_m) * block_m
    stacked = num_groups * rank
    padded_rank = -(-stacked // LANES) * LANES
    if padded_rows != num_rows:
        x = jnp.pad(x, ((0, padded_rows - num_rows), (0, 0)))
    if (padded_rows, padded_rank) != (num_rows, stacked):
        h = jnp.pad(h, ((0, padded_rows - num_rows), (0, padded_rank - stacked)))
    if padded_rank != stacked:
        b_cat = jnp.pad(b_cat, ((0, padded_rank - stacked), (0, 0)))
    offsets = reference.group_offsets(group_sizes, num_rows)  # [G + 1]
    grid = (num_out // block_n, padded_rows // block_m, num_in // block_k)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=grid,
        in_specs=[
            pl.BlockSpec((block_m, block_k), lambda n, i, k, off: (i, k)),  # x: [bm, bk]
            pl.BlockSpec((block_k, block_n), lambda n, i, k, off: (k, n)),  # w: [bk, bn]
            pl.BlockSpec((block_m, padded_rank), lambda n, i, k, off: (i, 0)),  # h: [bm, Rp]
            pl.BlockSpec((padded_rank, block_n), lambda n, i, k, off: (0, n)),  # b_cat: [Rp, bn]
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda n, i, k, off: (i, n)),  # out: [bm, bn]
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
    )
    kernel = functools.partial(_kernel, num_groups=num_groups, rank=rank, scale=scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, num_out), x.dtype),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="grouped_lora_matmul_tpu",
    )(offsets, x, w, h, b_cat)
    return out[:num_rows]
