"""The compiled Pallas kernels (impl=IMPL) on a real GPU or TPU, against the XLA reference.

Skipped on CPU (CI): there the kernels run in interpret mode in the other test files.
On a GPU or TPU (`scripts/device_check.sh` runs this file) every kernel runs compiled,
at shapes of real models (head dim 128, pages of 16, bfloat16), and must match the
reference computed on the same device:
- ragged paged attention: decodes and prefill chunks in one batch, a sliding window,
  a soft cap, float and int8 / fp8 quantized pages;
- shared-prefix (Hydragen) attention against plain attention over the same pages;
- int4 weight-only matmul at M = 1, 16, 64, 256 (symmetric and with zero points);
- grouped matmul (MoE) with empty groups.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import grouped_matmul as gmm
from jaxinfer.pallas import int4_matmul as i4
from jaxinfer.pallas import prefix_attention as pa
from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.int4_matmul import reference as i4_ref
from jaxinfer.pallas.ragged_paged_attention.quantized import QuantizedPages, quantize_tokens, storage_dtype

# The impl under test; JAXINFER_DEVICE_TEST_IMPL=xla runs this file's plumbing on CPU
# (every comparison then is the reference against itself).
IMPL = os.environ.get("JAXINFER_DEVICE_TEST_IMPL", "pallas")
pytestmark = pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu") and IMPL == "pallas",
                                reason="compiled Pallas kernels need a GPU or TPU (CPU runs them interpreted elsewhere)")

PAGE, HEAD_DIM, HEADS, KV_HEADS = 16, 128, 16, 4
# bf16 inputs, float32 accumulation: kernels and reference sum in different orders and the
# kernels round P to bf16 before P.V.
TOL = {jnp.dtype(jnp.float32): 2e-3, jnp.dtype(jnp.bfloat16): 4e-2}


def _err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def _attention_batch(dtype, seed=0):
    rng = np.random.RandomState(seed)
    # (q_len, kv_len): decodes first (num_decode_rows), then prefill chunks.
    seqs = [(1, 1), (1, 17), (1, 600), (1, 2048), (0, 0), (64, 64), (37, 300), (128, 1100)]
    pages_per_seq = max(-(-kv // PAGE) for _, kv in seqs)
    num_pages = pages_per_seq * len(seqs) + 8
    tables = rng.permutation(num_pages)[:pages_per_seq * len(seqs)].reshape(len(seqs), pages_per_seq)
    shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k_pages = jnp.asarray(rng.randn(*shape), dtype)
    v_pages = jnp.asarray(rng.randn(*shape), dtype)
    num_tokens = sum(n for n, _ in seqs)
    q = jnp.asarray(rng.randn(num_tokens + 5, HEADS, HEAD_DIM), dtype)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum([n for n, _ in seqs])]), jnp.int32)
    kv_lens = jnp.asarray([kv for _, kv in seqs], jnp.int32)
    return q, k_pages, v_pages, cu, kv_lens, jnp.asarray(tables, jnp.int32)


@functools.lru_cache(maxsize=None)
def _rpa(impl, window, soft_cap):
    return jax.jit(functools.partial(rpa.ragged_paged_attention, impl=impl, max_q_len=128, num_decode_rows=4,
                                     sm_scale=HEAD_DIM ** -0.5, sliding_window=window, soft_cap=soft_cap))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("window,soft_cap", [(None, None), (256, None), (None, 30.0)])
def test_ragged_paged_attention(dtype, window, soft_cap):
    q, k, v, cu, kv_lens, tables = _attention_batch(dtype)
    ref = _rpa("xla", window, soft_cap)(q, k, v, cu, kv_lens, tables)
    out = _rpa(IMPL, window, soft_cap)(q, k, v, cu, kv_lens, tables)
    assert _err(out, ref) <= TOL[jnp.dtype(dtype)]


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_ragged_paged_attention_quantized_pages(fmt):
    q, k, v, cu, kv_lens, tables = _attention_batch(jnp.bfloat16, seed=1)
    kq = QuantizedPages(*quantize_tokens(k, storage_dtype(fmt)))
    vq = QuantizedPages(*quantize_tokens(v, storage_dtype(fmt)))
    ref = _rpa("xla", None, None)(q, kq, vq, cu, kv_lens, tables)
    out = _rpa(IMPL, None, None)(q, kq, vq, cu, kv_lens, tables)
    assert _err(out, ref) <= TOL[jnp.dtype(jnp.bfloat16)]


def test_shared_prefix_attention():
    """32 decodes sharing a 1024-token prefix (64 pages), each with its own 40-token suffix."""
    rng = np.random.RandomState(2)
    num_seqs, prefix_pages, suffix_len = 32, 64, 40
    suffix_pages = -(-suffix_len // PAGE)
    num_pages = prefix_pages + num_seqs * suffix_pages
    shape = (num_pages, PAGE, KV_HEADS, HEAD_DIM)
    k = jnp.asarray(rng.randn(*shape), jnp.bfloat16)
    v = jnp.asarray(rng.randn(*shape), jnp.bfloat16)
    prefix = np.arange(prefix_pages)
    own = prefix_pages + np.arange(num_seqs * suffix_pages).reshape(num_seqs, suffix_pages)
    full = jnp.asarray(np.concatenate([np.tile(prefix, (num_seqs, 1)), own], axis=1), jnp.int32)
    kv_len = prefix_pages * PAGE + suffix_len
    kv_lens = jnp.full((num_seqs,), kv_len, jnp.int32)
    cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
    q = jnp.asarray(rng.randn(num_seqs, HEADS, HEAD_DIM), jnp.bfloat16)
    block = 16  # prefix rows of 16 queries each
    q_index = np.arange(num_seqs, dtype=np.int32).reshape(-1, block)
    rows = pa.PrefixRows(jnp.asarray(q_index), jnp.zeros((len(q_index),), jnp.int32),
                         jnp.full((len(q_index),), prefix_pages * PAGE, jnp.int32),
                         jnp.asarray(np.tile(prefix, (len(q_index), 1)), jnp.int32))
    kwargs = dict(max_q_len=1, sm_scale=HEAD_DIM ** -0.5)
    want = jax.jit(functools.partial(rpa.ragged_paged_attention, impl="xla", **kwargs))(q, k, v, cu, kv_lens, full)
    got = jax.jit(functools.partial(pa.shared_prefix_attention, impl=IMPL, **kwargs))(
        q, k, v, jnp.full((num_seqs,), kv_len - 1, jnp.int32), cu, kv_lens, jnp.asarray(own, jnp.int32),
        jnp.full((num_seqs,), prefix_pages * PAGE, jnp.int32), rows)
    assert _err(got, want) <= TOL[jnp.dtype(jnp.bfloat16)]


@pytest.mark.parametrize("m", [1, 16, 64, 256])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matmul(m, symmetric):
    rng = np.random.RandomState(m)
    k_dim, n_dim, group = 4096, 4096, 128
    codes = rng.randint(0, 16, size=(k_dim, n_dim))
    packed = jnp.asarray(i4_ref.pack(codes.astype(np.uint8), group))
    scales = jnp.asarray(rng.rand(k_dim // group, n_dim) * 0.02 + 0.001, jnp.bfloat16)
    zeros = None if symmetric else jnp.asarray(rng.randint(0, 16, size=(k_dim // group, n_dim)), jnp.bfloat16)
    x = jnp.asarray(rng.randn(m, k_dim), jnp.bfloat16)
    op = functools.partial(i4.int4_matmul, group_size=group, out_dtype=jnp.float32)
    ref = jax.jit(functools.partial(op, impl="xla"))(x, packed, scales, zeros)
    out = jax.jit(functools.partial(op, impl=IMPL))(x, packed, scales, zeros)
    scale = float(jnp.max(jnp.abs(ref))) + 1e-6
    assert _err(out, ref) / scale <= 2e-2


def test_grouped_matmul():
    rng = np.random.RandomState(3)
    sizes = np.array([300, 0, 17, 1, 0, 500, 64, 142], np.int32)  # empty groups included
    lhs = jnp.asarray(rng.randn(int(sizes.sum()), 1024), jnp.bfloat16)
    rhs = jnp.asarray(rng.randn(len(sizes), 1024, 512) * 0.03, jnp.bfloat16)
    ref = jax.jit(functools.partial(gmm.grouped_matmul, impl="xla", out_dtype=jnp.float32))(
        lhs, rhs, jnp.asarray(sizes))
    out = jax.jit(functools.partial(gmm.grouped_matmul, impl=IMPL, out_dtype=jnp.float32))(
        lhs, rhs, jnp.asarray(sizes))
    assert _err(out, ref) / (float(jnp.max(jnp.abs(ref))) + 1e-6) <= 2e-2
