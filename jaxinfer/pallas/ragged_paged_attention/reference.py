"""XLA reference of ragged paged attention: the CPU path and the oracle for the kernels.

Dimension codes: T tokens in the flat batch, S sequences, Q max query tokens of one
sequence in this call, C key positions of one sequence (pages x page size), N query
heads, K kv heads, G = N // K query heads per kv head, H head dim, P pages, L page size.

Layout. The KV cache of one layer is two arrays `[P, L, K, H]`; a flat slot index
`page * L + offset` addresses one token's K/V. Sequence s owns queries
`cu_q_lens[s] : cu_q_lens[s + 1]` of the flat batch and has `kv_lens[s]` tokens in its
pages (the new ones included: K/V are written before attention). Query j of sequence s
sits at position `kv_lens[s] - q_len[s] + j` and sees keys up to and including it.
Tokens of the flat batch that belong to no sequence (bucket padding) get zeros.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes the K/V of each token into its slot.

    Args:
      k_pages, v_pages: [P, L, K, H] cache of one layer.
      k, v: [T, K, H] new keys / values.
      slot_mapping: [T] int32 flat slot (page * L + offset); a slot outside [0, P * L)
        (the runner uses P * L for padding tokens) is dropped.
    Returns:
      The updated (k_pages, v_pages).
    """
    # NOTE: index by (page, offset), not into a [P * L, K, H] reshape of the cache: with a
    # single token, XLA turned the reshaped scatter into a full copy of the (donated)
    # cache whenever the result was also read (2.9 s per step for a 1 GiB cache).
    page_size = k_pages.shape[1]
    pages, offsets = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[pages, offsets].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[pages, offsets].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           cu_q_lens: jax.Array, kv_lens: jax.Array, page_tables: jax.Array,
                           *, max_q_len: int, sm_scale: float,
                           sliding_window: Optional[int] = None,
                           soft_cap: Optional[float] = None,
                           num_decode_rows: int = 0) -> jax.Array:
    """Causal attention of a flat ragged batch over paged K/V.

    Args:
      q: [T, N, H] queries.
      k_pages, v_pages: [P, L, K, H].
      cu_q_lens: [S + 1] int32 token offsets: sequence s owns tokens cu_q_lens[s]:cu_q_lens[s + 1]
        (non-decreasing).
      kv_lens: [S] int32 tokens in each sequence's pages, new ones included. A
        sequence with kv_len 0 (bucket padding) produces nothing.
      page_tables: [S, pages per sequence] int32 page ids.
      max_q_len: static bound on any sequence's query count in this call.
      sm_scale: softmax scale (usually head_dim ** -0.5).
      sliding_window: keys with q_pos - k_pos >= window are hidden; None = full causal.
      soft_cap: if set, scores become soft_cap * tanh(scores / soft_cap).
      num_decode_rows: static; the first num_decode_rows sequences have at most one
        query each. They are computed in a one-query layout instead of being padded
        to max_q_len next to prefill chunks (a 32x saving for decodes in mixed steps).
    Returns:
      [T, N, H] attention output in q's dtype.
    """
    num_seqs = page_tables.shape[0]
    if 0 < num_decode_rows < num_seqs and max_q_len > 1:
        kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        # The two groups own disjoint tokens and write zeros elsewhere: their sum is the result.
        d = num_decode_rows
        decodes = _attention(q, k_pages, v_pages, cu_q_lens[:d + 1], kv_lens[:d], page_tables[:d],
                             max_q_len=1, **kwargs)
        rest = _attention(q, k_pages, v_pages, cu_q_lens[d:], kv_lens[d:], page_tables[d:],
                          max_q_len=max_q_len, **kwargs)
        return decodes + rest
    return _attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, max_q_len=max_q_len,
                      sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)


def _attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, *, max_q_len, sm_scale,
               sliding_window, soft_cap):
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    num_seqs, pages_per_seq = page_tables.shape
    group = num_heads // num_kv_heads
    max_kv_len = pages_per_seq * page_size

    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    q_valid = j[None, :] < q_lens[:, None]  # [S, Q]
    q_index = jnp.where(q_valid, cu_q_lens[:-1, None] + j[None, :], num_tokens)  # [S, Q]
    # [S, Q, K, G, H]
    qs = q.at[q_index].get(mode="fill", fill_value=0).reshape(
        num_seqs, max_q_len, num_kv_heads, group, head_dim)
    # [S, C, K, H]
    ks = k_pages[page_tables].reshape(num_seqs, max_kv_len, num_kv_heads, head_dim)
    vs = v_pages[page_tables].reshape(num_seqs, max_kv_len, num_kv_heads, head_dim)

    scores = jnp.einsum("sqkgh,sckh->skgqc", qs.astype(jnp.float32), ks.astype(jnp.float32))
    scores = scores * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)

    q_pos = kv_lens[:, None] - q_lens[:, None] + j[None, :]  # [S, Q]
    k_pos = jnp.arange(max_kv_len, dtype=jnp.int32)  # [C]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < kv_lens[:, None, None])
    if sliding_window is not None:
        visible &= (q_pos[:, :, None] - k_pos[None, None, :]) < sliding_window
    visible &= q_valid[:, :, None]  # [S, Q, C]
    visible = visible[:, None, None, :, :]  # [S, 1, 1, Q, C]

    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("skgqc,sckh->sqkgh", probs, vs.astype(jnp.float32))  # [S, Q, K, G, H]
    out = out.reshape(num_seqs * max_q_len, num_heads, head_dim).astype(q.dtype)
    result = jnp.zeros_like(q)
    return result.at[q_index.reshape(-1)].set(out, mode="drop")
