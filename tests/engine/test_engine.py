"""The serving engine on 64 mixed requests: chunking, preemption, prefix caching, batch
invariance with requests joining and leaving, bounded compilation. HF is the oracle."""
from __future__ import annotations

import numpy as np
import pytest

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams

NUM_REQUESTS = 64


def _workload(seed, shared_prefix_len=0, num=NUM_REQUESTS):
    rng = np.random.RandomState(seed)
    prefix = rng.randint(3, hf_models.VOCAB, size=shared_prefix_len).tolist()
    prompts, params = [], []
    for _ in range(num):
        prompts.append(prefix + rng.randint(3, hf_models.VOCAB, size=rng.randint(1, 40)).tolist())
        params.append(SamplingParams(max_tokens=int(rng.randint(1, 12)), temperature=0.0, ignore_eos=True))
    return prompts, params


def _check(session, prompts, params, oracle_generate):
    outs = session.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == oracle_generate(p, sp.max_tokens)
    m = session.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    return m


# tiny_pool (preemption) in the default run; the chunking and shared-prefix variants are
# `-m slow` (~50 s each on the 2-core CI; both paths have their own default tests).
@pytest.mark.parametrize("case", [pytest.param("tiny_budget", marks=pytest.mark.slow), "tiny_pool",
                                  pytest.param("shared_prefix", marks=pytest.mark.slow)])
def test_64_requests_equal_hf(case, oracle):
    path, generate = oracle
    if case == "tiny_budget":
        prompts, params = _workload(0)
        engine = EngineConfig(page_size=4, max_num_batched_tokens=6, max_num_seqs=16)
    elif case == "tiny_pool":
        prompts, params = _workload(1)
        engine = EngineConfig(page_size=4, num_pages=24, max_num_batched_tokens=64)
    else:
        prompts, params = _workload(2, shared_prefix_len=24)
        engine = EngineConfig(page_size=4, max_num_batched_tokens=64, max_num_seqs=8)
    session = InferenceSession.from_pretrained(path, engine=engine)
    m = _check(session, prompts, params, generate)
    if case == "tiny_budget":
        assert m["mean_batch_tokens"] <= 6
    if case == "tiny_pool":
        assert m["num_preemptions"] > 0
    if case == "shared_prefix":
        # Every request after the first 8 finds at least the 6 shared full pages cached.
        assert m["prefix_cache_hits"] >= (NUM_REQUESTS - 8) * 24
        assert 0 < m["prefix_cache_hit_rate"] < 1


def test_prefix_cache_respects_the_salt_and_survives_preemption(oracle):
    path, generate = oracle
    prompts, params = _workload(3, shared_prefix_len=16, num=6)
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, max_num_seqs=1))
    session.generate(prompts[:1], params[:1], cache_salt="tenant-a")
    before = session.metrics()["prefix_cache_hits"]
    session.generate(prompts[1:2], params[1:2], cache_salt="tenant-b")
    assert session.metrics()["prefix_cache_hits"] == before  # other tenant: no sharing
    outs = session.generate(prompts[2:], params[2:], cache_salt="tenant-a")
    assert session.metrics()["prefix_cache_hits"] >= before + 4 * 16
    for p, sp, o in zip(prompts[2:], params[2:], outs):
        assert o.token_ids == generate(p, sp.max_tokens)


def test_priorities_admit_urgent_requests_first(oracle):
    path, _ = oracle
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(max_num_seqs=1))
    engine = session.engine
    low = engine.add_request([5, 6, 7], SamplingParams(max_tokens=2, temperature=0), priority=5)
    mid = engine.add_request([5, 6, 8], SamplingParams(max_tokens=2, temperature=0), priority=1)
    high = engine.add_request([5, 6, 9], SamplingParams(max_tokens=2, temperature=0), priority=-3)
    order = []
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.is_finished:
                order.append(delta.request_id)
    assert order == [high, mid, low]


NEEDLE = [1, 17, 33, 49, 65, 81, 97, 113]
NEEDLE_PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, seed=11, ignore_eos=True),
]


def _run_needles(path, needles_params):
    """Each needle alone, then all of them in one engine while others join mid-decode
    (with their own lengths, knobs and seeds) and leave: (alone, batched, streamed, engine)."""
    alone_session = InferenceSession.from_pretrained(path)
    alone = [alone_session.generate([NEEDLE], p)[0].token_ids for p in needles_params]

    session = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, max_num_batched_tokens=16))
    engine = session.engine
    rng = np.random.RandomState(5)
    needle_ids = [engine.add_request(NEEDLE, p) for p in needles_params]
    outputs, streamed = {}, {i: [] for i in needle_ids}
    step = 0
    while len(outputs) < len(needle_ids):
        if step % 3 == 0:
            for _ in range(rng.randint(1, 4)):
                engine.add_request(rng.randint(3, hf_models.VOCAB, size=rng.randint(1, 30)).tolist(),
                                   SamplingParams(max_tokens=int(rng.randint(1, 10)), temperature=float(rng.rand()),
                                                  seed=int(rng.randint(1000)), ignore_eos=True))
        for delta in engine.step():
            if delta.request_id in streamed:
                streamed[delta.request_id] += delta.token_ids
                if delta.is_finished:
                    outputs[delta.request_id] = delta.output
        step += 1
    return (alone, [outputs[i].token_ids for i in needle_ids], [streamed[i] for i in needle_ids], engine)


# The default run's needle check is tests/engine/test_batch_invariance_trials.py (greedy
# and seeded sampled needles, streamed and final tokens); each parameter set alone here
# is `-m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("needle_params", NEEDLE_PARAMS)
def test_needle_is_batch_invariant_while_others_join_and_leave(oracle, needle_params):
    (alone,), (batched,), (streamed,), engine = _run_needles(oracle[0], [needle_params])
    assert batched == alone and streamed == alone
    assert engine.metrics()["mean_batch_seqs"] > 1.5


# 24 requests: greedy and sampled steps, 2 to 32 tokens, up to 16 sample rows, query
# blocks 1 to 32: 18 programs. 48 requests (25 programs, ~30 s more on the 2-core CI) are
# `-m slow`.
@pytest.mark.parametrize("num_requests", [24, pytest.param(48, marks=pytest.mark.slow)])
def test_compiles_are_bounded_and_a_warm_rerun_compiles_nothing(oracle, num_requests):
    path, _ = oracle
    # No prefix caching: the rerun must schedule exactly the same shapes.
    engine_config = EngineConfig(page_size=4, max_num_batched_tokens=32, max_num_seqs=16,
                                 enable_prefix_caching=False)
    session = InferenceSession.from_pretrained(path, engine=engine_config)
    prompts, params = _workload(7, num=num_requests)
    params = [p if i % 3 else SamplingParams(max_tokens=p.max_tokens, temperature=0.7, seed=i, ignore_eos=True)
              for i, p in enumerate(params)]
    session.generate(prompts, params)
    first = session.metrics()["num_compiles"]
    # The bucket lists bound the count: tokens {16, 32} x seqs {4, 8, 16} x query block
    # {1, 2, 4, 8, 16, 32} x pages/seq {1, 2, 4, 8, 16} x greedy {yes, no}.
    assert first <= 2 * 3 * 6 * 5 * 2
    session.generate(prompts, params)
    assert session.metrics()["num_compiles"] == first
