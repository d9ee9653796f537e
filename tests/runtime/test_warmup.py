"""Warm-up (runtime/warmup.py, ModelRunner.warm, Engine.warmup, InferenceSession.warmup).

The claims: a dummy batch has exactly the shape key it was made from; warming a key
writes no page; after a warm-up from the profile an earlier process recorded, the same
traffic compiles nothing (checked on jit's own cache, not only the runner's bookkeeping);
the grid holds the key of every unmixed step; a damaged profile costs nothing but lines.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, SamplingParams
from jaxinfer.runtime import warmup
from jaxinfer.runtime.input_batch import BatchConfig, build_batch, shape_key_of
from jaxinfer.session import InferenceSession
from jaxinfer.types import ScheduledSequence, StepInput

ENGINE = dict(num_pages=64, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)


def _session(cache_dir, **overrides):
    return InferenceSession.from_pretrained("tiny-code", engine=EngineConfig(
        **{**ENGINE, **overrides}, compilation_cache_dir=str(cache_dir)))


def _traffic(session):
    """Mixed traffic: a batch of prompts (greedy, sampled, a penalty, logprobs), then a
    lone prompt joining two running ones."""
    prompts = ["def fib(n):", "import os\n", "class A:", "x = 1"]
    params = [SamplingParams(max_tokens=5, temperature=0.0), SamplingParams(max_tokens=4, temperature=0.8, seed=1),
              SamplingParams(max_tokens=3, temperature=0.0, repetition_penalty=1.2),
              SamplingParams(max_tokens=3, temperature=0.0, logprobs=2)]
    outs = [session.generate([p], q)[0] for p, q in zip(prompts[:2], params[:2])]
    outs += session.generate(prompts, params)
    return [o.token_ids for o in outs]


def test_profile_warmup_makes_the_same_traffic_compile_nothing(tmp_path):
    first = _session(tmp_path)
    expected = _traffic(first)
    recorded = first.shape_profile.load()
    first.close()
    assert len(recorded) == first.metrics()["num_compiles"] > 3
    assert any(k[10] for k in recorded) and any(k[9] for k in recorded)  # the penalty and logprobs programs

    second = _session(tmp_path)
    report = second.warmup(grid=False, progress=False)
    assert report["profile_programs"] == report["programs"] == report["compiled"] == len(recorded)
    step = second.engine.runner._step
    cached = step._cache_size()
    assert cached == len(recorded)
    assert _traffic(second) == expected  # warming changed no output
    metrics = second.metrics()
    assert metrics["num_compiles"] == 0 and metrics["warmup_programs"] == len(recorded)
    assert step._cache_size() == cached  # jit compiled nothing new
    again = second.warmup(grid=False, progress=False)
    assert again["compiled"] == 0  # held already
    second.close()


def test_warm_writes_no_page(tmp_path):
    session = _session(tmp_path)
    session.generate(["def fib(n):"], SamplingParams(max_tokens=3, temperature=0.0))
    runner = session.engine.runner
    before = jax.tree.map(np.asarray, runner.kv_caches)
    grid = [k for k in session.engine.warmup_grid(32) if k not in runner._shape_keys]
    keys = grid[:2] + [(16, 4, 4, 8, 2, 4, None, False, False, 2, 16, 4, False)]  # mixed, penalties, bias
    for key in keys:
        assert runner.warm(key)
        assert not runner.warm(key)
    after = jax.tree.map(np.asarray, runner.kv_caches)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    session.close()


def test_dummy_batch_has_its_key():
    config = BatchConfig(page_size=16, num_pages=8, vocab_size=100, max_positions=512)
    for key in [(1, 1, 0, 1, 1, 1, None, True, False, 0, 0, 0, False),
                (64, 16, 8, 16, 3, 32, (2, 64, 4), False, True, 4, 32, 8, True)]:
        assert shape_key_of(warmup.dummy_batch(key, config)) == key
        assert shape_key_of(warmup.dummy_batch(json.loads(json.dumps(key)), config)) == key


def _seq(i, n, start, pages, greedy=True):
    return ScheduledSequence(request_id=f"r{i}", token_ids=(3,) * n, start_position=start, page_ids=tuple(pages),
                             sample_offsets=(n - 1,), temperature=0.0 if greedy else 0.7, top_k=0, top_p=1.0,
                             min_p=0.0, seed=i)


def test_grid_holds_every_unmixed_step():
    page, budget, seqs, context = 16, 48, 6, 200
    config = BatchConfig(page_size=page, num_pages=512, vocab_size=100, max_positions=context)
    grid = set(warmup.grid_keys(max_num_seqs=seqs, max_num_batched_tokens=budget, context_tokens=context,
                                page_size=page))
    pages = -(-context // page)
    for greedy in (True, False):
        for n in range(1, seqs + 1):  # decode steps at every context
            for ctx in range(1, context + 1, 7):
                need = -(-ctx // page)
                step = StepInput(sequences=tuple(_seq(i, 1, ctx - 1, range(i * pages, i * pages + need), greedy)
                                                 for i in range(n)))
                assert build_batch(step, config).shape_key in grid, (n, ctx)
        for n in range(1, budget + 1):  # a prompt's first chunk
            step = StepInput(sequences=(_seq(0, n, 0, range(-(-n // page)), greedy),))
            assert build_batch(step, config).shape_key in grid, n
        for start in range(0, context - budget + 1, page):  # a long prompt's full-budget chunks
            step = StepInput(sequences=(_seq(0, budget, start, range(-(-(start + budget) // page)), greedy),))
            assert build_batch(step, config).shape_key in grid, start


def test_profile_skips_damaged_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    good = [1, 1, 0, 1, 1, 1, None, True, False, 0, 0, 0, False]
    lines = ["garbage", "[1, 2]", json.dumps([1 << 20] + good[1:]), json.dumps([2, 2, 0, 2, 1, 1, [1, 2], True,
             False, 0, 0, 0, False]), "[NaN, 1, 0, 1, 1, 1, null, true, false, 0, 0, 0, false]",
             json.dumps(good[:-1] + [True]), json.dumps([1, 1, 2, 1, 1, 1, None, True, False, 0, 0, 0, False]),
             json.dumps(good), json.dumps(good), "\xff\xfe", json.dumps([True] + good[1:])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    profile = warmup.ShapeProfile(str(path))
    assert profile.load() == [tuple(good)]
    profile.record(tuple(good))  # known: not written again
    profile.record((2, 2, 0, 2, 1, 1, None, False, False, 0, 0, 0, False))
    profile.record((2, 2, 0, 2, 1, 1, None, False, False, 0, 0, 0, True))  # a fault program: never
    assert len(path.read_text().splitlines()) == len(lines) + 1
    assert len(warmup.ShapeProfile(str(path)).load()) == 2
    with pytest.raises(ValueError, match="decode rows"):
        warmup.dummy_batch((1, 1, 2, 1, 1, 1, None, True, False, 0, 0, 0, False),
                           BatchConfig(page_size=16, num_pages=8, vocab_size=100, max_positions=64))


def test_profile_depends_on_the_setup(tmp_path):
    a = _session(tmp_path)
    b = _session(tmp_path, kv_cache_dtype="int8")
    c = _session(tmp_path, max_num_seqs=2)  # scheduling limits do not change what a key means
    assert a.shape_profile.path != b.shape_profile.path
    assert a.shape_profile.path == c.shape_profile.path
    assert os.path.dirname(a.shape_profile.path) == os.path.join(str(tmp_path), "profiles")
    off = _session("")
    assert off.shape_profile is None and off.warmup(grid=False, progress=False)["programs"] == 0
    with pytest.raises(ValueError, match="context_tokens"):
        off.warmup(context_tokens=0, progress=False)
    for s in (a, b, c, off):
        s.close()


class _FlushOnSecond:
    """A MapBudget stand-in that drops every program after the second compile."""

    def __init__(self):
        self.num_flushes, self.calls = 0, 0

    def after_compile(self, functions) -> bool:
        self.calls += 1
        if self.calls != 2:
            return False
        for fn in functions:
            fn.clear_cache()
        self.num_flushes += 1
        return True


def test_a_warmup_past_the_map_budget_reports_what_it_kept(tmp_path):
    session = _session("")
    runner = session.engine.runner
    keys = [k for k in session.engine.warmup_grid(16) if k not in runner._shape_keys][:3]
    real = runner.map_budget
    runner.map_budget = _FlushOnSecond()
    try:
        report = session.async_engine.call(lambda engine: engine.warmup(keys))
    finally:
        runner.map_budget = real
    assert report["compiled"] == 3 and report["flushes"] == 1 and report["held"] == 1
    assert runner._shape_keys == {keys[2]} and runner._step._cache_size() == 1
    session.close()
