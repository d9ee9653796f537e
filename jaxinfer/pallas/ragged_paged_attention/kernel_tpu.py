"""Pallas TPU (Mosaic) kernel of paged row attention.

Path: runner -> model -> ragged_paged_attention / prefix_attention op -> **this kernel**
on TPUs (or under `pltpu.force_tpu_interpret_mode` on CPU, for tests). It implements
`reference.row_attention` (same arguments and results); the ops pack ragged batches and
shared-prefix groups into rows before calling it.

Dimension codes as in reference.py; bm is the M tile (query rows of one program), T the
number of M tiles of a row, ppb the pages of one compute block and bk = ppb * L its keys.

Grid (R rows, T M tiles), both "parallel": one program owns bm query rows of every kv
head of one row ([K, bm, H] of q, all query heads of each group together) and walks the
pages its queries can see, ppb pages at a time, with an online softmax whose float32
state (m, l, acc) lives in VMEM scratch: m' = max(m, rowmax s), l' = e^(m-m') l +
sum e^(s-m'), o' = e^(m-m') o + e^(s-m') V.

Memory. The page table (flattened to [R * pages per row]) and the row metadata
(kv_starts, kv_ends, and the first/end page of each (row, M tile)) are scalar-prefetched
into SMEM. The K/V caches stay in HBM (`pl.ANY`); the kernel copies each block's pages
into a double buffer in VMEM with async DMAs, starting block b + 1's copies before it
waits for and computes block b, so the copy of the next block overlaps the compute of
this one. A program with no visible page issues no DMA at all.

Why whole pages. The cache layout [P, L, K, H] puts the kv heads of one token next to
each other, so one kv head of a page is strided. The kernel DMAs whole pages [L, K, H]
(one contiguous, tile-aligned copy per page for K and per page for V, whatever K is)
and loops over the kv heads statically inside the program, reading head k of the
buffer as `buf[slot, :, :, k, :]` -> [ppb, L, H] -> [bk, H]. Each page is thus fetched
once per program for all heads (a program per kv head would fetch every page K times,
or need a strided per-head DMA out of a (K, H)-tiled HBM array, one descriptor per page
and head). The price is a sublane gather in VMEM per head (Mosaic must relayout the
[ppb, L, 1, H] load into dense [bk, H] tiles; not yet measured on a TPU), and VMEM
padding when K is below the sublane tile (8 for f32, 16 for bf16).

Work skipped: the page loop of a program starts at the first page its sliding window
can see and stops after the last page its queries can see (`reference.row_bounds`,
per M tile), so decode rows read only their own pages, later M tiles of a prefill chunk
more pages than earlier ones, and sliding-window layers only the window. Pages of the
last block past the end are not fetched; their V rows are zeroed (the buffer may hold
stale data or NaN) and their keys are masked like every invisible key.

Limitations of the compiled kernel (`check_shapes`): head_dim a multiple of 128 (the
lane width: q, K, V and out tiles are [*, H]) and page_size a multiple of 8 (the f32
sublane tile, so that [ppb, L, H] merges into [bk, H] without a relayout; bf16 caches
merge best with multiples of 16). The whole flattened page table must fit in SMEM.
VMEM per program, with [.., 1] arrays padded to 128 lanes: K/V buffers 2 * 2 * bk * K'
* H (K' = K rounded up to the sublane tile) in the cache dtype, acc K * bm * H and m, l
2 * K * bm * 128 in f32, plus the double-buffered q, out and lse blocks: about 5 MiB for
K = 8, H = 128, bm = 128, bk = 128 in bf16, under the default scoped limit; much larger
K * H may need a smaller max_block_m. There is no split-K: one program walks all its
pages (the grid has R * T programs; split-K as in kernel_gpu.py would add a grid axis
and a merge), and each program's first DMA is not overlapped with anything (prefetching
across programs would need "arbitrary" grid semantics and cross-program state).

Quantized pages (quantized.py): the kernel DMAs each page's int8 / float8 values and its
[L, K] float32 scales (two more copies per page, into their own double buffers) and folds
the scales into the scores (s = q . k * k_scale) and the probabilities (P @ V =
(P * v_scale) @ v); a page is never dequantized. Not yet compiled for a TPU: the [L, K]
scale tiles pad K to 128 lanes in VMEM.

Written for what the TPU interpreter supports: no reshape of a
ref (loaded values are reshaped), no strided ref slicing, no masked store (scratch and
output blocks are written whole).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxinfer.pallas.ragged_paged_attention import reference
from jaxinfer.pallas.ragged_paged_attention.quantized import QuantizedPages

BLOCK_KEYS = 128  # keys per compute block (ppb = BLOCK_KEYS // L pages, at least 1)
MAX_BLOCK_M = 128  # query rows per program; larger rows are tiled (VMEM budget below)
LANES = 128  # TPU lane width: head_dim must be a multiple
SUBLANES = 8  # f32 sublane tile: page_size must be a multiple
M_ALIGN = 16  # M is padded to whole bf16 sublane tiles (16 rows)
# Running max before any key: finite, so that e^(m - m') never sees inf - inf.
_M_INIT = -1e30


def check_shapes(page_size: int, head_dim: int) -> None:
    """Raises ValueError (naming the field) for shapes the compiled kernel cannot take.

    Interpret mode runs any shape; these are Mosaic's tiling constraints (see the
    module docstring).
    """
    if head_dim % LANES:
        raise ValueError(f"head_dim: the TPU kernel needs a multiple of {LANES} (the lane width), got {head_dim}; "
                         f"use impl='xla'")
    if page_size % SUBLANES:
        raise ValueError(f"page_size: the TPU kernel needs a multiple of {SUBLANES} (the sublane tile), got "
                         f"{page_size}; use impl='xla'")


def _block_m(rows_per_head: int, max_block_m: int) -> int:
    padded = pl.cdiv(rows_per_head, M_ALIGN) * M_ALIGN
    return min(padded, max(M_ALIGN, max_block_m // M_ALIGN * M_ALIGN))


def _kernel(kv_starts_ref, kv_ends_ref, first_pages_ref, end_pages_ref, tables_ref,
            q_ref, pos_ref, k_hbm, v_hbm, *refs,
            sm_scale: float, sliding_window: Optional[int], soft_cap: Optional[float],
            pages_per_block: int, pages_per_row: int, quantized: bool):
    # Scalar prefetch (SMEM, int32):
    # kv_starts_ref:   [R]       first key position of each row
    # kv_ends_ref:     [R]       keys at positions >= kv_end are not attended
    # first_pages_ref: [R * T]   first page (relative to the row's table) of each (row, M tile)
    # end_pages_ref:   [R * T]   end page of each (row, M tile); first == end: nothing to see
    # tables_ref:      [R * Pr]  flattened page tables
    # Inputs:
    # q_ref:   [K, bm, H]     query rows of this (row, M tile), every kv head
    # pos_ref: [bm, 1]        int32 positions of those query rows (PAD_POSITION: padding)
    # k_hbm:   [P, L, K, H]   the whole K cache, in HBM (copied by DMA only)
    # v_hbm:   [P, L, K, H]
    # Outputs:
    # o_ref:   [K, bm, H]     float32 normalized output
    # lse_ref: [K, bm, 1]     float32 log-sum-exp (-inf: no key seen)
    # Scratch:
    # k_buf:   [2, ppb, L, K, H]  double buffer of whole K pages (slot, page of the block)
    # v_buf:   [2, ppb, L, K, H]
    # sems:    [2, 2]         DMA semaphores (K / V, slot)
    # m_ref:   [K, bm, 1]     float32 running max
    # l_ref:   [K, bm, 1]     float32 running softmax denominator
    # acc_ref: [K, bm, H]     float32 running unnormalized output
    # Quantized caches add two inputs after v_hbm (ks_hbm, vs_hbm: [P, L, K] float32
    # scales, in HBM) and two scratch buffers after v_buf (ks_buf, vs_buf: [2, ppb, L, K]).
    if quantized:
        ks_hbm, vs_hbm, o_ref, lse_ref, k_buf, v_buf, ks_buf, vs_buf, sems, m_ref, l_ref, acc_ref = refs
    else:
        o_ref, lse_ref, k_buf, v_buf, sems, m_ref, l_ref, acc_ref = refs
    row, tile = pl.program_id(0), pl.program_id(1)
    meta = row * pl.num_programs(1) + tile
    kv_start, kv_end = kv_starts_ref[row], kv_ends_ref[row]
    first, end = first_pages_ref[meta], end_pages_ref[meta]
    num_kv_heads, block_m, head_dim = q_ref.shape
    page_size = k_buf.shape[2]
    block_keys = pages_per_block * page_size
    num_blocks = pl.cdiv(end - first, pages_per_block)

    def page_copies(block, slot, i):
        """The K and V copy descriptors of page i of `block` into buffer `slot`."""
        page = tables_ref[row * pages_per_row + first + block * pages_per_block + i]
        copies = (pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, i], sems.at[0, slot]),
                  pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, i], sems.at[1, slot]))
        if quantized:
            copies += (pltpu.make_async_copy(ks_hbm.at[page], ks_buf.at[slot, i], sems.at[2, slot]),
                       pltpu.make_async_copy(vs_hbm.at[page], vs_buf.at[slot, i], sems.at[3, slot]))
        return copies

    def for_each_page(block, slot, action):
        # Pages past the row's end page are neither fetched nor waited for.
        for i in range(pages_per_block):
            @pl.when(first + block * pages_per_block + i < end)
            def _():
                for copy in page_copies(block, slot, i):
                    action(copy)

    m_ref[...] = jnp.full(m_ref.shape, _M_INIT, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(num_blocks > 0)
    def _prefetch_first_block():
        for_each_page(0, 0, lambda copy: copy.start())

    pos = pos_ref[...]  # [bm, 1]

    def body(block, carry):
        slot = jax.lax.rem(block, 2)

        @pl.when(block + 1 < num_blocks)
        def _prefetch_next_block():
            for_each_page(block + 1, 1 - slot, lambda copy: copy.start())

        for_each_page(block, slot, lambda copy: copy.wait())

        block_first = first + block * pages_per_block  # page of the block's key 0
        key = jax.lax.broadcasted_iota(jnp.int32, (1, block_keys), 1)  # [1, bk]
        k_pos = kv_start + block_first * page_size + key
        visible = (k_pos <= pos) & (k_pos < kv_end)  # [bm, bk]
        if sliding_window is not None:
            visible &= (pos - k_pos) < sliding_window
        # V rows that must not reach P @ V (0 * NaN = NaN): keys of pages that were not
        # fetched (stale buffer contents) and keys at or past kv_end (the unwritten tail
        # of the last page may hold NaN).
        key_col = jax.lax.broadcasted_iota(jnp.int32, (block_keys, 1), 0)  # [bk, 1]
        owned = (key_col < (end - block_first) * page_size) & (
            kv_start + block_first * page_size + key_col < kv_end)  # [bk, 1]

        for head in range(num_kv_heads):
            q = q_ref[head]  # [bm, H]
            # [ppb, L, H] -> [bk, H]: head `head` of every key of the block.
            k = k_buf[slot, :, :, head, :].reshape(block_keys, head_dim)
            v = v_buf[slot, :, :, head, :].reshape(block_keys, head_dim)
            dtype = q.dtype if quantized else jnp.promote_types(q.dtype, k.dtype)
            s = jax.lax.dot_general(q.astype(dtype), k.astype(dtype), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32) * sm_scale  # [bm, bk]
            if quantized:  # [ppb, L] scales of head `head` -> [1, bk]
                s = s * ks_buf[slot, :, :, head].reshape(1, block_keys)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(visible, s, -jnp.inf)
            m_prev = m_ref[head]  # [bm, 1]
            m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
            correction = jnp.exp(m_prev - m_next)  # [bm, 1]
            p = jnp.exp(s - m_next)  # [bm, bk]; 0 where invisible
            l_ref[head] = correction * l_ref[head] + p.sum(axis=1, keepdims=True)
            m_ref[head] = m_next
            v = jnp.where(owned, v, jnp.zeros_like(v))
            if quantized:  # P @ (v * v_scale) = (P * v_scale) @ v; unfetched keys' scales -> 0
                v_scale = jnp.where(owned.reshape(1, block_keys), vs_buf[slot, :, :, head].reshape(1, block_keys), 0.0)
                p, v = p * v_scale, v.astype(q.dtype)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [bm, H]
            acc_ref[head] = correction * acc_ref[head] + pv
        return carry

    jax.lax.fori_loop(0, num_blocks, body, 0)

    l = l_ref[...]  # [K, bm, 1]
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = acc_ref[...] / safe_l
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(safe_l), -jnp.inf)


def row_attention(q_rows, k_pages, v_pages, q_pos, kv_starts, kv_ends, page_tables, *, sm_scale: float,
                  sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                  block_keys: int = BLOCK_KEYS, max_block_m: int = MAX_BLOCK_M):
    """See reference.row_attention; the same arguments and results.

    Runs in TPU interpret mode when traced under `pltpu.force_tpu_interpret_mode(...)`
    (`row_attention_interpret`). block_keys (keys per compute block, rounded down to
    whole pages, at least one) and max_block_m (query rows per program, a multiple of
    16) are exposed for tests of the block and tile edges.
    """
    num_rows, num_kv_heads, rows_per_head, head_dim = q_rows.shape
    _, page_size, _, _ = k_pages.shape
    pages_per_row = page_tables.shape[1]
    block_m = _block_m(rows_per_head, max_block_m)
    num_tiles = pl.cdiv(rows_per_head, block_m)
    padded_m = num_tiles * block_m
    q_pos = q_pos.astype(jnp.int32)
    if padded_m != rows_per_head:
        q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, padded_m - rows_per_head), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, padded_m - rows_per_head)), constant_values=reference.PAD_POSITION)
    pages_per_block = max(1, block_keys // page_size)

    # First and end page of each (row, M tile): a tile reads only what its queries see.
    kv_starts = kv_starts.astype(jnp.int32)
    kv_ends = kv_ends.astype(jnp.int32)
    bounds = reference.row_bounds(q_pos.reshape(num_rows * num_tiles, block_m), jnp.repeat(kv_starts, num_tiles),
                        jnp.repeat(kv_ends, num_tiles), page_size, sliding_window)  # [R * T, 2]
    end_pages = jnp.minimum(bounds[:, 1], pages_per_row)
    first_pages = jnp.minimum(bounds[:, 0], end_pages)
    tables = page_tables.astype(jnp.int32).reshape(-1)  # [R * Pr]

    quantized = isinstance(k_pages, QuantizedPages)
    kernel = functools.partial(_kernel, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               pages_per_block=pages_per_block, pages_per_row=pages_per_row, quantized=quantized)
    buf_shape = (2, pages_per_block, page_size, num_kv_heads, head_dim)
    kv_operands = [k_pages, v_pages]
    scale_specs, scale_buffers = [], []
    if quantized:
        kv_operands = [k_pages.values, v_pages.values, k_pages.scales, v_pages.scales]
        scale_specs = [pl.BlockSpec(memory_space=pl.ANY)] * 2  # [P, L, K] scales in HBM
        scale_buffers = [pltpu.VMEM(buf_shape[:-1], jnp.float32)] * 2  # [2, ppb, L, K]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_rows, num_tiles),
        in_specs=[
            pl.BlockSpec((None, num_kv_heads, block_m, head_dim), lambda r, t, *_: (r, 0, t, 0)),  # q: [K, bm, H]
            pl.BlockSpec((None, block_m, 1), lambda r, t, *_: (r, t, 0)),  # q_pos: [bm, 1]
            pl.BlockSpec(memory_space=pl.ANY),  # k_pages: [P, L, K, H] in HBM
            pl.BlockSpec(memory_space=pl.ANY),  # v_pages: [P, L, K, H] in HBM
            *scale_specs,
        ],
        out_specs=(
            pl.BlockSpec((None, num_kv_heads, block_m, head_dim), lambda r, t, *_: (r, 0, t, 0)),  # o: [K, bm, H]
            pl.BlockSpec((None, num_kv_heads, block_m, 1), lambda r, t, *_: (r, 0, t, 0)),  # lse: [K, bm, 1]
        ),
        scratch_shapes=[
            pltpu.VMEM(buf_shape, k_pages.dtype),  # k_buf: [2, ppb, L, K, H]
            pltpu.VMEM(buf_shape, v_pages.dtype),  # v_buf: [2, ppb, L, K, H]
            *scale_buffers,
            pltpu.SemaphoreType.DMA((4 if quantized else 2, 2)),  # sems: [K / V (/ K, V scales), slot]
            pltpu.VMEM((num_kv_heads, block_m, 1), jnp.float32),  # m: [K, bm, 1]
            pltpu.VMEM((num_kv_heads, block_m, 1), jnp.float32),  # l: [K, bm, 1]
            pltpu.VMEM((num_kv_heads, block_m, head_dim), jnp.float32),  # acc: [K, bm, H]
        ],
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(jax.ShapeDtypeStruct((num_rows, num_kv_heads, padded_m, head_dim), jnp.float32),
                   jax.ShapeDtypeStruct((num_rows, num_kv_heads, padded_m, 1), jnp.float32)),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        name="paged_row_attention_tpu",
    )(kv_starts, kv_ends, first_pages, end_pages, tables,
      q_rows, q_pos[:, :, None], *kv_operands)
    return out[:, :, :rows_per_head], lse[:, :, :rows_per_head, 0]


def row_attention_interpret(q_rows, k_pages, v_pages, q_pos, kv_starts, kv_ends, page_tables, *,
                            sm_scale: float, sliding_window: Optional[int] = None,
                            soft_cap: Optional[float] = None, **block_kwargs):
    """`row_attention` under TPU interpret mode (runs on CPU; tests and the CPU dispatch)."""
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        return row_attention(q_rows, k_pages, v_pages, q_pos, kv_starts, kv_ends, page_tables, sm_scale=sm_scale,
                             sliding_window=sliding_window, soft_cap=soft_cap, **block_kwargs)
