"""XLA reference of shared-prefix attention (Hydragen): the CPU path and the oracle.

Hydragen (Juravsky et al., 2024, "Hydragen: High-Throughput LLM Inference with Shared
Prefixes") splits the attention of sequences that share a prefix into (a) attention
of *all* their queries over the shared prefix, done once as a batched matrix product
that reads the prefix K/V once, and (b) each sequence's attention over its own suffix;
the two softmax-normalized partial results merge exactly with their log-sum-exps:
with M = max(lse_1, lse_2) and w_i = e^(lse_i - M), o = (w_1 o_1 + w_2 o_2) / (w_1 + w_2).

Prefix tree. The prefix metadata lists *prefix rows*: each holds up to Q query tokens
of the flat batch (gathered from any sequences, `q_index`) and one key range
`[kv_start, kv_end)` read through one page list (the shared pages). A tree of sharing
(a system prompt shared by all, few-shot examples shared by a subset) is several rows
over consecutive key ranges: a token that belongs to a node at depth 1 and a node at
depth 2 appears in rows of both, and every contribution is merged by log-sum-exp
(`scatter_merge`). The suffix of each sequence is ordinary ragged paged attention from
its deepest node's end (`kv_starts`).

Dimension codes as in jaxinfer.pallas.ragged_paged_attention.reference; Rp prefix
rows, Qp queries per prefix row, Pp pages per prefix row.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas.ragged_paged_attention import reference as rpa_reference


class PrefixRows(NamedTuple):
    """Rows of the shared-prefix stage (a pytree of int32 arrays)."""

    q_index: jax.Array  # [Rp, Qp] tokens of the flat batch in the row (T = padding)
    kv_starts: jax.Array  # [Rp] first key position of the shared range (a multiple of L)
    kv_ends: jax.Array  # [Rp] end of the shared range (padding rows: 0)
    page_tables: jax.Array  # [Rp, Pp] the shared pages, from kv_starts on


def scatter_merge(o_rows: jax.Array, lse_rows: jax.Array, q_index: jax.Array,
                  num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Merges row results into tokens that may appear in several rows.

    Args:
      o_rows: [R, K, Q * G, H] float32 normalized row outputs.
      lse_rows: [R, K, Q * G] their log-sum-exps.
      q_index: [R, Q] token of each query (outside [0, T) = padding, dropped).
      num_tokens: T.
    Returns:
      (out [T, N, H] float32, lse [T, N]); tokens in no row get (0, -inf).
    """
    block = q_index.shape[1]
    per_o = rpa_reference.rows_to_tokens(o_rows, block)  # [R * Q, N, H]
    per_lse = rpa_reference.rows_to_tokens(lse_rows, block)  # [R * Q, N]
    index = q_index.reshape(-1)
    num_heads = per_lse.shape[1]
    top = jnp.full((num_tokens, num_heads), -jnp.inf, jnp.float32).at[index].max(per_lse, mode="drop")
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(per_lse - top.at[index].get(mode="fill", fill_value=0.0))  # [R * Q, N]
    total = jnp.zeros((num_tokens, num_heads), jnp.float32).at[index].add(weights, mode="drop")
    summed = jnp.zeros((num_tokens, num_heads, per_o.shape[-1]), jnp.float32).at[index].add(
        weights[..., None] * per_o, mode="drop")
    seen = total > 0
    out = summed / jnp.where(seen, total, 1.0)[..., None]
    return out, jnp.where(seen, top + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)


def prefix_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                     rows: PrefixRows, *, sm_scale: float, sliding_window: Optional[int] = None,
                     soft_cap: Optional[float] = None,
                     row_attention_fn=rpa_reference.row_attention) -> tuple[jax.Array, jax.Array]:
    """Attention of the prefix rows' queries over their shared key ranges.

    Args:
      q: [T, N, H] queries of the flat batch.
      k_pages, v_pages: [P, L, K, H].
      positions: [T] int32 position of each token (for the causal / window masks).
      rows: the prefix rows.
      sm_scale, sliding_window, soft_cap: as in ragged paged attention.
      row_attention_fn: the core (reference.row_attention or a kernel's).
    Returns:
      (out [T, N, H] float32, lse [T, N]): each token's attention over the union of the
      shared ranges of the rows it appears in; (0, -inf) for tokens in no row.
    """
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k_pages.shape[2]
    group = num_heads // num_kv_heads
    in_batch = (rows.q_index >= 0) & (rows.q_index < num_tokens)
    q_pos = jnp.where(in_batch, positions.at[rows.q_index].get(mode="fill", fill_value=0),
                      rpa_reference.PAD_POSITION)  # [Rp, Qp]
    o_rows, lse_rows = row_attention_fn(
        rpa_reference.pack_rows(q, rows.q_index, num_kv_heads), k_pages, v_pages,
        rpa_reference.row_positions(q_pos, group), rows.kv_starts, rows.kv_ends, rows.page_tables,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    return scatter_merge(o_rows, lse_rows, rows.q_index, num_tokens)


def shared_prefix_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
                            cu_q_lens: jax.Array, kv_lens: jax.Array, page_tables: jax.Array,
                            kv_starts: jax.Array, prefix: PrefixRows, *, max_q_len: int, sm_scale: float,
                            sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                            num_decode_rows: int = 0,
                            row_attention_fn=rpa_reference.row_attention) -> jax.Array:
    """Causal attention of a ragged batch whose sequences share prefix pages.

    The suffix stage is ragged paged attention with `kv_starts` (each sequence's keys
    from its deepest shared node's end; 0 for sequences in no group) and the prefix
    stage is `prefix_attention`; the two are merged by log-sum-exp.

    Args:
      q, k_pages, v_pages, cu_q_lens, kv_lens, max_q_len, num_decode_rows: as in
        ragged paged attention; page_tables [S, pages] start at kv_starts.
      positions: [T] int32 token positions.
      kv_starts: [S] int32 first suffix key of each sequence (a multiple of L).
      prefix: the prefix rows (PrefixRows).
    Returns:
      [T, N, H] in q's dtype, equal (to rounding) to attention over all keys.
    """
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  row_attention_fn=row_attention_fn)
    o_suffix, lse_suffix = rpa_reference.ragged_paged_attention(
        q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, max_q_len=max_q_len,
        num_decode_rows=num_decode_rows, kv_starts=kv_starts, return_lse=True, **kwargs)
    o_prefix, lse_prefix = prefix_attention(q, k_pages, v_pages, positions, prefix, **kwargs)
    out, _ = rpa_reference.merge_partials(jnp.stack([o_prefix, o_suffix]), jnp.stack([lse_prefix, lse_suffix]),
                                          axis=0)
    return out.astype(q.dtype)
