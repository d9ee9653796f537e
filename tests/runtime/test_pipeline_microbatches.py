"""Microbatches of a pipelined step on one device: the split into near-equal token
counts, the merge of the parts' outputs, the bubble model, and the split's exactness
(a step run whole and the same step run as its microbatches, one after the other, give
the same tokens, log-probs, top log-probs and prompt log-probs).

The pipeline itself (stages on several devices) is checked on 8 fake devices in
tests/sharding/pipeline_checks.py.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.models import parallel
from jaxinfer.models.transformer import init_params
from jaxinfer.runtime.microbatches import PipelineSchedule, merge_outputs, schedule_span, split_step
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.types import ScheduledSequence, SequenceOutput, SharedPrefix, StepInput

CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64)


def _seq(rid, token_ids, start, pages, sample_offsets, **kw):
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    defaults.update(kw)
    return ScheduledSequence(request_id=rid, token_ids=tuple(token_ids), start_position=start,
                             page_ids=tuple(pages), sample_offsets=tuple(sample_offsets), **defaults)


def test_split_near_equal_pieces():
    # 3 decodes + a 9-token prompt chunk = 12 tokens -> 3 microbatches of 4.
    step = StepInput(sequences=(
        _seq("d0", [5], 7, [0, 1], [0]), _seq("d1", [6], 3, [2], [0]), _seq("d2", [7], 0, [3], [0]),
        _seq("p", range(10, 19), 2, [4, 5, 6], [8], want_prompt_logprobs=True)))
    parts = split_step(step, 3, page_size=4)
    assert [sum(len(s.token_ids) for s in p.sequences) for p in parts] == [4, 4, 4]
    assert [s.request_id for s in parts[0].sequences] == ["d0", "d1", "d2", "p"]
    assert parts[0].sequences[0] is step.sequences[0]  # whole sequences are kept as they are
    first, middle, last = parts[0].sequences[3], parts[1].sequences[0], parts[2].sequences[0]
    assert first.token_ids == (10,) and first.start_position == 2 and first.page_ids == (4,)
    assert first.sample_offsets == () and first.next_token_id == 11
    assert middle.token_ids == (11, 12, 13, 14) and middle.start_position == 3 and middle.page_ids == (4, 5)
    assert middle.next_token_id == 15 and middle.sample_offsets == ()
    assert last.token_ids == (15, 16, 17, 18) and last.start_position == 7 and last.page_ids == (4, 5, 6)
    assert last.sample_offsets == (3,) and last.next_token_id is None
    # Sizes differ by at most one; never more parts than tokens.
    sizes = [sum(len(s.token_ids) for s in p.sequences) for p in split_step(step, 5, page_size=4)]
    assert sorted(sizes) == [2, 2, 2, 3, 3] and sum(sizes) == 12
    assert len(split_step(StepInput(sequences=step.sequences[:2]), 4, page_size=4)) == 2


def test_split_keeps_shared_prefix_steps_and_refuses_duplicates():
    seqs = (_seq("a", range(8, 12), 8, [0, 1, 2], [3]), _seq("b", range(20, 24), 8, [0, 1, 3], [3]))
    shared = StepInput(sequences=seqs, shared_prefixes=(SharedPrefix(page_ids=(0, 1), start_page=0, members=(0, 1)),))
    assert split_step(shared, 4, page_size=4) == [shared]
    assert split_step(StepInput(sequences=seqs), 1, page_size=4) == [StepInput(sequences=seqs)]
    with pytest.raises(ValueError, match="request a appears twice"):
        split_step(StepInput(sequences=(seqs[0], seqs[0])), 2, page_size=4)
    with pytest.raises(ValueError, match="num_microbatches: must be an int >= 1, got 0"):
        split_step(StepInput(sequences=seqs), 0, page_size=4)


def test_merge_concatenates_pieces_in_order():
    a1 = SequenceOutput(request_id="a", token_ids=(), prompt_logprobs=(-1.0, -2.0))
    a2 = SequenceOutput(request_id="a", token_ids=(7,), logprobs=(-0.5,), top_logprobs=(((7, -0.5),),),
                        prompt_logprobs=(-3.0,))
    b = SequenceOutput(request_id="b", token_ids=(4,))
    merged = merge_outputs([{"a": a1, "b": b}, {"a": a2}])
    assert merged["b"] is b
    assert merged["a"] == SequenceOutput(request_id="a", token_ids=(7,), logprobs=(-0.5,),
                                         top_logprobs=(((7, -0.5),),), prompt_logprobs=(-1.0, -2.0, -3.0))


def test_bubble_model():
    # m equal microbatches on p stages: span (m + p - 1) c, bubble (p - 1) / (m + p - 1).
    for m, p in ((1, 2), (2, 2), (4, 2), (3, 4)):
        assert schedule_span([8.0] * m, p) == (m + p - 1) * 8.0
        sched = PipelineSchedule(num_stages=p)
        sched.add([8.0] * m)
        assert sched.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    # Unequal microbatches: the big one sets the pace (F(s, k) recurrence by hand).
    assert schedule_span([4.0, 1.0], 2) == 9.0  # stage 0: 0-4, 4-5; stage 1: 4-8, 8-9
    sched = PipelineSchedule(num_stages=2)
    sched.add([4.0, 1.0])
    sched.add([2.0])
    assert sched.bubble_fraction == pytest.approx((2 * 9 - 10 + 2 * 4 - 4) / (2 * 9 + 2 * 4))
    assert PipelineSchedule(num_stages=2).bubble_fraction == 0.0


def test_pipeline_parallel_size_must_divide_layers():
    with pytest.raises(ValueError, match="pipeline_parallel_size: 3 does not divide num_layers 2"):
        parallel.check_parallel_sizes(CONFIG, 1, 1, 3)
    parallel.check_parallel_sizes(CONFIG, 2, 1, 2)  # built now: no error


def _runner(params):
    return ModelRunner(CONFIG, params, page_size=4, num_pages=16)


def test_split_step_is_exact():
    params = init_params(CONFIG, jax.random.key(0), init_std=0.3)
    whole, split = _runner(params), _runner(params)
    knobs = dict(want_logprobs=True, num_top_logprobs=3, want_prompt_logprobs=True)
    prefill = StepInput(sequences=(
        _seq("a", [1, 5, 9, 33, 7], 0, [0, 1], [4], **knobs),
        _seq("b", [1, 50, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0, [2, 3, 4], [10], temperature=1.0, top_k=20,
             seed=11, **knobs)))
    want = whole.execute(prefill).outputs
    parts = split_step(prefill, 4, page_size=4)  # 16 tokens: a[0:4] | a[4:5] b[0:3] | b[3:7] | b[7:11]
    assert [len(p.sequences) for p in parts] == [1, 2, 1, 1]
    got = merge_outputs([split.execute(p).outputs for p in parts])
    for rid in ("a", "b"):
        assert got[rid].token_ids == want[rid].token_ids, rid
        np.testing.assert_allclose(got[rid].logprobs, want[rid].logprobs, atol=1e-5)
        np.testing.assert_allclose(got[rid].prompt_logprobs, want[rid].prompt_logprobs, atol=1e-5)
        assert len(got[rid].prompt_logprobs) == len(prefill.sequences[rid == "b"].token_ids) - 1
        assert [t for t, _ in got[rid].top_logprobs[0]] == [t for t, _ in want[rid].top_logprobs[0]]
    # A decode step on the caches each runner filled: the same next tokens.
    decode = StepInput(sequences=(
        _seq("a", [want["a"].token_ids[0]], 5, [0, 1], [0]),
        _seq("b", [want["b"].token_ids[0]], 11, [2, 3, 4], [0], temperature=1.0, top_k=20, seed=11)))
    want2 = whole.execute(decode).outputs
    got2 = merge_outputs([split.execute(p).outputs for p in split_step(decode, 2, page_size=4)])
    assert {r: o.token_ids for r, o in got2.items()} == {r: o.token_ids for r, o in want2.items()}
