"""The model's one attention entry point: KV write + the right attention op for the batch.

Path: runner (AttentionMetadata from the host batch) -> model -> **attention** ->
ragged paged attention | shared-prefix attention | dense reference -> model.

`attention(q, k, v, positions, kv_cache, metadata, ...)` writes the step's K/V into the pages and
chooses, from the metadata alone, the variant of the batch:
- dense (`kv_cache` is None: scoring, training): each attention row of the batch is
  one "page" of its own keys; the XLA reference runs it (the kernels' page tiling is
  not made for it);
- shared prefix (`metadata.prefix` set): Hydragen, jaxinfer.pallas.prefix_attention;
- otherwise ragged paged attention, jaxinfer.pallas.ragged_paged_attention.
Models call this and never branch on the variant themselves.

Glossary as in jaxinfer/runtime/input_batch.py: an *attention row* is up to max_q_len
queries of one sequence sharing its page table; a *prefix row* holds queries of
several sequences against one shared node's pages. Dimension codes: T tokens, R
attention rows, N query heads, K kv heads, H head dim, P pages, L page size.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas import prefix_attention
from jaxinfer.pallas import ragged_paged_attention as rpa
from jaxinfer.pallas.prefix_attention import PrefixRows

__all__ = ["AttentionMetadata", "PrefixRows", "attention"]


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each token's K/V goes and which keys each attention row's queries see."""

    slot_mapping: jax.Array  # [T] int32 flat KV slot per token (P * L = dropped padding)
    cu_q_lens: jax.Array  # [R + 1] int32 cumulative queries per attention row
    kv_lens: jax.Array  # [R] int32 keys of the row's sequence visible to the row's last query
    page_tables: jax.Array  # [R, pages per row] int32
    max_q_len: int = dataclasses.field(metadata=dict(static=True))  # static: queries per row at most
    # static: the first num_decode_rows rows have at most one query (see the op)
    num_decode_rows: int = dataclasses.field(default=0, metadata=dict(static=True))
    # Shared-prefix (Hydragen) path, both None without it: [R] first own key position of
    # each row (page_tables start there), and the prefix rows over the shared pages.
    kv_starts: Optional[jax.Array] = None
    prefix: Optional[PrefixRows] = None

    @classmethod
    def dense(cls, batch: int, length: int) -> "AttentionMetadata":
        """Metadata of a dense [batch, length] causal batch run with kv_cache=None."""
        lens = jnp.full((batch,), length, jnp.int32)
        return cls(slot_mapping=jnp.full((batch * length,), -1, jnp.int32),
                   cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32) * length,
                   kv_lens=lens,
                   page_tables=jnp.arange(batch, dtype=jnp.int32)[:, None],
                   max_q_len=length)


jax.tree_util.register_dataclass(
    AttentionMetadata,
    data_fields=["slot_mapping", "cu_q_lens", "kv_lens", "page_tables", "kv_starts", "prefix"],
    meta_fields=["max_q_len", "num_decode_rows"])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, kv_cache,
              metadata: AttentionMetadata, *, sm_scale: float, sliding_window: Optional[int] = None,
              soft_cap: Optional[float] = None, impl: Optional[str] = None):
    """Writes K/V into the cache and attends.

    Args:
      q: [T, N, H] queries (RoPE applied).
      k, v: [T, K, H] this step's keys and values.
      positions: [T] int32 position of each token (the shared-prefix path needs them).
      kv_cache: (k_pages, v_pages) of [P, L, K, H], or None for a dense batch.
      metadata: AttentionMetadata of the batch.
      sm_scale, sliding_window, soft_cap: as in ragged_paged_attention.
      impl: "xla" | "pallas" | "pallas_interpret" | "pallas_tpu_interpret" | None
        (the backend's default); a dense batch always uses "xla".
    Returns:
      (out [T, N, H] in q's dtype, the updated (k_pages, v_pages) or None).
    """
    if kv_cache is None:
        impl = "xla"
        num_rows = metadata.page_tables.shape[0]
        num_tokens, num_kv_heads, head_dim = k.shape
        # [R, T / R, K, H]: each row of the dense batch is one page of its own keys.
        k_pages = k.reshape(num_rows, num_tokens // num_rows, num_kv_heads, head_dim)
        v_pages = v.reshape(k_pages.shape)
        new_cache = None
    else:
        k_pages, v_pages = rpa.write_kv(kv_cache[0], kv_cache[1], k, v, metadata.slot_mapping)
        new_cache = (k_pages, v_pages)
    common = dict(max_q_len=metadata.max_q_len, num_decode_rows=metadata.num_decode_rows, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap, impl=impl)
    if metadata.prefix is None:
        out = rpa.ragged_paged_attention(q, k_pages, v_pages, metadata.cu_q_lens, metadata.kv_lens,
                                         metadata.page_tables, **common)
    else:
        out = prefix_attention.shared_prefix_attention(
            q, k_pages, v_pages, positions, metadata.cu_q_lens, metadata.kv_lens, metadata.page_tables,
            metadata.kv_starts, metadata.prefix, **common)
    return out, new_cache
