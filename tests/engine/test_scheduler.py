"""Scheduler and block manager without jax: hand-driven steps and hand-built outputs."""
from __future__ import annotations

import ast
import pathlib

import pytest

from jaxinfer.config import SamplingParams
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.types import SequenceOutput, StepOutput, StepStats


def _request(rid, prompt_len, max_tokens=4):
    return Request(str(rid), list(range(3, 3 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0),
                   seed=0)


def _run_step(scheduler, next_token=7):
    """Schedules one step and plays the runner with a hand-built StepOutput: every
    sequence gets `next_token` at each of its sample offsets. Returns the step's
    StepInput (None when nothing ran) and its (request, num_tokens) pairs in batch order."""
    requests = {r.request_id: r for r in scheduler.running + scheduler.waiting}
    step = scheduler.schedule()
    if step is None:
        return None, []
    chosen = [(requests[s.request_id], len(s.token_ids)) for s in step.step_input.sequences]
    assert dict(step.num_scheduled_tokens) == {r.request_id: n for r, n in chosen}
    out = StepOutput(outputs={s.request_id: SequenceOutput(request_id=s.request_id,
                                                           token_ids=(next_token,) * len(s.sample_offsets))
                              for s in step.step_input.sequences},
                     stats=StepStats(num_tokens=step.num_tokens))
    scheduler.update(step, out)
    return step.step_input, chosen


def test_block_manager_refcounts_and_errors():
    bm = BlockManager(num_pages=4, page_size=2)
    assert bm.pages_needed(5) == 3
    pages = bm.allocate(3)
    assert len(set(pages)) == 3 and bm.num_free_pages == 1
    assert not bm.can_allocate(2)
    with pytest.raises(RuntimeError, match="out of KV pages"):
        bm.allocate(2)
    bm.free(pages)
    assert bm.num_free_pages == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        bm.free(pages[:1])


def test_token_budget_chunks_prefill_and_decodes_go_first():
    s = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8, max_num_seqs=8)
    a, b = _request("a", 3), _request("b", 20)
    s.add(a)
    s.add(b)
    step, chosen = _run_step(s)
    # a's whole prompt (3) + the first 5 tokens of b's prompt.
    assert [(r.request_id, n) for r, n in chosen] == [("a", 3), ("b", 5)]
    assert step.sequences[0].sample_offsets == (2,) and step.sequences[1].sample_offsets == ()
    assert step.sequences[1].start_position == 0 and step.sequences[1].next_token_id == b.prompt_ids[5]
    step, chosen = _run_step(s)
    # Decode of a first, then 7 more tokens of b.
    assert [(r.request_id, n) for r, n in chosen] == [("a", 1), ("b", 7)]
    assert step.sequences[1].start_position == 5
    while s.has_unfinished:
        step, chosen = _run_step(s)
        assert sum(n for _, n in chosen) <= 8
    assert a.output_ids == [7] * 4 and b.output_ids == [7] * 4
    assert s.block_manager.num_free_pages == 64


def test_max_num_seqs_limits_running():
    s = Scheduler(BlockManager(64, 4), max_num_batched_tokens=100, max_num_seqs=2)
    for i in range(4):
        s.add(_request(i, 2))
    _, chosen = _run_step(s)
    assert [r.request_id for r, _ in chosen] == ["0", "1"]
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_preempts_the_most_recently_admitted_and_recomputes():
    # 6 pages of 2 tokens. Three requests of 4 prompt tokens take 2 pages each; their
    # first decode needs a third page each: the newest gets preempted.
    s = Scheduler(BlockManager(6, 2), max_num_batched_tokens=100, max_num_seqs=8)
    # Distinct prompts (identical ones would wait for the first one's pages and share them).
    reqs = [Request(str(i), list(range(3 + 10 * i, 7 + 10 * i)), SamplingParams(max_tokens=3, temperature=0), seed=0)
            for i in range(3)]
    for r in reqs:
        s.add(r)
    _run_step(s)  # prefill all three, each samples one token
    assert s.block_manager.num_free_pages == 0
    _, chosen = _run_step(s)
    assert s.num_preemptions >= 1
    assert reqs[2] in s.waiting and reqs[2].num_computed == 0 and reqs[2].page_ids == []
    assert [r.request_id for r, _ in chosen] == ["0", "1"]
    while s.has_unfinished:
        _run_step(s)
    assert all(r.output_ids == [7, 7, 7] for r in reqs)
    assert s.block_manager.num_free_pages == 6


