"""Splitwise disaggregation in one process (engine/splitwise.py, runtime/kv_transfer.py).

Here both runners sit on the one CPU device of the test process (two pools, two sets
of programs); tests/sharding/engine_checks.py runs the same engine on two meshes of 8
fake devices (TP 2 -> TP 2 and TP 2 -> TP 1) through InferenceSession.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import hf_models
from jaxinfer.config import EngineConfig, SamplingParams, SpeculativeConfig
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.splitwise import SplitwiseEngine
from jaxinfer.engine.validation import NewRequest
from jaxinfer.models import checkpoint
from jaxinfer.runtime.model_runner import ModelRunner


@pytest.fixture(scope="module")
def model(oracle):
    path, generate = oracle
    config, params, _ = checkpoint.load_model(path, "float32")
    return config, params, generate


@pytest.fixture(scope="module")
def runners(model):
    """A prefill and a decode runner of 64 pages of 4, shared by the tests (each builds its
    own SplitwiseEngine, i.e. fresh page pools' bookkeeping, over them): their compiled
    programs are reused, and stale page contents are never read (pages are written
    before they are attended)."""
    config, params, _ = model
    return tuple(ModelRunner(config, params, page_size=4, num_pages=64) for _ in range(2))


def _splitwise(model, runners=None, decode_pages=64, **fields):
    config, params, _ = model
    fields.setdefault("page_size", 4)
    engine_config = EngineConfig(**fields)
    if runners is None:
        runners = [ModelRunner(config, params, page_size=fields["page_size"], num_pages=n) for n in (64, decode_pages)]
    return SplitwiseEngine(config, *runners, engine_config)


def _run(engine, prompts, params, abort_after=None):
    ids = engine.add_requests([NewRequest(prompt_ids=p, params=sp) for p, sp in zip(prompts, params)])
    outs, steps = {}, 0
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.finish_reason:
                outs[delta.request_id] = delta.output
        steps += 1
        if abort_after and steps == abort_after[0]:
            for request_id in abort_after[1]:
                delta = engine.abort(ids[request_id])
                if delta is not None:
                    outs[delta.request_id] = delta.output
        assert steps < 2000
    return [outs[i] for i in ids]


def _workload(seed, num=12, prefix=0):
    rng = np.random.RandomState(seed)
    shared = rng.randint(3, hf_models.VOCAB, size=prefix).tolist()
    prompts = [shared + rng.randint(3, hf_models.VOCAB, size=rng.randint(2, 30)).tolist() for _ in range(num)]
    params = [SamplingParams(max_tokens=int(rng.randint(1, 10)), temperature=0.0, ignore_eos=True)
              for _ in range(num)]
    return prompts, params


def _no_leak(engine):
    m = engine.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], m
    assert m["num_decode_reservations"] == 0 and m["num_running"] == 0 and m["num_waiting"] == 0
    return m


@pytest.mark.parametrize("case", ["chunked", "small_decode_pool"])
def test_greedy_tokens_equal_hf(model, runners, case):
    generate = model[2]
    prompts, params = _workload(0)
    if case == "chunked":  # prompts in chunks of 8 tokens; decodes beside them on the other side
        engine = _splitwise(model, runners, max_num_batched_tokens=8, max_num_seqs=6)
    else:  # 12 decode pages: prompts wait for decode reservations, decodes get preempted
        engine = _splitwise(model, decode_pages=12, max_num_batched_tokens=32)
    outs = _run(engine, prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == generate(p, sp.max_tokens)
    m = _no_leak(engine)
    handed_off = sum(sp.max_tokens > 1 for sp in params)  # max_tokens 1 ends in the prefill step
    assert m["num_kv_transfers"] >= handed_off and m["kv_transfer_bytes"] > 0
    assert m["ttft_num_requests"] == m["num_kv_transfers"] and m["ttft_transfer_seconds"] > 0
    if case == "small_decode_pool":
        assert m["num_preemptions"] > 0


def test_seeded_sampling_equals_the_colocated_engine(model, runners):
    config, params, _ = model
    prompts, _ = _workload(1, num=6)
    sampled = [SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True) for i in range(6)]
    colocated = Engine(config, ModelRunner(config, params, page_size=4, num_pages=64), EngineConfig(page_size=4))
    want = [o.token_ids for o in _run(colocated, prompts, sampled)]
    assert [o.token_ids for o in _run(_splitwise(model, runners), prompts, sampled)] == want


def test_decodes_go_on_while_a_prefill_step_is_in_flight(model, runners):
    """The decode loop does not wait for a prefill step: while one is held in flight
    (its runner blocked on an event), every step() call runs a decode step and streams
    tokens; an abort meanwhile is skipped when the step lands; tokens equal HF."""
    generate = model[2]
    engine = _splitwise(model, runners, max_num_batched_tokens=64)
    rng = np.random.RandomState(5)
    short, long_prompt, dropped = (rng.randint(3, hf_models.VOCAB, size=n).tolist() for n in (6, 40, 30))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    (a,) = engine.add_requests([NewRequest(prompt_ids=short, params=params)])
    got = {a: []}
    while len(got[a]) < 2:  # A is decoding on the decode side
        for delta in engine.step():
            got[delta.request_id] = got.get(delta.request_id, []) + list(delta.token_ids)
    release, entered = threading.Event(), threading.Event()
    execute = runners[0].execute

    def held(step_input):
        entered.set()
        assert release.wait(60), "the test never released the prefill step"
        return execute(step_input)
    runners[0].execute = held
    try:
        b, c = engine.add_requests([NewRequest(prompt_ids=long_prompt, params=params),
                                    NewRequest(prompt_ids=dropped, params=params)])
        before = len(got[a])
        for _ in range(3):  # the prefill step of B and C stays in flight
            for delta in engine.step():
                got[delta.request_id] = got.get(delta.request_id, []) + list(delta.token_ids)
        assert entered.is_set() and len(got[a]) == before + 3
        assert engine.metrics()["decode_steps_beside_prefill"] == 3
        engine.abort(c)
    finally:
        release.set()
        runners[0].execute = execute
    while engine.has_unfinished:
        for delta in engine.step():
            got[delta.request_id] = got.get(delta.request_id, []) + list(delta.token_ids)
    assert got[a] == generate(short, 12) and got[b] == generate(long_prompt, 12)
    assert not got.get(c)
    _no_leak(engine)


def test_a_prefix_cached_on_the_decode_side_is_not_sent_again(model, runners):
    prompts, params = _workload(2, num=2, prefix=16)  # 4 shared full pages of 4
    params = [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)] * 2
    engine = _splitwise(model, runners)
    _run(engine, prompts[:1], params[:1])
    first = engine.metrics()["kv_transfer_bytes"]
    _run(engine, prompts[1:], params[1:])
    second = engine.metrics()["kv_transfer_bytes"] - first
    page_bytes = engine.transfer.page_bytes
    pages = [engine.block_manager.pages_needed(len(p)) for p in prompts]
    assert first == pages[0] * page_bytes
    assert second == (pages[1] - 4) * page_bytes  # the 4 shared pages were on the decode side already
    assert engine.metrics()["prefix_cache_hits"] > 0  # and the prefill side reused them too
    _no_leak(engine)


def test_aborts_release_both_sides_and_a_failed_copy_fails_one_request(model, runners):
    prompts, params = _workload(3, num=8)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 8
    engine = _splitwise(model, runners, max_num_batched_tokens=8)
    outs = _run(engine, prompts, params, abort_after=(3, [0, 5, 7]))
    assert sum(o.finish_reason == "abort" for o in outs) >= 1
    _no_leak(engine)
    # A copy that raises fails its request alone; the others finish.
    engine = _splitwise(model, runners)
    copy = engine.transfer
    calls = []

    def flaky(src, dst):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("link down")
        return copy(src, dst)
    engine.transfer = flaky
    engine.add_requests([NewRequest(prompt_ids=p, params=sp) for p, sp in zip(prompts[:4], params[:4])])
    while engine.has_unfinished:
        engine.step()
    errors = engine.take_errors()
    assert len(errors) == 1 and "link down" in str(next(iter(errors.values())))
    m = _no_leak(engine)
    assert m["num_requests_failed"] == 1 and m["num_requests_finished"] == 3


def test_configurations_it_does_not_run_are_refused(model):
    with pytest.raises(ValueError, match="disaggregation"):
        _splitwise(model, speculative=SpeculativeConfig(method="ngram"))
    with pytest.raises(ValueError, match="disaggregation"):
        _splitwise(model, preemption_mode="swap")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(disaggregation="splitwise", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_prefill_devices"):
        EngineConfig(disaggregation="splitwise", num_prefill_devices=2)
    with pytest.raises(ValueError, match="num_prefill_devices \\+ decode_tensor_parallel_size"):
        from jaxinfer import InferenceSession
        InferenceSession.from_pretrained("tiny-code", engine=EngineConfig(disaggregation="splitwise"))


def test_warmup_compiles_each_key_on_both_runners(model):
    engine = _splitwise(model, max_num_seqs=2, max_num_batched_tokens=8)  # own runners: nothing compiled yet
    keys = engine.warmup_grid(16)[:2]
    calls = []
    report = engine.warmup(keys, on_program=lambda: calls.append(1))
    assert report["programs"] == 2 and report["compiled"] == 4 and len(calls) == 2
    assert engine.runner is not engine.decode_runner
