"""Speculative decoding (EngineConfig.speculative, engine/speculative.py).

- the acceptance rule, prompt lookup and the counters, on the host;
- the scheduler's side on a scripted runner: drafts after a decode's last token, sampled
  at every offset, accepted as far as they match, rejected slots' pages rolled back,
  drafts never preempting and never exceeding the token budget;
- on a tiny HF Llama: greedy tokens equal to HF for "ngram" and "draft" (a self-draft
  and a different draft model), with chunked prefill and preemption (recompute; swap
  preemption and prefix caching under `-m slow`); seeded sampling gives the same tokens
  as without speculation;
- the distribution of the tokens a verification step emits is the target's (chi-square).
"""
from __future__ import annotations

import numpy as np
import pytest

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams, SpeculativeConfig
from jaxinfer.engine.speculative import SpecCounters, ngram_draft, num_accepted

NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=3, ngram_max=3)


def test_acceptance_rule_and_counters():
    assert num_accepted((5, 6, 7), (5, 6, 9, 4)) == 2
    assert num_accepted((5, 6), (1, 6, 7)) == 0
    assert num_accepted((5, 6), (5, 6, 8)) == 2
    c = SpecCounters()
    c.record(3, 2)
    c.record(2, 0)
    m = c.metrics()
    assert (m["spec_num_drafts"], m["spec_num_draft_tokens"], m["spec_num_accepted_tokens"]) == (2, 5, 2)
    assert m["spec_accepted_per_position"] == [1, 1, 0] and m["spec_acceptance_rate"] == pytest.approx(0.4)
    assert m["spec_mean_accepted_length"] == pytest.approx(2.0)


def test_prompt_lookup_takes_the_longest_ngram_and_its_latest_occurrence():
    ids = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 2, 3]
    # "2 3" occurs at 1 and 6; "4 2 3" nowhere; the latest "2 3" was followed by 7 8 4.
    assert ngram_draft(ids, 3, ngram_max=3, ngram_min=2) == (7, 8, 4)
    assert ngram_draft(ids, 1, ngram_max=3, ngram_min=2) == (7,)
    assert ngram_draft([1, 2, 3, 1, 2], 4, ngram_max=2, ngram_min=2) == (3, 1, 2)  # runs up to the end
    assert ngram_draft([1, 2, 3, 4], 3, ngram_max=3, ngram_min=1) == ()
    assert ngram_draft([5], 3, ngram_max=3, ngram_min=1) == ()
    assert ngram_draft([1, 2, 1, 2], 0, ngram_max=3, ngram_min=1) == ()


def test_config_names_the_field():
    with pytest.raises(ValueError, match="speculative.method"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="speculative.num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative.draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="speculative.ngram_min"):
        SpeculativeConfig(ngram_min=4, ngram_max=2)
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="ngram")


# ---------------------------------------------------------------- scheduler, scripted runner

def test_verification_appends_accepted_drafts_and_rolls_back_rejected_pages(scripted_engine):
    # Prompt 1 2 3 1 2 (page size 4): the prefill samples 3, so the ids end "1 2 3" and
    # prompt lookup drafts "1 2 3". The scripted verifier samples 1 2 9 (then a bonus 5):
    # drafts 1 2 accepted, 3 rejected, 9 emitted.
    engine = scripted_engine({"r": [3, 1, 2, 9, 5, 4, 4, 4, 4]}, speculative=NGRAM, num_pages=16)
    engine.add_request([1, 2, 3, 1, 2], SamplingParams(max_tokens=8, temperature=0.0), request_id="r")
    engine.step()  # prefill
    request = engine.requests["r"]
    assert request.output_ids == [3]
    engine.step()
    seq = engine.runner.steps[-1].sequences[0]
    assert seq.token_ids == (3, 1, 2, 3) and seq.sample_offsets == (0, 1, 2, 3) and seq.start_position == 5
    assert request.output_ids == [3, 1, 2, 9]
    # K/V kept for the fed 3 and the accepted 1 2; the rejected slot is not computed.
    assert request.num_computed == 8 == request.num_tokens - 1
    assert len(request.page_ids) == engine.block_manager.pages_needed(request.num_tokens)
    m = engine.metrics()
    assert (m["spec_num_drafts"], m["spec_num_draft_tokens"], m["spec_num_accepted_tokens"]) == (1, 3, 2)
    while engine.has_unfinished:
        engine.step()
    assert engine.metrics()["num_free_pages"] == 16


