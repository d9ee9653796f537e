"""Faults: a NaN / Inf in one request's rows, and a step that raises.

Through the runner's fault hook (jaxinfer/runtime/faults.py) the real compiled step
adds NaN or Inf to one request's logits and to the K/V it writes. That request must
fail with an error, alone: the requests beside it in the same steps keep the tokens of
a clean run, its pages are freed and none it computed stays in the prefix cache (a
later request with the same prompt recomputes it and gets clean tokens). A step that
raises fails exactly that step's requests; the engine then serves new ones with the
right tokens (Engine and AsyncEngine).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from reliability_helpers import assert_idle, make_engine, new, run_to_end

from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.engine import NonFiniteOutput, StepFailed
from jaxinfer.runtime import input_batch, microbatches
from jaxinfer.runtime.faults import FaultInjector, InjectedFault
from jaxinfer.runtime.step_broadcast import BroadcastingRunner
from jaxinfer.types import ScheduledSequence, SequenceOutput, StepInput

LONG = [11, 23, 35, 47, 59, 71, 83, 95, 8, 20, 32, 44, 56]  # 13 tokens: 3 full pages + 1
WORKLOAD = [("victim", LONG, 6), ("n1", [3, 5, 7, 9, 2], 6), ("n2", [60, 61, 62, 63, 64, 65, 66, 67, 68], 5),
            ("n3", [90, 1], 6)]


def _submit(engine, workload, suffix=""):
    return engine.add_requests([new(p, n, rid + suffix) for rid, p, n in workload])


def _tokens(outputs, suffix=""):
    return {rid[:len(rid) - len(suffix)] if suffix else rid: o.token_ids for rid, o in outputs.items()}


@pytest.fixture(scope="module")
def clean(tiny_runner):
    """Greedy tokens of WORKLOAD and of the victim's prompt alone, in a clean engine."""
    engine = make_engine(tiny_runner, max_num_batched_tokens=16, max_num_seqs=4)
    _submit(engine, WORKLOAD)
    tokens = _tokens(run_to_end(engine))
    assert_idle(engine)
    return tokens


@pytest.mark.parametrize("value, chunk", [(math.nan, 16), (math.inf, 8)])
def test_a_non_finite_row_fails_its_request_alone(tiny_runner, clean, value, chunk):
    # chunk 16: the victim's whole prompt is one step, where the fault lands in its
    # logits and its three full pages' K/V. chunk 8: the fault lands in the first
    # chunk, which samples nothing: the step's per-token K/V check must catch it there,
    # before any page of it is registered in the prefix cache.
    engine = make_engine(tiny_runner, max_num_batched_tokens=chunk, max_num_seqs=4)
    engine.runner.fault_injector = injector = FaultInjector(nonfinite={"victim": value})
    failed_at = []
    real_fail = engine.scheduler.fail
    engine.scheduler.fail = lambda r: failed_at.append((r.request_id, r.num_computed, r.num_registered_pages)) \
        or real_fail(r)
    _submit(engine, WORKLOAD)
    outputs = run_to_end(engine)
    assert injector.num_injected == 1
    assert failed_at == [("victim", 0, 0)]  # failed in the step that wrote the value: nothing kept
    errors = engine.take_errors()
    assert set(errors) == {"victim"} and isinstance(errors["victim"], NonFiniteOutput)
    assert "non-finite" in str(errors["victim"]) and "victim" not in outputs
    assert _tokens(outputs) == {k: v for k, v in clean.items() if k != "victim"}
    assert_idle(engine)
    m = engine.metrics()
    assert m["num_requests_failed"] == 1 and m["num_requests_finished"] == 3
    # Nothing the victim computed is findable: its prompt again (no fault) recomputes
    # every page and gets the clean tokens; the pages may well be the poisoned ones,
    # reused, which must not matter either.
    hits_before = engine.block_manager.num_cache_hits
    engine.add_requests([new(LONG, 6, "again")])
    again = run_to_end(engine)
    assert engine.take_errors() == {}
    assert again["again"].token_ids == clean["victim"]
    assert engine.block_manager.num_cache_hits == hits_before
    assert_idle(engine)


def test_a_step_that_raises_fails_that_steps_requests_and_the_engine_goes_on(tiny_runner, clean):
    engine = make_engine(tiny_runner, max_num_batched_tokens=16, max_num_seqs=2)
    engine.runner.fault_injector = FaultInjector(fail_executes={2})
    _submit(engine, WORKLOAD)
    outputs, failed = {}, None
    for _ in range(200):
        if not engine.has_unfinished:
            break
        try:
            deltas = engine.step()
        except StepFailed as e:
            assert failed is None and isinstance(e.error, InjectedFault)
            failed = e.request_ids
            continue
        outputs.update({d.request_id: d.output for d in deltas if d.is_finished})
    assert failed and set(failed) | set(outputs) == {rid for rid, _, _ in WORKLOAD}
    assert not set(failed) & set(outputs)
    assert _tokens(outputs) == {k: clean[k] for k in outputs}
    assert_idle(engine)
    assert engine.metrics()["num_failed_steps"] == 1
    assert engine.metrics()["num_requests_failed"] == len(failed)
    # New requests after the failure: the right tokens.
    _submit(engine, WORKLOAD, "-new")
    assert _tokens(run_to_end(engine), "-new") == clean
    assert_idle(engine)


