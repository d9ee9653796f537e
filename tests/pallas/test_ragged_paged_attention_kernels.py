"""Ragged paged attention: every Pallas kernel in interpret mode against the XLA reference.

The default grid covers each axis (dtype, page size, heads / kv heads, head dim, window,
soft cap) at least once per kernel, each case over a batch with the edge lengths 0, 1,
one page, one past a page and a long context (several compute blocks and key splits),
prefill chunks after cached tokens and shuffled page tables. The full product is
`-m slow`.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.ragged_paged_attention import kernel_gpu, reference

KERNEL_IMPLS = ("pallas_interpret", "pallas_tpu_interpret")
# max |out - ref|. The kernels sum the same products in another order (online softmax
# over blocks); bf16 inputs are multiplied as bf16 (P is rounded to bf16 before P.V, as
# on the hardware), the reference multiplies in float32.
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def _batch(page_size, num_heads, num_kv_heads, head_dim, dtype, seed=0, long_len=70):
    """A ragged batch: (q_len, kv_len) per sequence, edge lengths included."""
    rng = np.random.RandomState(seed)
    seqs = [(1, 1), (1, page_size), (2, page_size + 1), (0, 0), (5, 5), (3, 2 * page_size + 3), (1, long_len),
            (4, long_len - 3)]
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs)
    num_pages = pages_per_seq * len(seqs) + 3
    tables = rng.permutation(num_pages)[:pages_per_seq * len(seqs)].reshape(len(seqs), pages_per_seq)
    k_pages = rng.randn(num_pages, page_size, num_kv_heads, head_dim)
    v_pages = rng.randn(num_pages, page_size, num_kv_heads, head_dim)
    num_tokens = sum(n for n, _ in seqs)
    q = rng.randn(num_tokens + 3, num_heads, head_dim)  # 3 bucket-padding tokens
    cu = np.concatenate([[0], np.cumsum([n for n, _ in seqs])])
    arrays = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)]
    meta = [jnp.asarray(x, jnp.int32) for x in (cu, [kv for _, kv in seqs], tables)]
    return arrays + meta


def _jit(fn, **static):
    """fn with `static` bound, jitted: one compiled program per call instead of one compile
    per op (several times faster on CPU; the runner runs the op under jit too)."""
    return jax.jit(functools.partial(fn, **static))


def _max_err(out, ref):
    return float(np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32)).max())


# (dtype, page_size, num_heads, num_kv_heads, head_dim, window, soft_cap)
CASES = [
    (jnp.float32, 4, 4, 2, 16, None, None),
    (jnp.bfloat16, 16, 8, 1, 32, None, None),
    (jnp.float32, 16, 4, 4, 32, 20, None),
    (jnp.float32, 8, 6, 2, 16, None, 30.0),
]
SLOW_CASES = [c for c in itertools.product((jnp.float32, jnp.bfloat16), (4, 16), ((4, 2), (8, 1), (4, 4)), (16, 64),
                                           (None, 20), (None, 30.0))]


def _check_op(impl, dtype, page_size, num_heads, num_kv_heads, head_dim, window, soft_cap):
    q, k_pages, v_pages, cu, kv_lens, tables = _batch(page_size, num_heads, num_kv_heads, head_dim, dtype)
    kwargs = dict(max_q_len=8, sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=soft_cap)
    ref = _jit(rpa.ragged_paged_attention, impl="xla", **kwargs)(q, k_pages, v_pages, cu, kv_lens, tables)
    out = _jit(rpa.ragged_paged_attention, impl=impl, **kwargs)(q, k_pages, v_pages, cu, kv_lens, tables)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert _max_err(out, ref) <= TOLERANCE[jnp.dtype(dtype)]
    np.testing.assert_array_equal(np.asarray(out[-3:], np.float32), 0.0)  # padding tokens


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(getattr(x, "__name__", x)) for x in c))
def test_kernel_matches_reference(impl, case):
    _check_op(impl, *case)


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", SLOW_CASES)
def test_kernel_matches_reference_sweep(impl, case):
    _check_op(impl, *case)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_decode_rows_lse_and_kv_starts(impl):
    # Mixed layout (decode rows apart), log-sum-exps, and rows that start past cached
    # pages (kv_starts, as the shared-prefix path uses them).
    page_size = 4
    q, k_pages, v_pages, cu, kv_lens, tables = _batch(page_size, 4, 2, 16, jnp.float32, seed=1)
    q_lens = np.diff(np.asarray(cu))
    order = np.argsort(q_lens != 1, kind="stable")  # decodes first
    q_new = np.concatenate([np.asarray(q)[cu[i]:cu[i + 1]] for i in order] + [np.asarray(q)[-3:]])
    cu_new = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens[order])]), jnp.int32)
    kv_new, tables_new = kv_lens[order], tables[order]
    # Skip whole pages before each sequence's first query.
    first_query = np.asarray(kv_new) - q_lens[order]
    skip = np.minimum(first_query // page_size, 2)
    starts = jnp.asarray(skip * page_size, jnp.int32)
    shifted = np.stack([np.roll(np.asarray(t), -s) for t, s in zip(np.asarray(tables_new), skip)])
    num_decodes = int((q_lens == 1).sum())
    kwargs = dict(max_q_len=8, sm_scale=0.25, num_decode_rows=num_decodes, return_lse=True)
    args = (jnp.asarray(q_new), k_pages, v_pages, cu_new, kv_new, jnp.asarray(shifted, jnp.int32))
    ref_out, ref_lse = _jit(rpa.ragged_paged_attention, impl="xla", **kwargs)(*args, kv_starts=starts)
    out, lse = _jit(rpa.ragged_paged_attention, impl=impl, **kwargs)(*args, kv_starts=starts)
    assert _max_err(out, ref_out) <= 2e-5
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-5)
    assert not finite[-3:].any()  # padding tokens saw no key


def test_gpu_kernel_block_and_split_edges():
    # Tiny blocks and splits: many compute blocks, several splits, a split that a
    # sequence does not reach, and a sliding window that starts mid-split.
    page_size = 4
    q, k_pages, v_pages, cu, kv_lens, tables = _batch(page_size, 4, 2, 16, jnp.float32, seed=2, long_len=37)
    num_tokens = q.shape[0]
    q_index, q_pos = reference.ragged_rows(cu, kv_lens, 8, num_tokens)
    rows = reference.pack_rows(q, q_index, 2)
    pos = reference.row_positions(q_pos, 2)
    starts = jnp.zeros_like(kv_lens)
    for window in (None, 7):
        want = reference.row_attention(rows, k_pages, v_pages, pos, starts, kv_lens, tables, sm_scale=0.25,
                                       sliding_window=window)
        for block_keys, split_keys in ((4, 8), (8, 12), (16, 16)):
            got = kernel_gpu.row_attention(rows, k_pages, v_pages, pos, starts, kv_lens, tables, sm_scale=0.25,
                                           sliding_window=window, interpret=True, block_keys=block_keys,
                                           split_keys=split_keys)
            assert _max_err(got[0], want[0]) <= 2e-5
            np.testing.assert_array_equal(np.isfinite(np.asarray(got[1])), np.isfinite(np.asarray(want[1])))


def test_merge_partials_by_hand():
    # Two parts over disjoint keys of one query: scores {0} -> v=1 and {0, log 2} -> v=(2, 4).
    # Whole softmax over the 3 keys: weights 1/4, 1/4, 2/4 -> 0.25 * 1 + 0.25 * 2 + 0.5 * 4.
    out = jnp.array([[1.0], [(2.0 + 2 * 4.0) / 3]])  # [parts, H]
    lse = jnp.array([0.0, np.log(3.0)])
    merged, merged_lse = rpa.merge_partials(out, lse, axis=0)
    np.testing.assert_allclose(np.asarray(merged), [0.25 + 0.5 + 2.0], rtol=1e-6)
    np.testing.assert_allclose(float(merged_lse), np.log(4.0), rtol=1e-6)
    empty, empty_lse = rpa.merge_partials(jnp.zeros((2, 1)), jnp.array([-jnp.inf, -jnp.inf]), axis=0)
    assert float(empty[0]) == 0.0 and float(empty_lse) == -np.inf


def test_kernel_shape_errors_are_named():
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        rpa.row_attention_impl("pallas", 16, 64)
    with pytest.raises(ValueError, match="impl"):
        rpa.row_attention_impl("triton", 16, 64)
    q = jnp.zeros((2, 4, 8))
    pages = jnp.zeros((3, 2, 2, 8))
    meta = (jnp.array([0, 2]), jnp.array([2]), jnp.array([[0]]))
    with pytest.raises(ValueError, match="kv_starts"):
        rpa.ragged_paged_attention(q, pages, pages, *meta, max_q_len=2, sm_scale=1.0, kv_starts=jnp.zeros((2,)))
    with pytest.raises(ValueError, match="sliding_window"):
        rpa.ragged_paged_attention(q, pages, pages, *meta, max_q_len=2, sm_scale=1.0, sliding_window=0)
    with pytest.raises(ValueError, match="max_q_len"):
        rpa.ragged_paged_attention(q, pages, pages, *meta, max_q_len=0, sm_scale=1.0)


@pytest.mark.parametrize("window,soft_cap,dtype", [(None, None, jnp.bfloat16), (64, 30.0, jnp.float32)])
def test_gpu_kernel_lowers_to_triton(window, soft_cap, dtype):
    # No GPU here: lowering for CUDA still runs the whole Pallas -> Triton IR lowering,
    # which rejects what Triton cannot express (shapes, ops), without compiling it.
    import functools

    import jax
    shapes = [((3, 2, 8, 64), dtype), ((32, 16, 2, 64), dtype), ((32, 16, 2, 64), dtype), ((3, 8), jnp.int32),
              ((3,), jnp.int32), ((3,), jnp.int32), ((3, 40), jnp.int32)]
    args = [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]
    fn = jax.jit(functools.partial(kernel_gpu.row_attention, sm_scale=0.125, sliding_window=window,
                                   soft_cap=soft_cap))
    exported = jax.export.export(fn, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    assert "paged_row_attention_gpu" in exported.mlir_module()
