"""Sampling additions for the OpenAI / vLLM APIs: penalties, logit_bias, min_tokens, n
samples sharing the prompt's pages, queue_time. The host rules over a scripted runner;
the device path on the tiny HF Llama against a host-side reference loop (HF logits)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from jaxinfer.config import EngineConfig, SamplingParams
from jaxinfer.engine.async_engine import AsyncEngine
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.validation import NewRequest, sample_seed

EOS = 2


def _run(engine, requests):
    """Queues NewRequests and steps until all finish; RequestOutputs in id order."""
    ids = engine.add_requests(requests)
    outs = {}
    while engine.has_unfinished:
        for delta in engine.step():
            if delta.is_finished:
                outs[delta.request_id] = delta.output
    return [outs[i] for i in ids]


def _new(prompt, request_id=None, **params):
    return NewRequest(prompt_ids=list(prompt), params=SamplingParams(**params), request_id=request_id)


# ------------------------------------------------------------------ host rules (no model)


class _Tok:
    PIECES = {0: "</s>", 1: "a", 3: "END", 4: "c"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids if not (skip_special_tokens and i == 0))


def test_min_tokens_bans_reach_the_step_and_hold_the_host_stops(scripted_engine):
    engine = scripted_engine({"r": [EOS, 9, 5, EOS, 5]}, eos_token_ids=(EOS,))
    (out,) = _run(engine, [_new([5, 6, 7], "r", max_tokens=8, min_tokens=3, stop_token_ids=[9])])
    assert out.token_ids == [EOS, 9, 5, EOS] and out.finish_reason == "eos"  # the 4th may end it
    seqs = [s for step in engine.runner.steps for s in step.sequences]
    assert [s.banned_token_ids for s in seqs] == [(EOS, 9)] * 3 + [()]
    assert {s.ban_until_position for s in seqs} == {6}
    # ignore_eos: only the stop ids are banned; nothing set without min_tokens.
    engine = scripted_engine(eos_token_ids=(EOS,))
    _run(engine, [_new([5], "a", max_tokens=2, min_tokens=1, stop_token_ids=[9], ignore_eos=True),
                  _new([5], "b", max_tokens=2, stop_token_ids=[9])])
    first = {s.request_id: s for s in engine.runner.steps[0].sequences}
    assert first["a"].banned_token_ids == (9,) and first["b"].banned_token_ids == ()


def test_stop_strings_are_not_checked_before_min_tokens(scripted_engine):
    engine = scripted_engine({"r": [3, 1, 3, 1, 1]}, tokenizer=_Tok(), eos_token_ids=(0,))
    (out,) = _run(engine, [_new([4], "r", max_tokens=6, min_tokens=2, stop=["END"])])
    assert out.text == "ENDa" and out.token_ids == [3, 1, 3] and out.finish_reason == "stop"


def test_penalty_history_and_bias_only_when_asked(scripted_engine):
    engine = scripted_engine({"p": [8, 9]}, max_num_batched_tokens=4)
    _run(engine, [_new(range(3, 9), "p", max_tokens=3, presence_penalty=0.5, logit_bias={"7": 1.5}),
                  _new([3, 4], "q", max_tokens=2)])
    seqs = [s for step in engine.runner.steps for s in step.sequences if s.request_id == "p"]
    assert [s.sample_offsets != () for s in seqs] == [False, True, True, True]
    assert seqs[0].prompt_token_ids == () and seqs[0].logit_bias == ()  # a mid-prompt chunk samples nothing
    assert [s.output_token_ids for s in seqs[1:]] == [(), (8,), (8, 9)]
    assert seqs[1].prompt_token_ids == (3, 4, 5, 6, 7, 8) and seqs[1].logit_bias == ((7, 1.5),)
    q = [s for step in engine.runner.steps for s in step.sequences if s.request_id == "q"]
    assert all(s.prompt_token_ids == () and s.logit_bias == () for s in q)


def test_n_samples_wait_for_the_prompt_then_share_its_pages(scripted_engine):
    engine = scripted_engine()
    prompt = list(range(3, 13))  # 10 tokens: 2 full pages of 4, then a partial one
    ids = engine.add_requests([_new(prompt, "p", max_tokens=3, n=3, seed=5, temperature=1.0)])
    assert ids == ["p-0", "p-1", "p-2"]
    reqs = [engine.requests[i] for i in ids]
    assert [r.seed for r in reqs] == [5, sample_seed(5, 1), sample_seed(5, 2)] and len({r.seed for r in reqs}) == 3
    assert all(r.params.n == 1 for r in reqs)
    deltas = engine.step()
    assert [s.request_id for s in engine.runner.steps[0].sequences] == ["p-0"]
    engine.step()
    seqs = {s.request_id: s for s in engine.runner.steps[1].sequences}
    for rid in ("p-1", "p-2"):
        assert seqs[rid].start_position == 8 and seqs[rid].token_ids == (11, 12)  # only the last page recomputed
        assert seqs[rid].page_ids[:2] == seqs["p-0"].page_ids[:2]
    outs = []
    while engine.has_unfinished:
        deltas += engine.step()
    outs = [d.output for d in deltas if d.is_finished]
    assert sorted((o.request_id, o.index, o.parent_request_id) for o in outs) == [
        ("p-0", 0, "p"), ("p-1", 1, "p"), ("p-2", 2, "p")]
    assert all(d.parent_request_id == "p" for d in deltas)
    m = engine.metrics()
    assert m["prefix_cache_hits"] == 2 * 8 and m["num_free_pages"] == m["num_total_pages"]


def test_n_samples_without_prefix_caching_run_at_once(scripted_engine):
    engine = scripted_engine(enable_prefix_caching=False)
    ids = engine.add_requests([_new(range(3, 13), max_tokens=2, n=2), _new([3], max_tokens=1)])
    assert len(ids) == 3 and ids[0].endswith("-0") and ids[1].endswith("-1")
    engine.step()
    assert [s.request_id for s in engine.runner.steps[0].sequences] == ids


def test_sample_ids_in_use_are_refused_and_nothing_is_queued(scripted_engine):
    engine = scripted_engine()
    engine.add_requests([_new([3], "x-1", max_tokens=4)])
    with pytest.raises(ValueError, match=r"request_id\[1\]: 'x-1' is already in use"):
        engine.add_requests([_new([3], "y", max_tokens=4), _new([3], "x", max_tokens=4, n=2)])
    assert list(engine.requests) == ["x-1"]


def test_queue_time_counts_the_wait_for_admission(scripted_engine):
    engine = scripted_engine(max_num_seqs=1)
    first, second = _run(engine, [_new([3, 4], max_tokens=3), _new([5, 6], max_tokens=3)])
    assert 0 <= first.queue_time < second.queue_time
    assert second.queue_time <= second.time_to_first_token


def test_validation_names_logit_bias_ids_outside_the_vocabulary(scripted_engine):
    engine = scripted_engine()  # vocabulary of 64
    with pytest.raises(ValueError, match=r"^params\[1\]\.logit_bias: token id 64 outside the vocabulary"):
        engine.add_requests([_new([3], max_tokens=2), _new([3], max_tokens=2, logit_bias={64: 1.0})])
    assert not engine.requests


def test_async_engine_streams_per_sample_and_aborts_by_parent(scripted_engine):
    engine = scripted_engine()
    gate, execute = threading.Event(), engine.runner.execute
    engine.runner.execute = lambda step_input: (gate.wait(30), execute(step_input))[1]
    ae = AsyncEngine(engine)
    try:
        streams = ae.add_requests([_new([3, 4, 5], "p", max_tokens=50, n=3), _new([3], max_tokens=50)])
        assert [s.request_id for s in streams[:3]] == ["p-0", "p-1", "p-2"]
        assert [s.parent_id for s in streams] == ["p", "p", "p", None]
        with pytest.raises(ValueError, match="'p' is already in use"):
            ae.add_requests([_new([3], "p", max_tokens=2)])
        ae.abort("p")
        gate.set()
        outs = [s.result(30) for s in streams[:3]]
        assert [o.finish_reason for o in outs] == ["abort"] * 3 and [o.index for o in outs] == [0, 1, 2]
        assert streams[3].result(30).finish_reason == "length"
    finally:
        gate.set()
        ae.shutdown()


# ------------------------------------------------------------------ the device path (tiny HF Llama)


@pytest.fixture(scope="module")
def model(hf_model_dir):
    """(engine factory, HF torch model); one runner (and its compiled programs) for the module."""
    from jaxinfer.models import checkpoint
    from jaxinfer.runtime.model_runner import ModelRunner
    path, hf = hf_model_dir("llama")
    config, params, _ = checkpoint.load_model(path, "float32")
    runner = ModelRunner(config, params, page_size=16, num_pages=48)

    def make(**fields):
        fields = {"page_size": 16, "num_pages": 48, "max_num_batched_tokens": 256, **fields}
        return Engine(config, runner, EngineConfig(**fields), eos_token_ids=(EOS,))
    return make, hf


def _reference(logits, prompt, output, presence=0.0, frequency=0.0, repetition=1.0, bias=()):
    out = np.array(logits, np.float64)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    counts = np.bincount(np.asarray(output, np.int64), minlength=out.size)
    out -= frequency * counts + presence * (counts > 0)
    for t, b in bias:
        out[t] += b
    return out


def _reference_greedy(hf, prompt, max_tokens, **knobs):
    """Greedy decoding with the processing applied to HF's logits on the host."""
    output = []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([list(prompt) + output])).logits[0, -1].numpy()
        output.append(int(np.argmax(_reference(logits, prompt, output, **knobs))))
    return output


