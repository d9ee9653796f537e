"""Public op: shared-prefix attention (Hydragen) over a tree of shared prefix pages.

Path: scheduler (engine/shared_prefix.py groups sequences by shared prefix pages) ->
runtime/input_batch.py (lays out prefix rows) -> model -> **shared_prefix_attention**
-> paged row kernel (prefix stage and suffix stage) -> merge -> model.

The algorithm and the row layout are in reference.py. Both stages run on the paged
row-attention core of `jaxinfer.pallas.ragged_paged_attention` (`row_attention_impl`):
a prefix row is the same computation as a prefill chunk's row, queries of many
sequences against one page list, so the same XLA reference and the same Pallas
GPU/TPU kernels serve both, and `impl` means the same thing here ("xla", "pallas",
"pallas_interpret", "pallas_tpu_interpret"). On accelerators the kernel reads each
prefix page once per row of up to Qp queries (Hydragen's inter-sequence batching: a
[Qp * G, H] x [H, keys] matmul instead of one matrix-vector product per sequence); on
CPU the XLA reference gathers the prefix pages once per prefix row instead of once
per sequence.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.prefix_attention import reference
from jaxinfer.pallas.prefix_attention.reference import PrefixRows, scatter_merge

__all__ = ["PrefixRows", "prefix_attention", "scatter_merge", "shared_prefix_attention"]


def _check_rows(prefix: PrefixRows) -> None:
    if not isinstance(prefix, PrefixRows):
        raise ValueError(f"prefix: expected PrefixRows, got {type(prefix).__name__}")
    num_rows = prefix.q_index.shape[0] if prefix.q_index.ndim == 2 else -1
    if prefix.q_index.ndim != 2 or prefix.page_tables.ndim != 2 or prefix.page_tables.shape[0] != num_rows \
            or prefix.kv_starts.shape != (num_rows,) or prefix.kv_ends.shape != (num_rows,):
        raise ValueError(f"prefix: expected q_index [Rp, Qp], kv_starts [Rp], kv_ends [Rp], page_tables [Rp, Pp]; "
                         f"got {prefix.q_index.shape}, {prefix.kv_starts.shape}, {prefix.kv_ends.shape}, "
                         f"{prefix.page_tables.shape}")
    for name in PrefixRows._fields:
        if not jnp.issubdtype(getattr(prefix, name).dtype, jnp.integer):
            raise ValueError(f"prefix.{name}: expected an integer dtype, got {getattr(prefix, name).dtype}")


def prefix_attention(q, k_pages, v_pages, positions, prefix: PrefixRows, *, sm_scale: float,
                     sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                     impl: Optional[str] = None):
    """The prefix stage alone: see reference.prefix_attention; `impl` as in ragged_paged_attention."""
    _check_rows(prefix)
    if positions.shape != q.shape[:1]:
        raise ValueError(f"positions: expected shape {q.shape[:1]}, got {positions.shape}")
    core = rpa.row_attention_impl(impl, k_pages.shape[1], k_pages.shape[3])
    return reference.prefix_attention(q, k_pages, v_pages, positions, prefix, sm_scale=sm_scale,
                                      sliding_window=sliding_window, soft_cap=soft_cap, row_attention_fn=core)


def shared_prefix_attention(q, k_pages, v_pages, positions, cu_q_lens, kv_lens, page_tables, kv_starts,
                            prefix: PrefixRows, *, max_q_len: int, sm_scale: float,
                            sliding_window: Optional[int] = None, soft_cap: Optional[float] = None,
                            num_decode_rows: int = 0, impl: Optional[str] = None):
    """Prefix stage + suffix stage + exact merge: see reference.shared_prefix_attention.

    Raises:
      ValueError: naming the argument, for inconsistent shapes or dtypes, or an impl
        that is unknown or cannot take these shapes.
    """
    rpa.check_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_tables)
    _check_rows(prefix)
    if positions.shape != q.shape[:1]:
        raise ValueError(f"positions: expected shape {q.shape[:1]}, got {positions.shape}")
    if kv_starts.shape != kv_lens.shape:
        raise ValueError(f"kv_starts: expected shape {kv_lens.shape}, got {kv_starts.shape}")
    if not 0 <= num_decode_rows <= page_tables.shape[0]:
        raise ValueError(f"num_decode_rows: {num_decode_rows} outside [0, {page_tables.shape[0]}]")
    core = rpa.row_attention_impl(impl, k_pages.shape[1], k_pages.shape[3])
    return reference.shared_prefix_attention(
        q, k_pages, v_pages, positions, cu_q_lens, kv_lens, page_tables, kv_starts, prefix, max_q_len=max_q_len,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, num_decode_rows=num_decode_rows,
        row_attention_fn=core)
