"""The XLA reference of ragged paged attention: hand-computed values, then a naive oracle."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import ragged_paged_attention as rpa


def _naive(q, k_seqs, v_seqs, q_lens, kv_lens, scale, window=None):
    """Per-sequence, per-query softmax attention in float64 numpy."""
    out, offset = [], 0
    heads, kv_heads = q.shape[1], k_seqs[0].shape[1]
    group = heads // kv_heads
    for k, v, n, L in zip(k_seqs, v_seqs, q_lens, kv_lens):
        for j in range(n):
            pos = L - n + j
            row = np.zeros(q.shape[1:])
            for h in range(heads):
                keys = np.arange(L)
                ok = keys <= pos
                if window is not None:
                    ok &= pos - keys < window
                s = (k[:L, h // group] @ q[offset + j, h]) * scale
                s = np.where(ok, s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                row[h] = p @ v[:L, h // group]
            out.append(row)
        offset += n
    return np.array(out)


def test_hand_computed_single_query():
    # One sequence, one kv head, head dim 2, keys at positions 0 and 1, query at 1.
    q = jnp.array([[[1.0, 0.0]]])  # [T=1, N=1, H=2]
    k_pages = jnp.array([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # [P=1, L=2, K=1, H=2]
    v_pages = jnp.array([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    out = rpa.ragged_paged_attention(q, k_pages, v_pages, jnp.array([0, 1]), jnp.array([2]), jnp.array([[0]]),
                                     max_q_len=1, sm_scale=1.0)
    # scores [1, 0] -> weights [e/(e+1), 1/(e+1)]
    w = np.exp(1.0) / (np.exp(1.0) + 1.0)
    np.testing.assert_allclose(out[0, 0], [w * 1 + (1 - w) * 3, w * 2 + (1 - w) * 4], rtol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("page_size", [1, 4])
def test_against_naive_with_shuffled_pages(page_size, window):
    rng = np.random.RandomState(0)
    heads, kv_heads, dim = 4, 2, 8
    # (q_len, kv_len): decode, a chunk after cached tokens, a full prefill, an empty
    # padding sequence, one page exactly, one past a page.
    seqs = [(1, 9), (3, 7), (5, 5), (0, 0), (1, page_size), (2, page_size + 1)]
    pages_per_seq = max(-(-L // page_size) for _, L in seqs) or 1
    num_pages = pages_per_seq * len(seqs) + 2
    perm = rng.permutation(num_pages)
    tables = perm[:pages_per_seq * len(seqs)].reshape(len(seqs), pages_per_seq)
    k_pages = rng.randn(num_pages, page_size, kv_heads, dim).astype(np.float32)
    v_pages = rng.randn(num_pages, page_size, kv_heads, dim).astype(np.float32)
    total_q = sum(n for n, _ in seqs)
    q = rng.randn(total_q + 3, heads, dim).astype(np.float32)  # 3 padding tokens at the end
    cu = np.concatenate([[0], np.cumsum([n for n, _ in seqs])])
    out = rpa.ragged_paged_attention(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages),
                                     jnp.asarray(cu, jnp.int32), jnp.asarray([L for _, L in seqs], jnp.int32),
                                     jnp.asarray(tables, jnp.int32), max_q_len=8, sm_scale=dim ** -0.5,
                                     sliding_window=window)
    k_seqs = [k_pages[t].reshape(-1, kv_heads, dim) for t in tables]
    v_seqs = [v_pages[t].reshape(-1, kv_heads, dim) for t in tables]
    want = _naive(q, k_seqs, v_seqs, [n for n, _ in seqs], [L for _, L in seqs], dim ** -0.5, window)
    np.testing.assert_allclose(np.asarray(out[:total_q]), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[total_q:]), 0.0)


def test_write_kv_drops_padding_slots():
    k_pages = jnp.zeros((2, 2, 1, 1))
    k = jnp.array([[[1.0]], [[2.0]], [[3.0]]])
    new_k, _ = rpa.write_kv(k_pages, k_pages, k, k, jnp.array([3, 0, 4]))  # slot 4 = P * L: dropped
    np.testing.assert_array_equal(np.asarray(new_k).reshape(-1), [2.0, 0.0, 0.0, 1.0])


def test_bad_shapes_and_impl_are_named():
    q = jnp.zeros((2, 4, 8))
    pages = jnp.zeros((3, 2, 2, 8))
    meta = (jnp.array([0, 2]), jnp.array([2]), jnp.array([[0]]))
    with pytest.raises(ValueError, match="head_dim"):
        rpa.ragged_paged_attention(jnp.zeros((2, 4, 4)), pages, pages, *meta, max_q_len=2, sm_scale=1.0)
    with pytest.raises(ValueError, match="impl"):
        rpa.ragged_paged_attention(q, pages, pages, *meta, max_q_len=2, sm_scale=1.0, impl="cuda")
    with pytest.raises(ValueError, match="metadata"):
        rpa.ragged_paged_attention(q, pages, pages, jnp.array([0, 2, 2]), *meta[1:], max_q_len=2, sm_scale=1.0)


def test_decode_rows_split_equals_the_padded_layout():
    rng = np.random.RandomState(3)
    heads, kv_heads, dim, page_size = 4, 2, 8, 4
    # Rows: 3 decodes (one of them a padding row of length 0), then two prefill rows.
    q_lens, kv_lens = [1, 1, 0, 5, 3], [6, 9, 0, 5, 11]
    tables = rng.permutation(20)[:15].reshape(5, 3)
    k_pages = jnp.asarray(rng.randn(20, page_size, kv_heads, dim).astype(np.float32))
    v_pages = jnp.asarray(rng.randn(20, page_size, kv_heads, dim).astype(np.float32))
    q = jnp.asarray(rng.randn(sum(q_lens), heads, dim).astype(np.float32))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    args = (q, k_pages, v_pages, cu, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(tables, jnp.int32))
    # Jitted: one compiled program per layout instead of one compile per op (several times
    # faster on CPU; the runner runs the op under jit too).
    padded = jax.jit(functools.partial(rpa.ragged_paged_attention, max_q_len=8, sm_scale=0.3))(*args)
    split = jax.jit(functools.partial(rpa.ragged_paged_attention, max_q_len=8, sm_scale=0.3,
                                      num_decode_rows=3))(*args)
    np.testing.assert_allclose(np.asarray(split), np.asarray(padded), atol=1e-6)
    with pytest.raises(ValueError, match="num_decode_rows"):
        rpa.ragged_paged_attention(*args, max_q_len=8, sm_scale=0.3, num_decode_rows=6)
