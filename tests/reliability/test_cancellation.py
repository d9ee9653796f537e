"""Cancellation storms: many requests aborted at random moments leak nothing.

Requests (seeded random prompts of 1-20 tokens, max_tokens 1-8, a page pool small
enough that some are preempted) arrive in waves and are aborted at random moments:
still queued, in the middle of their prompt (chunked prefill), decoding, after they
finished (a no-op), and unknown ids. Afterwards: no page held (reference counts, free
lists and the prefix cache consistent), no request tracked by the engine, scheduler,
output processor or async engine, and the request counters add up (added = finished +
aborted). The requests that were not aborted got the greedy tokens of a clean run.

Runners: the storms of thousands run over PagedHashRunner (reliability_helpers: the
real host checks, no model, tokens that depend on what it reads back from its KV pages,
so a page freed while in use or shared by mistake changes tokens), because on the real
runner every new step shape is a compile of seconds and a storm reaches dozens of
shapes; a smaller storm with fewer shapes runs on the real compiled step.

The default run: 3,000 requests at the Engine and 1,000 through the AsyncEngine with
streaming readers (PagedHashRunner); `-m slow`: 20,000 + 5,000 (PagedHashRunner) and
300 through the AsyncEngine on the real runner. (The real compiled step's own faults
run by default in test_faults.py, AsyncEngine included.)
"""
from __future__ import annotations

import asyncio
import collections
import random
import threading
import time

import pytest

from reliability_helpers import assert_idle, make_engine, make_hash_engine, new, run_to_end

from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.request import Status

HASH = dict(max_num_batched_tokens=16, max_num_seqs=8)  # PagedHashRunner storms: prompts 1-20, 1-8 tokens
REAL = dict(max_num_batched_tokens=8, max_num_seqs=4)  # real-runner storms: prompts 1-8, 1-4 tokens (few shapes)


def _factory(runner):
    """(engine factory, prompt length max, max_tokens max) of a storm."""
    if runner is None:
        return (lambda: make_hash_engine(**HASH)), 20, 8
    return (lambda: make_engine(runner, **REAL)), 8, 4


def _workload(rng: random.Random, num: int, prefix: str, max_prompt: int, max_tokens: int) -> list:
    """Random prompts; half of them start with one of three shared 8-token prefixes (two
    pages), so that prefix-cache hits and shared pages' reference counts are in play."""
    shared = [[rng.randrange(3, 97) for _ in range(8)] for _ in range(3)]
    items = []
    for i in range(num):
        length = rng.randint(1, max_prompt)
        head = rng.choice(shared)[:length] if rng.random() < 0.5 else []
        items.append((f"{prefix}{i}", head + [rng.randrange(3, 97) for _ in range(length - len(head))],
                      rng.randint(1, max_tokens)))
    return items


def _clean_tokens(runner, items) -> dict:
    """Greedy tokens of (id, prompt, max_tokens) items, run together in a fresh engine."""
    engine = _factory(runner)[0]()
    engine.add_requests([new(p, n, rid) for rid, p, n in items])
    outputs = run_to_end(engine)
    assert_idle(engine)
    return {rid: o.token_ids for rid, o in outputs.items()}


def _moment(request) -> str:
    if request.status is Status.WAITING:
        return "queued"
    if request.output_ids:
        return "decoding"
    return "prefilling"


def _engine_storm(runner, num: int, seed: int):
    rng = random.Random(seed)
    make, max_prompt, max_tokens = _factory(runner)
    engine = make()
    items = _workload(rng, num, "r", max_prompt, max_tokens)
    pending = collections.deque(items)
    finished, aborted = {}, set()
    moments = collections.Counter()
    deadline = time.monotonic() + 600
    while pending or engine.has_unfinished:
        assert time.monotonic() < deadline, "the storm did not drain"
        for _ in range(min(len(pending), rng.randint(0, 12))):  # a wave of arrivals
            rid, prompt, max_tokens = pending.popleft()
            engine.add_requests([new(prompt, max_tokens, rid)])
        for _ in range(rng.randint(0, 6)):  # aborts: live requests mostly, some stale or unknown ids
            roll = rng.random()
            if roll < 0.8 and engine.requests:
                rid = rng.choice(list(engine.requests))
                moment = _moment(engine.requests[rid])
            elif roll < 0.9 and finished:
                rid, moment = rng.choice(list(finished)), "finished"
            else:
                rid, moment = f"unknown-{rng.randrange(10**6)}", "unknown"
            delta = engine.abort(rid)
            if moment in ("finished", "unknown"):
                assert delta is None
            else:
                assert delta is not None and delta.finish_reason == "abort" and delta.output.finish_reason == "abort"
                aborted.add(rid)
            moments[moment] += 1
        if engine.has_unfinished:
            for delta in engine.step():
                if delta.is_finished:
                    finished[delta.request_id] = delta.output.token_ids
    assert_idle(engine)
    m = engine.metrics()
    assert m["num_requests_added"] == num
    assert m["num_requests_aborted"] == len(aborted) and m["num_requests_finished"] == len(finished)
    assert m["num_requests_failed"] == 0 and not engine.take_errors()
    assert not set(finished) & aborted and len(finished) + len(aborted) == num
    for moment in ("queued", "prefilling", "decoding", "finished", "unknown"):
        assert moments[moment] > 0, (moment, moments)
    if runner is None:
        assert m["num_preemptions"] > 0  # the pool is small enough: aborts race preemptions too
        assert m["prefix_cache_hits"] > 0  # and shared prefix pages
    return items, finished


