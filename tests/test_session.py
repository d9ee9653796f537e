"""InferenceSession end to end on tiny models: API, validation, stops, seeds, isolation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jaxinfer import EngineConfig, InferenceSession, SamplingParams
from jaxinfer.models import checkpoint
from jaxinfer.models.tokenizer import load_tokenizer

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def session(text_model_dir):
    return InferenceSession.from_pretrained(text_model_dir[0], dtype="float32")


def _prompts(n, seed=0, vocab=300, lo=1, hi=20):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, vocab, size=rng.randint(lo, hi)).tolist() for _ in range(n)]


def _assert_idle(session):
    m = session.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    assert session.async_engine.num_unfinished == 0
    assert session.async_engine.call(lambda engine: not engine.has_unfinished and not engine.requests)


def test_text_prompts_and_outputs(session):
    outs = session.generate(["def add(a, b):", "for i in range(10):"], GREEDY)
    tok = session.tokenizer
    for o, prompt in zip(outs, ["def add(a, b):", "for i in range(10):"]):
        assert o.prompt_token_ids == tok.encode(prompt)
        assert o.prompt_token_ids[0] == tok.bos_token_id
        assert len(o.token_ids) == 24 and o.finish_reason == "length"
        full = tok.decode(o.prompt_token_ids + o.token_ids)
        assert full.endswith(o.text) and o.text
    _assert_idle(session)


def test_stream_pieces_concatenate_to_the_generated_text(session):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    stream = session.stream("class Point:", params)
    pieces = list(stream)
    (out,) = session.generate(["class Point:"], params)
    assert len(pieces) > 1
    assert "".join(pieces) == out.text
    assert stream.output.token_ids == out.token_ids and stream.output.finish_reason == "length"


def test_stream_abandoned_early_frees_its_pages(session):
    stream = session.stream("import os", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    next(stream)
    stream.close()
    _assert_idle(session)


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_invalid_prompts_are_rejected_without_disturbing_the_engine(session):
    vocab = session.model_config.vocab_size
    cases = [
        ([[5, vocab]], "vocabulary"),
        ([[5, -1]], "vocabulary"),
        ([[]], "empty prompt"),
        ([""], "empty prompt"),
        ([[1, 2, 3]], None),  # placeholder replaced below: too long for the context
        ("just a string", "list of prompts"),
        ([3.5], "prompts\\[0\\]"),
    ]
    cases[4] = ([[5] * 200], "max_tokens")
    for prompts, match in cases:
        with pytest.raises(ValueError, match=match):
            session.generate(prompts, SamplingParams(max_tokens=100))
        _assert_idle(session)
    # A bad prompt in a batch rejects the call before any prompt is queued.
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        session.generate([[5, 6], [7, vocab + 3]], GREEDY)
    _assert_idle(session)
    with pytest.raises(ValueError, match="params"):
        session.generate([[5], [6]], [GREEDY])
    with pytest.raises(ValueError, match="stop_token_ids"):
        session.generate([[5]], SamplingParams(stop_token_ids=[vocab + 1]))
    _assert_idle(session)
    assert len(session.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 24


def test_stop_strings_stop_token_ids_and_eos(session, text_model_dir):
    prompt = "def add(a, b):"
    (ref,) = session.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    # A stop string from the middle of the greedy text: text ends right before it.
    stop = ref.text[10:13]
    (out,) = session.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                       stop=[stop, "never-seen-string"]))
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:ref.text.index(stop)]
    assert ref.token_ids[:len(out.token_ids)] == out.token_ids
    # Streaming never shows text past the stop string.
    pieces = list(session.stream(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                        stop=[stop])))
    assert "".join(pieces) == out.text
    # A stop token id: the output ends with that token (its first occurrence).
    stop_id = ref.token_ids[7]
    (out,) = session.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                                       stop_token_ids=[stop_id]))
    first = ref.token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.token_ids == ref.token_ids[:first + 1]
    # EOS: a session whose EOS is a token the greedy run produces.
    path = text_model_dir[0]
    config, params, _ = checkpoint.load_model(path)
    eos_session = InferenceSession(config, params, tokenizer=load_tokenizer(path), eos_token_ids=[stop_id])
    (out,) = eos_session.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0))
    assert out.finish_reason == "eos" and out.token_ids == ref.token_ids[:first + 1]
    (out,) = eos_session.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert out.finish_reason == "length" and out.token_ids == ref.token_ids


def test_same_seed_same_tokens(session):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=1234)
    a = session.generate([[4, 5, 6]], params)[0].token_ids
    b = session.generate([[4, 5, 6]], params)[0].token_ids
    c = session.generate([[4, 5, 6]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0].token_ids
    assert a == b and a != c


@pytest.mark.parametrize("needle_params", [
    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7, ignore_eos=True),
])
def test_output_does_not_depend_on_the_batch(session, needle_params):
    needle = [9, 40, 41, 42, 43, 44, 45]
    alone = session.generate([needle], needle_params)[0].token_ids
    others = _prompts(7, seed=3)
    other_params = [SamplingParams(max_tokens=int(n), temperature=1.0, seed=int(n), ignore_eos=True)
                    for n in np.random.RandomState(4).randint(1, 30, size=7)]
    outs = session.generate(others[:3] + [needle] + others[3:], other_params[:3] + [needle_params] + other_params[3:])
    assert outs[3].token_ids == alone


# ~30 s of compiles (26 programs over three sessions) for what the default run checks
# against HF in tests/engine/test_engine.py (test_64_requests_equal_hf: tiny_budget chunks
# every prompt, tiny_pool preempts): `-m slow`. The admission refusal is the test after it.
@pytest.mark.slow
def test_chunked_prefill_and_preemption_give_the_same_greedy_tokens(text_model_dir):
    path = text_model_dir[0]
    prompts = _prompts(12, seed=5, hi=40)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ref = InferenceSession.from_pretrained(path).generate(prompts, params)
    # 7-token budget: prompts are split into chunks across steps.
    chunked = InferenceSession.from_pretrained(path, engine=EngineConfig(max_num_batched_tokens=7, page_size=4))
    assert [o.token_ids for o in chunked.generate(prompts, params)] == [o.token_ids for o in ref]
    # 20 pages of 4 tokens for 12 requests of up to 55 tokens: running requests get preempted.
    tight = InferenceSession.from_pretrained(path, engine=EngineConfig(num_pages=20, page_size=4))
    assert [o.token_ids for o in tight.generate(prompts, params)] == [o.token_ids for o in ref]
    assert tight.metrics()["num_preemptions"] > 0
    _assert_idle(tight)
    # A request that can never fit is refused at admission, naming the field.
    with pytest.raises(ValueError, match="max_tokens.*never fit"):
        tight.generate([[5] * 60], SamplingParams(max_tokens=30))


def test_a_request_that_can_never_fit_the_pool_is_refused_at_admission(text_model_dir):
    # 20 pages of 4 tokens: 90 tokens never fit; refused before anything is scheduled.
    tight = InferenceSession.from_pretrained(text_model_dir[0], engine=EngineConfig(num_pages=20, page_size=4))
    with pytest.raises(ValueError, match="max_tokens.*never fit"):
        tight.generate([[5] * 60], SamplingParams(max_tokens=30))
    _assert_idle(tight)
    assert tight.metrics()["num_steps"] == 0


def test_logprobs_and_prompt_logprobs_match_hf(text_model_dir):
    path, hf = text_model_dir
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(max_num_batched_tokens=5))
    prompt = [1, 50, 60, 70, 80, 90, 100, 110, 120]
    (out,) = session.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True,
                                                       logprobs=True, prompt_logprobs=True))
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0]
    lp = torch.log_softmax(logits, dim=-1).numpy()
    seq = prompt + out.token_ids
    want_prompt = [lp[i - 1, seq[i]] for i in range(1, len(prompt))]
    want_gen = [lp[len(prompt) - 1 + j, out.token_ids[j]] for j in range(len(out.token_ids))]
    np.testing.assert_allclose(out.prompt_logprobs, want_prompt, atol=1e-4)
    np.testing.assert_allclose(out.logprobs, want_gen, atol=1e-4)
    assert all(math.isfinite(x) for x in out.logprobs)


def test_metrics_and_engine_config_validation(session):
    m = session.metrics()
    for key in ("num_steps", "num_preemptions", "num_compiles", "num_free_pages", "num_total_pages",
                "weight_bytes"):
        assert key in m
    assert m["weight_bytes"] == sum(x.size * 4 for x in __import__("jax").tree.leaves(session.engine.runner.params))
    for kwargs, field in [(dict(page_size=0), "page_size"), (dict(num_pages=0), "num_pages"),
                          (dict(max_num_seqs=0), "max_num_seqs"), (dict(attention_impl="cuda"), "attention_impl"),
                          (dict(max_num_batched_tokens=-1), "max_num_batched_tokens")]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(**kwargs)
    with pytest.raises(ValueError, match="dtype"):
        InferenceSession.from_pretrained("/nonexistent", dtype="float16")
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        InferenceSession.from_pretrained("/nonexistent")


def test_stop_string_split_across_tokens(session):
    from jaxinfer.engine.detokenizer import IncrementalDetokenizer
    prompt = "for i in range(10):"
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    (ref,) = session.generate([prompt], params)
    # Find a token boundary inside the text and take the 2 characters around it.
    detok = IncrementalDetokenizer(session.tokenizer, ref.prompt_token_ids)
    boundaries, text = [], ""
    for t in ref.token_ids:
        text += detok.add(t)
        boundaries.append(len(text))
    cut = next(b for b in boundaries[2:] if 0 < b < len(ref.text) and ref.text[b - 1:b + 1].strip())
    stop = ref.text[cut - 1:cut + 1]
    (out,) = session.generate([prompt], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                       stop=[stop]))
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:ref.text.index(stop)]
    pieces = list(session.stream(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                        stop=[stop])))
    assert "".join(pieces) == out.text
