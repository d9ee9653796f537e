"""XLA reference of the grouped LoRA matmul, and the stacked-rank layout both kernels share.

Path: runner -> model (relaxed recursive block, depth-wise batching) -> grouped_lora op
-> **reference** (CPU default, and the oracle of the kernels' tests).

Dimension codes: T rows (tokens), I input features, O output features, G groups (loop
depths), r LoRA rank, R = G * r the stacked rank (Rp: R padded by a kernel).

The contract: the rows of `x` are sorted by depth, depth g owning the rows
[offsets[g], offsets[g + 1]) with offsets = (0, cumsum(group_sizes)) cut at T; row t of
the result is

    y[t] = x[t] @ W + scale * (x[t] @ A[g]^T) @ B[g]^T          (g = depth of row t)

Rows past sum(group_sizes) (the padding a caller adds to reach a fixed T) get no LoRA
term: exactly y[t] = x[t] @ W (zero when the padding rows of x are zero).

Numerics (both kernels follow them): products in the input dtype, float32 accumulation;
the rank-r intermediate x @ A^T is rounded to the input dtype before the up projection
(as PEFT's bf16 LoRA does); the shared matmul and the scaled LoRA term are added in
float32 and rounded once.

Stacked-rank formulation: the G LoRAs are stacked along the rank, A_cat = [I, G*r]
(column g*r + j is A[g, j, :]) and B_cat = [G*r, O] (row g*r + j is B[g, :, j]). Then
h = x @ A_cat holds every depth's down projection of every row; zeroing in each row the
columns of the other depths and multiplying by B_cat gives each row its own depth's
LoRA term, whatever the group layout, in two dense matmuls. It costs G times the LoRA
flops, which are r (I + O) / (I O) of the shared matmul's (G = 4, r = 16, I = O = 4096:
3 %), and on an MXU / tensor core a contraction of G*r <= 128 costs no more than one of r.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[G + 1] int32: depth g owns rows [offsets[g], offsets[g + 1]), cut at num_rows."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)  # [G]
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def stack_lora(lora_a: jax.Array, lora_b: jax.Array):
    """The PEFT-oriented per-depth factors as one stacked-rank pair.

    Args:
      lora_a: [G, r, I] (PEFT lora_A.weight of each depth).
      lora_b: [G, O, r] (PEFT lora_B.weight of each depth).
    Returns:
      (a_cat [I, G*r], b_cat [G*r, O]); column / row g*r + j is depth g's rank j.
    """
    num_groups, rank, num_in = lora_a.shape
    num_out = lora_b.shape[1]
    a_cat = lora_a.reshape(num_groups * rank, num_in).T  # [I, R]
    b_cat = jnp.transpose(lora_b, (0, 2, 1)).reshape(num_groups * rank, num_out)  # [R, O]
    return a_cat, b_cat


def down_projection(x: jax.Array, a_cat: jax.Array) -> jax.Array:
    """h = x @ A_cat: [T, R], every depth's rank-r projection of every row, in x.dtype.

    Not masked: a consumer keeps, in row t, only the r columns of t's depth.
    """
    return jnp.dot(x, a_cat, preferred_element_type=jnp.float32).astype(x.dtype)


def row_depths(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[T] int32: the depth owning each row; -1 for rows past sum(group_sizes)."""
    ends = group_offsets(group_sizes, num_rows)[1:]  # [G]
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    depth = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)  # first g with ends[g] > row
    return jnp.where(rows < ends[-1], depth, -1)


def grouped_lora_matmul(x: jax.Array, w: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                        group_sizes: jax.Array, *, scale: float) -> jax.Array:
    """y[t] = x[t] @ w + scale * (x[t] @ A[g]^T) @ B[g]^T; see the module docstring.

    Args:
      x: [T, I] rows sorted by depth.
      w: [I, O] the shared weight.
      lora_a: [G, r, I]; lora_b: [G, O, r] (PEFT orientation).
      group_sizes: [G] int32 rows per depth (non-negative).
      scale: the LoRA scaling (alpha / r).
    Returns:
      [T, O] in x.dtype; rows past sum(group_sizes) are x @ w.
    """
    num_rows = x.shape[0]
    num_groups, rank, _ = lora_a.shape
    a_cat, b_cat = stack_lora(lora_a, lora_b)
    h = down_projection(x, a_cat)  # [T, R]
    depth = row_depths(group_sizes, num_rows)  # [T]
    column_depth = jnp.arange(num_groups * rank, dtype=jnp.int32) // rank  # [R]
    h = jnp.where(depth[:, None] == column_depth[None, :], h, jnp.zeros((), h.dtype))
    base = jnp.dot(x, w, preferred_element_type=jnp.float32)  # [T, O]
    lora = jnp.dot(h, b_cat, preferred_element_type=jnp.float32)  # [T, O]
    return (base + jnp.float32(scale) * lora).astype(x.dtype)
