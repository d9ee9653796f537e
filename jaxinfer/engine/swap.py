"""SwapSpace: the host pool of swapped-out KV pages and the swap-or-recompute rule (no jax).

Path: scheduler._preempt -> **SwapSpace.choose / reserve** -> a SwapOut op -> engine ->
runner.swap_out -> **SwapSpace.store**; later scheduler admission -> a SwapIn op ->
engine -> **SwapSpace.take** -> runner.swap_in. The copies themselves are opaque
objects of the runner (runtime/kv_swap.HostPages); this module only counts them.

Modes (EngineConfig.preemption_mode):
- "recompute": a preempted request's pages are freed; it is recomputed when it
  resumes (full pages it computed stay in the prefix cache, so that may be cheap).
- "swap": its computed pages are copied to host memory and freed; when it resumes it
  gets new pages, the copy is written into them and it decodes on with num_computed
  kept (no recompute). When its pages do not fit in what is left of the host pool
  (`swap_space_bytes`), that request falls back to recompute.
- "auto": per request, swap when it is expected to be cheaper:

      2 * bytes / swap_bandwidth  <=  tokens / prefill_speed

  bytes: the request's computed pages (every page of its first num_computed tokens)
  times the host bytes of one page; 2 *: out now and in later; tokens: num_computed,
  what a recompute feeds again (the prefix cache may give some back, not counted: under
  the memory pressure that preempts, freed cached pages are the first to be evicted).
  Both rates are measured as the engine runs (RateEstimate): swap_bandwidth from every
  swap copy that did not compile, prefill_speed from every step that fed more tokens
  than it had sequences (so it held a prefill chunk) and did not compile; until such a
  step is measured, the tokens/s of any step that did not compile stands in (a lower
  bound of the prefill speed: decode tokens are memory-bound). Before the first
  measurement the priors are 4 GB/s (a host copy is several GB/s on every backend
  here; a wrong prior is replaced by the first copy measured) and 1000 tokens/s. If the
  rule never picks swap, the bandwidth is never measured: the prior is deliberately
  optimistic so that the first eligible preemption tries a swap and measures it.

Why every computed page is copied, also pages the request shares with the prefix cache
or other requests (the simplest correct rule): a swapped request then holds no device
page while it waits, so swapped requests never hold pages another request needs to be
admitted (no deadlock of waiting requests), and it gets back bit-exact the K/V it had
(its own copy, not a cache page computed in another batch). The shared pages keep their
other holders and stay in the prefix cache; the restored copies are private pages that
the request registers again only for hashes the cache no longer holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

PREEMPTION_MODES = ("recompute", "swap", "auto")
PRIOR_SWAP_BYTES_PER_SECOND = 4e9
PRIOR_PREFILL_TOKENS_PER_SECOND = 1e3


class RateEstimate:
    """A rate (amount per second) from measurements, starting at a prior.

    The prior is the rate until the first measurement, which replaces it; from then on
    the rate is a ratio of sums of amount and of seconds, both decayed by `decay` at each
    measurement, so it follows a changing load and a long copy weighs more than a short
    one (whose fixed overhead would otherwise dominate).
    """

    def __init__(self, prior_rate: float, *, decay: float = 0.9):
        self.prior_rate = float(prior_rate)
        self._amount, self._seconds = float(prior_rate), 1.0
        self.decay = decay
        self.num_measurements = 0

    def add(self, amount: float, seconds: float) -> None:
        if seconds <= 0 or amount <= 0:
            return
        if self.num_measurements == 0:  # the prior stood in for measurements: drop it
            self._amount, self._seconds = 0.0, 0.0
        self._amount = self._amount * self.decay + amount
        self._seconds = self._seconds * self.decay + seconds
        self.num_measurements += 1

    @property
    def rate(self) -> float:
        return self._amount / self._seconds


def swap_is_cheaper(num_bytes: int, num_tokens: int, bytes_per_second: float, tokens_per_second: float) -> bool:
    """The "auto" rule: moving `num_bytes` out and back in costs no more than
    recomputing `num_tokens` (both in seconds at the given rates)."""
    return 2 * num_bytes / bytes_per_second <= num_tokens / tokens_per_second


@dataclasses.dataclass
class _Entry:
    num_pages: int
    nbytes: int  # reserved (num_pages * bytes_per_page); the copy's own once stored
    copy: Any = None  # the runner's HostPages, once the engine ran the swap-out


class SwapSpace:
    """The host pool: which requests are swapped out, their copies and the bytes used.

    Args:
      mode: "recompute", "swap" or "auto".
      capacity_bytes: host bytes the copies may take together (swap_space_bytes).
      bytes_per_page: host bytes of one page of every layer (K and V, scales included).
    """

    def __init__(self, mode: str, capacity_bytes: int, bytes_per_page: int):
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode: {mode!r} not in {PREEMPTION_MODES}")
        self.mode = mode
        self.capacity_bytes = int(capacity_bytes)
        self.bytes_per_page = int(bytes_per_page)
        self._entries: dict = {}  # request id -> _Entry
        self.used_bytes = 0
        self.bandwidth = RateEstimate(PRIOR_SWAP_BYTES_PER_SECOND)  # bytes / s of swap copies
        self.prefill_speed = RateEstimate(PRIOR_PREFILL_TOKENS_PER_SECOND)  # tokens / s of prefill steps
        self.step_speed = RateEstimate(PRIOR_PREFILL_TOKENS_PER_SECOND)  # tokens / s of any step
        # counters (Engine.metrics)
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.swap_out_bytes = 0
        self.swap_in_bytes = 0
        self.swap_seconds = 0.0
        self.num_swap_fallbacks = 0  # swaps refused for lack of host space (recomputed instead)

    # ---------------------------------------------------------------- decisions

    def choose(self, num_pages: int, num_tokens: int) -> str:
        """"swap" or "recompute" for a preempted request with `num_pages` computed pages
        holding `num_tokens` computed tokens (the pool's room is checked by reserve)."""
        if self.mode == "recompute" or num_pages == 0 or num_tokens == 0:
            return "recompute"
        if self.mode == "swap":
            return "swap"
        fits = swap_is_cheaper(num_pages * self.bytes_per_page, num_tokens, self.bandwidth.rate,
                               self.prefill_tokens_per_second)
        return "swap" if fits else "recompute"

    def reserve(self, request_id: str, num_pages: int) -> bool:
        """Reserves room for a request's copy; False (nothing reserved) when it does not fit."""
        if request_id in self._entries:
            raise RuntimeError(f"request {request_id!r} is already swapped out")
        nbytes = num_pages * self.bytes_per_page
        if self.used_bytes + nbytes > self.capacity_bytes:
            self.num_swap_fallbacks += 1
            return False
        self._entries[request_id] = _Entry(num_pages, nbytes)
        self.used_bytes += nbytes
        return True

    # ---------------------------------------------------------------- copies

    def store(self, request_id: str, copy: Any, nbytes: int, seconds: float, measured: bool) -> None:
        """Keeps the runner's copy of a reserved request (the engine ran the swap-out)."""
        entry = self._entries[request_id]
        self.used_bytes += nbytes - entry.nbytes
        entry.copy, entry.nbytes = copy, nbytes
        self.num_swap_outs += 1
        self._count(nbytes, seconds, measured)
        self.swap_out_bytes += nbytes

    def take(self, request_id: str) -> Any:
        """Removes a request's copy (to write it back) and frees its bytes."""
        entry = self._entries.pop(request_id)
        self.used_bytes -= entry.nbytes
        return entry.copy

    def swapped_in(self, nbytes: int, seconds: float, measured: bool) -> None:
        """Counts a swap-in the engine ran."""
        self.num_swap_ins += 1
        self.swap_in_bytes += nbytes
        self._count(nbytes, seconds, measured)

    def _count(self, nbytes: int, seconds: float, measured: bool) -> None:
        self.swap_seconds += seconds
        if measured:
            self.bandwidth.add(nbytes, seconds)

    def discard(self, request_id: str) -> None:
        """Drops a request's copy, if any (aborted, failed, finished while swapped out)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes

    def holds(self, request_id: str) -> bool:
        return request_id in self._entries

    def num_pages_of(self, request_id: str) -> int:
        return self._entries[request_id].num_pages

    @property
    def num_swapped(self) -> int:
        return len(self._entries)

    def observe_step(self, num_tokens: int, num_sequences: int, seconds: float, is_compile: bool) -> None:
        """Feeds a step's timing to the speed estimates (steps that did not compile):
        prefill_speed from steps with a prefill chunk (more tokens than sequences),
        step_speed from every step."""
        if is_compile:
            return
        self.step_speed.add(num_tokens, seconds)
        if num_tokens > num_sequences:
            self.prefill_speed.add(num_tokens, seconds)

    @property
    def prefill_tokens_per_second(self) -> float:
        """The recompute speed the rule uses: measured prefill steps; until one is
        measured, every step's tokens/s (a lower bound: a decode-only step feeds one
        memory-bound token per sequence), and before any step the prior."""
        if self.prefill_speed.num_measurements or not self.step_speed.num_measurements:
            return self.prefill_speed.rate
        return self.step_speed.rate

    def metrics(self) -> dict:
        return {"num_swap_outs": self.num_swap_outs, "num_swap_ins": self.num_swap_ins,
                "swap_out_bytes": self.swap_out_bytes, "swap_in_bytes": self.swap_in_bytes,
                "swap_seconds": self.swap_seconds, "num_swapped_requests": self.num_swapped,
                "swap_space_used_bytes": self.used_bytes, "swap_space_bytes": self.capacity_bytes,
                "num_swap_fallbacks": self.num_swap_fallbacks,
                "swap_bytes_per_second": self.bandwidth.rate,
                "prefill_tokens_per_second": self.prefill_tokens_per_second}


@dataclasses.dataclass(frozen=True)
class SwapOut:
    """Copy `page_ids` (a preempted request's computed pages, in order) to the host;
    emitted by the scheduler, run by the engine before the step (the pages are free by
    then and may be written by that step)."""

    request_id: str
    page_ids: tuple


@dataclasses.dataclass(frozen=True)
class SwapIn:
    """Write a request's host copy into `page_ids` (new pages) before the step."""

    request_id: str
    page_ids: tuple


def optional_space(mode: str, capacity_bytes: int, bytes_per_page: int) -> Optional[SwapSpace]:
    """A SwapSpace, or None for "recompute" (the scheduler then never asks)."""
    return None if mode == "recompute" else SwapSpace(mode, capacity_bytes, bytes_per_page)
