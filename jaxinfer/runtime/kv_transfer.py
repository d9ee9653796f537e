"""KV pages from one runner's pool into another's (Splitwise: prefill mesh -> decode mesh).

Path: engine/splitwise.py, when a prompt is done on the prefill runner -> **transfer
(its prompt pages -> the pages reserved for it on the decode runner)** -> the request
decodes on the decode runner.

How. One jitted gather of the pages of every leaf on the source mesh (the pool's own
shardings: each device gathers its own KV heads), `jax.device_put` of those rows to the
destination mesh with the destination pool's shardings (a device-to-device copy that
also reshards when the two sides' tensor-parallel sizes differ), one jitted scatter
into the destination pool (donated: written in place). Page counts are padded to powers
of two as in runtime/kv_swap.py (the padding repeats the last page pair, so duplicate
writes carry the same bytes). No host round trip, no pickling.

Both pools must hold the same per-page layout: layers, KV heads (after any repetition
a tensor-parallel size above the model's KV heads makes), head dim, dtype and page
size; checked when the transfer is built.

Not done: streaming layer by layer while the prefill runs (Splitwise §4.3). The copy
runs after the prompt's last chunk, so its time is exposed in the request's TTFT and
reported as such (engine metrics kv_transfer_seconds).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax

from jaxinfer.runtime import kv_swap
from jaxinfer.sharding import rules


@dataclasses.dataclass(frozen=True)
class TransferStats:
    num_pages: int
    nbytes: int  # bytes moved (every leaf)
    seconds: float  # wall time, copy finished
    is_compile: bool


class PageTransfer:
    """Copies pages from `src` to `dst` (ModelRunners; `dst.kv_caches` is replaced)."""

    def __init__(self, src, dst):
        src_leaves, dst_leaves = jax.tree.leaves(src.kv_caches), jax.tree.leaves(dst.kv_caches)
        same = len(src_leaves) == len(dst_leaves) and all(
            a.shape[1:] == b.shape[1:] and a.dtype == b.dtype for a, b in zip(src_leaves, dst_leaves))
        if not same:
            raise ValueError(
                "prefill_tensor_parallel_size / decode_tensor_parallel_size: the two KV pools have different page "
                f"layouts ({[(a.shape[1:], str(a.dtype)) for a in src_leaves[:2]]} vs "
                f"{[(b.shape[1:], str(b.dtype)) for b in dst_leaves[:2]]}): a tensor-parallel size above the model's "
                f"KV heads repeats them; choose sizes that divide the KV heads")
        self.src, self.dst = src, dst
        src_shardings = jax.tree.map(lambda x: x.sharding, src.kv_caches)
        self._dst_shardings = jax.tree.map(lambda x: x.sharding, dst.kv_caches)
        self._gather = jax.jit(kv_swap._gather, in_shardings=(src_shardings, rules.replicated(src.mesh)),
                               out_shardings=src_shardings)
        self._scatter = jax.jit(kv_swap._scatter, in_shardings=(self._dst_shardings, self._dst_shardings,
                                                                rules.replicated(dst.mesh)),
                                out_shardings=self._dst_shardings, donate_argnums=(0,))
        self.page_bytes = int(sum(x.nbytes // x.shape[0] for x in src_leaves))
        self._sizes: set = set()

    def __call__(self, src_pages: Sequence[int], dst_pages: Sequence[int]) -> TransferStats:
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"dst_pages: {len(dst_pages)} pages for {len(src_pages)} source pages")
        n = len(src_pages)
        if n == 0:
            return TransferStats(0, 0, 0.0, False)
        start = time.perf_counter()
        size = kv_swap.bucket(n)
        src_ids, dst_ids = kv_swap.padded_ids(src_pages, size), kv_swap.padded_ids(dst_pages, size)
        is_compile = size not in self._sizes
        self._sizes.add(size)
        rows = self._gather(self.src.kv_caches, src_ids)
        rows = jax.device_put(rows, self._dst_shardings)
        self.dst.kv_caches = self._scatter(self.dst.kv_caches, rows, dst_ids)
        jax.block_until_ready(self.dst.kv_caches)
        return TransferStats(n, n * self.page_bytes, time.perf_counter() - start, is_compile)