PROMPTS = [[1, 17, 33, 49, 65, 81], [1, 5, 9, 5, 9, 5, 9, 40], [1, 100, 7]]


def test_greedy_processing_equals_the_host_reference_and_min_tokens_holds_eos(model):
    make, hf = model
    cases = [dict(repetition_penalty=2.0), dict(presence_penalty=1.5, frequency_penalty=1.0),
             dict(repetition_penalty=0.8, frequency_penalty=0.5, logit_bias={11: 3.0, 12: -4.0}), {}]
    requests = [_new(p, max_tokens=8, temperature=0.0, ignore_eos=True, **c) for p in PROMPTS for c in cases]
    prompt = PROMPTS[0]
    requests += [
        _new(prompt, max_tokens=8, temperature=0.0, logit_bias={EOS: 100.0}),
        _new(prompt, max_tokens=8, temperature=0.0, logit_bias={EOS: 100.0}, min_tokens=5, logprobs=True),
        _new(prompt, max_tokens=8, temperature=0.7, seed=1, logit_bias={7: 100.0}, stop_token_ids=[7],
             min_tokens=3, ignore_eos=True),
        _new(prompt, max_tokens=8, temperature=1.0, seed=2, logit_bias={5: 100.0}, ignore_eos=True, logprobs=True),
    ]
    outs = _run(make(), requests)
    for r, out in zip(requests, outs[:len(PROMPTS) * len(cases)]):
        p = r.params
        expected = _reference_greedy(hf, r.prompt_ids, 8, presence=p.presence_penalty,
                                     frequency=p.frequency_penalty, repetition=p.repetition_penalty,
                                     bias=p.logit_bias)
        assert out.token_ids == expected, (r.prompt_ids, p)
    # PROMPTS[1]'s plain greedy output repeats 82: the repetition penalty changes it.
    assert outs[len(cases)].token_ids != outs[2 * len(cases) - 1].token_ids

    eos_forced, held, stop_held, forced = outs[len(PROMPTS) * len(cases):]
    assert eos_forced.token_ids == [EOS] and eos_forced.finish_reason == "eos"
    assert len(held.token_ids) == 6 and EOS not in held.token_ids[:5] and held.token_ids[5] == EOS
    assert held.finish_reason == "eos"
    assert len(stop_held.token_ids) == 4 and stop_held.token_ids[3] == 7 and stop_held.finish_reason == "stop"
    assert forced.token_ids == [5] * 8  # logit_bias +100 forces a token
    with torch.no_grad():
        raw = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], -1).numpy()
    assert forced.logprobs[0] == pytest.approx(float(raw[5]), abs=1e-4) and forced.logprobs[0] < -1  # raw log p


