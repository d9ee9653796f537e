"""BlockManager: the pool of fixed-size KV pages, who holds which, and the prefix cache.

Path: scheduler -> **block manager** (page ids) -> StepInput -> runner. Host side, no
jax. The manager hands the scheduler opaque page ids; the runner owns the device arrays
those ids index.

Automatic prefix caching. A *full* page is identified by a hash chain:
`h_i = sha256(h_{i-1} || tokens of page i)`, with `h_{-1}` derived from the request's
cache salt (so tenants with different salts never share pages). Computed full pages are
registered under their hash. A new request looks up its chain page by page and reuses
every consecutive hit (the pages gain a reference; their tokens need no recompute).
Pages carry reference counts; a page whose count drops to zero is *free* but, if it
holds a cached hash, stays findable until it is reused: free uncached pages are handed
out first, then cached ones least-recently-freed first (LRU eviction). Lookups and
hits are counted in tokens.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional, Sequence


def page_hashes(token_ids: Sequence[int], page_size: int, salt: Optional[str] = None,
                start: int = 0, parent: Optional[bytes] = None) -> list:
    """Hash chain of the full pages of `token_ids`, from page `start` on.

    Args:
      token_ids: the sequence's tokens.
      page_size: tokens per page.
      salt: cache salt; part of the chain's root.
      start: first page to hash (the caller already has hashes of pages < start).
      parent: the hash of page start - 1 (required when start > 0).
    Returns:
      list of 32-byte digests, one per full page from `start`.
    """
    prev = parent if start else hashlib.sha256(b"jaxinfer-root:" + (salt or "").encode()).digest()
    out = []
    for i in range(start, len(token_ids) // page_size):
        chunk = token_ids[i * page_size:(i + 1) * page_size]
        h = hashlib.sha256(prev)
        h.update(b"".join(int(t).to_bytes(4, "little") for t in chunk))
        prev = h.digest()
        out.append(prev)
    return out


class BlockManager:
    """Allocates KV pages of `page_size` tokens out of `num_pages`, with prefix caching."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_pages
        self._hash_of: list = [None] * num_pages  # page -> registered hash
        self._page_of: dict = {}  # hash -> page
        self._free_uncached = collections.deque(range(num_pages))
        self._free_cached: collections.OrderedDict = collections.OrderedDict()  # LRU order
        self.num_cache_queries = 0  # tokens looked up
        self.num_cache_hits = 0  # tokens found

    # ---------------------------------------------------------------- counts

    @property
    def num_free_pages(self) -> int:
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_pages(self) -> int:
        return len(self._page_of)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free_pages

    # ---------------------------------------------------------------- plain pages

    def allocate(self, num_pages: int) -> list:
        """Takes `num_pages` free pages (uncached first, then LRU-evicted cached ones)."""
        if not self.can_allocate(num_pages):
            raise RuntimeError(f"out of KV pages: asked for {num_pages}, {self.num_free_pages} free")
        pages = []
        for _ in range(num_pages):
            if self._free_uncached:
                page = self._free_uncached.popleft()
            else:
                page, _ = self._free_cached.popitem(last=False)
                del self._page_of[self._hash_of[page]]
                self._hash_of[page] = None
            self._ref_counts[page] = 1
            pages.append(page)
        return pages

    def free(self, pages) -> None:
        """Drops one reference from each page; unreferenced pages become free."""
        for page in pages:
            if self._ref_counts[page] <= 0:
                raise RuntimeError(f"page {page} freed twice")
            self._ref_counts[page] -= 1
            if self._ref_counts[page] == 0:
                if self._hash_of[page] is not None:
                    self._free_cached[page] = None  # most recently freed at the end
                else:
                    self._free_uncached.append(page)

    # ---------------------------------------------------------------- prefix cache

    def match_prefix(self, hashes: Sequence[bytes], max_pages: int) -> list:
        """Pages of the longest cached prefix of `hashes` (at most max_pages), no side effects."""
        pages = []
        if not self.enable_prefix_caching:
            return pages
        for h in hashes[:max_pages]:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_admit(self, hit_pages: Sequence[int], num_new_pages: int) -> bool:
        """Whether hit_pages can be shared and num_new_pages allocated on top of them."""
        revived = sum(1 for p in hit_pages if self._ref_counts[p] == 0)
        return num_new_pages <= self.num_free_pages - revived

    def share(self, pages: Sequence[int]) -> None:
        """Takes a reference on cached pages found by match_prefix."""
        for page in pages:
            if self._ref_counts[page] == 0:
                del self._free_cached[page]
            self._ref_counts[page] += 1

    def acquire(self, hashes: Sequence[bytes], max_hit_pages: int, num_tokens: int) -> Optional[tuple]:
        """Pages for num_tokens tokens, the leading ones shared from the cache (the longest
        cached prefix of `hashes`, at most max_hit_pages): (pages, number shared), or None
        (nothing taken) when they cannot all be had."""
        hits = self.match_prefix(hashes, max_pages=max_hit_pages)
        num_new = self.pages_needed(num_tokens) - len(hits)
        if not self.can_admit(hits, num_new):
            return None
        self.share(hits)
        return list(hits) + self.allocate(num_new), len(hits)

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.num_cache_queries += num_query_tokens
        self.num_cache_hits += num_hit_tokens

    def register(self, page: int, page_hash: bytes) -> None:
        """Makes a computed full page findable by its hash (first writer wins)."""
        if not self.enable_prefix_caching or self._hash_of[page] is not None or page_hash in self._page_of:
            return
        self._hash_of[page] = page_hash
        self._page_of[page_hash] = page

    def unregister(self, pages: Sequence[int]) -> int:
        """Makes pages unfindable (their contents are not to be trusted); returns how many
        were registered. Referenced pages stay with their holders; a free cached one
        becomes free uncached."""
        dropped = 0
        for page in pages:
            page_hash = self._hash_of[page]
            if page_hash is None:
                continue
            del self._page_of[page_hash]
            self._hash_of[page] = None
            if page in self._free_cached:
                del self._free_cached[page]
                self._free_uncached.append(page)
            dropped += 1
        return dropped

    def num_referenced_pages(self) -> int:
        """Pages held by at least one request (0 when every request has ended)."""
        return sum(1 for c in self._ref_counts if c > 0)

    def check_consistency(self) -> None:
        """Raises AssertionError when the bookkeeping disagrees with itself (tests)."""
        free = set(self._free_uncached) | set(self._free_cached)
        assert len(free) == len(self._free_uncached) + len(self._free_cached), "a page is free twice"
        for page, count in enumerate(self._ref_counts):
            assert count >= 0, f"page {page}: negative reference count"
            assert (count == 0) == (page in free), f"page {page}: {count} references, free={page in free}"
            assert (page in self._free_cached) <= (self._hash_of[page] is not None), f"page {page}: cached without hash"
        for page_hash, page in self._page_of.items():
            assert self._hash_of[page] == page_hash, f"page {page}: hash maps disagree"
        assert sum(h is not None for h in self._hash_of) == len(self._page_of), "hash maps disagree in size"

    def reset_prefix_cache(self) -> None:
        """Forgets every cached hash (e.g. after the weights change)."""
        for page in list(self._free_cached):
            self._free_uncached.append(page)
        self._free_cached.clear()
        self._page_of.clear()
        self._hash_of = [None] * self.num_pages