def test_async_engine_surfaces_both_faults_to_their_readers_only(tiny_runner, clean):
    engine = make_engine(tiny_runner, max_num_batched_tokens=16, max_num_seqs=4)
    async_engine = AsyncEngine(engine)
    try:
        engine.runner.fault_injector = FaultInjector(nonfinite={"victim": math.nan})
        streams = async_engine.add_requests([new(p, n, rid) for rid, p, n in WORKLOAD])
        for stream in streams:
            if stream.request_id == "victim":
                with pytest.raises(NonFiniteOutput, match="non-finite"):
                    stream.result(timeout=60)
            else:
                assert stream.result(timeout=60).token_ids == clean[stream.request_id]
        # A step that raises: every request of that step gets the error; the next ones serve.
        engine_calls = async_engine.call(lambda e: e.runner.fault_injector.num_executes)
        async_engine.call(lambda e: e.runner.fault_injector.fail_executes.add(engine_calls))
        streams = async_engine.add_requests([new(p, n, rid + "-b") for rid, p, n in WORKLOAD])
        num_failed = 0
        for stream in streams:  # the first step holds the 16 tokens it could admit
            try:
                assert stream.result(timeout=60).token_ids == clean[stream.request_id[:-2]]
            except InjectedFault:
                num_failed += 1
        assert num_failed >= 1
        streams = async_engine.add_requests([new(p, n, rid + "-c") for rid, p, n in WORKLOAD])
        assert {s.request_id[:-2]: s.result(timeout=60).token_ids for s in streams} == clean
        assert async_engine.num_unfinished == 0
        metrics = async_engine.metrics()
        assert metrics["num_failed_steps"] == 1 and metrics["num_requests_tracked"] == 0
        assert metrics["num_requests_failed"] == 1 + num_failed  # the victim and the failed step's requests
        async_engine.call(assert_idle)
    finally:
        async_engine.shutdown()


def _seq(rid, tokens, start, pages, offsets=None):
    return ScheduledSequence(request_id=rid, token_ids=tuple(tokens), start_position=start, page_ids=tuple(pages),
                             sample_offsets=(len(tokens) - 1,) if offsets is None else offsets, temperature=0.0,
                             top_k=0, top_p=1.0, min_p=0.0, seed=0)


def test_the_fault_array_exists_only_when_a_fault_is_injected():
    config = input_batch.BatchConfig(page_size=4, num_pages=8, vocab_size=50, max_positions=64)
    step = StepInput(sequences=(_seq("a", [1], 4, [0, 1]), _seq("b", [2, 3, 4], 0, [2])))
    plain = input_batch.build_batch(step, config)
    assert plain.device.fault is None
    assert input_batch.build_batch(step, config, {"zzz": math.nan}).device.fault is None  # not in this step
    assert input_batch.build_batch(step, config, {"zzz": math.nan}).shape_key == plain.shape_key
    faulty = input_batch.build_batch(step, config, {"b": math.inf})
    assert faulty.shape_key != plain.shape_key
    fault = faulty.device.fault
    # b's three tokens (after a's decode) get Inf; a's token and the padding get 0.
    np.testing.assert_array_equal(fault, [0.0, np.inf, np.inf, np.inf])
    with pytest.raises(ValueError, match="nonfinite"):
        FaultInjector(nonfinite={"a": 1.0})


def test_finite_flags_travel_through_unpacking_and_microbatch_merging():
    config = input_batch.BatchConfig(page_size=4, num_pages=8, vocab_size=50, max_positions=64)
    batch = input_batch.build_batch(StepInput(sequences=(_seq("a", [1], 4, [0, 1]), _seq("b", [2, 3], 0, [2]))),
                                    config)
    out = input_batch.unpack_outputs(batch, np.array([5, 6]), np.zeros(2), np.zeros((2, 0)), np.zeros((2, 0)),
                                     np.zeros(0), finite=np.array([True, False]))
    assert out["a"].finite and not out["b"].finite
    merged = microbatches.merge_outputs([{"b": SequenceOutput(request_id="b", token_ids=())},
                                         {"b": out["b"]}])
    assert not merged["b"].finite and merged["b"].token_ids == (6,)


class _Channel:
    def __init__(self):
        self.sent = []

    def send(self, data):
        self.sent.append(data)


def test_the_multi_process_runner_refuses_fault_injection(tiny_runner):
    channel = _Channel()
    runner = BroadcastingRunner(tiny_runner, channel, peer_check_s=0.0)
    tiny_runner.fault_injector = FaultInjector(fail_executes={0})
    try:
        with pytest.raises(ValueError, match="fault_injector"):
            runner.execute(StepInput(sequences=(_seq("a", [1, 2], 0, [0]),)))
        assert channel.sent == []  # refused before anything reached the other processes
    finally:
        tiny_runner.fault_injector = None


@pytest.mark.slow
def test_the_pipeline_runner_carries_the_finite_flags_and_step_faults():
    # Slow: a second process with 2 fake devices compiles every stage program (~50 s here).
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(here, "pipeline_faults.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("PASS"), proc.stdout[-2000:] + proc.stderr[-4000:]