def test_host_side_modules_never_import_jax():
    """The scheduler, block manager and what they import are pure Python/numpy."""
    root = pathlib.Path(__file__).resolve().parents[2] / "jaxinfer"
    for rel in ("engine/scheduler.py", "engine/block_manager.py", "engine/request.py", "engine/speculative.py",
                "config/__init__.py", "config/checks.py", "types.py"):
        tree = ast.parse((root / rel).read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in ("jax", "flax", "jaxlib"), f"{rel} imports {name}"


def test_prefix_cache_hash_chain_sharing_and_lru_eviction():
    from jaxinfer.engine.block_manager import page_hashes
    tokens = list(range(10, 22))  # 3 full pages of 4
    chain = page_hashes(tokens, 4)
    assert len(chain) == 3 and len(set(chain)) == 3
    # A chain depends on everything before it: same page tokens after a different prefix differ.
    assert page_hashes([0] + tokens[1:], 4)[1] != chain[1]
    assert page_hashes(tokens, 4, salt="b") != chain
    assert page_hashes(tokens, 4, start=2, parent=chain[1]) == chain[2:]

    bm = BlockManager(num_pages=4, page_size=4)
    pages = bm.allocate(3)
    for p, h in zip(pages, chain):
        bm.register(p, h)
    assert bm.match_prefix(chain, max_pages=3) == pages
    assert bm.match_prefix(chain, max_pages=2) == pages[:2]
    bm.share(pages[:2])  # a second sequence shares two pages
    bm.free(pages)
    assert bm.num_free_pages == 2  # pages[2] and the never-used page
    bm.free(pages[:2])
    assert bm.num_free_pages == 4 and bm.num_cached_pages == 3
    # Freed cached pages stay findable; allocation takes the uncached page first, then
    # evicts the least recently freed cached page (pages[2], freed first).
    assert bm.match_prefix(chain, 3) == pages
    first = bm.allocate(1)
    assert first[0] not in pages
    second = bm.allocate(1)
    assert second == [pages[2]]
    assert bm.match_prefix(chain, 3) == pages[:2]
    assert bm.can_admit(pages[:2], 0) and not bm.can_admit(pages[:2], 1)


def test_scheduler_reuses_cached_prefix_and_leaves_one_token_to_compute():
    s = Scheduler(BlockManager(32, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a = _request("a", 8, max_tokens=1)
    s.add(a)
    while s.has_unfinished:
        _run_step(s)
    b = _request("b", 8, max_tokens=1)  # same 8 prompt tokens: 2 full pages cached
    s.add(b)
    _, chosen = _run_step(s)
    # Both pages hit but one token must be computed for logits: page 2 is recomputed.
    assert chosen == [(b, 4)]
    assert s.block_manager.num_cache_hits == 4 and s.block_manager.num_cache_queries == 16
    c = _request("c", 10, max_tokens=1)  # 2 cached full pages + 2 new tokens
    s.add(c)
    _, chosen = _run_step(s)
    assert chosen == [(c, 2)]
    assert s.block_manager.num_free_pages == 32


def _outputs(step, tokens):
    """request id -> its SequenceOutput, built in reverse batch order (update must match by id)."""
    return StepOutput(outputs={s.request_id: SequenceOutput(request_id=s.request_id, token_ids=tokens[s.request_id])
                               for s in reversed(step.step_input.sequences)})


def test_update_matches_outputs_by_request_id_and_skips_aborted_requests():
    s = Scheduler(BlockManager(16, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a, b, c = _request("a", 3), _request("b", 2), _request("c", 2)
    for r in (a, b, c):
        s.add(r)
    step = s.schedule()
    assert step.step_id == 0 and dict(step.num_scheduled_tokens) == {"a": 3, "b": 2, "c": 2}
    assert step.num_tokens == 7 and step.num_sequences == 3
    s.finish(c, "abort")  # aborted while the step is in flight
    assert c.is_finished and c.finish_reason == "abort" and c.page_ids == []
    touched = s.update(step, _outputs(step, {"a": (11,), "b": (12,), "c": (13,)}))
    assert touched == [(a, 1), (b, 1)]
    assert a.output_ids == [11] and b.output_ids == [12] and c.output_ids == []
    with pytest.raises(ValueError, match="step_output: no output for request 'b' of step 1"):
        step = s.schedule()
        s.update(step, StepOutput(outputs={"a": SequenceOutput(request_id="a", token_ids=(1,))}))


def test_update_appends_several_tokens_and_stops_at_the_first_finishing_one():
    s = Scheduler(BlockManager(16, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a = Request("a", [3, 4], SamplingParams(max_tokens=9, stop_token_ids=[9], logprobs=True), seed=0)
    b = _request("b", 2, max_tokens=2)
    s.add(a)
    s.add(b)
    step = s.schedule()
    # As a draft-verify step would return: several tokens per sequence.
    out = StepOutput(outputs={
        "a": SequenceOutput(request_id="a", token_ids=(5, 9, 6), logprobs=(-1.0, -2.0, -3.0)),
        "b": SequenceOutput(request_id="b", token_ids=(7, 7, 7))})
    assert s.update(step, out) == [(a, 2), (b, 2)]
    assert a.output_ids == [5, 9] and a.logprobs == [-1.0, -2.0] and a.finish_reason == "stop"
    assert b.output_ids == [7, 7] and b.finish_reason == "length"
    assert not s.has_unfinished and s.block_manager.num_free_pages == 16


def test_eos_ends_unless_ignored():
    s = Scheduler(BlockManager(16, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a = Request("a", [3], SamplingParams(max_tokens=5), seed=0, eos_token_ids=(2,))
    b = Request("b", [3], SamplingParams(max_tokens=5, ignore_eos=True), seed=0, eos_token_ids=(2,))
    s.add(a)
    s.add(b)
    while s.has_unfinished:
        _run_step(s, next_token=2)
    assert (a.output_ids, a.finish_reason) == ([2], "eos")
    assert (b.output_ids, b.finish_reason) == ([2] * 5, "length")


def test_a_prompt_whose_prefix_is_being_computed_waits_for_those_pages():
    s = Scheduler(BlockManager(64, 4), max_num_batched_tokens=8, max_num_seqs=8)
    params = SamplingParams(max_tokens=2, temperature=0)
    a = Request("a", list(range(3, 17)), params, seed=0)  # 14 tokens: 3 full pages + 2
    b = Request("b", list(range(3, 15)) + [90, 91, 92, 93], params, seed=0)  # a's first 3 pages, then its own
    c = Request("c", list(range(40, 46)), params, seed=0)  # nothing shared
    other_tenant = Request("t", list(range(3, 15)) + [90, 91, 92, 93], params, seed=0, cache_salt="x")
    for r in (a, b, c, other_tenant):
        s.add(r)
    _, chosen = _run_step(s)
    assert chosen == [(a, 8)]
    _, chosen = _run_step(s)
    # a's third page is still being computed: b waits (without blocking c behind it).
    assert chosen == [(a, 6), (c, 2)] and b in s.waiting and s.num_prefix_waits == 1
    _, chosen = _run_step(s)
    # a's prompt pages are registered: b shares all three and computes its own page
    # only; the other tenant's hashes differ, so it never waited and shares nothing.
    assert b in s.running and b.num_hit_pages == 3 and b.num_cached_tokens == 12
    assert [n for r, n in chosen if r is b] == [3]  # of its 4 own tokens (a decodes, c finishes its prompt first)
    assert s.num_prefix_waits == 1
    while s.has_unfinished:
        _run_step(s)
    assert other_tenant.num_hit_pages == 0


def test_no_wait_without_prefix_caching():
    s = Scheduler(BlockManager(64, 4, enable_prefix_caching=False), max_num_batched_tokens=8, max_num_seqs=8)
    params = SamplingParams(max_tokens=1, temperature=0)
    a, b = Request("a", list(range(3, 17)), params, seed=0), Request("b", list(range(3, 17)), params, seed=0)
    s.add(a)
    s.add(b)
    _run_step(s)
    _, chosen = _run_step(s)
    assert chosen == [(a, 6), (b, 2)] and s.num_prefix_waits == 0
