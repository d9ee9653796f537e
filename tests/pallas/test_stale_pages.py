"""Stale cache slots: NaN in KV slots no sequence owns must not reach any output.

A paged KV cache holds whatever an earlier request left in pages that are free now,
and the slots past kv_len in a sequence's last page are not written yet; after a
preemption or in a fresh (uninitialized) cache they may hold NaN. The ops mask those
keys out of the softmax, but a masked weight of 0 times a NaN value is still NaN in
P @ V, so each implementation must also keep unowned V rows out of the product. Every
slot outside the sequences' [0, kv_len) is filled with NaN here (free pages, the tail
of each last page, the pages that padding entries of the page tables point to), and the
output must be finite and equal to the same call on a cache whose unowned slots are 0.

Shapes follow the TPU kernel's tiling (head_dim 128, page size 8), so the same batch
runs every implementation; batches hold decode rows, prefill chunks, a padding sequence
(kv_len 0) and bucket-padding tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import prefix_attention as pa
from jaxinfer.pallas import ragged_paged_attention as rpa

IMPLS = ("xla", "pallas_interpret", "pallas_tpu_interpret")
HEADS, KV_HEADS, HEAD_DIM, PAGE = 4, 2, 128, 8
NUM_PAD_TOKENS = 3


def _caches(num_pages, owned, seed):
    """(k, v) with NaN and (k, v) with 0 in the slots outside `owned` [P, L]; else equal."""
    rng = np.random.RandomState(seed)
    shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    live = owned[:, :, None, None]
    k, v = rng.randn(*shape).astype(np.float32), rng.randn(*shape).astype(np.float32)
    stale = tuple(jnp.asarray(np.where(live, x, np.nan)) for x in (k, v))
    zeros = tuple(jnp.asarray(np.where(live, x, 0.0)) for x in (k, v))
    return stale, zeros


def _owned(num_pages, full_tables, kv_lens):
    """[P, L] True for the slots [0, kv_len) of each sequence, through its page table."""
    owned = np.zeros((num_pages, PAGE), bool)
    for pages, kv_len in zip(full_tables, kv_lens):
        for pos in range(kv_len):
            owned[pages[pos // PAGE], pos % PAGE] = True
    return owned


def _flat_batch(q_lens, kv_lens, rng):
    """q [T + pad, N, H], cu_q_lens [S + 1], positions [T + pad] of a ragged batch."""
    num_tokens = int(sum(q_lens))
    q = jnp.asarray(rng.randn(num_tokens + NUM_PAD_TOKENS, HEADS, HEAD_DIM), jnp.float32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.zeros(num_tokens + NUM_PAD_TOKENS, np.int32)
    for i, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        positions[cu[i]:cu[i + 1]] = kv_len - q_len + np.arange(q_len)
    return q, jnp.asarray(cu), jnp.asarray(positions)


def _jit(fn, **static):
    """fn with `static` bound, jitted: one program for both caches instead of one compile per
    op (several times faster on CPU; the runner runs the ops under jit too)."""
    return jax.jit(functools.partial(fn, **static))


def _assert_same_and_finite(stale, zeros):
    for got, want in zip(stale, zeros):
        got, want = np.asarray(got), np.asarray(want)
        assert not np.isnan(got).any()
        np.testing.assert_array_equal(got, want)


# (q_len, kv_len): decodes first (kv 1, one page, one past two pages, a long context),
# then a padding sequence, prefill chunks (one past a page, a whole prompt, after cached
# tokens) and a trailing padding sequence.
RAGGED_SEQS = [(1, 1), (1, PAGE), (1, 2 * PAGE + 1), (1, 37), (0, 0), (2, PAGE + 1), (5, 5), (4, 20), (0, 0)]
NUM_DECODE_ROWS = 4


@pytest.mark.parametrize("impl, sliding_window, soft_cap", [
    *((impl, None, None) for impl in IMPLS), ("xla", 6, 20.0),
    # The interpreted kernels with a window and a cap: ~30 s more on 2 cores.
    *(pytest.param(impl, 6, 20.0, marks=pytest.mark.slow) for impl in IMPLS[1:])])
def test_ragged_attention_ignores_stale_slots(impl, sliding_window, soft_cap):
    rng = np.random.RandomState(0)
    q_lens = [n for n, _ in RAGGED_SEQS]
    kv_lens = [kv for _, kv in RAGGED_SEQS]
    pages_per_seq = [-(-kv // PAGE) for kv in kv_lens]
    width = max(pages_per_seq) + 1  # one padding entry past the longest table
    num_pages = sum(pages_per_seq) + 4
    # Page 0 and three others belong to no sequence; padding entries point to them.
    order = iter(1 + rng.permutation(num_pages - 1))
    free = [0] + [next(order) for _ in range(3)]
    tables = np.zeros((len(RAGGED_SEQS), width), np.int32)
    for i, n in enumerate(pages_per_seq):
        tables[i, :n] = [next(order) for _ in range(n)]
        tables[i, n:] = free[i % len(free)]
    stale, zeros = _caches(num_pages, _owned(num_pages, tables, kv_lens), seed=1)
    q, cu, _ = _flat_batch(q_lens, kv_lens, rng)

    op = _jit(rpa.ragged_paged_attention, max_q_len=8, sm_scale=HEAD_DIM ** -0.5, sliding_window=sliding_window,
              soft_cap=soft_cap, num_decode_rows=NUM_DECODE_ROWS, return_lse=True, impl=impl)

    def run(k_pages, v_pages):
        return op(q, k_pages, v_pages, cu, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(tables))

    out, lse = run(*stale)
    _assert_same_and_finite((out,), (run(*zeros)[0],))
    np.testing.assert_array_equal(np.asarray(out[-NUM_PAD_TOKENS:]), 0.0)  # bucket padding
    assert np.isneginf(np.asarray(lse[-NUM_PAD_TOKENS:])).all()


def _tree_batch(rng):
    """Seven sequences over a depth-2 tree of shared pages, decodes first.

    root: 2 pages shared by sequences 0-3; child: 1 more page shared by 0 and 2; a node of
    one sequence (4, 1 page); sequence 5 shares nothing; sequence 6 is padding. Returns
    the op's arguments for a cache (filled in by the caller) and the full page tables.
    """
    # (shared node path, q_len, kv_len)
    spec = [("root+child", 1, 3 * PAGE + 3), ("root", 1, 2 * PAGE + 1), ("root+child", 3, 3 * PAGE + 5),
            ("root", 5, 2 * PAGE + 6), ("alone", 2, PAGE + 2), ("", 2, 7), ("", 0, 0)]
    num_pages = 24
    order = iter(1 + rng.permutation(num_pages - 1))
    free = 0  # page 0 belongs to no sequence
    nodes = {"root": [next(order) for _ in range(2)]}
    nodes["child"] = [next(order)]
    nodes["alone"] = [next(order)]
    full, suffix, shared_pages = [], [], []
    for path, _, kv_len in spec:
        shared = [p for name in filter(None, path.split("+")) for p in nodes[name]]
        own = [next(order) for _ in range(-(-kv_len // PAGE) - len(shared))]
        full.append(shared + own)
        suffix.append(own)
        shared_pages.append(len(shared))
    width = max(map(len, full)) + 1

    def padded(tables):
        return jnp.asarray([t + [free] * (width - len(t)) for t in tables], jnp.int32)

    q_lens = [n for _, n, _ in spec]
    kv_lens = [kv for _, _, kv in spec]
    q, cu, positions = _flat_batch(q_lens, kv_lens, rng)
    cu_np = np.asarray(cu)

    def tokens(*seqs):
        return [t for i in seqs for t in range(cu_np[i], cu_np[i + 1])]

    # Prefix rows of 4 queries: the root's 10 queries take 3 rows; an empty node and a
    # padding row at the end.
    block = 4
    rows = []
    for toks, first, end, pages in [(tokens(0, 1, 2, 3), 0, 2, nodes["root"]), (tokens(0, 2), 2, 3, nodes["child"]),
                                    (tokens(4), 0, 1, nodes["alone"]), (tokens(5), 0, 0, [])]:
        rows += [(toks[r:r + block], first, end, pages) for r in range(0, len(toks), block)]
    rows.append(([], 0, 0, []))
    num_tokens = q.shape[0]
    prefix = pa.PrefixRows(
        q_index=jnp.asarray([t + [num_tokens] * (block - len(t)) for t, _, _, _ in rows], jnp.int32),
        kv_starts=jnp.asarray([first * PAGE for _, first, _, _ in rows], jnp.int32),
        kv_ends=jnp.asarray([end * PAGE for _, _, end, _ in rows], jnp.int32),
        page_tables=jnp.asarray([p + [free] * (2 - len(p)) for _, _, _, p in rows], jnp.int32))
    args = dict(q=q, positions=positions, cu_q_lens=cu, kv_lens=jnp.asarray(kv_lens, jnp.int32),
                page_tables=padded(suffix), kv_starts=jnp.asarray(np.array(shared_pages) * PAGE, jnp.int32),
                prefix=prefix)
    return args, full, kv_lens, num_pages


@pytest.mark.parametrize("impl", IMPLS)
def test_shared_prefix_attention_ignores_stale_slots(impl):
    args, full, kv_lens, num_pages = _tree_batch(np.random.RandomState(2))
    stale, zeros = _caches(num_pages, _owned(num_pages, full, kv_lens), seed=3)

    op = _jit(pa.shared_prefix_attention, max_q_len=8, sm_scale=HEAD_DIM ** -0.5, num_decode_rows=2, impl=impl)

    def run(k_pages, v_pages):
        return op(**args, k_pages=k_pages, v_pages=v_pages)

    out = run(*stale)
    _assert_same_and_finite((out,), (run(*zeros),))
    np.testing.assert_array_equal(np.asarray(out[-NUM_PAD_TOKENS:]), 0.0)
