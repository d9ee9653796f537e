"""Continuous depth-wise batching of a recursive model (engine/depthwise.py,
runtime/depthwise_runner.py, models/recursive_block.py) on the bundled tiny-code-recursive
(2 shared layers x 3 loops, rank-16 LoRA).

Checked: with exit off, the greedy tokens equal the unrolled engine's (loops back to back)
for requests joining at different steps, with chunked prefill and with preemptions; early
exit picks, per token, the first exit whose confidence reaches the threshold, with the
skipped loops' K/V filled (the dense oracle runs every loop for earlier tokens); a
threshold of 1 never exits; aborts in flight leak no page; the metrics add up; the
settings depth-wise batching cannot run with are refused with the field named.
"""
from __future__ import annotations

import pytest

from jaxinfer import EngineConfig, InferenceSession, SamplingParams, SpeculativeConfig
from jaxinfer.types import ScheduledSequence, StepInput
from recursive_assets import MODEL_DIR, NAME, heldout, needs_model, recursive_lib

BASE = dict(page_size=8, num_pages=48, max_num_batched_tokens=32, max_num_seqs=8, compilation_cache_dir="")
MAX_TOKENS = 6

pytestmark = needs_model


@pytest.fixture(scope="module")
def lib():
    return recursive_lib()


@pytest.fixture(scope="module")
def prompts():
    docs = heldout(3)
    # 45 tokens > the 32-token budget: chunked prefill across depth-wise steps.
    return [docs[0][:12], docs[1][:45], docs[2][:5], docs[0][30:52]]


@pytest.fixture(scope="module")
def depthwise():
    with InferenceSession.from_pretrained(NAME, engine=EngineConfig(**BASE)) as session:
        yield session


@pytest.fixture(scope="module")
def unrolled_tokens(prompts):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with InferenceSession.from_pretrained(NAME, engine=EngineConfig(depthwise_batching=False, **BASE)) as session:
        assert type(session.engine.runner).__name__ == "ModelRunner"
        return [o.token_ids for o in session.generate(prompts, greedy)]


def _run(engine, items, join_every=2):
    """Adds (prompt, params) items one by one, `join_every` steps apart, and steps to the end."""
    ids, done, pending, steps = [], {}, list(items), 0
    while pending or engine.has_unfinished:
        if pending and steps % join_every == 0:
            prompt, params = pending.pop(0)
            ids.append(engine.add_request(prompt, params))
        for delta in engine.step():
            if delta.is_finished:
                done[delta.request_id] = delta.output.token_ids
        steps += 1
        assert steps < 2000
    return [done[i] for i in ids]


def test_default_for_recursive_folders_and_greedy_equals_unrolled(depthwise, prompts, unrolled_tokens):
    engine = depthwise.engine
    assert type(engine.runner).__name__ == "DepthwiseRunner"
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    engine.reset_prefix_cache()
    before = engine.metrics()
    assert _run(engine, [(p, greedy) for p in prompts]) == unrolled_tokens
    m = engine.metrics()
    delta = {k: m[k] - before[k] for k in ("depthwise_steps", "depthwise_rows", "depthwise_mixed_steps",
                                           "num_early_exits", "depthwise_fill_rows")}
    # every fed token (prompt, then each generated token but the last) runs all 3 loops
    assert delta["depthwise_rows"] == 3 * sum(len(p) + MAX_TOKENS - 1 for p in prompts)
    assert delta["depthwise_mixed_steps"] > delta["depthwise_steps"] // 2  # one block call, several depths
    assert delta["num_early_exits"] == 0 and delta["depthwise_fill_rows"] == 0
    assert m["num_free_pages"] == m["num_total_pages"] and not engine.depthwise.entries


@pytest.fixture(scope="module")
def copy_fill():
    engine = EngineConfig(early_exit_kv_fill="copy", **BASE)
    with InferenceSession.from_pretrained(NAME, engine=engine) as session:
        yield session


@pytest.mark.parametrize("kv_fill,threshold", [("compute", 0.4), ("copy", 0.4)])
def test_early_exit_matches_the_dense_exit_oracle(request, lib, prompts, kv_fill, threshold):
    """Tokens and log-probs equal the dense oracle of the same fill rule; the two fill
    rules' log-probs differ by far more than the tolerance (so the check tells them apart)."""
    session = request.getfixturevalue("depthwise" if kv_fill == "compute" else "copy_fill")
    config, _, spec, rp = lib.load_recursive(MODEL_DIR)
    want = {fill: [lib.greedy_tokens(config, spec, rp, p, MAX_TOKENS, exit_threshold=threshold, kv_fill=fill,
                                     with_logprobs=True) for p in prompts[:3]] for fill in ("compute", "copy")}
    first = session.engine.metrics()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, early_exit_threshold=threshold,
                            logprobs=True)
    outs = session.generate(prompts[:3], params)
    for out, (tokens, logprobs) in zip(outs, want[kv_fill]):
        assert out.token_ids == tokens
        assert max(abs(a - b) for a, b in zip(out.logprobs, logprobs)) < 1e-4
    gap = max(abs(a - b) for (_, x), (_, y) in zip(want["compute"], want["copy"]) for a, b in zip(x, y))
    assert gap > 1e-2
    m = session.engine.metrics()
    exits = {k: m["early_exits_per_loop"][k] - first["early_exits_per_loop"][k] for k in m["early_exits_per_loop"]}
    fill_rows = "depthwise_fill_rows" if kv_fill == "compute" else "depthwise_copy_fill_rows"
    assert sum(exits.values()) > 0 and m[fill_rows] > first[fill_rows] and m["mean_loops_per_token"] < 3.0
    assert m["num_free_pages"] == m["num_total_pages"] and not session.engine.depthwise.entries


