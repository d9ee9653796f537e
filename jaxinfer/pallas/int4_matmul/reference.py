"""XLA reference of the int4 weight-only matmul: the layout, the CPU path and the oracle.

Path: runner -> model (a quantized Linear) -> **int4 matmul** -> back to the model.

Dimension codes: M rows of activations (tokens), K input features, N output features,
G = K / g groups of g input rows.

Layout (shared by every implementation in this package):

- `packed`: uint8 [K/2, N], two 4-bit codes q in [0, 15] per byte. Within group G
  (input rows [G*g, (G+1)*g)), packed row G*g/2 + j holds row G*g + j in its low nibble
  and row G*g + g/2 + j in its high nibble, j in [0, g/2). So one group's packed tile
  [g/2, N] unpacks into two contiguous halves of the group, and a kernel computes
  `x[:, lo_rows] @ w_lo + x[:, hi_rows] @ w_hi` without interleaving nibbles.
- `scales`: float [G, N], one scale per group and output column.
- `zeros`: float [G, N] zero points in code units (asymmetric), or None (symmetric,
  zero point 8).
- Dequantized weight: w[k, n] = (q[k, n] - zero[k // g, n]) * scales[k // g, n],
  computed in float32.

The matmul dequantizes in float32, casts the weights to the activation dtype (bf16
products where x is bf16) and accumulates in float32, like the kernels. It walks K in
steps of whole groups (about ROWS_PER_STEP rows) with `lax.scan`, one dot per nibble
half: XLA then never materializes the float32 weight. NOTE: on CPU a whole-matrix
dequantize-then-dot allocates a fresh [K, N] float32 temporary on every call; for a
125M model's decode step that was ~300 MB of page faults and 8x the time of the float
matmul, while the stepped form runs at about the float matmul's speed.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SYMMETRIC_ZERO = 8  # zero point of the symmetric scheme: codes [0, 15] mean [-8, 7] steps
ROWS_PER_STEP = 512  # K rows the XLA matmul dequantizes per scan step (rounded to whole groups)


def _array_module(x):
    # NOTE: numpy in, numpy out: checkpoint loaders and quantizers pack on the host, where
    # jnp would compile one small program per weight shape.
    return np if isinstance(x, np.ndarray) else jnp


def pack(q: jax.Array, group_size: int) -> jax.Array:
    """Packs 4-bit codes into the group-halves layout.

    Args:
      q: [K, N] integer codes in [0, 15] (values outside are masked to 4 bits); a numpy
        array gives a numpy result.
      group_size: g, an even divisor of K.
    Returns:
      [K/2, N] uint8.
    """
    num_rows, num_cols = q.shape
    half = group_size // 2
    q = q.astype(np.uint8) & 0xF
    q = q.reshape(num_rows // group_size, 2, half, num_cols)  # [G, 2, g/2, N]: (low, high) halves
    packed = q[:, 0] | (q[:, 1] << 4)  # [G, g/2, N]
    return packed.reshape(num_rows // 2, num_cols)


def unpack(packed: jax.Array, group_size: int) -> jax.Array:
    """Inverse of `pack`: [K/2, N] uint8 -> [K, N] uint8 codes in [0, 15] (numpy in, numpy out)."""
    num_packed, num_cols = packed.shape
    half = group_size // 2
    p = packed.reshape(num_packed // half, half, num_cols)  # [G, g/2, N]
    q = _array_module(packed).stack([p & 0xF, p >> 4], axis=1)  # [G, 2, g/2, N]
    return q.reshape(num_packed * 2, num_cols)


def dequantize(packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array], group_size: int) -> jax.Array:
    """The float32 weight [K, N] that (packed, scales, zeros) encode."""
    num_groups, num_cols = scales.shape
    q = unpack(packed, group_size).astype(jnp.float32).reshape(num_groups, group_size, num_cols)  # [G, g, N]
    zero = SYMMETRIC_ZERO if zeros is None else zeros.astype(jnp.float32)[:, None, :]
    w = (q - zero) * scales.astype(jnp.float32)[:, None, :]  # [G, g, N]
    return w.reshape(num_groups * group_size, num_cols)


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array] = None, *,
                group_size: int, out_dtype=None) -> jax.Array:
    """y = x @ dequantize(packed, scales, zeros).

    Args:
      x: [M, K] activations (float32, bfloat16 or float16).
      packed: [K/2, N] uint8 (see the module docstring for the layout).
      scales: [K/g, N] float.
      zeros: [K/g, N] float zero points, or None for the symmetric scheme (zero point 8).
      group_size: g, input rows per scale.
      out_dtype: dtype of the result; None = x.dtype.
    Returns:
      [M, N] in out_dtype (accumulated in float32).
    """
    num_rows, num_in = x.shape
    num_groups, num_cols = scales.shape
    half = group_size // 2
    per_step = max(1, min(num_groups, ROWS_PER_STEP // group_size))  # C groups per step
    while num_groups % per_step:
        per_step -= 1
    num_steps = num_groups // per_step
    codes = packed.reshape(num_steps, per_step, half, num_cols)  # [S, C, g/2, N]
    scale = scales.astype(jnp.float32).reshape(num_steps, per_step, 1, num_cols)  # [S, C, 1, N]
    xs = jnp.moveaxis(x.reshape(num_rows, num_steps, per_step, 2, half), 1, 0)  # [S, M, C, 2, g/2]
    operands = (codes, scale, xs)
    if zeros is not None:
        operands += (zeros.astype(jnp.float32).reshape(num_steps, per_step, 1, num_cols),)  # [S, C, 1, N]

    def step(acc, operand):
        step_codes, step_scale, step_x = operand[:3]
        zero = operand[3] if zeros is not None else float(SYMMETRIC_ZERO)
        rows = per_step * half
        w_lo = (((step_codes & 0xF).astype(jnp.float32) - zero) * step_scale).astype(x.dtype)  # [C, g/2, N]
        w_hi = (((step_codes >> 4).astype(jnp.float32) - zero) * step_scale).astype(x.dtype)
        x_lo = step_x[:, :, 0].reshape(num_rows, rows)  # [M, C * g/2]: low-half rows of each group
        x_hi = step_x[:, :, 1].reshape(num_rows, rows)
        acc += jnp.dot(x_lo, w_lo.reshape(rows, num_cols), preferred_element_type=jnp.float32)
        acc += jnp.dot(x_hi, w_hi.reshape(rows, num_cols), preferred_element_type=jnp.float32)
        return acc, None

    y, _ = jax.lax.scan(step, jnp.zeros((num_rows, num_cols), jnp.float32), operands)
    return y.astype(out_dtype or x.dtype)