def _check_survivors(runner, items, finished, limit=None):
    survivors = [it for it in items if it[0] in finished][:limit]
    assert _clean_tokens(runner, survivors) == {rid: finished[rid] for rid, _, _ in survivors}


def test_engine_cancellation_storm():
    items, finished = _engine_storm(None, 3000, seed=0)
    _check_survivors(None, items, finished)


@pytest.mark.slow
def test_engine_cancellation_storm_slow():
    items, finished = _engine_storm(None, 20000, seed=1)
    _check_survivors(None, items, finished)


def _async_storm(runner, num: int, seed: int):
    """Readers in threads and in an asyncio loop; each abort comes at a random moment."""
    rng = random.Random(seed)
    make, max_prompt, max_tokens = _factory(runner)
    engine = make()
    async_engine = AsyncEngine(engine)
    items = _workload(rng, num, "s", max_prompt, max_tokens)
    plans = {rid: rng.choice(["read", "read", "stop_after", "abort_now", "abort_other_thread"]) for rid, _, _ in items}
    results, aborted_ids, errors = {}, set(), []
    lock = threading.Lock()

    def consume(stream, plan, stop_after):
        try:
            if plan == "abort_now":
                stream.abort()
            seen = 0
            for delta in stream:
                seen += 1
                if plan == "stop_after" and seen >= stop_after and not delta.is_finished:
                    stream.abort()
                if delta.is_finished:
                    with lock:
                        results[stream.request_id] = delta.output
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    async def consume_async(streams):
        async def one(stream):
            async for delta in stream:
                if delta.is_finished:
                    results[stream.request_id] = delta.output
        await asyncio.gather(*(one(s) for s in streams))

    try:
        threads, async_streams = [], []
        for start in range(0, num, 25):  # waves of 25
            batch = items[start:start + 25]
            streams = async_engine.add_requests([new(p, n, rid) for rid, p, n in batch])
            for stream in streams:
                plan = plans[stream.request_id]
                if plan == "read" and rng.random() < 0.5:
                    async_streams.append(stream)
                    continue
                if plan == "abort_other_thread":
                    timer = threading.Timer(rng.random() * 0.05, async_engine.abort, (stream.request_id,))
                    timer.start()
                    threads.append(timer)
                t = threading.Thread(target=consume, args=(stream, plan, rng.randint(1, 4)), daemon=True)
                t.start()
                threads.append(t)
            time.sleep(rng.random() * 0.02)
        asyncio.run(asyncio.wait_for(consume_async(async_streams), timeout=300))
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive()
        assert not errors, errors[:3]
        assert len(results) == num  # every stream ended with a last delta
        aborted_ids = {rid for rid, o in results.items() if o.finish_reason == "abort"}
        assert async_engine.num_unfinished == 0
        m = async_engine.metrics()
        assert m["num_requests_added"] == num and m["num_requests_tracked"] == 0
        assert m["num_requests_aborted"] == len(aborted_ids)
        assert m["num_requests_finished"] == num - len(aborted_ids)
        async_engine.call(assert_idle)
        assert aborted_ids and len(aborted_ids) < num
    finally:
        async_engine.shutdown()
    survivors = {rid: o.token_ids for rid, o in results.items() if o.finish_reason != "abort"}
    for rid, plan in plans.items():  # the readers that never aborted got their whole result
        if plan == "read":
            assert rid in survivors
    return items, survivors


def test_async_engine_cancellation_storm_with_streaming_readers():
    items, survivors = _async_storm(None, 1000, seed=2)
    _check_survivors(None, items, survivors)


@pytest.mark.slow
def test_async_engine_cancellation_storm_on_the_real_runner(tiny_runner):
    # Slow: ~30 step shapes, each a compile of seconds on a loaded 2-core machine.
    items, survivors = _async_storm(tiny_runner, 300, seed=4)
    _check_survivors(tiny_runner, items, survivors)


@pytest.mark.slow
def test_async_engine_cancellation_storm_slow():
    items, survivors = _async_storm(None, 5000, seed=3)
    _check_survivors(None, items, survivors)
