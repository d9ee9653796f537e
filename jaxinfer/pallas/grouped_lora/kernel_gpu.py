"""Pallas GPU (Triton lowering) kernel of the grouped LoRA matmul.

Path: runner -> model (relaxed recursive block) -> grouped_lora op -> **this kernel** on
GPUs (or in interpret mode on CPU, for tests).

Dimension codes as in reference.py: T rows, I inputs, O outputs, G depths, r rank,
R = G*r the stacked rank; bm, bk, bn the tiles, Rp the padded stacked rank.

Two steps. (1) The wrapper computes the down projection of every depth at once,
h = x @ A_cat ([T, R], reference.down_projection: one skinny XLA matmul, done once
rather than once per column tile). (2) The kernel, grid (T tiles, O tiles), one program
per (row tile, column tile): it accumulates x[bm, I] @ W[I, bn] in bk steps (float32),
then, for its rows, keeps in h[bm, Rp] only the r columns of each row's own depth (a
row mask per depth, from the group offsets: a tile that depth boundaries cut needs
nothing more, and rows past the groups keep no column), adds
scale * h_masked @ B_cat[Rp, bn] to the accumulator and writes the tile once. The LoRA
term never goes through memory as a [T, O] tensor.

Triton needs power-of-two tensor shapes of at least 16 per dot side: T is padded to bm,
I and O to bk / bn only when they are not multiples already, R to a power of two (zero
columns of A_cat, zero rows of B_cat; their column index is past every depth, so the
mask drops them anyway), and the offsets to a power-of-two length.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jaxinfer.pallas.grouped_lora import reference
from jaxinfer.pallas.tiling import pow2_block, round_up

MAX_BLOCK_M = 64  # row tile; decode-sized T uses a 16-row tile
MAX_BLOCK_K = 64  # contraction step
MAX_BLOCK_N = 128  # output columns per program


def _kernel(offsets_ref, x_ref, w_ref, h_ref, b_ref, out_ref, *, block_k: int, num_k_blocks: int,
            num_groups: int, rank: int, scale: float):
    # offsets_ref: [L]        depth g owns rows [offsets[g], offsets[g + 1]) (L >= G + 1)
    # x_ref:       [bm, Ip]   this row tile (read bk columns at a time)
    # w_ref:       [Ip, bn]   the shared weight, this column tile
    # h_ref:       [bm, Rp]   this row tile's down projections, every depth (unmasked)
    # b_ref:       [Rp, bn]   B_cat, this column tile
    # out_ref:     [bm, bn]
    block_m, block_n = out_ref.shape
    stacked_rank = h_ref.shape[1]

    def k_step(k, acc):
        x = x_ref[:, pl.ds(k * block_k, block_k)]  # [bm, bk]
        w = w_ref[pl.ds(k * block_k, block_k), :]  # [bk, bn]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, num_k_blocks, k_step, jnp.zeros((block_m, block_n), jnp.float32))
    rows = pl.program_id(0) * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, stacked_rank), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_m, stacked_rank), 1)  # [bm, Rp]
    mine = cols < 0  # all False
    for g in range(num_groups):  # G is small (loop depths): unrolled
        mine = mine | ((cols >= g * rank) & (cols < (g + 1) * rank)
                       & (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1]))
    h = h_ref[...]
    h = jnp.where(mine, h, jnp.zeros_like(h))  # [bm, Rp]
    lora = jnp.dot(h, b_ref[...], preferred_element_type=jnp.float32)  # [bm, bn]
    out_ref[...] = (acc + scale * lora).astype(out_ref.dtype)


def grouped_lora_matmul(x: jax.Array, w: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                        group_sizes: jax.Array, *, scale: float, interpret: bool = False) -> jax.Array:
    """See reference.grouped_lora_matmul. Shapes are validated by the public op."""
    num_rows, num_in = x.shape
    num_out = w.shape[1]
    num_groups, rank, _ = lora_a.shape
    a_cat, b_cat = reference.stack_lora(lora_a, lora_b)  # [I, R], [R, O]
    h = reference.down_projection(x, a_cat)  # [T, R]
    block_m = pow2_block(num_rows, MAX_BLOCK_M)
    block_k = pow2_block(num_in, MAX_BLOCK_K)
    block_n = pow2_block(num_out, MAX_BLOCK_N)
    padded_rows, padded_in, padded_out = (round_up(num_rows, block_m), round_up(num_in, block_k),
                                          round_up(num_out, block_n))
    stacked = num_groups * rank
    padded_rank = pow2_block(stacked, 1 << 30)
    if (padded_rows, padded_in) != (num_rows, num_in):
        x = jnp.pad(x, ((0, padded_rows - num_rows), (0, padded_in - num_in)))
    if (padded_in, padded_out) != (num_in, num_out):
        w = jnp.pad(w, ((0, padded_in - num_in), (0, padded_out - num_out)))
    if (padded_rows, padded_rank) != (num_rows, stacked):
        h = jnp.pad(h, ((0, padded_rows - num_rows), (0, padded_rank - stacked)))
    if (padded_rank, padded_out) != (stacked, num_out):
        b_cat = jnp.pad(b_cat, ((0, padded_rank - stacked), (0, padded_out - num_out)))
    offsets = reference.group_offsets(group_sizes, num_rows)  # [G + 1]
    num_offsets = pow2_block(num_groups + 1, 1 << 30)
    offsets = jnp.pad(offsets, (0, num_offsets - (num_groups + 1)), mode="edge")  # [L]
    kernel = functools.partial(_kernel, block_k=block_k, num_k_blocks=padded_in // block_k,
                               num_groups=num_groups, rank=rank, scale=scale)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, padded_out), x.dtype),
        grid=(padded_rows // block_m, padded_out // block_n),
        in_specs=[
            pl.BlockSpec((num_offsets,), lambda i, j: (0,)),  # offsets: [L]
            pl.BlockSpec((block_m, padded_in), lambda i, j: (i, 0)),  # x: [bm, Ip]
            pl.BlockSpec((padded_in, block_n), lambda i, j: (0, j)),  # w: [Ip, bn]
            pl.BlockSpec((block_m, padded_rank), lambda i, j: (i, 0)),  # h: [bm, Rp]
            pl.BlockSpec((padded_rank, block_n), lambda i, j: (0, j)),  # b_cat: [Rp, bn]
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),  # out: [bm, bn]
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="grouped_lora_matmul_gpu",
    )(offsets, x, w, h, b_cat)
    return out[:num_rows, :num_out]
