"""EngineConfig(kv_cache_dtype="int8" | "fp8"): quantized KV pages in the engine.

- More pages in the same budget: the pool's size follows the bytes per token and kv head
  (H + 4 instead of H * itemsize), and `kv_cache_bytes` shows it.
- Greedy agreement with the float cache over the engine tests' 64-request workload
  (chunked prefill, a tiny pool with preemptions, prefix caching): the share of requests
  whose tokens are identical and of tokens before the first divergence. The figures are
  printed (`-s`); the test holds them to a floor well under what was measured, since
  quantization may flip a near-tie.
- Batch invariance holds for a quantized cache as for a float one: a needle's tokens
  alone equal its tokens among other requests.
- The quantized cache's pages are accounted for like float ones: nothing leaks.
"""
from __future__ import annotations

import numpy as np
import pytest

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams

BASE = dict(page_size=4, max_num_batched_tokens=48, max_num_seqs=16, compilation_cache_dir="")


def _workload(num=24, seed=3):
    rng = np.random.RandomState(seed)
    prefix = rng.randint(3, hf_models.VOCAB, size=12).tolist()
    prompts, params = [], []
    for i in range(num):
        head = prefix if i % 3 == 0 else []
        prompts.append(head + rng.randint(3, hf_models.VOCAB, size=rng.randint(1, 30)).tolist())
        params.append(SamplingParams(max_tokens=int(rng.randint(4, 16)), temperature=0.0, ignore_eos=True))
    return prompts, params


def _agreement(reference, other):
    same_requests = sum(a == b for a, b in zip(reference, other))
    prefix_tokens = 0
    for a, b in zip(reference, other):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix_tokens += n
    return same_requests / len(reference), prefix_tokens / sum(len(a) for a in reference)


@pytest.fixture(scope="module")
def float_run(hf_model_dir):
    path, _ = hf_model_dir("llama")
    prompts, params = _workload()
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(num_pages=40, **BASE))
    try:
        return path, prompts, params, [o.token_ids for o in session.generate(prompts, params)]
    finally:
        session.close()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_cache_agrees_with_the_float_cache(float_run, fmt):
    path, prompts, params, expected = float_run
    # A pool of 40 pages for 24 requests: preemptions and recomputation from quantized pages.
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(num_pages=40, kv_cache_dtype=fmt, **BASE))
    try:
        got = [o.token_ids for o in session.generate(prompts, params)]
        m = session.metrics()
    finally:
        session.close()
    requests, tokens = _agreement(expected, got)
    print(f"\n{fmt} KV cache vs float32: {100 * requests:.1f}% of requests identical, "
          f"{100 * tokens:.1f}% of tokens before the first divergence ({len(prompts)} requests, "
          f"{m['num_preemptions']} preemptions, {m['prefix_cache_hits']} prefix-cache hits)")
    assert requests >= (0.6 if fmt == "int8" else 0.45)  # measured: 75.0% and 62.5% (2026-12-03)
    assert m["num_free_pages"] == m["num_total_pages"], "pages leaked"
    assert m["num_preemptions"] > 0 and m["prefix_cache_hits"] > 0


def test_more_pages_in_the_same_budget(hf_model_dir):
    path, _ = hf_model_dir("llama")
    budget = 1 << 16
    pages = {}
    for fmt in ("auto", "int8"):
        session = InferenceSession.from_pretrained(path, engine=EngineConfig(
            page_size=4, max_kv_cache_bytes=budget, max_num_seqs=64, kv_cache_dtype=fmt, compilation_cache_dir=""))
        m = session.metrics()
        pages[fmt] = m["num_total_pages"]
        assert m["kv_cache_bytes"] <= budget
        session.close()
    # float32, head_dim 16: 64 bytes per token and kv head; int8: 16 + a 4-byte scale.
    assert pages["auto"] == budget // (2 * 4 * 2 * 64 * 2)
    assert pages["int8"] == budget // (2 * 4 * 2 * 20 * 2)
    assert pages["int8"] / pages["auto"] == pytest.approx(64 / 20, rel=0.05)


def test_needle_is_batch_invariant_with_a_quantized_cache(hf_model_dir):
    path, _ = hf_model_dir("llama")
    needle = [1, 17, 33, 49, 65, 81, 97, 113]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    session = InferenceSession.from_pretrained(path, engine=EngineConfig(num_pages=64, kv_cache_dtype="int8", **BASE))
    try:
        alone = session.generate([needle], sp)[0].token_ids
        session.reset_prefix_cache()
        prompts, params = _workload(num=8, seed=9)
        outs = session.generate(prompts[:4] + [needle] + prompts[4:], params[:4] + [sp] + params[4:])
        assert outs[4].token_ids == alone
    finally:
        session.close()
