"""Bounding the memory mappings of compiled programs, so that many compiles never crash.

XLA:CPU links every program it compiles into the process as separate memory mappings:
about 13 for a small function and about 270 for the engine's step program (measured on
this machine with jax 0.10: 112 step programs held 31,000 mappings). Linux refuses
mappings past `vm.max_map_count` (65,530 by default); LLVM then reports "Cannot allocate
memory" and the process dies with a segmentation fault inside the next compile. A long
mixed workload meets new batch shapes -- each one a program -- for a long time (the
batch-invariance trials compile about 1.5 programs per trial and crashed after ~240),
so without a bound a server with varied traffic would crash after a few hundred
programs.

`MapBudget.after_compile(functions)` is called by a runner after each new program:
when the process holds more than `fraction` of the allowed mappings, it clears the
caches of the runner's jitted functions (`jax.jit(...).clear_cache()`: jax drops their
executables and the mappings go with them) and returns True; the runner forgets which
shapes it has compiled, and they compile again when met (from the persistent
compilation cache when it holds them). Elsewhere than Linux (no /proc) it does nothing.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional

log = logging.getLogger("jaxinfer.runtime")

MAX_MAP_COUNT_FILE = "/proc/sys/vm/max_map_count"
MAPS_FILE = "/proc/self/maps"


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def count_mappings(path: str = MAPS_FILE) -> Optional[int]:
    """Memory mappings this process holds (lines of /proc/self/maps), None where unknown."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


class MapBudget:
    """Clears jitted functions' compiled programs before the process runs out of mappings.

    Args:
      fraction: share of the limit above which programs are dropped (the rest is room
        for the compile in flight, other libraries and other runners of the process).
      max_map_count: the limit; None = read from /proc/sys/vm/max_map_count (no limit
        known: the budget never acts).
    """

    def __init__(self, fraction: float = 0.6, max_map_count: Optional[int] = None):
        if not 0 < fraction < 1:
            raise ValueError(f"fraction: must be in (0, 1), got {fraction!r}")
        self.limit = max_map_count if max_map_count is not None else _read_int(MAX_MAP_COUNT_FILE)
        self.fraction = fraction
        self.num_flushes = 0

    def after_compile(self, functions: Iterable) -> bool:
        """Clears `functions`' caches when the mappings exceed the budget; True if it did."""
        if self.limit is None:
            return False
        used = count_mappings()
        if used is None or used <= self.fraction * self.limit:
            return False
        for fn in functions:
            fn.clear_cache()
        self.num_flushes += 1
        log.warning("%d memory mappings of %d allowed (vm.max_map_count): dropped the compiled step programs; "
                    "the shapes met again compile again (flush %d)", used, self.limit, self.num_flushes)
        return True
