"""Pallas GPU (Triton lowering) kernel of paged row attention.

Path: runner -> model -> ragged_paged_attention / prefix_attention op -> **this kernel**
on GPUs (or in interpret mode on CPU, for tests). It implements `reference.row_attention`
(same arguments and results); the ops pack ragged batches and shared-prefix groups into
rows before calling it.

Dimension codes as in reference.py; bm is the M tile, bk = ppb * L the keys of one
compute block (ppb pages), S the number of key splits.

Grid (R rows, K kv heads, M tiles, S splits). One program holds bm query rows of one kv
head (all query heads of the group, and for prefill chunks or shared-prefix groups many
queries, so K/V tiles are reused across them) and walks its split's pages of the row,
ppb pages at a time: it gathers the pages' K and V tiles [bk, H] straight from the
cache through the page table (no copy of the sequence's KV), computes scores with one
dot, masks them (causal by position, the row's key range, the sliding window), and
updates the online softmax: m' = max(m, rowmax s), l' = e^(m-m') l + sum e^(s-m'),
o' = e^(m-m') o + e^(s-m') V. Each split writes its normalized output and log-sum-exp;
the splits are merged exactly here in XLA (`reference.merge_partials`), which is
split-K over long contexts (vLLM's partitions are 512 tokens; so are ours).

Work skipped: a row's page loop starts at the first page its window can see and stops
at the last page its queries can see, so decode rows read only their own pages and
sliding-window layers only the window.

Quantized pages (quantized.py): the kernel reads the int8 / float8 values and their
[P, L] scales of the kv head, and folds the scales into the scores (s = q . k * k_scale)
and the probabilities (P @ V = (P * v_scale) @ v), so a page is never dequantized.

Triton needs power-of-two tiles of at least 16 for dots: bm is padded here, and the op
requires a power-of-two page size and head dim on a real GPU (bk = ppb * L >= 16).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from jaxinfer.pallas.ragged_paged_attention import reference
from jaxinfer.pallas.ragged_paged_attention.quantized import QuantizedPages

BLOCK_KEYS = 64  # keys per compute block (ppb = BLOCK_KEYS // L pages, at least 1)
SPLIT_KEYS = 512  # keys per split-K partition
MAX_BLOCK_M = 64  # query rows per program
# Running max before any key: finite, so that e^(m - m') never sees inf - inf.
_M_INIT = -1e30


def _block_m(num_rows: int) -> int:
    return min(MAX_BLOCK_M, max(16, pl.next_power_of_2(num_rows)))


def _kernel(meta_ref, pos_ref, tables_ref, q_ref, k_ref, v_ref, *refs, sm_scale: float,
            sliding_window: Optional[int], soft_cap: Optional[float], pages_per_block: int,
            pages_per_split: int, quantized: bool):
    # meta_ref:   [4]      (kv_start, kv_end) of this row, (first page, end page) this M
    #                      tile's queries can see, relative to the row's table
    # pos_ref:    [bm]     positions of this tile's query rows
    # tables_ref: [Pt]     the row's page table, padded by ppb so a block never reads past it
    # q_ref:      [bm, H]  query rows of this (row, kv head, M tile)
    # k_ref:      [P, L, H] the whole K cache of this kv head (pages gathered by id)
    # v_ref:      [P, L, H]
    # (quantized only) ks_ref, vs_ref: [P, L] float32 scales of this kv head's K / V
    # o_ref:      [bm, H]  float32 normalized output of this split
    # lse_ref:    [bm]     float32 log-sum-exp of this split (-inf: no key seen)
    if quantized:
        ks_ref, vs_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    split = pl.program_id(3)
    page_size, head_dim = k_ref.shape[1], k_ref.shape[2]
    block_keys = pages_per_block * page_size
    kv_start, kv_end = meta_ref[0], meta_ref[1]
    lo = jnp.maximum(meta_ref[2], split * pages_per_split)
    hi = jnp.minimum(meta_ref[3], (split + 1) * pages_per_split)
    q = q_ref[...]
    pos = pos_ref[...]
    block_m = q.shape[0]

    def body(b, carry):
        acc, m, l = carry
        first = lo + b * pages_per_block
        pages = tables_ref[pl.ds(first, pages_per_block)]  # [ppb]
        k = k_ref[pages].reshape(block_keys, head_dim)  # [bk, H]
        v = v_ref[pages].reshape(block_keys, head_dim)  # [bk, H]
        # Keys past the row's end (the last page's unwritten tail, table entries past
        # the end page) are masked below, but 0 * NaN = NaN in P @ V: zero their V rows.
        v_pos = kv_start + first * page_size + jax.lax.broadcasted_iota(jnp.int32, (block_keys,), 0)  # [bk]
        owned = (v_pos < kv_end) & (v_pos < kv_start + hi * page_size)
        v = jnp.where(owned[:, None], v, jnp.zeros_like(v))
        if quantized:
            k_scale = ks_ref[pages].reshape(1, block_keys)  # [1, bk]
            v_scale = jnp.where(owned, vs_ref[pages].reshape(block_keys), 0.0)[None, :]  # [1, bk]
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * sm_scale  # [bm, bk]
        if quantized:
            s = s * k_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        k_pos = kv_start + first * page_size + jax.lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)
        visible = (k_pos <= pos[:, None]) & (k_pos < kv_end) & (k_pos < kv_start + hi * page_size)
        if sliding_window is not None:
            visible &= (pos[:, None] - k_pos) < sliding_window
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = correction * l + p.sum(axis=1)
        pv = p * v_scale if quantized else p
        acc = correction[:, None] * acc + jnp.dot(pv.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    num_blocks = pl.cdiv(jnp.maximum(hi - lo, 0), pages_per_block)
    init = (jnp.zeros((block_m, head_dim), jnp.float32), jnp.full((block_m,), _M_INIT, jnp.float32),
            jnp.zeros((block_m,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    seen = l > 0
    o_ref[...] = acc / jnp.where(seen, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def row_attention(q_rows, k_pages, v_pages, q_pos, kv_starts, kv_ends, page_tables, *, sm_scale: float,
                  sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                  interpret: bool = False, block_keys: int = BLOCK_KEYS, split_keys: int = SPLIT_KEYS):
    """See reference.row_attention; the same arguments and results.

    block_keys and split_keys (keys per compute block and per split-K partition,
    rounded to whole pages) are exposed for tests of the block and split edges.
    """
    num_rows, num_kv_heads, rows_per_head, head_dim = q_rows.shape
    page_size = k_pages.shape[1]
    pages_per_row = page_tables.shape[1]
    block_m = _block_m(rows_per_head)
    padded_m = pl.cdiv(rows_per_head, block_m) * block_m
    if padded_m != rows_per_head:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_m - rows_per_head), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, padded_m - rows_per_head)), constant_values=reference.PAD_POSITION)
    pages_per_block = max(1, block_keys // page_size)
    pages_per_split = pl.cdiv(max(pl.cdiv(split_keys, page_size), 1), pages_per_block) * pages_per_block
    pages_per_split = min(pages_per_split, pl.cdiv(pages_per_row, pages_per_block) * pages_per_block)
    num_splits = pl.cdiv(pages_per_row, pages_per_split)
    # A block may start at any page of the split and read ppb table entries past it.
    tables = jnp.pad(page_tables, ((0, 0), (0, num_splits * pages_per_split + pages_per_block - pages_per_row)))
    # Page bounds per (row, M tile): a tile of padding queries reads nothing.
    num_tiles = padded_m // block_m
    bounds = reference.row_bounds(q_pos.reshape(num_rows * num_tiles, block_m), jnp.repeat(kv_starts, num_tiles),
                                  jnp.repeat(kv_ends, num_tiles), page_size, sliding_window)
    ranges = jnp.broadcast_to(jnp.stack([kv_starts, kv_ends], axis=1)[:, None], (num_rows, num_tiles, 2))
    meta = jnp.concatenate([ranges, bounds.reshape(num_rows, num_tiles, 2)], axis=2).astype(jnp.int32)  # [R, T, 4]

    grid = (num_rows, num_kv_heads, num_tiles, num_splits)
    kv_spec = pl.BlockSpec((k_pages.shape[0], page_size, None, head_dim), lambda r, k, t, s: (0, 0, k, 0))
    quantized = isinstance(k_pages, QuantizedPages)
    kv_operands, kv_specs = [k_pages, v_pages], [kv_spec, kv_spec]  # [P, L, H] of kv head k
    if quantized:
        scale_spec = pl.BlockSpec((k_pages.shape[0], page_size, None), lambda r, k, t, s: (0, 0, k))
        kv_operands = [k_pages.values, v_pages.values, k_pages.scales, v_pages.scales]
        kv_specs = [kv_spec, kv_spec, scale_spec, scale_spec]  # + the [P, L] scales of kv head k
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               pages_per_block=pages_per_block, pages_per_split=pages_per_split,
                               quantized=quantized)
    o_parts, lse_parts = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((num_rows, num_kv_heads, num_splits, padded_m, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_rows, num_kv_heads, num_splits, padded_m), jnp.float32)),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda r, k, t, s: (r, t, 0)),  # meta: [4]
            pl.BlockSpec((None, block_m), lambda r, k, t, s: (r, t)),  # q_pos: [bm]
            pl.BlockSpec((None, tables.shape[1]), lambda r, k, t, s: (r, 0)),  # page table: [Pt]
            pl.BlockSpec((None, None, block_m, head_dim), lambda r, k, t, s: (r, k, t, 0)),  # q: [bm, H]
            *kv_specs,
        ],
        out_specs=(
            pl.BlockSpec((None, None, None, block_m, head_dim), lambda r, k, t, s: (r, k, s, t, 0)),  # o: [bm, H]
            pl.BlockSpec((None, None, None, block_m), lambda r, k, t, s: (r, k, s, t)),  # lse: [bm]
        ),
        compiler_params=pltr.CompilerParams(num_warps=4 if block_m <= 32 else 8, num_stages=2),
        interpret=interpret,
        name="paged_row_attention_gpu",
    )(meta, q_pos, tables, q_rows, *kv_operands)
    out, lse = reference.merge_partials(o_parts, lse_parts, axis=2)
    return out[:, :, :rows_per_head], lse[:, :, :rows_per_head]
