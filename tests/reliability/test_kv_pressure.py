"""KV pressure: a page pool far too small for the offered load.

Requests whose prompt + max_tokens fit the pool one at a time but not together are
all admitted eventually: running ones are preempted (their pages freed, recomputed
later), nothing deadlocks (bounded steps and wall time), and every request ends with
the tokens of an unconstrained run. A request that can never fit is refused at
admission with a ValueError naming `max_tokens` and the pool's size; nothing of its
batch is queued.

Two runners: the real compiled step (eight requests of 8 pages on a 24-page pool; the
unconstrained reference is each request alone on the same runner, which never
preempts), and PagedHashRunner (reliability_helpers; hundreds of requests up to the
whole pool, on a pool of 24 pages vs a reference pool of 1,000) for scale.
"""
from __future__ import annotations

import random
import time

import pytest

from reliability_helpers import NUM_PAGES, PAGE_SIZE, assert_idle, make_engine, make_hash_engine, new, run_to_end

from jaxinfer.engine.async_engine import AsyncEngine


def _run_bounded(engine, max_steps: int, max_seconds: float) -> dict:
    start = time.monotonic()
    outputs = run_to_end(engine, max_steps=max_steps)
    assert time.monotonic() - start < max_seconds, "the engine took too long under pressure"
    return outputs


def test_preempts_and_completes_with_unconstrained_tokens_on_the_real_runner(tiny_runner):
    rng = random.Random(0)
    # 8 requests x (10 + 22 tokens = 8 pages) = 64 pages offered to a 24-page pool.
    items = [(f"p{i}", [rng.randrange(3, 97) for _ in range(10)], 22) for i in range(8)]
    alone = make_engine(tiny_runner, max_num_batched_tokens=16, max_num_seqs=1)
    alone.add_requests([new(p, n, rid) for rid, p, n in items])
    reference = {rid: o.token_ids for rid, o in run_to_end(alone).items()}
    assert alone.metrics()["num_preemptions"] == 0
    assert_idle(alone)

    engine = make_engine(tiny_runner, max_num_batched_tokens=16, max_num_seqs=8)
    assert len(items) * 8 > 2 * engine.block_manager.num_pages
    # The request that can never fit: refused whole at admission, naming the limit.
    with pytest.raises(ValueError, match=rf"max_tokens: prompt \+ max_tokens = 110 tokens can never fit in the KV "
                                         rf"cache \({NUM_PAGES} pages of {PAGE_SIZE}\)"):
        engine.add_requests([new(items[0][1], 22, "ok"), new([5] * 10, 100, "never")])
    assert not engine.requests and not engine.has_unfinished
    engine.add_requests([new(p, n, rid) for rid, p, n in items])
    outputs = _run_bounded(engine, max_steps=400, max_seconds=300)
    assert {rid: o.token_ids for rid, o in outputs.items()} == reference
    assert all(o.finish_reason == "length" for o in outputs.values())
    m = engine.metrics()
    assert m["num_preemptions"] > 0
    assert_idle(engine)


def _hash_pressure(num: int, seed: int):
    rng = random.Random(seed)
    # Lengths up to the whole pool (24 pages = 96 tokens): 4 to 96 tokens per request.
    items = []
    for i in range(num):
        total = rng.choice([rng.randint(4, 24), rng.randint(24, 64), rng.randint(64, NUM_PAGES * PAGE_SIZE)])
        prompt_len = rng.randint(1, total - 1)
        items.append((f"h{i}", [rng.randrange(3, 97) for _ in range(prompt_len)], total - prompt_len))
    reference_engine = make_hash_engine(num_pages=1000, max_num_batched_tokens=64, max_num_seqs=16)
    reference_engine.add_requests([new(p, n, rid) for rid, p, n in items])
    reference = {rid: o.token_ids for rid, o in run_to_end(reference_engine).items()}
    assert reference_engine.metrics()["num_preemptions"] == 0

    engine = make_hash_engine(max_num_batched_tokens=64, max_num_seqs=16)
    never = [new([7] * 10, 100, "never")]  # 110 tokens: inside the context (128), more than the pool (96)
    with pytest.raises(ValueError, match="max_tokens: .*can never fit in the KV cache"):
        engine.add_requests(never)
    pending = list(items)
    outputs, steps, start = {}, 0, time.monotonic()
    while pending or engine.has_unfinished:  # arrivals keep coming while the pool is full
        for _ in range(min(len(pending), rng.randint(0, 8))):
            rid, p, n = pending.pop(0)
            engine.add_requests([new(p, n, rid)])
        for delta in engine.step():
            if delta.is_finished:
                outputs[delta.request_id] = delta.output
        steps += 1
        assert steps < 100 * num and time.monotonic() - start < 120, "no progress under pressure"
    assert {rid: o.token_ids for rid, o in outputs.items()} == reference
    m = engine.metrics()
    assert m["num_preemptions"] > 0 and m["num_requests_finished"] == num
    assert_idle(engine)
    return m


def test_preempts_and_completes_with_unconstrained_tokens_at_scale():
    _hash_pressure(300, seed=1)


@pytest.mark.slow
def test_preempts_and_completes_with_unconstrained_tokens_at_scale_slow():
    for seed in range(2, 7):
        _hash_pressure(1000, seed=seed)


def test_async_engine_refuses_a_request_that_can_never_fit_and_serves_the_rest():
    async_engine = AsyncEngine(make_hash_engine(max_num_batched_tokens=64, max_num_seqs=16))
    try:
        with pytest.raises(ValueError, match=r"\[1\]\.max_tokens: .*can never fit in the KV cache"):
            async_engine.add_requests([new([3, 4], 8, "fits"), new([3] * 90, 20, "never")])
        assert async_engine.num_unfinished == 0
        streams = async_engine.add_requests([new([3 + i] * 40, 50, f"big{i}") for i in range(4)])
        outputs = [s.result(timeout=60) for s in streams]
        assert all(len(o.token_ids) == 50 for o in outputs)
        metrics = async_engine.metrics()
        assert metrics["num_preemptions"] > 0 and metrics["num_requests_tracked"] == 0
        async_engine.call(assert_idle)
    finally:
        async_engine.shutdown()
