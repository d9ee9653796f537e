"""Shared-prefix attention (Hydragen): prefix rows + suffix + log-sum-exp merge must equal
plain ragged paged attention over all keys, for the reference and every kernel."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import prefix_attention as pa
from jaxinfer.pallas import ragged_paged_attention as rpa

IMPLS = ("xla", "pallas_interpret", "pallas_tpu_interpret")
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}
PAGE = 4


def _jit(fn, **static):
    """fn with `static` bound, jitted: one compiled program per call instead of one compile
    per op (several times faster on CPU; the runner runs the ops under jit too)."""
    return jax.jit(functools.partial(fn, **static))


def _tree_batch(dtype, num_heads=4, num_kv_heads=2, head_dim=16, seed=0):
    """Six sequences over a depth-2 tree of shared pages.

    root: 3 pages shared by sequences 0-3; child: 2 more pages shared by 0-1; a node of
    size 1 (sequence 4 alone over 2 pages); sequence 5 shares nothing. Queries: decodes
    and prefill chunks, some starting right at the end of their shared pages.
    """
    rng = np.random.RandomState(seed)
    num_pages = 64
    perm = iter(rng.permutation(num_pages))
    root = [next(perm) for _ in range(3)]
    child = [next(perm) for _ in range(2)]
    alone = [next(perm) for _ in range(2)]
    # (shared pages, q_len, kv_len)
    spec = [(root + child, 1, 5 * PAGE + 3), (root + child, 3, 5 * PAGE + 3), (root, 1, 3 * PAGE + 2),
            (root, 5, 3 * PAGE + 5), (alone, 2, 2 * PAGE + 2), ([], 2, 7)]
    tables, q_lens, kv_lens, shared_len = [], [], [], []
    for shared, q_len, kv_len in spec:
        tables.append(shared + [next(perm) for _ in range(-(-kv_len // PAGE) - len(shared))])
        q_lens.append(q_len)
        kv_lens.append(kv_len)
        shared_len.append(len(shared))
    num_tokens = sum(q_lens)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    positions = np.zeros(num_tokens + 2, np.int32)  # 2 bucket-padding tokens
    for i in range(len(spec)):
        positions[cu[i]:cu[i + 1]] = kv_lens[i] - q_lens[i] + np.arange(q_lens[i])
    width = max(map(len, tables))
    full = np.zeros((len(spec), width), np.int32)
    suffix = np.zeros((len(spec), width), np.int32)
    for i, t in enumerate(tables):
        full[i, :len(t)] = t
        suffix[i, :len(t) - shared_len[i]] = t[shared_len[i]:]

    def tokens(*seqs):
        return [t for i in seqs for t in range(cu[i], cu[i + 1])]

    # Prefix rows (query block 4, so the root's 11 queries take 3 rows), then an empty
    # node (kv_start == kv_end: a prefix of 0 pages) and a padding row.
    block = 4
    nodes = [(tokens(0, 1, 2, 3), 0, 3, root), (tokens(0, 1), 3, 5, child), (tokens(4), 0, 2, alone),
             (tokens(5), 0, 0, [])]
    rows_q, rows_start, rows_end, rows_pages = [], [], [], []
    for toks, first, end, pages in nodes:
        for r in range(0, len(toks), block):
            rows_q.append(toks[r:r + block])
            rows_start.append(first * PAGE)
            rows_end.append(end * PAGE)
            rows_pages.append(pages)
    rows_q.append([])
    rows_start.append(0)
    rows_end.append(0)
    rows_pages.append([])
    q_index = np.full((len(rows_q), block), num_tokens + 2, np.int32)
    prefix_tables = np.zeros((len(rows_q), 4), np.int32)
    for r, (toks, pages) in enumerate(zip(rows_q, rows_pages)):
        q_index[r, :len(toks)] = toks
        prefix_tables[r, :len(pages)] = pages
    rows = pa.PrefixRows(*(jnp.asarray(x, jnp.int32) for x in (q_index, rows_start, rows_end, prefix_tables)))
    q = jnp.asarray(rng.randn(num_tokens + 2, num_heads, head_dim), dtype)
    k_pages = jnp.asarray(rng.randn(num_pages, PAGE, num_kv_heads, head_dim), dtype)
    v_pages = jnp.asarray(rng.randn(num_pages, PAGE, num_kv_heads, head_dim), dtype)
    common = dict(q=q, k_pages=k_pages, v_pages=v_pages, cu_q_lens=jnp.asarray(cu),
                  kv_lens=jnp.asarray(kv_lens, jnp.int32))
    plain = dict(common, page_tables=jnp.asarray(full))
    shared = dict(common, page_tables=jnp.asarray(suffix), positions=jnp.asarray(positions),
                  kv_starts=jnp.asarray(np.array(shared_len) * PAGE, jnp.int32), prefix=rows)
    return plain, shared


# Every impl runs plain float32, bfloat16 with the window and the cap together, and the
# window and the cap alone; the TPU kernel (interpreted: ~10 s a case on CPU) runs the
# last two with `-m slow` only.
PREFIX_CASES = [
    *((*case, impl) for impl in IMPLS for case in [(jnp.float32, None, None), (jnp.bfloat16, 9, 20.0)]),
    *((*case, impl) for impl in IMPLS[:-1] for case in [(jnp.float32, 9, None), (jnp.bfloat16, None, 20.0)]),
    *(pytest.param(*case, "pallas_tpu_interpret", marks=pytest.mark.slow)
      for case in [(jnp.float32, 9, None), (jnp.bfloat16, None, 20.0)])]


@pytest.mark.parametrize("dtype,window,soft_cap,impl", PREFIX_CASES)
def test_shared_prefix_equals_plain_attention(impl, dtype, window, soft_cap):
    plain, shared = _tree_batch(dtype)
    kwargs = dict(max_q_len=8, sm_scale=0.25, sliding_window=window, soft_cap=soft_cap)
    want = _jit(rpa.ragged_paged_attention, impl="xla", **kwargs)(**plain)
    got = _jit(pa.shared_prefix_attention, impl=impl, **kwargs)(**shared)
    assert got.dtype == want.dtype
    err = float(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32)).max())
    assert err <= TOLERANCE[jnp.dtype(dtype)]
    np.testing.assert_array_equal(np.asarray(got[-2:], np.float32), 0.0)


def test_decode_rows_with_shared_prefix():
    plain, shared = _tree_batch(jnp.float32)
    # Reorder is not needed: the first sequence is a decode; one decode row.
    want = _jit(rpa.ragged_paged_attention, max_q_len=8, sm_scale=0.25, num_decode_rows=1, impl="xla")(**plain)
    got = _jit(pa.shared_prefix_attention, max_q_len=8, sm_scale=0.25, num_decode_rows=1, impl="xla")(**shared)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_prefix_stage_alone_is_the_prefix_part_of_the_softmax():
    # The prefix stage's (out, lse) for a token equals attention restricted to its
    # shared pages: check the root-only sequence 2 against plain attention over a
    # table truncated to the root pages (kv_len = 3 pages).
    plain, shared = _tree_batch(jnp.float32)
    out, lse = _jit(pa.prefix_attention, sm_scale=0.25, impl="xla")(
        shared["q"], shared["k_pages"], shared["v_pages"], shared["positions"], shared["prefix"])
    cu = np.asarray(plain["cu_q_lens"])
    token = cu[2]
    tables = plain["page_tables"][2:3, :3]
    alone = _jit(rpa.ragged_paged_attention, max_q_len=1, sm_scale=0.25, return_lse=True, impl="xla")(
        plain["q"][token:token + 1], plain["k_pages"], plain["v_pages"], jnp.array([0, 1], jnp.int32),
        jnp.array([3 * PAGE], jnp.int32), tables)
    np.testing.assert_allclose(np.asarray(out[token]), np.asarray(alone[0][0]), atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse[token]), np.asarray(alone[1][0]), atol=2e-6)
    # Sequence 5 is only in the empty node: nothing seen.
    assert np.all(np.isneginf(np.asarray(lse[cu[5]:cu[6]])))


def test_scatter_merge_by_hand():
    # One token (index 0) in two rows, one kv head, G = 1, H = 1; token 1 in none.
    o_rows = jnp.array([[[[1.0]]], [[[3.0]]]])  # [R=2, K=1, M=1, H=1]
    lse_rows = jnp.array([[[0.0]], [[np.log(3.0)]]])  # weights 1 : 3
    q_index = jnp.array([[0], [0]])
    out, lse = pa.scatter_merge(o_rows, lse_rows, q_index, num_tokens=2)
    np.testing.assert_allclose(np.asarray(out[0, 0]), [(1.0 + 3 * 3.0) / 4], rtol=1e-6)
    np.testing.assert_allclose(float(lse[0, 0]), np.log(4.0), rtol=1e-6)
    assert float(out[1, 0, 0]) == 0.0 and float(lse[1, 0]) == -np.inf


def test_bad_prefix_metadata_is_named():
    _, shared = _tree_batch(jnp.float32)
    rows = shared["prefix"]
    with pytest.raises(ValueError, match="prefix"):
        pa.shared_prefix_attention(**dict(shared, prefix=rows._replace(kv_ends=rows.kv_ends[:2])), max_q_len=8,
                                   sm_scale=0.25)
    with pytest.raises(ValueError, match="prefix.page_tables"):
        pa.shared_prefix_attention(**dict(shared, prefix=rows._replace(page_tables=rows.page_tables * 1.0)),
                                   max_q_len=8, sm_scale=0.25)
    with pytest.raises(ValueError, match="positions"):
        pa.shared_prefix_attention(**dict(shared, positions=shared["positions"][:3]), max_q_len=8, sm_scale=0.25)
    with pytest.raises(ValueError, match="kv_starts"):
        pa.shared_prefix_attention(**dict(shared, kv_starts=shared["kv_starts"][:2]), max_q_len=8, sm_scale=0.25)