def test_drafts_respect_the_budget_max_tokens_and_never_preempt(scripted_engine):
    # Budget 3: a decode takes at most 2 drafts. max_tokens 4 after 1 token: at most 2.
    engine = scripted_engine({}, speculative=SpeculativeConfig(num_speculative_tokens=8), num_pages=16,
                             max_num_batched_tokens=3)
    engine.add_request([7, 7, 7, 7, 7, 7], SamplingParams(max_tokens=4, temperature=0.0), request_id="a")
    engine.runner.default = 7
    while engine.has_unfinished:
        engine.step()
    lens = [len(s.sequences[0].token_ids) for s in engine.runner.steps]
    assert max(lens[1:]) <= 3
    # Pool of 2 pages of 4: prompt 6 + 1 fits, drafts would need a third page: dropped.
    engine = scripted_engine({}, speculative=SpeculativeConfig(num_speculative_tokens=4), num_pages=2)
    engine.runner.default = 7
    engine.add_request([7, 7, 7, 7, 7, 7], SamplingParams(max_tokens=2, temperature=0.0), request_id="b")
    engine.add_request([8], SamplingParams(max_tokens=1, temperature=0.0), request_id="c")
    while engine.has_unfinished:
        engine.step()
    m = engine.metrics()
    assert m["num_preemptions"] == 0 and m["num_free_pages"] == 2


# ---------------------------------------------------------------- a real model

def _workload(seed, num=12, repeat=True):
    rng = np.random.RandomState(seed)
    prompts, params = [], []
    for i in range(num):
        base = rng.randint(3, hf_models.VOCAB, size=rng.randint(2, 6)).tolist()
        # Repetitive prompts give prompt lookup something to find.
        prompt = (base * rng.randint(2, 5))[:40] if repeat and i % 3 else base + rng.randint(3, 100, 8).tolist()
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=int(rng.randint(4, 14)), temperature=0.0, ignore_eos=True))
    return prompts, params


@pytest.mark.parametrize("case", ["chunked", "tiny_pool_recompute",
                                  pytest.param("tiny_pool_swap", marks=pytest.mark.slow),
                                  pytest.param("prefix_cache", marks=pytest.mark.slow)])
def test_ngram_greedy_equals_hf(case, oracle):
    path, generate = oracle
    prompts, params = _workload(1)
    engine = {"chunked": dict(page_size=4, max_num_batched_tokens=16, max_num_seqs=6),
              "tiny_pool_swap": dict(page_size=4, num_pages=20, max_num_batched_tokens=64,
                                     preemption_mode="swap"),
              "tiny_pool_recompute": dict(page_size=4, num_pages=18, max_num_batched_tokens=64),
              "prefix_cache": dict(page_size=4, max_num_batched_tokens=64)}[case]
    if case == "prefix_cache":
        prompts = [prompts[1][:8] + p for p in prompts]  # a common prefix
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(speculative=NGRAM, **engine))
    outs = session.generate(prompts, params)
    for p, sp, o in zip(prompts, params, outs):
        assert o.token_ids == generate(p, sp.max_tokens)
    m = session.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    assert 0 < m["spec_num_accepted_tokens"] < m["spec_num_draft_tokens"]  # both outcomes happened
    if case.startswith("tiny_pool"):
        assert m["num_preemptions"] > 0
    if case == "prefix_cache":
        assert m["prefix_cache_hits"] > 0


