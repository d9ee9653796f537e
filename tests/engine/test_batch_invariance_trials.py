"""Batch invariance trials: a needle request's tokens never depend on its batch.

Each trial puts two needles (greedy, and seeded sampling with presence, frequency and
repetition penalties) into one engine at a random step, among random requests that join
and leave around them. The engines vary what the batch does to the needles: the Sarathi
chunk size, a pool so small that requests are preempted and recomputed, prefix-cache
hits (background requests share the needles' first pages, and every trial after the
first finds the needles' own pages cached), the shared-prefix (Hydragen) attention
path, and int4 weights. The needles' tokens must equal those of the same needle run
alone in a fresh engine with default settings, in every trial.

The default run tries a few trials per engine; `-m slow` runs 1,000 or more in all. With
JAXINFER_FUZZ_REPORT=path set, the trial and mismatch counts are merged into that JSON
file (scripts/reliability_report.py reads it).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams
from jaxinfer.quant import QuantConfig

PREFIX = [5, 23, 41, 59, 77, 95, 113, 131, 7, 25, 43, 61, 79, 97, 115, 133]  # four 4-token pages
NEEDLE_PROMPT = PREFIX + [1, 17, 33, 49, 65, 81]
NEEDLES = {
    "greedy": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    "sampled_penalties": SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=7,
                                        presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                                        ignore_eos=True),
}

# name -> (EngineConfig fields, int4 weights?). page_size 4 everywhere so that short
# prompts still fill whole pages (prefix caching and the shared-prefix path need them).
ENGINES = {
    "chunk16": (dict(max_num_batched_tokens=16), False),
    "chunk64_tiny_pool": (dict(max_num_batched_tokens=64, num_pages=20, max_num_seqs=8), False),
    "shared_prefix": (dict(max_num_batched_tokens=64, shared_prefix_min_tokens=8, shared_prefix_min_seqs=2), False),
    "int4_chunk32": (dict(max_num_batched_tokens=32), True),
    # The default run's one engine (each engine compiles its own ~20 step programs,
    # ~30 s here): preemption, prefix-cache hits and the shared-prefix path together.
    "tiny_pool_shared_prefix": (dict(max_num_batched_tokens=32, num_pages=24, max_num_seqs=8,
                                     shared_prefix_min_tokens=8, shared_prefix_min_seqs=2), False),
}
DEFAULT_TRIALS = 2  # the default run: one engine
SLOW_TRIALS = 200  # per engine with -m slow: 1,000 in all


def _session(path, fields, int4):
    engine = EngineConfig(page_size=4, compilation_cache_dir="", **fields)
    if int4:
        return InferenceSession.from_pretrained(path, engine=engine, quantization="int4",
                                                quantization_config=QuantConfig(group_size=32))
    return InferenceSession.from_pretrained(path, engine=engine)


def _alone(path, int4):
    """Each needle alone in a fresh engine with default settings: the expected tokens."""
    session = _session(path, {}, int4)
    try:
        return {name: session.generate([NEEDLE_PROMPT], params)[0].token_ids for name, params in NEEDLES.items()}
    finally:
        session.close()


def _background(rng):
    """A random request: half of them share the needles' first pages."""
    length = int(rng.randint(1, 28))
    prompt = rng.randint(3, hf_models.VOCAB, size=length).tolist()
    if rng.rand() < 0.5:
        prompt = PREFIX[: 4 * int(rng.randint(1, 5))] + prompt
    greedy = rng.rand() < 0.5
    params = SamplingParams(max_tokens=int(rng.randint(1, 10)), temperature=0.0 if greedy else float(rng.rand()) + 0.1,
                            seed=int(rng.randint(1 << 20)), presence_penalty=float(rng.rand()) if not greedy else 0.0,
                            ignore_eos=True)
    return prompt, params


def _trial(engine, rng, max_steps=400):
    """One trial: returns {needle name: its tokens}; every other request is aborted at the end."""
    join_at = int(rng.randint(0, 6))
    needle_ids, others, out, streamed = {}, [], {}, {}
    for step in range(max_steps):
        if step == join_at:
            needle_ids = {engine.add_request(NEEDLE_PROMPT, params): name for name, params in NEEDLES.items()}
        if rng.rand() < 0.6:
            for _ in range(int(rng.randint(1, 4))):
                others.append(engine.add_request(*_background(rng)))
        for delta in engine.step():
            if delta.request_id in needle_ids:
                name = needle_ids[delta.request_id]
                streamed[name] = streamed.get(name, []) + list(delta.token_ids)
                if delta.is_finished:  # the streamed deltas add up to the final output
                    out[name] = delta.output.token_ids
                    assert streamed[name] == out[name], (name, streamed[name], out[name])
        if step > join_at and len(out) == len(NEEDLES):
            break
    else:
        raise AssertionError(f"the needles did not finish within {max_steps} steps")
    for rid in others:
        engine.abort(rid)  # those still queued or running; finished ones are already gone
    m = engine.metrics()
    assert m["num_running"] == m["num_waiting"] == 0 and not engine.requests
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    return out


def _record(trials, mismatches):
    path = os.environ.get("JAXINFER_FUZZ_REPORT")
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = json.load(open(path)) if os.path.exists(path) else {}
    entry = data.setdefault("batch_invariance", {"trials": 0, "mismatches": 0})
    entry["trials"] += trials
    entry["mismatches"] += mismatches
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _run(hf_model_dir, name, num_trials):
    path, _ = hf_model_dir("llama")
    fields, int4 = ENGINES[name]
    expected = _alone(path, int4)
    session = _session(path, fields, int4)
    rng = np.random.RandomState(sum(map(ord, name)))  # a fixed seed per engine
    mismatches = []
    try:
        for trial in range(num_trials):
            got = _trial(session.engine, rng)
            if got != expected:
                mismatches.append((trial, got))
        metrics = session.engine.metrics()
    finally:
        session.close()
        _record(num_trials, len(mismatches))
    assert not mismatches, f"{name}: {len(mismatches)} of {num_trials} trials differ: {mismatches[:2]} vs {expected}"
    # The engine did what its name says, so the trials covered that path.
    assert metrics["prefix_cache_hits"] > 0
    if "tiny_pool" in name:
        assert metrics["num_preemptions"] > 0
    if "shared_prefix" in name:
        assert metrics["shared_prefix_steps"] > 0
    assert metrics["mean_batch_seqs"] > 1.5


def test_needles_are_batch_invariant(hf_model_dir):
    _run(hf_model_dir, "tiny_pool_shared_prefix", DEFAULT_TRIALS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ENGINES))
def test_needles_are_batch_invariant_in_many_trials(hf_model_dir, name):
    _run(hf_model_dir, name, SLOW_TRIALS)
