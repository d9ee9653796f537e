"""Public op: ragged paged attention (prefill chunks and decodes in one call).

The one dispatch point for this op. Shapes and dtypes are validated here; `impl`
picks the implementation. Only the XLA reference exists so far (it is the CPU path and
the oracle); the Pallas GPU/TPU kernels are the subject of their own issue and will be
added behind this same function.
"""
from __future__ import annotations

from typing import Optional

import jax

from jaxinfer.pallas.ragged_paged_attention import reference

IMPLS = ("xla",)

write_kv = reference.write_kv


def _check(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables):
    if q.ndim != 3:
        raise ValueError(f"q: expected [tokens, heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages/v_pages: expected equal [pages, page_size, kv_heads, head_dim], "
                         f"got {k_pages.shape} and {v_pages.shape}")
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(f"head_dim: q has {q.shape[2]}, k_pages has {k_pages.shape[3]}")
    if q.shape[1] % k_pages.shape[2]:
        raise ValueError(f"heads: {q.shape[1]} query heads not a multiple of {k_pages.shape[2]} kv heads")
    if page_tables.ndim != 2 or kv_lens.shape != (page_tables.shape[0],) or \
            cu_q_lens.shape != (page_tables.shape[0] + 1,):
        raise ValueError(f"metadata: expected cu_q_lens [S+1], kv_lens [S], page_tables [S, pages]; got "
                         f"{cu_q_lens.shape}, {kv_lens.shape}, {page_tables.shape}")
    for name, arr in (("cu_q_lens", cu_q_lens), ("kv_lens", kv_lens), ("page_tables", page_tables)):
        if not jax.numpy.issubdtype(arr.dtype, jax.numpy.integer):
            raise ValueError(f"{name}: expected an integer dtype, got {arr.dtype}")


def ragged_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, *,
                           max_q_len: int, sm_scale: float,
                           sliding_window: Optional[int] = None,
                           soft_cap: Optional[float] = None,
                           num_decode_rows: int = 0,
                           impl: Optional[str] = None):
    """See `reference.ragged_paged_attention` for the arguments; `impl` in IMPLS."""
    _check(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables)
    if not 0 <= num_decode_rows <= page_tables.shape[0]:
        raise ValueError(f"num_decode_rows: {num_decode_rows} outside [0, {page_tables.shape[0]}]")
    impl = impl or "xla"
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not available; choose one of {IMPLS}")
    return reference.ragged_paged_attention(
        q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, max_q_len=max_q_len,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, num_decode_rows=num_decode_rows)
