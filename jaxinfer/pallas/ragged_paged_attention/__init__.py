"""Public op: ragged paged attention (prefill chunks and decodes in one call).

Path: runner -> model -> **ragged_paged_attention** -> row kernel -> model.

The one dispatch point for this op and for its core, `row_attention` (which the
shared-prefix op reuses). Shapes and dtypes are validated here (ValueError naming the
argument); `impl` picks the implementation of the core:

- "xla": reference.py. Default on CPU; the oracle of the kernels.
- "pallas": the kernel of the backend: kernel_gpu.py (Triton lowering) on GPU,
  kernel_tpu.py (Mosaic) on TPU. Default there.
- "pallas_interpret": the GPU kernel in Pallas interpret mode (runs on CPU; tests).
- "pallas_tpu_interpret": the TPU kernel under TPU interpret mode (runs on CPU; tests).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas.ragged_paged_attention import reference
from jaxinfer.pallas.ragged_paged_attention.reference import (PAD_POSITION, merge_partials, pack_rows,
                                                              row_positions, unpack_rows)

__all__ = ["IMPLS", "PAD_POSITION", "check_inputs", "default_impl", "merge_partials", "pack_rows",
           "ragged_paged_attention", "row_attention_impl", "row_positions", "unpack_rows", "write_kv"]

IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_tpu_interpret")

write_kv = reference.write_kv


def default_impl() -> str:
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def _check_kernel_shapes(impl: str, page_size: int, head_dim: int) -> None:
    """Constraints of the compiled kernels (interpret mode runs any shape)."""
    if impl != "pallas":
        return
    backend = jax.default_backend()
    if backend == "gpu":
        for name, value in (("page_size", page_size), ("head_dim", head_dim)):
            if value & (value - 1):
                raise ValueError(f"{name}: the GPU kernel needs a power of two, got {value}; use impl='xla'")
        if head_dim < 16:
            raise ValueError(f"head_dim: the GPU kernel needs >= 16, got {head_dim}; use impl='xla'")
    elif backend == "tpu":
        from jaxinfer.pallas.ragged_paged_attention import kernel_tpu
        kernel_tpu.check_shapes(page_size, head_dim)
    else:
        raise ValueError(f"impl: 'pallas' needs a GPU or TPU backend, this one is {backend!r}; use 'xla' or an "
                         f"interpret impl")


def row_attention_impl(impl: Optional[str], page_size: int, head_dim: int):
    """The `reference.row_attention`-compatible core for `impl`.

    None picks the backend's default: its Pallas kernel on GPU/TPU when the kernel can
    take (page_size, head_dim), else the XLA reference.

    Raises:
      ValueError: unknown impl, no backend for 'pallas', or shapes the kernel cannot take.
    """
    if impl is None:
        impl = default_impl()
        try:
            _check_kernel_shapes(impl, page_size, head_dim)
        except ValueError:
            impl = "xla"  # the backend's kernel cannot take these shapes: the reference can
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not available; choose one of {IMPLS}")
    _check_kernel_shapes(impl, page_size, head_dim)
    if impl == "xla":
        return reference.row_attention
    if impl == "pallas_interpret" or (impl == "pallas" and jax.default_backend() == "gpu"):
        from jaxinfer.pallas.ragged_paged_attention import kernel_gpu
        return functools.partial(kernel_gpu.row_attention, interpret=impl == "pallas_interpret")
    from jaxinfer.pallas.ragged_paged_attention import kernel_tpu
    if impl == "pallas_tpu_interpret":
        return kernel_tpu.row_attention_interpret
    return kernel_tpu.row_attention


def check_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables):
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
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise ValueError(f"{name}: expected an integer dtype, got {arr.dtype}")


def ragged_paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, *,
                           max_q_len: int, sm_scale: float,
                           sliding_window: Optional[int] = None,
                           soft_cap: Optional[float] = None,
                           num_decode_rows: int = 0,
                           kv_starts=None,
                           return_lse: bool = False,
                           impl: Optional[str] = None):
    """See `reference.ragged_paged_attention` for the arguments; `impl` in IMPLS."""
    check_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables)
    if not 0 <= num_decode_rows <= page_tables.shape[0]:
        raise ValueError(f"num_decode_rows: {num_decode_rows} outside [0, {page_tables.shape[0]}]")
    if not isinstance(max_q_len, int) or max_q_len < 1:
        raise ValueError(f"max_q_len: expected an int >= 1, got {max_q_len!r}")
    if kv_starts is not None and kv_starts.shape != kv_lens.shape:
        raise ValueError(f"kv_starts: expected shape {kv_lens.shape}, got {kv_starts.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window: expected None or >= 1, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap: expected None or > 0, got {soft_cap}")
    core = row_attention_impl(impl, k_pages.shape[1], k_pages.shape[3])
    return reference.ragged_paged_attention(
        q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables, max_q_len=max_q_len,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, num_decode_rows=num_decode_rows,
        kv_starts=kv_starts, return_lse=return_lse, row_attention_fn=core)
