"""Pallas GPU (Triton lowering) kernel of the int4 weight-only matmul.

Path: runner -> model (quantized Linear) -> int4_matmul op -> **this kernel** on GPUs
(or in interpret mode on CPU, for tests).

Dimension codes as in reference.py: M rows, K input features, N output features, g
group size, G = K / g; bm and bn are the M and N tiles.

One program computes one [bm, bn] output tile. It walks K one group at a time: it
loads the group's packed tile [g/2, bn] once (half the bytes of an int8 tile, an
eighth of float32), splits the two nibbles in registers, subtracts the zero point,
multiplies by the group's scale row, casts to the activation dtype and accumulates
two dots, x[:, low half] @ w_low + x[:, high half] @ w_high, in float32. The
group-halves layout is what makes the two x slices contiguous (MARLIN, Frantar et al.
2024, shuffles its tiles for the same reason: no interleaving inside the kernel).
Triton needs power-of-two tensor shapes and dot operands of at least 16 per side, hence
the constraints checked in `int4_matmul`; M is padded to the M tile here.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jaxinfer.pallas.int4_matmul.reference import SYMMETRIC_ZERO

BLOCK_N = 128  # N tile: one program's output columns
MAX_BLOCK_M = 64  # largest M tile; decode batches (M <= 16) use a 16-row tile


def _block_m(num_rows: int) -> int:
    return min(MAX_BLOCK_M, max(16, 1 << (num_rows - 1).bit_length()))


def _kernel(x_ref, packed_ref, scales_ref, *rest, group_size: int, num_groups: int, has_zeros: bool):
    # x_ref:      [bm, K]   this M tile's activations, all of K (read one group at a time)
    # packed_ref: [K/2, bn] uint8 codes of this N tile
    # scales_ref: [G, bn]   scales of this N tile
    # zeros_ref:  [G, bn]   zero points (asymmetric only)
    # out_ref:    [bm, bn]
    zeros_ref, out_ref = rest if has_zeros else (None, rest[0])
    half = group_size // 2
    block_m, block_n = out_ref.shape

    def group_step(group, acc):
        codes = packed_ref[pl.ds(group * half, half), :].astype(jnp.int32)  # [g/2, bn], loaded once
        scale = scales_ref[pl.ds(group, 1), :].astype(jnp.float32)  # [1, bn]
        zero = zeros_ref[pl.ds(group, 1), :].astype(jnp.float32) if has_zeros else float(SYMMETRIC_ZERO)
        x_lo = x_ref[:, pl.ds(group * group_size, half)]  # [bm, g/2]
        x_hi = x_ref[:, pl.ds(group * group_size + half, half)]  # [bm, g/2]
        w_lo = (((codes & 0xF).astype(jnp.float32) - zero) * scale).astype(x_lo.dtype)  # [g/2, bn]
        w_hi = (((codes >> 4).astype(jnp.float32) - zero) * scale).astype(x_lo.dtype)  # [g/2, bn]
        acc += jnp.dot(x_lo, w_lo, preferred_element_type=jnp.float32)
        acc += jnp.dot(x_hi, w_hi, preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, num_groups, group_step, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array], *,
                group_size: int, out_dtype, interpret: bool = False) -> jax.Array:
    """See reference.int4_matmul. Shapes are validated by the public op.

    Requires N % BLOCK_N == 0 and a power-of-two group size >= 32 (checked by the op).
    """
    num_rows, num_in = x.shape
    num_cols = packed.shape[1]
    block_m = _block_m(num_rows)
    padded_rows = -(-num_rows // block_m) * block_m
    if padded_rows != num_rows:
        x = jnp.pad(x, ((0, padded_rows - num_rows), (0, 0)))
    num_groups = num_in // group_size
    has_zeros = zeros is not None
    grid = (padded_rows // block_m, num_cols // BLOCK_N)
    in_specs = [
        pl.BlockSpec((block_m, num_in), lambda i, j: (i, 0)),  # x: [bm, K]
        pl.BlockSpec((num_in // 2, BLOCK_N), lambda i, j: (0, j)),  # packed: [K/2, bn]
        pl.BlockSpec((num_groups, BLOCK_N), lambda i, j: (0, j)),  # scales: [G, bn]
    ]
    operands = [x, packed, scales]
    if has_zeros:
        in_specs.append(pl.BlockSpec((num_groups, BLOCK_N), lambda i, j: (0, j)))  # zeros: [G, bn]
        operands.append(zeros)
    kernel = functools.partial(_kernel, group_size=group_size, num_groups=num_groups, has_zeros=has_zeros)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, num_cols), out_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, BLOCK_N), lambda i, j: (i, j)),  # out: [bm, bn]
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="int4_matmul_gpu",
    )(*operands)
    return out[:num_rows]
