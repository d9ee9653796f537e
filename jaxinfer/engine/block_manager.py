"""BlockManager: the pool of fixed-size KV pages and who holds which (host side, no jax).

Path: scheduler -> **block manager** (page ids) -> StepInput -> runner. The manager
hands out opaque page ids from a free list and takes them back; the runner owns the
device arrays those ids index. Pages carry reference counts so that a page can later be
shared by several sequences (prefix caching).
"""
from __future__ import annotations

import collections


class BlockManager:
    """Allocates KV pages of `page_size` tokens out of `num_pages`."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = collections.deque(range(num_pages))
        self._ref_counts = [0] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list:
        if not self.can_allocate(num_pages):
            raise RuntimeError(f"out of KV pages: asked for {num_pages}, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        for p in pages:
            self._ref_counts[p] = 1
        return pages

    def free(self, pages) -> None:
        for p in pages:
            if self._ref_counts[p] <= 0:
                raise RuntimeError(f"page {p} freed twice")
            self._ref_counts[p] -= 1
            if self._ref_counts[p] == 0:
                self._free.append(p)
