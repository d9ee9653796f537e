"""XLA reference of ragged paged attention: the CPU path and the oracle for the kernels.

Dimension codes: T tokens in the flat batch, S sequences, R attention rows, Q queries of
one row, M = Q * G query rows of one kv head, C key positions of one row (pages x page
size), N query heads, K kv heads, G = N // K query heads per kv head, H head dim, P
pages, L page size.

Layout. The KV cache of one layer is two arrays `[P, L, K, H]`; a flat slot index
`page * L + offset` addresses one token's K/V. Sequence s owns queries
`cu_q_lens[s] : cu_q_lens[s + 1]` of the flat batch and has `kv_lens[s]` tokens in its
pages (the new ones included: K/V are written before attention). Query j of sequence s
sits at position `kv_lens[s] - q_len[s] + j` and sees keys up to and including it.
Tokens of the flat batch that belong to no sequence (bucket padding) get zeros.

Two levels. `row_attention` is the core every implementation provides (this file in
XLA, kernel_gpu.py and kernel_tpu.py in Pallas): R independent rows, each a block of M
query rows of one kv head (with their positions) against the keys
`[kv_start, kv_end)` of one page table; it returns the normalized output and the
log-sum-exp of every query row, so partial results over disjoint key ranges merge
exactly (split-K, and the shared-prefix path of `jaxinfer.pallas.prefix_attention`).
`ragged_paged_attention` packs a ragged batch into rows (`pack_rows`), runs the core
and scatters the rows back (`unpack_rows`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas.ragged_paged_attention.quantized import QuantizedPages, dequantize, quantize_tokens

# Position of a padding query row: below every key, so it sees nothing (l = 0).
PAD_POSITION = -1


def write_kv(k_pages, v_pages, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> tuple:
    """Writes the K/V of each token into its slot.

    Args:
      k_pages, v_pages: [P, L, K, H] cache of one layer: arrays, or QuantizedPages
        (quantized.py), into which each token is written quantized with its scales.
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

    def write(cache, x):
        if isinstance(cache, QuantizedPages):
            values, scales = quantize_tokens(x, cache.values.dtype)
            return QuantizedPages(cache.values.at[pages, offsets].set(values, mode="drop"),
                                  cache.scales.at[pages, offsets].set(scales, mode="drop"))
        return cache.at[pages, offsets].set(x.astype(cache.dtype), mode="drop")
    return write(k_pages, k), write(v_pages, v)


def gather_pages(pages, page_tables: jax.Array) -> jax.Array:
    """[P, L, K, H] pages (float or QuantizedPages) at page_tables [R, Pr] -> float32
    [R, Pr * L, K, H] (dequantized)."""
    num_rows, pages_per_row = page_tables.shape
    _, page_size, num_kv_heads, head_dim = pages.shape
    if isinstance(pages, QuantizedPages):
        out = dequantize(pages.values[page_tables], pages.scales[page_tables])
    else:
        out = pages[page_tables].astype(jnp.float32)
    return out.reshape(num_rows, pages_per_row * page_size, num_kv_heads, head_dim)


