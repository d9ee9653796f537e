"""InferenceSession as a client of the AsyncEngine: threads, asyncio, deltas, atomic batches."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from jaxinfer import InferenceSession, SamplingParams
from jaxinfer.engine.async_engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
JOIN_SECONDS = 240  # every thread below is joined with this bound


@pytest.fixture(scope="module")
def session(text_model_dir):
    with InferenceSession.from_pretrained(text_model_dir[0], dtype="float32") as s:
        yield s


def _assert_idle(session):
    m = session.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    assert session.async_engine.num_unfinished == 0
    assert session.async_engine.call(lambda engine: not engine.has_unfinished and not engine.requests)


def _prompts(n, seed):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 300, size=rng.randint(2, 12)).tolist() for _ in range(n)]


def _run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_SECONDS)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    if errors:
        raise errors[0]


def test_generate_from_four_threads_three_rounds(session):
    prompts = {i: _prompts(3, seed=i) for i in range(4)}
    expected = {i: [o.token_ids for o in session.generate(prompts[i], GREEDY)] for i in range(4)}
    got = {i: [] for i in range(4)}

    def client(i):
        def run():
            for _ in range(3):
                got[i].append([o.token_ids for o in session.generate(prompts[i], GREEDY)])
        return run

    _run_threads([client(i) for i in range(4)])
    for i in range(4):
        assert got[i] == [expected[i]] * 3  # same tokens whatever ran beside them
    _assert_idle(session)


def test_stream_in_one_thread_while_generate_runs_in_another(session):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (ref,) = session.generate(["class Point:"], params)
    batch = _prompts(4, seed=7)
    ref_batch = [o.token_ids for o in session.generate(batch, GREEDY)]
    pieces, outs = [], []

    def streamer():
        for _ in range(2):
            stream = session.stream("class Point:", params)
            pieces.append("".join(stream))
            outs.append(stream.output)

    def generator():
        for _ in range(2):
            assert [o.token_ids for o in session.generate(batch, GREEDY)] == ref_batch

    _run_threads([streamer, generator])
    assert pieces == [ref.text] * 2
    assert [o.token_ids for o in outs] == [ref.token_ids] * 2
    _assert_idle(session)


def test_a_bad_second_request_queues_nothing(session):
    with pytest.raises(ValueError, match=r"params\[1\]\.stop_token_ids"):
        session.generate(["def f():", "import os"],
                         [SamplingParams(max_tokens=5), SamplingParams(stop_token_ids=[99999])])
    _assert_idle(session)
    m0 = session.metrics()["num_steps"]
    (out,) = session.generate([[5, 6, 7]], GREEDY)
    assert len(out.token_ids) == 8
    # Only the new request ran: a leftover "def f():" would have been a second sequence.
    assert session.metrics()["num_steps"] - m0 <= 8
    _assert_idle(session)


def test_stream_deltas_carry_ids_finish_reason_and_usage(session):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3)
    (ref,) = session.generate(["import os"], params)
    deltas = list(session.stream("import os", params, output="deltas"))
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason == "length" and last.output is not None
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert "".join(d.text for d in deltas) == ref.text
    assert last.output.num_prompt_tokens == len(ref.prompt_token_ids)
    assert last.output.num_generated_tokens == 10
    top = [t for d in deltas for t in d.top_logprobs]
    assert len(top) == 10 and all(len(t) == 3 for t in top)
    with pytest.raises(ValueError, match="output"):
        session.stream("import os", params, output="json")


def test_stream_validates_before_iteration(session):
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        session.stream("", GREEDY)  # raised by the call, not by the first next()
    _assert_idle(session)


def test_top_logprobs(session):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=5)
    (out,) = session.generate([[5, 6, 7, 8]], params)
    assert len(out.logprobs) == 6 and len(out.top_logprobs) == 6
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert len(top) == 5
        values = sorted(top.values(), reverse=True)
        assert token in top and top[token] == pytest.approx(lp, abs=1e-5)
        assert max(values) == pytest.approx(lp, abs=1e-5)  # greedy picks the most likely
        assert all(v <= 0.0 for v in values)
    (plain,) = session.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                               logprobs=True))
    assert plain.top_logprobs is None and plain.logprobs == pytest.approx(out.logprobs, abs=1e-5)


def test_asyncio_clients(session):
    batch = _prompts(3, seed=11)
    ref = [o.token_ids for o in session.generate(batch, GREEDY)]

    async def main():
        async def streamed(prompt):
            ids = []
            async for delta in session.astream(prompt, GREEDY):
                ids.extend(delta.token_ids)
            return ids

        outs, *streams = await asyncio.wait_for(
            asyncio.gather(session.agenerate(batch, GREEDY), *(streamed(p) for p in batch)), JOIN_SECONDS)
        return [o.token_ids for o in outs], streams

    outs, streams = asyncio.run(main())
    assert outs == ref and streams == ref
    _assert_idle(session)


def test_abort_from_another_thread_and_a_failing_step(session):
    stream = session.async_engine.add_requests([_new([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))])[0]
    deltas = iter(stream)
    assert next(deltas).token_ids  # running
    _run_threads([stream.abort])
    last = list(deltas)[-1]
    assert last.finish_reason == "abort" and len(last.output.token_ids) < 200
    _assert_idle(session)

    # A step that raises ends the requests in flight with its error, frees their pages,
    # and the loop goes on serving.
    engine = session.engine
    real_step = engine.step

    def failing_step():
        engine.step = real_step
        raise RuntimeError("device lost")

    session.async_engine.call(lambda e: setattr(e, "step", failing_step))
    with pytest.raises(RuntimeError, match="device lost"):
        session.generate([[5, 6]], GREEDY)
    _assert_idle(session)
    assert len(session.generate([[5, 6]], GREEDY)[0].token_ids) == 8


def test_a_failing_runner_fails_only_that_steps_requests(session):
    # The runner raises once: the requests of that step get the error, a request queued
    # after it (not in the failed step) completes, pages are freed, the engine serves on.
    runner = session.engine.runner
    real_execute = runner.execute

    def failing_execute(step_input):
        runner.execute = real_execute
        raise RuntimeError("device lost")

    session.async_engine.call(lambda e: setattr(runner, "execute", failing_execute))
    first = session.async_engine.add_requests([_new([5, 6, 7], GREEDY)])[0]
    with pytest.raises(RuntimeError, match="device lost"):
        first.result(timeout=120)
    assert session.generate([[5, 6]], GREEDY)[0].finish_reason == "length"
    _assert_idle(session)


def test_an_error_in_one_requests_output_fails_that_request_alone(session):
    processor = session.engine.output_processor
    real_process = processor.process
    victim = "victim"

    def process(request, num_new):
        if request.request_id == victim:
            raise UnicodeError("cannot detokenize")
        return real_process(request, num_new)

    session.async_engine.call(lambda e: setattr(processor, "process", process))
    try:
        bad, good = session.async_engine.add_requests([_new([5, 6, 7], GREEDY, victim), _new([5, 6, 8], GREEDY)])
        with pytest.raises(UnicodeError):
            bad.result(timeout=120)
        assert good.result(timeout=120).finish_reason == "length"
    finally:
        session.async_engine.call(lambda e: setattr(processor, "process", real_process))
    _assert_idle(session)


def test_a_reader_that_stops_reading_is_cut_off(session):
    from jaxinfer.engine.async_engine import SlowReader
    engine = session.async_engine
    engine.max_buffered_deltas = 4
    try:
        stream = engine.add_requests([_new([5, 6, 7], SamplingParams(max_tokens=64, ignore_eos=True,
                                                                     temperature=0.0))])[0]
        deadline = time.monotonic() + 120
        while not stream.finished and time.monotonic() < deadline:  # never read: the engine cuts it off
            time.sleep(0.05)
        items = list(stream._items)
        assert isinstance(items[-1], SlowReader) and len(items) == 5
        with pytest.raises(SlowReader):
            list(stream)
    finally:
        engine.max_buffered_deltas = 4096
    deadline = time.monotonic() + 60
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_idle(session)


def test_shutdown_and_restart(text_model_dir):
    session = InferenceSession.from_pretrained(text_model_dir[0], dtype="float32")
    try:
        (a,) = session.generate([[5, 6, 7]], GREEDY)
        assert session.async_engine.is_running
        session.close()
        assert not session.async_engine.is_running
        (b,) = session.generate([[5, 6, 7]], GREEDY)  # a new loop thread
        assert a.token_ids == b.token_ids
    finally:
        session.close()
    assert not session.async_engine.is_running


def test_async_engine_rejects_duplicate_ids(session):
    ae: AsyncEngine = session.async_engine
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    (s,) = ae.add_requests([_new([5, 6], params, request_id="x")])
    try:
        with pytest.raises(ValueError, match=r"request_id\[0\]"):
            ae.add_requests([_new([5, 6], params, request_id="x")])
        with pytest.raises(ValueError, match=r"request_id\[1\]"):
            ae.add_requests([_new([5], params, request_id="y"), _new([6], params, request_id="y")])
    finally:
        s.abort()
    assert s.result(timeout=JOIN_SECONDS).finish_reason in ("abort", "length")
    _assert_idle(session)


def _new(ids, params, request_id=None):
    from jaxinfer.engine.validation import NewRequest
    return NewRequest(prompt_ids=ids, params=params, request_id=request_id)
