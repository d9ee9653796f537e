"""Quantized KV pages (int8, float8 e4m3): write, reference, both kernels, shared prefix.

- quantize_tokens: the per-(token, kv head) error bound of each format; zeros and NaN.
- write_kv into QuantizedPages stores exactly quantize_tokens' values and scales.
- Both Pallas kernels (interpret mode) read the quantized pages and match the XLA
  reference on the same quantized pages (they fold the scales in differently: scores
  and probabilities instead of a dequantized copy).
- The reference on quantized pages is close to the reference on the float pages.
- The shared-prefix (Hydragen) op over quantized pages equals plain ragged attention
  over the same pages.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import prefix_attention
from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.ragged_paged_attention.quantized import (QuantizedPages, dequantize, quantize_tokens,
                                                              storage_dtype, token_head_bytes)

FORMATS = ("int8", "fp8")


def _quantize_pages(pages, fmt):
    values, scales = quantize_tokens(pages, storage_dtype(fmt))
    return QuantizedPages(values, scales)


def _batch(page_size=4, num_heads=4, num_kv_heads=2, head_dim=16, seed=0):
    rng = np.random.RandomState(seed)
    seqs = [(1, 1), (1, page_size), (2, page_size + 1), (0, 0), (5, 5), (3, 2 * page_size + 3), (1, 40), (4, 37)]
    pages_per_seq = max(-(-kv // page_size) for _, kv in seqs)
    num_pages = pages_per_seq * len(seqs) + 3
    tables = rng.permutation(num_pages)[:pages_per_seq * len(seqs)].reshape(len(seqs), pages_per_seq)
    k_pages = jnp.asarray(rng.randn(num_pages, page_size, num_kv_heads, head_dim), jnp.float32)
    v_pages = jnp.asarray(rng.randn(num_pages, page_size, num_kv_heads, head_dim), jnp.float32)
    num_tokens = sum(n for n, _ in seqs)
    q = jnp.asarray(rng.randn(num_tokens + 3, num_heads, head_dim), jnp.float32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum([n for n, _ in seqs])]), jnp.int32)
    return q, k_pages, v_pages, cu, jnp.asarray([kv for _, kv in seqs], jnp.int32), jnp.asarray(tables, jnp.int32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_tokens_error_bound(fmt):
    x = jnp.asarray(np.random.RandomState(1).randn(64, 3, 32) * np.logspace(-3, 3, 64)[:, None, None], jnp.float32)
    values, scales = quantize_tokens(x, storage_dtype(fmt))
    assert values.dtype == storage_dtype(fmt) and scales.shape == (64, 3) and scales.dtype == jnp.float32
    err = np.abs(np.asarray(dequantize(values, scales)) - np.asarray(x))
    amax = np.abs(np.asarray(x)).max(axis=-1, keepdims=True)
    # int8: half a step of amax / 127; e4m3: 3 mantissa bits -> 2^-4 relative, and the
    # subnormal step 2^-9 (in units of amax / 448) near zero.
    bound = amax / 254 if fmt == "int8" else np.maximum(np.abs(np.asarray(x)) / 16, amax / 448 * 2.0 ** -9)
    assert (err <= bound * 1.0001 + 1e-30).all()
    # A zero head: scale 1, values 0. A NaN head stays NaN after dequantization.
    zv, zs = quantize_tokens(jnp.zeros((2, 1, 8)), storage_dtype(fmt))
    assert float(jnp.abs(dequantize(zv, zs)).max()) == 0.0 and float(zs.min()) == 1.0
    nv, ns = quantize_tokens(jnp.full((1, 1, 8), jnp.nan), storage_dtype(fmt))
    assert bool(jnp.isnan(dequantize(nv, ns)).all())


def test_bytes_per_token_head():
    assert token_head_bytes("auto", 128, 2) == 256
    assert token_head_bytes("int8", 128, 2) == token_head_bytes("fp8", 128, 2) == 132


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_kv_stores_quantized_tokens(fmt):
    rng = np.random.RandomState(2)
    empty = QuantizedPages.zeros((6, 4, 2, 8), fmt)
    k = jnp.asarray(rng.randn(5, 2, 8), jnp.float32)
    slots = jnp.asarray([0, 5, 13, 23, 24], jnp.int32)  # 24 = P * L: a padding token, dropped
    new_k, new_v = rpa.write_kv(empty, empty, k, 2 * k, slots)
    values, scales = quantize_tokens(k[:4], storage_dtype(fmt))
    pages, offsets = np.asarray(slots[:4]) // 4, np.asarray(slots[:4]) % 4
    np.testing.assert_array_equal(np.asarray(new_k.values[pages, offsets], np.float32), np.asarray(values, np.float32))
    np.testing.assert_array_equal(np.asarray(new_k.scales[pages, offsets]), np.asarray(scales))
    np.testing.assert_allclose(np.asarray(new_v.scales[pages, offsets]), 2 * np.asarray(scales), rtol=1e-6)
    untouched = np.ones(24, bool)
    untouched[np.asarray(slots[:4])] = False
    assert (np.asarray(new_k.values, np.float32).reshape(24, 2, 8)[untouched] == 0).all()


@functools.lru_cache(maxsize=None)
def _op(impl, window):
    return jax.jit(functools.partial(rpa.ragged_paged_attention, impl=impl, max_q_len=8, sm_scale=0.25,
                                     sliding_window=window))


# Each kernel reads each format once, with and without a window; the rest is -m slow
# (the TPU kernel interpreted takes ~10 s a case here).
KERNEL_CASES = [("int8", "pallas_interpret", None), ("fp8", "pallas_interpret", 6),
                ("int8", "pallas_tpu_interpret", 6), ("fp8", "pallas_tpu_interpret", None)]
KERNEL_CASES += [pytest.param(*c, marks=pytest.mark.slow) for c in
                 [("int8", "pallas_interpret", 6), ("fp8", "pallas_interpret", None),
                  ("int8", "pallas_tpu_interpret", None), ("fp8", "pallas_tpu_interpret", 6)]]


@pytest.mark.parametrize("fmt,impl,window", KERNEL_CASES)
def test_kernels_read_quantized_pages(fmt, impl, window):
    q, k_pages, v_pages, cu, kv_lens, tables = _batch()
    kq, vq = _quantize_pages(k_pages, fmt), _quantize_pages(v_pages, fmt)
    ref = _op("xla", window)(q, kq, vq, cu, kv_lens, tables)
    out = _op(impl, window)(q, kq, vq, cu, kv_lens, tables)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out[-3:]), 0.0)  # padding tokens
    # Against the float cache: the quantization error, bounded by the format's precision.
    full = _op("xla", window)(q, k_pages, v_pages, cu, kv_lens, tables)
    assert float(jnp.abs(ref - full).max()) < (0.03 if fmt == "int8" else 0.25)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=pytest.mark.slow)])
def test_nan_in_unwritten_scales_never_reaches_the_output(fmt):
    """Scales of slots past a row's end (stale or NaN) are masked like their values."""
    q, k_pages, v_pages, cu, kv_lens, tables = _batch(seed=3)
    kq, vq = _quantize_pages(k_pages, fmt), _quantize_pages(v_pages, fmt)
    # Poison every slot no row can see: positions >= kv_len of the row owning the page.
    page_size = k_pages.shape[1]
    poison = np.zeros(kq.scales.shape, bool)
    owner = {}
    for row, kv in enumerate(np.asarray(kv_lens)):
        for i, page in enumerate(np.asarray(tables)[row]):
            owner[int(page)] = (i, int(kv))
    for page in range(kq.scales.shape[0]):
        i, kv = owner.get(page, (0, 0))
        for off in range(page_size):
            poison[page, off] = i * page_size + off >= kv
    bad_k = QuantizedPages(kq.values, jnp.where(poison, jnp.nan, kq.scales))
    bad_v = QuantizedPages(vq.values, jnp.where(poison, jnp.nan, vq.scales))
    clean = _op("xla", None)(q, kq, vq, cu, kv_lens, tables)
    for impl in ("xla", "pallas_interpret", "pallas_tpu_interpret"):
        out = _op(impl, None)(q, bad_k, bad_v, cu, kv_lens, tables)
        assert bool(jnp.isfinite(out).all()), impl
        np.testing.assert_allclose(np.asarray(out), np.asarray(clean), atol=2e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_shared_prefix_attention_over_quantized_pages(fmt, impl):
    """The depth-2 prefix tree of test_prefix_attention.py over quantized pages: Hydragen
    (prefix rows + suffix + merge) equals plain ragged attention over the same pages."""
    from test_prefix_attention import _tree_batch
    plain, shared = _tree_batch(jnp.float32)
    for name in ("k_pages", "v_pages"):
        plain[name] = shared[name] = _quantize_pages(plain[name], fmt)
    kwargs = dict(max_q_len=8, sm_scale=0.25)
    want = jax.jit(functools.partial(rpa.ragged_paged_attention, impl="xla", **kwargs))(**plain)
    got = jax.jit(functools.partial(prefix_attention.shared_prefix_attention, impl=impl, **kwargs))(**shared)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got[-2:]), 0.0)
