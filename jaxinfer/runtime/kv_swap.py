"""Copies of KV pages between the device pool and host memory (preemption by swapping).

Path: scheduler (decides to swap a preempted request, engine/swap.py) -> engine ->
**runner.swap_out(page ids)** -> HostPages kept by the engine's SwapSpace -> later
**runner.swap_in(host pages, new page ids)** -> the request decodes on with no recompute.

What moves. The KV pool is a pytree whose leaves all have the page axis first: per
layer a (k_pages, v_pages) pair of [P, L, K, H] arrays, or of QuantizedPages (values
[P, L, K, H] and scales [P, L, K]) for an int8 / fp8 cache. Every leaf is handled the
same way with jax.tree.map, so a new page format needs nothing here. A swap-out is one
jitted gather of the pages of every leaf, then `jax.device_get` into numpy (host
memory: on a GPU / TPU a device-to-host copy, on CPU a memcpy); a swap-in is one
jitted scatter of the host rows into the pool, with the pool donated so XLA writes the
pages in place instead of copying the whole pool.

Compiles. The number of pages moved is padded to a power of two (a bucket), so a run
compiles at most log2(P) + 1 programs of each kind. A gather pads with the last real
page id (the extra rows are dropped on the host); a scatter pads its ids with the last
real id AND its rows with that id's own row, so the duplicate writes put the same bytes
in the same page and the result does not depend on the order XLA applies them.

Sharding. Both programs are jitted with the pool's own shardings for the pages (KV
heads split over the mesh's "tensor" axis) and a replicated index vector, so on a
tensor-parallel mesh each device gathers / scatters only its own heads and the cache
keeps its layout; `device_get` assembles the whole heads on the host.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxinfer.sharding import rules


@dataclasses.dataclass(frozen=True)
class SwapStats:
    """One copy: pages and bytes moved, wall seconds (the copy finished), whether it compiled."""

    num_pages: int
    nbytes: int
    seconds: float
    is_compile: bool


@dataclasses.dataclass(frozen=True)
class HostPages:
    """A host copy of some KV pages, in the order their page ids were given.

    Attributes:
      data: the pool's pytree with numpy leaves of `num_pages` rows each (a pipeline
        runner's is a list of one such tree per stage); opaque to the engine.
      num_pages: pages copied.
      nbytes: host bytes the copy holds (every leaf).
      stats: the swap-out that made it.
    """

    data: Any
    num_pages: int
    nbytes: int
    stats: SwapStats


def bucket(num_pages: int) -> int:
    """The padded number of pages of a copy: the next power of two (>= 1)."""
    return 1 << max(num_pages - 1, 0).bit_length()


def padded_ids(page_ids: Sequence[int], size: int) -> np.ndarray:
    """int32 page ids padded to `size` by repeating the last one (a copy's bucket)."""
    page_ids = [int(p) for p in page_ids]
    return np.asarray(page_ids + [page_ids[-1]] * (size - len(page_ids)), np.int32)


def _gather(caches, ids):
    return jax.tree.map(lambda pages: pages[ids], caches)


def _scatter(caches, rows, ids):
    return jax.tree.map(lambda pages, new: pages.at[ids].set(new.astype(pages.dtype)), caches, rows)


class PageMover:
    """Gathers and scatters pages of ONE KV pool on one mesh (a pipeline runner has one
    per stage). Holds the jitted programs, never the pool (the runner owns it).

    Args:
      caches: the pool (only its structure and shardings are read).
      mesh: the pool's mesh (the page ids are replicated over it).
    """

    def __init__(self, caches, mesh: Mesh):
        shardings = jax.tree.map(lambda x: x.sharding, caches)
        replicated = rules.replicated(mesh)
        self._gather = jax.jit(_gather, in_shardings=(shardings, replicated), out_shardings=shardings)
        self._scatter = jax.jit(_scatter, in_shardings=(shardings, shardings, replicated), out_shardings=shardings,
                                donate_argnums=(0,))
        self._buckets: set = set()  # (kind, bucket) compiled so far

    def _seen(self, kind: str, size: int) -> bool:
        key = (kind, size)
        seen = key in self._buckets
        self._buckets.add(key)
        return seen

    def gather(self, caches, page_ids: Sequence[int]) -> tuple:
        """Host copies (numpy) of `page_ids` of every leaf; returns (tree, compiled)."""
        n = len(page_ids)
        size = bucket(n)
        ids = padded_ids(page_ids, size)
        compiled = not self._seen("gather", size)
        rows = jax.device_get(self._gather(caches, ids))
        return jax.tree.map(lambda x: np.ascontiguousarray(x[:n]), rows), compiled

    def scatter(self, caches, rows, page_ids: Sequence[int]) -> tuple:
        """Writes host `rows` (as `gather` returned them) into `page_ids`; returns the
        new pool (the old one is donated) and whether the call compiled."""
        n = len(page_ids)
        size = bucket(n)
        ids = padded_ids(page_ids, size)

        def pad(x):
            return x if size == n else np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])

        compiled = not self._seen("scatter", size)
        caches = self._scatter(caches, jax.tree.map(pad, rows), ids)
        jax.block_until_ready(caches)  # the copy's time is measured, and its host rows may go
        return caches, compiled


def tree_nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def swap_out(movers: Sequence[PageMover], pools: Sequence, page_ids: Sequence[int]) -> HostPages:
    """Copies `page_ids` of every pool (one per pipeline stage, or just one) to the host."""
    start = time.perf_counter()
    page_ids = [int(p) for p in page_ids]
    if not page_ids:
        return HostPages(data=None, num_pages=0, nbytes=0, stats=SwapStats(0, 0, 0.0, False))
    data, compiled = [], False
    for mover, pool in zip(movers, pools):
        rows, c = mover.gather(pool, page_ids)
        data.append(rows)
        compiled |= c
    nbytes = tree_nbytes(data)
    stats = SwapStats(len(page_ids), nbytes, time.perf_counter() - start, compiled)
    return HostPages(data=data, num_pages=len(page_ids), nbytes=nbytes, stats=stats)


def swap_in(movers: Sequence[PageMover], pools: list, host: HostPages, page_ids: Sequence[int]) -> SwapStats:
    """Writes `host` into `page_ids` of every pool, replacing `pools[i]` in place (the
    old arrays are donated). `page_ids` must be as many as the pages `host` holds."""
    page_ids = [int(p) for p in page_ids]
    if len(page_ids) != host.num_pages:
        raise ValueError(f"page_ids: {len(page_ids)} pages given for a host copy of {host.num_pages}")
    start = time.perf_counter()
    if not page_ids:
        return SwapStats(0, 0, 0.0, False)
    compiled = False
    for i, (mover, rows) in enumerate(zip(movers, host.data)):
        pools[i], c = mover.scatter(pools[i], rows, page_ids)
        compiled |= c
    return SwapStats(len(page_ids), host.nbytes, time.perf_counter() - start, compiled)