def test_seeded_features_and_n_samples_are_batch_invariant_and_share_pages(model):
    make, _ = model
    needle = _new([1, 17, 33, 49, 65, 81, 97, 113], max_tokens=8, temperature=0.9, top_k=30, seed=3,
                  presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3,
                  logit_bias={5: 2.0, 9: -5.0}, min_tokens=6, stop_token_ids=[11], logprobs=True)
    (alone,) = _run(make(), [needle])
    assert 11 not in alone.token_ids[:6]

    prompt = list(range(1, 160, 8))  # 20 tokens: one full page of 16, then 4
    p = _new(prompt, "p", max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True, presence_penalty=0.5)
    single = _new(prompt, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True, presence_penalty=0.5)
    rng = np.random.RandomState(0)
    others = [_new(rng.randint(3, 150, size=rng.randint(1, 9)).tolist(), max_tokens=int(rng.randint(6, 9)),
                   temperature=float(rng.choice([0.0, 1.0])), seed=i, repetition_penalty=float(rng.choice([1, 1.5])),
                   presence_penalty=float(rng.choice([0, -1])), logit_bias={int(rng.randint(150)): 3.0} if i % 2
                   else None, min_tokens=int(rng.randint(0, 2)), ignore_eos=bool(i % 3))
              for i in range(5)]
    runs = []
    for batch in (others[:3] + [needle, p, single] + others[3:], others[::-1] + [single, p, needle]):
        engine = make()
        outs = {o.request_id: o for o in _run(engine, batch)}
        m = engine.metrics()
        # Samples 1 and 2 and `single` (same prompt, waiting for the first one computing it)
        # found the prompt's full page cached.
        assert m["prefix_cache_hits"] == 3 * 16 and m["num_free_pages"] == m["num_total_pages"]
        assert m["num_prefix_waits"] >= 1
        runs.append(outs)
        needle_out = next(o for o in outs.values() if o.prompt_token_ids == needle.prompt_ids)
        assert needle_out.token_ids == alone.token_ids and needle_out.logprobs == pytest.approx(alone.logprobs,
                                                                                                abs=1e-5)
        samples = [outs[f"p-{i}"] for i in range(3)]
        assert [(o.index, o.parent_request_id) for o in samples] == [(0, "p"), (1, "p"), (2, "p")]
        assert len({tuple(o.token_ids) for o in samples}) == 3  # independent samples
        single_out = next(o for o in outs.values() if o.prompt_token_ids == prompt and o.parent_request_id is None)
        assert single_out.token_ids == samples[0].token_ids  # sample 0 keeps the request's seed
    assert [runs[0][f"p-{i}"].token_ids for i in range(3)] == [runs[1][f"p-{i}"].token_ids for i in range(3)]