def test_threshold_one_never_exits_and_requests_mix(depthwise, prompts, unrolled_tokens):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    never = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, early_exit_threshold=1.0)
    eager = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, early_exit_threshold=0.0)
    # exiting requests beside full-depth ones do not change the full-depth ones' tokens
    before = depthwise.engine.metrics()["early_exits_per_loop"]
    got = _run(depthwise.engine, [(prompts[0], never), (prompts[1], eager), (prompts[2], greedy),
                                  (prompts[3], eager)], join_every=1)
    assert got[0] == unrolled_tokens[0] and got[2] == unrolled_tokens[2]
    # threshold 0: every token but the first (a prompt's, never exiting) leaves at the first exit
    after = depthwise.engine.metrics()["early_exits_per_loop"]
    assert (after["1"] - before["1"], after["2"] - before["2"]) == (2 * (MAX_TOKENS - 1), 0)


def test_abort_in_flight_and_preemption_leak_nothing(prompts, unrolled_tokens):
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # 12 pages of 8 tokens for 4 requests of up to 53 tokens: preemptions
    with InferenceSession.from_pretrained(NAME, engine=EngineConfig(**{**BASE, "num_pages": 12})) as session:
        engine = session.engine
        assert _run(engine, [(p, greedy) for p in prompts], join_every=1) == unrolled_tokens
        assert engine.metrics()["num_preemptions"] > 0
        eager = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, early_exit_threshold=0.0)
        rid = engine.add_request(prompts[0], eager)
        other = engine.add_request(prompts[2], greedy)
        for _ in range(6):
            engine.step()
        assert engine.depthwise.entries
        engine.abort(rid)
        while engine.has_unfinished:
            engine.step()
        m = engine.metrics()
        assert m["num_free_pages"] == m["num_total_pages"] and m["num_requests_tracked"] == 0
        assert not engine.depthwise.entries and not engine.depthwise.busy
        assert other not in engine.requests
        engine.block_manager.check_consistency()


def test_runner_refuses_a_loop_without_its_rows(depthwise):
    seq = ScheduledSequence(request_id="nowhere", token_ids=(5,), start_position=0, page_ids=(0,),
                            sample_offsets=(), temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, loop=1)
    with pytest.raises(ValueError, match="'nowhere': loop 1 but the last step had no 1 rows"):
        depthwise.engine.runner.execute(StepInput(sequences=(seq,)))


def test_settings_it_cannot_run_with_are_named():
    with pytest.raises(ValueError, match="early_exit_threshold"):
        SamplingParams(early_exit_threshold=1.5)
    with pytest.raises(ValueError, match="depthwise_batching"):
        EngineConfig(depthwise_batching="yes")
    with pytest.raises(ValueError, match="depthwise_batching: True needs a recursive model folder"):
        InferenceSession.from_pretrained("tiny-code", engine=EngineConfig(depthwise_batching=True, **BASE))
    with pytest.raises(ValueError, match="early_exit_threshold: early exit needs depth-wise batching"):
        InferenceSession.from_pretrained("tiny-code", engine=EngineConfig(early_exit_threshold=0.5, **BASE))
    spec = SpeculativeConfig(method="ngram")
    with pytest.raises(ValueError, match="speculative: cannot run with depthwise_batching=True"):
        InferenceSession.from_pretrained(NAME, engine=EngineConfig(depthwise_batching=True, speculative=spec, **BASE))


def test_unrolled_engine_refuses_a_request_exit_threshold(prompts):
    with InferenceSession.from_pretrained(NAME, engine=EngineConfig(depthwise_batching=False, **BASE)) as session:
        with pytest.raises(ValueError, match=r"params\[0\].early_exit_threshold"):
            session.engine.add_request(prompts[0], SamplingParams(early_exit_threshold=0.5))


def test_pallas_kernels_in_interpret_mode_give_the_same_tokens(prompts, unrolled_tokens):
    """The grouped LoRA op and the ragged paged attention, both as Pallas kernels
    (interpret mode), in the depth-wise block: the unrolled XLA engine's tokens."""
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = EngineConfig(**{**BASE, "attention_impl": "pallas_interpret"})
    with InferenceSession.from_pretrained(NAME, engine=engine) as session:
        assert type(session.engine.runner).__name__ == "DepthwiseRunner"
        got = [o.token_ids for o in session.generate([prompts[2], prompts[0]], greedy)]
    assert got == [unrolled_tokens[2][:3], unrolled_tokens[0][:3]]
