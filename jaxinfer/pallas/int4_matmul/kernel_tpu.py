"""Pallas TPU (Mosaic) kernel of the int4 weight-only matmul.

Path: runner -> model (quantized Linear) -> int4_matmul op -> **this kernel** on TPUs
(or under `pltpu.force_tpu_interpret_mode` on CPU, for tests).

Dimension codes as in reference.py: M rows, K input features, N output features, g
group size, G = K / g; bm, bn, bk are the tiles.

Grid (M tiles, N tiles, K tiles), K last and sequential ("arbitrary"): each step
dequantizes the packed tile [bk/2, bn] of bk/g whole groups into a [bk, bn] weight
tile in the activation dtype (low half then high half of each group, which is the
original row order), and adds one MXU dot x[bm, bk] @ w[bk, bn] into a float32 VMEM
accumulator; the last K step writes the output tile. The scales of the N tile stay
resident ([G, bn] is small) and each step reads its groups' rows.

Written for what the TPU interpreter supports: no reshape of a
ref (values are sliced after loading), no strided ref slicing, no masked store (tiles
divide the padded arrays exactly). Integer work is done in int32 after loading the
uint8 tile.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.pallas.int4_matmul.reference import SYMMETRIC_ZERO

BLOCK_N = 128  # N tile: one lane-width of output columns
MIN_BLOCK_K = 128  # K tile: whole groups, at least one lane-width of x
MAX_BLOCK_M = 128  # M tile for prefill-sized batches


def _block_m(num_rows: int) -> int:
    # Multiples of 16 fill the bf16 sublane tiling; decode (M = 1) pads to 16 rows.
    return min(MAX_BLOCK_M, -(-num_rows // 16) * 16)


def _block_k(num_in: int, group_size: int) -> int:
    groups = max(1, MIN_BLOCK_K // group_size)
    while (num_in // group_size) % groups:
        groups -= 1
    return groups * group_size


def _kernel(x_ref, packed_ref, scales_ref, *rest, group_size: int, groups_per_step: int, has_zeros: bool):
    # x_ref:      [bm, bk]   activations of this (M, K) tile
    # packed_ref: [bk/2, bn] uint8 codes of this (K, N) tile
    # scales_ref: [G, bn]    all scales of this N tile (resident across K steps)
    # zeros_ref:  [G, bn]    zero points (asymmetric only)
    # out_ref:    [bm, bn]
    # acc_ref:    [bm, bn]   float32 VMEM scratch accumulator
    if has_zeros:
        zeros_ref, out_ref, acc_ref = rest
    else:
        zeros_ref, (out_ref, acc_ref) = None, rest
    k = pl.program_id(2)
    half = group_size // 2

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    x = x_ref[...]
    codes = packed_ref[...].astype(jnp.int32)  # [bk/2, bn]
    halves = []
    for t in range(groups_per_step):
        group = k * groups_per_step + t
        tile = codes[t * half:(t + 1) * half]  # [g/2, bn]: slice the loaded value, not the ref
        scale = scales_ref[pl.ds(group, 1), :].astype(jnp.float32)  # [1, bn]
        zero = zeros_ref[pl.ds(group, 1), :].astype(jnp.float32) if has_zeros else float(SYMMETRIC_ZERO)
        halves.append(((tile & 0xF).astype(jnp.float32) - zero) * scale)  # rows [0, g/2) of the group
        halves.append(((tile >> 4).astype(jnp.float32) - zero) * scale)  # rows [g/2, g)
    w = jnp.concatenate(halves, axis=0).astype(x.dtype)  # [bk, bn] in original row order
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array], *,
                group_size: int, out_dtype) -> jax.Array:
    """See reference.int4_matmul. Shapes are validated by the public op.

    Requires N % BLOCK_N == 0 and group_size % 32 == 0 (checked by the op). Runs in TPU
    interpret mode when traced under `pltpu.force_tpu_interpret_mode(...)`.
    """
    num_rows, num_in = x.shape
    num_cols = packed.shape[1]
    block_m = _block_m(num_rows)
    block_k = _block_k(num_in, group_size)
    padded_rows = -(-num_rows // block_m) * block_m
    if padded_rows != num_rows:
        x = jnp.pad(x, ((0, padded_rows - num_rows), (0, 0)))
    num_groups = num_in // group_size
    has_zeros = zeros is not None
    grid = (padded_rows // block_m, num_cols // BLOCK_N, num_in // block_k)
    in_specs = [
        pl.BlockSpec((block_m, block_k), lambda i, j, k: (i, k)),  # x: [bm, bk]
        pl.BlockSpec((block_k // 2, BLOCK_N), lambda i, j, k: (k, j)),  # packed: [bk/2, bn]
        pl.BlockSpec((num_groups, BLOCK_N), lambda i, j, k: (0, j)),  # scales: [G, bn]
    ]
    operands = [x, packed, scales]
    if has_zeros:
        in_specs.append(pl.BlockSpec((num_groups, BLOCK_N), lambda i, j, k: (0, j)))  # zeros: [G, bn]
        operands.append(zeros)
    kernel = functools.partial(_kernel, group_size=group_size, groups_per_step=block_k // group_size,
                               has_zeros=has_zeros)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, num_cols), out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, BLOCK_N), lambda i, j, k: (i, j)),  # out: [bm, bn]
        scratch_shapes=[pltpu.VMEM((block_m, BLOCK_N), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="int4_matmul_tpu",
    )(*operands)
    return out[:num_rows]