def test_seeded_sampling_is_the_same_with_and_without_speculation(oracle):
    path, _ = oracle
    prompts, _ = _workload(2, num=4)
    params = [SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=i, ignore_eos=True,
                             repetition_penalty=1.3 if i % 2 else 1.0, min_tokens=3) for i in range(4)]
    plain = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4))
    spec = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, speculative=NGRAM))
    expected = [o.token_ids for o in plain.generate(prompts, params)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == expected
    # Alone or batched: the same tokens.
    assert spec.generate([prompts[3]], [params[3]])[0].token_ids == expected[3]
    assert spec.metrics()["spec_num_drafts"] > 0


def test_draft_model_self_draft_accepts_everything_and_another_draft_stays_exact(oracle, hf_model_dir):
    path, generate = oracle
    prompts, params = _workload(3, num=3, repeat=False)
    self_draft = SpeculativeConfig(method="draft", draft_model=path, num_speculative_tokens=3)
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, speculative=self_draft))
    for p, sp, o in zip(prompts, params, session.generate(prompts, params)):
        assert o.token_ids == generate(p, sp.max_tokens)
    sampled = [SamplingParams(max_tokens=8, temperature=1.0, seed=i, ignore_eos=True) for i in range(3)]
    session.generate(prompts, sampled)
    m = session.metrics()
    # The draft is the target and shares its sampling noise: every draft is accepted.
    assert m["spec_num_draft_tokens"] > 0 and m["spec_acceptance_rate"] == 1.0
    # Prompt catch-ups step by step; after a verify step a round is one device call.
    assert m["spec_draft_stepped_rounds"] > 0 and m["spec_draft_chained_rounds"] > 0
    # Another model of the same vocabulary (the Mistral checkpoint): still the target's tokens.
    other, _ = hf_model_dir("mistral")
    config = SpeculativeConfig(method="draft", draft_model=other, num_speculative_tokens=2)
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, speculative=config))
    for p, sp, o in zip(prompts, params, session.generate(prompts, params)):
        assert o.token_ids == generate(p, sp.max_tokens)
    assert session.metrics()["num_free_pages"] == session.metrics()["num_total_pages"]


def test_draft_model_of_another_vocabulary_is_refused(oracle, text_model_dir):
    path, _ = oracle
    config = SpeculativeConfig(method="draft", draft_model=text_model_dir[0])
    with pytest.raises(ValueError, match="speculative.draft_model"):
        InferenceSession.from_pretrained(path, engine=EngineConfig(speculative=config))
    with pytest.raises(ValueError, match="speculative.draft_model"):
        InferenceSession.from_pretrained(path, engine=EngineConfig(
            speculative=SpeculativeConfig(method="draft", draft_model="/no/such/folder")))


# ---------------------------------------------------------------- the distribution

CHI2_DF7_P001 = 24.32  # chi-square critical value, 7 degrees of freedom, p = 0.001


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_verified_tokens_have_the_target_distribution(oracle):
    """A verification step feeds the prompt's last token and a draft d, sampling at both.
    Plain decoding would emit s0 ~ p(.|prompt), then s1 ~ p(.|prompt, s0). The verifier
    emits s0, and s1 only when s0 == d: so s0 must follow p (the mass p(d) goes to d), and
    s1, given s0 == d, must follow p(.|prompt, d). top_k = 8 keeps the support small."""
    from jaxinfer.types import ScheduledSequence, StepInput
    path, _ = oracle
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=16, num_pages=300))
    runner = session.engine.runner
    prompt = (5, 17, 42, 9, 77, 3, 120, 64)

    def seq(rid, ids, offsets, seed, **kw):
        return ScheduledSequence(request_id=rid, token_ids=tuple(ids), start_position=0, page_ids=(int(rid) % 300,),
                                 sample_offsets=offsets, temperature=1.0, top_k=8, top_p=1.0, min_p=0.0, seed=seed,
                                 **kw)

    def top8(ids):
        out = runner.execute(StepInput(sequences=(seq("0", ids, (len(ids) - 1,), 0, num_top_logprobs=8),)))
        ((pairs),) = out.outputs["0"].top_logprobs
        tokens = np.array([t for t, _ in pairs])
        p = np.exp(np.array([lp for _, lp in pairs]))
        return tokens, p / p.sum()

    tokens0, p0 = top8(prompt)
    d = int(tokens0[0])
    tokens1, p1 = top8(prompt + (d,))
    s0, s1 = [], []
    for batch in range(8):
        seqs = tuple(seq(str(i), prompt + (d,), (len(prompt) - 1, len(prompt)), batch * 256 + i) for i in range(256))
        out = runner.execute(StepInput(sequences=seqs)).outputs
        s0 += [out[str(i)].token_ids[0] for i in range(256)]
        s1 += [out[str(i)].token_ids[1] for i in range(256)]
    s0, s1 = np.array(s0), np.array(s1)
    counts0 = np.array([(s0 == t).sum() for t in tokens0])
    assert counts0.sum() == s0.size and _chi2(counts0, p0) < CHI2_DF7_P001
    accepted = s1[s0 == d]
    counts1 = np.array([(accepted == t).sum() for t in tokens1])
    assert accepted.size > 100 and counts1.sum() == accepted.size
    assert _chi2(counts1, p1) < CHI2_DF7_P001