def row_attention(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array, q_pos: jax.Array,
                  kv_starts: jax.Array, kv_ends: jax.Array, page_tables: jax.Array, *, sm_scale: float,
                  sliding_window: Optional[int] = None,
                  soft_cap: Optional[float] = None) -> tuple[jax.Array, jax.Array]:
    """Attention of R rows of queries over paged keys, with log-sum-exps.

    Args:
      q_rows: [R, K, M, H] queries; row r, kv head k holds M query rows (of the G query
        heads of kv head k, in any order the caller likes).
      k_pages, v_pages: [P, L, K, H], arrays or QuantizedPages.
      q_pos: [R, M] int32 position of each query row; it sees keys at positions <= it
        (PAD_POSITION: sees nothing).
      kv_starts: [R] int32 first key position of the row, a multiple of L:
        page_tables[r, i] holds positions kv_starts[r] + i * L + [0, L).
      kv_ends: [R] int32 keys at positions >= kv_ends[r] are not attended.
      page_tables: [R, pages per row] int32 page ids.
      sm_scale: softmax scale.
      sliding_window: keys with q_pos - k_pos >= window are hidden; None = full causal.
      soft_cap: if set, scores become soft_cap * tanh(scores / soft_cap).
    Returns:
      (out [R, K, M, H] float32, normalized; lse [R, K, M] float32, log of the softmax
      denominator, -inf where a query row saw no key (its out is 0)).
    """
    num_rows, pages_per_row = page_tables.shape
    num_keys = pages_per_row * k_pages.shape[1]
    ks = gather_pages(k_pages, page_tables)  # [R, C, K, H] float32
    vs = gather_pages(v_pages, page_tables)  # [R, C, K, H] float32
    k_pos = kv_starts[:, None] + jnp.arange(num_keys, dtype=jnp.int32)[None, :]  # [R, C]
    # NOTE: keys at or past kv_end (the unwritten tail of the last page, the pages that
    # padding table entries point to) are masked out of the softmax, but their V rows
    # may hold anything, NaN included, and 0 * NaN = NaN in P @ V: zero them.
    owned = (k_pos < kv_ends[:, None])[:, :, None, None]  # [R, C, 1, 1]
    vs = jnp.where(owned, vs, jnp.zeros((), vs.dtype))
    scores = jnp.einsum("rkmh,rckh->rkmc", q_rows.astype(jnp.float32), ks) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    visible = (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos < kv_ends[:, None])[:, None, :]  # [R, M, C]
    if sliding_window is not None:
        visible &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    visible = visible[:, None]  # [R, 1, M, C]
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(probs, axis=-1)  # [R, K, M]
    out = jnp.einsum("rkmc,rckh->rkmh", probs, vs)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    lse = jnp.where(denom > 0, row_max[..., 0] + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
    return out, lse


def row_bounds(q_pos, kv_starts, kv_ends, page_size: int, sliding_window: Optional[int]):
    """[R, 2] first and end page (relative to each row's table) that any query can see.

    The kernels walk only these pages; the reference needs no bounds (it masks).
    """
    valid = q_pos >= 0  # [R, M]
    max_pos = jnp.max(jnp.where(valid, q_pos, -1), axis=1)
    end_key = jnp.minimum(kv_ends, max_pos + 1)
    end_page = jnp.maximum(-(-(end_key - kv_starts) // page_size), 0)
    if sliding_window is None:
        first_page = jnp.zeros_like(end_page)
    else:
        min_pos = jnp.min(jnp.where(valid, q_pos, jnp.iinfo(jnp.int32).max), axis=1)
        first_key = jnp.maximum(kv_starts, min_pos - sliding_window + 1)
        first_page = jnp.maximum(first_key - kv_starts, 0) // page_size
    first_page = jnp.where(jnp.any(valid, axis=1), first_page, 0)
    end_page = jnp.where(jnp.any(valid, axis=1), end_page, 0)
    return jnp.stack([first_page, end_page], axis=1).astype(jnp.int32)


def merge_partials(out: jax.Array, lse: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Exact merge of attention results over disjoint key sets, stacked along `axis`.

    With M = max_i lse_i and w_i = e^(lse_i - M): out = sum w_i out_i / sum w_i and
    lse = M + log sum w_i. Parts with lse -inf (no key seen) weigh 0; if every part
    is -inf the result is (0, -inf).

    Args:
      out: [..., parts, ..., H] float32 normalized partial outputs.
      lse: the same without the trailing H: their log-sum-exps.
    """
    top = jnp.max(lse, axis=axis, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # e^-inf = 0
    total = jnp.sum(weights, axis=axis)
    merged = jnp.sum(weights[..., None] * out, axis=axis) / jnp.where(total > 0, total, 1.0)[..., None]
    top = jnp.squeeze(top, axis)
    return merged, jnp.where(total > 0, top + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def pack_rows(q: jax.Array, q_index: jax.Array, num_kv_heads: int) -> jax.Array:
    """Gathers the queries of each row: q [T, N, H], q_index [R, Q] -> [R, K, Q * G, H].

    Query row m = j * G + g of kv head k is token q_index[r, j], head k * G + g; indices
    outside [0, T) give zeros.
    """
    num_rows, block = q_index.shape
    _, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    rows = q.at[q_index].get(mode="fill", fill_value=0)  # [R, Q, N, H]
    rows = rows.reshape(num_rows, block, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    return rows.reshape(num_rows, num_kv_heads, block * group, head_dim)  # [R, K, M, H]


def row_positions(q_pos: jax.Array, group: int) -> jax.Array:
    """[R, Q] positions of the queries -> [R, Q * G] positions of the query rows."""
    return jnp.repeat(q_pos, group, axis=1)


def rows_to_tokens(rows: jax.Array, block: int) -> jax.Array:
    """[R, K, Q * G, ...] packed rows -> [R * Q, N, ...], one entry per packed query."""
    num_rows, num_kv_heads, rows_per_head = rows.shape[:3]
    group = rows_per_head // block
    tail = rows.shape[3:]
    per_token = rows.reshape(num_rows, num_kv_heads, block, group, *tail).swapaxes(1, 2)  # [R, Q, K, G, ...]
    return per_token.reshape(num_rows * block, num_kv_heads * group, *tail)


def unpack_rows(rows: jax.Array, q_index: jax.Array, num_tokens: int, fill: float = 0.0) -> jax.Array:
    """Inverse of pack_rows for rows that own disjoint tokens: [R, K, Q*G, ...] -> [T, N, ...].

    Tokens no row owns get `fill`; padding indices (outside [0, T)) are dropped.
    """
    per_token = rows_to_tokens(rows, q_index.shape[1])
    result = jnp.full((num_tokens, *per_token.shape[1:]), fill, rows.dtype)
    return result.at[q_index.reshape(-1)].set(per_token, mode="drop")


def ragged_rows(cu_q_lens: jax.Array, kv_lens: jax.Array, max_q_len: int,
                num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Rows of a ragged batch: each sequence is one row of max_q_len queries.

    Returns:
      (q_index [S, Q] token of each query (num_tokens where padding),
       q_pos [S, Q] its position (PAD_POSITION where padding)).
    """
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [S]
    j = jnp.arange(max_q_len, dtype=jnp.int32)
    valid = j[None, :] < q_lens[:, None]  # [S, Q]
    q_index = jnp.where(valid, cu_q_lens[:-1, None] + j[None, :], num_tokens)
    q_pos = jnp.where(valid, kv_lens[:, None] - q_lens[:, None] + j[None, :], PAD_POSITION)
    return q_index, q_pos


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           cu_q_lens: jax.Array, kv_lens: jax.Array, page_tables: jax.Array,
                           *, max_q_len: int, sm_scale: float,
                           sliding_window: Optional[int] = None,
                           soft_cap: Optional[float] = None,
                           num_decode_rows: int = 0,
                           kv_starts: Optional[jax.Array] = None,
                           return_lse: bool = False,
                           row_attention_fn=row_attention):
    """Causal attention of a flat ragged batch over paged K/V.

    Args:
      q: [T, N, H] queries.
      k_pages, v_pages: [P, L, K, H].
      cu_q_lens: [S + 1] int32 token offsets: sequence s owns tokens cu_q_lens[s]:cu_q_lens[s + 1]
        (non-decreasing).
      kv_lens: [S] int32 tokens in each sequence's pages, new ones included. A
        sequence with kv_len 0 (bucket padding) produces nothing.
      page_tables: [S, pages per sequence] int32 page ids (from kv_starts[s] on).
      max_q_len: static bound on any sequence's query count in this call.
      sm_scale: softmax scale (usually head_dim ** -0.5).
      sliding_window: keys with q_pos - k_pos >= window are hidden; None = full causal.
      soft_cap: if set, scores become soft_cap * tanh(scores / soft_cap).
      num_decode_rows: static; the first num_decode_rows sequences have at most one
        query each. They are computed in a one-query layout instead of being padded
        to max_q_len next to prefill chunks (a 32x saving for decodes in mixed steps).
      kv_starts: optional [S] int32 first key position of each sequence (a multiple of
        L; keys before it are skipped and page_tables[s, 0] holds it). The shared-prefix
        path passes the suffix this way. None = 0.
      return_lse: also return the log-sum-exp [T, N] (-inf for tokens that saw no key).
      row_attention_fn: the core (this file's row_attention or a kernel's).
    Returns:
      [T, N, H] attention output in q's dtype, or (out float32, lse) with return_lse.
    """
    num_seqs = page_tables.shape[0]
    if kv_starts is None:
        kv_starts = jnp.zeros((num_seqs,), jnp.int32)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    group_ranges = [(0, num_seqs, max_q_len)]
    if 0 < num_decode_rows < num_seqs and max_q_len > 1:
        group_ranges = [(0, num_decode_rows, 1), (num_decode_rows, num_seqs, max_q_len)]
    num_tokens, num_heads, _ = q.shape
    num_kv_heads = k_pages.shape[2]
    group = num_heads // num_kv_heads
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((num_tokens, num_heads), -jnp.inf, jnp.float32)
    # The groups own disjoint tokens and write 0 (lse: -inf) elsewhere.
    for lo, hi, block in group_ranges:
        q_index, q_pos = ragged_rows(cu_q_lens[lo:hi + 1], kv_lens[lo:hi], block, num_tokens)
        o_rows, lse_rows = row_attention_fn(
            pack_rows(q, q_index, num_kv_heads), k_pages, v_pages, row_positions(q_pos, group),
            kv_starts[lo:hi], kv_lens[lo:hi], page_tables[lo:hi], **kwargs)
        out += unpack_rows(o_rows, q_index, num_tokens)
        if return_lse:
            lse = jnp.maximum(lse, unpack_rows(lse_rows, q_index, num_tokens, fill=-jnp.inf))
    return (out, lse) if return_lse else out.astype(q.dtype)
