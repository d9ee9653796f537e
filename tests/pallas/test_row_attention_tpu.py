"""The Pallas TPU (Mosaic) row-attention kernel in TPU interpret mode against the XLA reference.

TPU interpret mode is slow on CPU, so the cases are few and each packs many edges:
a ragged batch (decode, chunks, kv lengths 0 / 1 / one page / one past a page, a row of
several blocks, padding rows, shuffled pages) per dtype, and hand-made rows for
kv_starts, the sliding window, the soft cap, M tiles and partly fetched blocks. The
interpreter fills scratch memory with NaN, so a read of a page that was never fetched
shows up as NaN. The compiled kernel cannot run here; its Mosaic lowering is checked
with `jax.export` for the TPU platform.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.ragged_paged_attention import kernel_tpu, reference

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 4, 2, 128, 8
GROUP = HEADS // KV_HEADS
# Max abs error of out and lse. float32: only the summation order differs. bfloat16: q, K
# and V are the same bf16 values in both (products exact in f32), but the kernel rounds
# the softmax weights to bf16 for the P @ V dot (relative step 2^-8), the reference does not.
TOLERANCE = {jnp.dtype(jnp.float32): dict(out=1e-5, lse=1e-5),
             jnp.dtype(jnp.bfloat16): dict(out=1e-2, lse=1e-4)}


def _cache(num_pages, dtype, seed):
    rng = np.random.RandomState(seed)
    shape = (num_pages, PAGE_SIZE, KV_HEADS, HEAD_DIM)
    return jnp.asarray(rng.randn(*shape), dtype), jnp.asarray(rng.randn(*shape), dtype)


def _shuffled_tables(num_rows, pages_per_row, num_pages, seed):
    perm = np.random.RandomState(seed).permutation(num_pages)[:num_rows * pages_per_row]
    return jnp.asarray(perm.reshape(num_rows, pages_per_row), jnp.int32)


def _jit(fn, **static):
    """fn with `static` bound, jitted: one compiled program per call instead of one compile
    per op (several times faster on CPU; the runner runs the ops under jit too)."""
    return jax.jit(functools.partial(fn, **static))


def _assert_matches(args, dtype, **kwargs):
    block_kwargs = {k: kwargs.pop(k) for k in ("block_keys", "max_block_m") if k in kwargs}
    want_out, want_lse = _jit(reference.row_attention, **kwargs)(*args)
    out, lse = _jit(kernel_tpu.row_attention_interpret, **kwargs, **block_kwargs)(*args)
    assert out.shape == want_out.shape and out.dtype == jnp.float32
    assert lse.shape == want_lse.shape and lse.dtype == jnp.float32
    tol = TOLERANCE[jnp.dtype(dtype)]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))  # rows that see nothing
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=0, atol=tol["lse"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=0, atol=tol["out"])
    return out, lse


# (q_len, kv_len) of a ragged batch: decode over 5 pages (5 one-page blocks: the double
# buffer alternates 4 times), an empty padding sequence, kv length 1, a chunk ending on
# one page, a chunk one past a page, a prefill chunk after cached tokens.
RAGGED_SEQS = [(1, 37), (0, 0), (1, 1), (2, PAGE_SIZE), (3, PAGE_SIZE + 1), (4, 20)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_batch_matches_reference(dtype):
    max_q_len = 4
    q_lens = np.array([n for n, _ in RAGGED_SEQS], np.int32)
    kv_lens = jnp.asarray([kv for _, kv in RAGGED_SEQS], jnp.int32)
    pages_per_row = 5
    num_pages = pages_per_row * len(RAGGED_SEQS) + 3
    k_pages, v_pages = _cache(num_pages, dtype, seed=1)
    tables = _shuffled_tables(len(RAGGED_SEQS), pages_per_row, num_pages, seed=2)
    num_tokens = int(q_lens.sum())
    q = jnp.asarray(np.random.RandomState(3).randn(num_tokens, HEADS, HEAD_DIM), dtype)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    q_index, q_pos = reference.ragged_rows(cu_q_lens, kv_lens, max_q_len, num_tokens)
    q_rows = reference.pack_rows(q, q_index, KV_HEADS)  # [R, K, Q * G, H]: padded queries are rows of zeros
    args = (q_rows, k_pages, v_pages, reference.row_positions(q_pos, GROUP),
            jnp.zeros((len(RAGGED_SEQS),), jnp.int32), kv_lens, tables)
    _, lse = _assert_matches(args, dtype, sm_scale=HEAD_DIM ** -0.5, block_keys=PAGE_SIZE)
    # The padding sequence and the padding queries of short sequences see nothing.
    assert np.isneginf(np.asarray(lse[1])).all()
    assert np.isneginf(np.asarray(lse[0, :, GROUP:])).all()
    assert np.isfinite(np.asarray(lse[5])).all()


def _hand_rows(dtype, seed=0):
    """Four rows of M = 20 query rows over 4-page tables starting at kv_starts.

    Row 0: kv_start 16 (the suffix after a 2-page shared prefix), queries at 30..39 with
      padding rows between them. Row 1: kv_start 0, keys [0, 27), a prefill chunk at
      positions 7..26. Row 2: queries but kv_end == kv_start (no key to see). Row 3: all
      rows padding.
    """
    rng = np.random.RandomState(seed)
    num_rows, rows_per_head, pages_per_row = 4, 20, 4
    num_pages = num_rows * pages_per_row + 2
    k_pages, v_pages = _cache(num_pages, dtype, seed + 1)
    tables = _shuffled_tables(num_rows, pages_per_row, num_pages, seed + 2)
    q_rows = jnp.asarray(rng.randn(num_rows, KV_HEADS, rows_per_head, HEAD_DIM), dtype)
    pad = reference.PAD_POSITION
    row0 = [30 + j // 2 if j % 4 != 3 else pad for j in range(rows_per_head)]
    row1 = list(range(7, 7 + rows_per_head))
    row2 = [12] * rows_per_head  # at or after kv_start: only kv_end hides the keys
    row3 = [pad] * rows_per_head
    q_pos = jnp.asarray([row0, row1, row2, row3], jnp.int32)
    kv_starts = jnp.asarray([16, 0, 8, 0], jnp.int32)
    kv_ends = jnp.asarray([40, 27, 8, 30], jnp.int32)
    return q_rows, k_pages, v_pages, q_pos, kv_starts, kv_ends, tables


@pytest.mark.parametrize("dtype, sliding_window, soft_cap", [
    (jnp.float32, None, None),
    (jnp.float32, 5, 2.0),  # the window starts mid-page; the cap bends large scores
    (jnp.bfloat16, 9, None),
])
def test_hand_rows_match_reference(dtype, sliding_window, soft_cap):
    # Two pages per block over 3- and 4-page rows: the last block is partly fetched (its
    # unfetched page is NaN in the interpreter's scratch). max_block_m=16: M = 20 is two
    # tiles, the second one mostly padding.
    args = _hand_rows(dtype)
    _, lse = _assert_matches(args, dtype, sm_scale=0.3, sliding_window=sliding_window, soft_cap=soft_cap,
                             block_keys=2 * PAGE_SIZE, max_block_m=16)
    assert np.isneginf(np.asarray(lse[2:])).all()
    assert np.isneginf(np.asarray(lse[0, :, 3::4])).all()


def test_public_op_runs_the_tpu_kernel_in_interpret_mode():
    # The dispatch's "pallas_tpu_interpret" impl, with return_lse, equals "xla".
    seqs = [(1, 12), (2, 3)]
    q_lens = np.array([n for n, _ in seqs], np.int32)
    kv_lens = jnp.asarray([kv for _, kv in seqs], jnp.int32)
    k_pages, v_pages = _cache(6, jnp.float32, seed=4)
    tables = _shuffled_tables(2, 2, 6, seed=5)
    q = jnp.asarray(np.random.RandomState(6).randn(int(q_lens.sum()) + 1, HEADS, HEAD_DIM), jnp.float32)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    args = (q, k_pages, v_pages, cu_q_lens, kv_lens, tables)
    run = functools.partial(_jit, rpa.ragged_paged_attention, max_q_len=2, sm_scale=HEAD_DIM ** -0.5,
                            return_lse=True)
    out, lse = run(impl="pallas_tpu_interpret")(*args)
    want_out, want_lse = run(impl="xla")(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=1e-5)


# ---------------------------------------------------------------------------- compiled kernel

@pytest.mark.parametrize("page_size, head_dim, field", [(16, 64, "head_dim"), (16, 200, "head_dim"),
                                                        (12, 128, "page_size"), (4, 256, "page_size")])
def test_check_shapes_rejects_untileable_shapes(page_size, head_dim, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        kernel_tpu.check_shapes(page_size, head_dim)


@pytest.mark.parametrize("page_size, head_dim", [(8, 128), (16, 256), (128, 128)])
def test_check_shapes_accepts_tileable_shapes(page_size, head_dim):
    kernel_tpu.check_shapes(page_size, head_dim)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mosaic_lowering_exports_for_tpu(dtype):
    # Lowers the non-interpret kernel to a Mosaic custom call (jax's lowering only: the
    # Mosaic compiler itself runs on a TPU host).
    num_rows, rows_per_head, num_pages, pages_per_row, page_size = 3, 12, 10, 4, 16
    spec = jax.ShapeDtypeStruct
    args = (spec((num_rows, KV_HEADS, rows_per_head, HEAD_DIM), dtype),
            spec((num_pages, page_size, KV_HEADS, HEAD_DIM), dtype),
            spec((num_pages, page_size, KV_HEADS, HEAD_DIM), dtype),
            spec((num_rows, rows_per_head), jnp.int32), spec((num_rows,), jnp.int32),
            spec((num_rows,), jnp.int32), spec((num_rows, pages_per_row), jnp.int32))
    fn = functools.partial(kernel_tpu.row_attention, sm_scale=0.1, sliding_window=20, soft_cap=30.0,
                           block_keys=2 * page_size)
    exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
    assert "tpu_custom_call" in exported.mlir_module()
    out_avals = exported.out_avals
    assert out_avals[0].shape == (num_rows, KV_HEADS, rows_per_head, HEAD_DIM)
    assert out_avals[1].shape == (num_rows, KV_HEADS, rows_per_head)
