"""The host batch builder (numpy only): hand-built steps -> the exact padded arrays.

Layouts are worked out by hand in the comments (L = page size 4, P = 16 pages, so the
dropped slot of padding tokens is P * L = 64).
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.runtime.input_batch import (PREFIX_QUERY_BLOCK, QUERY_BLOCK, BatchConfig, build_batch, bucket,
                                          page_bucket, unpack_outputs)
from jaxinfer.types import ScheduledSequence, ScheduledStep, SharedPrefix, StepInput

CONFIG = BatchConfig(page_size=4, num_pages=16, vocab_size=100, max_positions=64)
DROPPED = 16 * 4


def _seq(rid, token_ids, start, pages, sample_offsets, **kw):
    defaults = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    defaults.update(kw)
    return ScheduledSequence(request_id=rid, token_ids=tuple(token_ids), start_position=start,
                             page_ids=tuple(pages), sample_offsets=tuple(sample_offsets), **defaults)


def _eq(actual, expected, dtype=np.int32):
    actual = np.asarray(actual)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    np.testing.assert_array_equal(actual, np.asarray(expected, dtype))


def test_buckets():
    assert [bucket(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert bucket(3, minimum=8) == 8
    assert [page_bucket(n) for n in (1, 3, 16, 17, 24, 25, 64, 65, 73, 240, 241)] == [1, 4, 16, 24, 24, 32, 64, 72,
                                                                                      88, 240, 272]
    for n in range(17, 5000):  # multiples of 8; padding at most 8 pages, or 1/8 of the row + 8 past 64
        b = page_bucket(n)
        assert b >= n and b % 8 == 0 and b - n <= max(7, n // 8 + 8), n
    assert len({page_bucket(n) for n in range(1, 257)}) == 21  # 35 with multiples of 8 all the way
    assert QUERY_BLOCK == CONFIG.query_block and PREFIX_QUERY_BLOCK == CONFIG.prefix_query_block


def test_ragged_prefills_padded_to_buckets():
    seqs = (
        _seq("a", (10, 11, 12), 0, (3,), (2,)),  # a whole prompt: samples after its last token
        _seq("b", (20, 21, 22, 23, 24), 0, (5, 6), (), next_token_id=25),  # mid-prompt chunk: no sample
        _seq("c", (30, 31), 4, (9, 10), (1,), temperature=0.5, top_k=7, top_p=0.9, min_p=0.1,
             seed=(3 << 32) + 9),  # the last chunk of a prompt whose first 4 tokens are cached
    )
    batch = build_batch(StepInput(sequences=seqs), CONFIG)
    d = batch.device
    # 10 tokens -> bucket 16; flat layout in step order (no decodes).
    pad = [0] * 6
    _eq(d.tokens, [10, 11, 12, 20, 21, 22, 23, 24, 30, 31] + pad)
    _eq(d.positions, [0, 1, 2, 0, 1, 2, 3, 4, 4, 5] + pad)
    _eq(d.slot_mapping, [12, 13, 14, 20, 21, 22, 23, 24, 40, 41] + [DROPPED] * 6)
    # Successors: b's last one is its known next token; a and c end their prompts (0).
    _eq(d.targets, [11, 12, 0, 21, 22, 23, 24, 25, 31, 0] + pad)
    # One row per sequence (5 <= max_q_len 8), padded to 4 rows: no queries, no keys.
    assert d.max_q_len == 8 and d.num_decode_rows == 0
    _eq(d.cu_q_lens, [0, 3, 8, 10, 10])
    _eq(d.kv_lens, [3, 5, 6, 0])
    _eq(d.page_tables, [[3, 0], [5, 6], [9, 10], [0, 0]])
    assert d.kv_starts is None and d.prefix is None
    # Sample rows in step order: a after token 2, c after its token 1 (flat 9); b none.
    _eq(d.logits_indices, [2, 9])
    _eq(d.sample_pos, [3, 6])
    _eq(d.temperature, [0.0, 0.5], np.float32)
    _eq(d.top_k, [0, 7])
    _eq(d.top_p, [1.0, 0.9], np.float32)
    _eq(d.min_p, [0.0, 0.1], np.float32)
    _eq(d.seed_hi, [0, 3], np.uint32)
    _eq(d.seed_lo, [0, 9], np.uint32)
    assert not d.all_greedy and not d.all_logits and d.num_top_logprobs == 0
    assert batch.request_ids == ("a", "b", "c")
    _eq(batch.token_offsets, [0, 3, 8], np.int64)
    _eq(batch.sample_starts, [0, 1, 1], np.int64)
    _eq(batch.num_samples, [1, 0, 1], np.int64)
    assert batch.num_real_tokens == 10
    assert batch.shape_key == (16, 2, 0, 4, 2, 8, None, False, False, 0, 0, 0, False)

    outputs = unpack_outputs(batch, np.array([41, 42]), np.array([-0.5, -1.5]), np.zeros((2, 0), np.int32),
                             np.zeros((2, 0), np.float32), np.zeros(0, np.float32))
    assert list(outputs) == ["a", "b", "c"]
    assert [outputs[r].token_ids for r in "abc"] == [(41,), (), (42,)]
    assert all(o.logprobs is None and o.top_logprobs is None and o.prompt_logprobs is None
               for o in outputs.values())


def test_decodes_first_then_a_prefill_chunk():
    seqs = (
        _seq("p", (40, 41, 42, 43, 44, 45), 2, (7, 8), (5,)),  # the rest of a prompt, after 2 cached tokens
        _seq("d1", (50,), 5, (1, 2), (0,)),
        _seq("d2", (60,), 9, (9, 10, 11), (0,), temperature=0.7, seed=(1 << 40) + 5),
    )
    batch = build_batch(StepInput(sequences=seqs), CONFIG)
    d = batch.device
    # Flat layout: decodes first (in step order), then the chunk.
    _eq(d.tokens, [50, 60, 40, 41, 42, 43, 44, 45])
    _eq(d.positions, [5, 9, 2, 3, 4, 5, 6, 7])
    # d1 pos 5 -> its page 1 (id 2) offset 1; d2 pos 9 -> page 2 (id 11) offset 1; p on pages 7, 8.
    _eq(d.slot_mapping, [9, 45, 30, 31, 32, 33, 34, 35])
    _eq(d.targets, [0, 0, 41, 42, 43, 44, 45, 0])
    # Mixed step: 2 decode rows of one query, then the chunk's row (max_q_len 8).
    assert d.max_q_len == 8 and d.num_decode_rows == 2
    _eq(d.cu_q_lens, [0, 1, 2, 8])
    _eq(d.kv_lens, [6, 10, 8])
    _eq(d.page_tables, [[1, 2, 0, 0], [9, 10, 11, 0], [7, 8, 0, 0]])  # 3 pages -> bucket 4
    # Sample rows stay in step order: p, d1, d2, padding.
    _eq(d.logits_indices, [7, 0, 1, 0])
    _eq(d.sample_pos, [8, 6, 10, 0])
    _eq(d.temperature, [0.0, 0.0, 0.7, 0.0], np.float32)
    _eq(d.top_p, [1.0, 1.0, 1.0, 1.0], np.float32)
    _eq(d.seed_hi, [0, 0, 256, 0], np.uint32)
    _eq(d.seed_lo, [0, 0, 5, 0], np.uint32)
    assert not d.all_greedy
    _eq(batch.token_offsets, [2, 0, 1], np.int64)
    _eq(batch.num_tokens, [6, 1, 1])


def test_padding_decode_rows_slots_and_sample_rows():
    seqs = (_seq("x", (70,), 0, (0,), (0,)), _seq("y", (71,), 0, (1,), (0,)), _seq("z", (72,), 0, (2,), (0,)),
            _seq("p", (80, 81), 0, (3,), (1,)))
    d = build_batch(StepInput(sequences=seqs), CONFIG).device
    _eq(d.tokens, [70, 71, 72, 80, 81, 0, 0, 0])
    _eq(d.positions, [0, 0, 0, 0, 1, 0, 0, 0])
    _eq(d.slot_mapping, [0, 4, 8, 12, 13, DROPPED, DROPPED, DROPPED])
    # 3 decodes -> 4 decode rows (the 4th owns no query), then p's row.
    assert d.max_q_len == 2 and d.num_decode_rows == 4
    _eq(d.cu_q_lens, [0, 1, 2, 3, 3, 5])
    _eq(d.kv_lens, [1, 1, 1, 0, 2])
    _eq(d.page_tables, [[0], [1], [2], [0], [3]])
    _eq(d.logits_indices, [0, 1, 2, 4])
    _eq(d.sample_pos, [1, 1, 1, 2])
    assert d.all_greedy


def test_long_sequence_split_into_rows_of_the_query_block():
    config = BatchConfig(page_size=4, num_pages=16, vocab_size=100, max_positions=64, query_block=4)
    seqs = (_seq("p", (1, 2, 3, 4, 5, 6), 0, (0, 1), (5,)), _seq("d", (9,), 3, (2,), (0,)))
    d = build_batch(StepInput(sequences=seqs), config).device
    _eq(d.tokens, [9, 1, 2, 3, 4, 5, 6, 0])
    # The decode row, then p's 6 queries in rows of 4 and 2, each seeing keys up to its last query.
    assert d.max_q_len == 4 and d.num_decode_rows == 1
    _eq(d.cu_q_lens, [0, 1, 5, 7])
    _eq(d.kv_lens, [4, 4, 6])
    _eq(d.page_tables, [[2, 0], [0, 1], [0, 1]])
    _eq(d.logits_indices, [6, 0])


def test_shared_prefix_rows():
    seqs = (_seq("s0", (50,), 9, (1, 2, 3), (0,)), _seq("s1", (51,), 10, (1, 2, 4), (0,)))
    node = SharedPrefix(start_page=0, page_ids=(1, 2), members=(0, 1))
    batch = build_batch(StepInput(sequences=seqs, shared_prefixes=(node,)), CONFIG)
    d = batch.device
    _eq(d.slot_mapping, [13, 18])
    # Own rows start at the node's end (page 2, key 8): their tables hold their own pages only.
    _eq(d.cu_q_lens, [0, 1, 2])
    _eq(d.kv_lens, [10, 11])
    _eq(d.kv_starts, [8, 8])
    _eq(d.page_tables, [[3], [4]])
    # One prefix row: both members' queries over the node's keys [0, 8).
    _eq(d.prefix.q_index, [[0, 1]])
    _eq(d.prefix.kv_starts, [0])
    _eq(d.prefix.kv_ends, [8])
    _eq(d.prefix.page_tables, [[1, 2]])
    # The plain path would read the node's 8 keys in 2 rows; the prefix row reads them once.
    assert batch.shared_prefix_tokens_saved == 8
    assert batch.shape_key[6] == (1, 2, 2)


def test_draft_verify_samples_and_unpacked_outputs():
    seqs = (
        # 3 draft tokens after the last accepted one: 4 samples (one after each fed token)
        _seq("v", (5, 6, 7, 8), 10, (0, 1, 2, 3), (0, 1, 2, 3), want_logprobs=True, num_top_logprobs=3),
        _seq("d", (9,), 2, (4,), (0,)),
    )
    batch = build_batch(StepInput(sequences=seqs), CONFIG)
    d = batch.device
    _eq(d.tokens, [9, 5, 6, 7, 8, 0, 0, 0])
    _eq(d.logits_indices, [1, 2, 3, 4, 0, 0, 0, 0])
    _eq(d.sample_pos, [11, 12, 13, 14, 3, 0, 0, 0])
    assert d.num_top_logprobs == 4  # 3 bucketed
    _eq(batch.sample_starts, [0, 4], np.int64)
    _eq(batch.num_samples, [4, 1], np.int64)
    sampled = np.arange(100, 108)
    logprobs = -np.arange(8) / 4
    top_ids = np.arange(32).reshape(8, 4)
    top_lps = -np.arange(32).reshape(8, 4) / 2
    out = unpack_outputs(batch, sampled, logprobs, top_ids, top_lps, np.zeros(0, np.float32))
    v, dd = out["v"], out["d"]
    assert v.request_id == "v" and v.token_ids == (100, 101, 102, 103)
    assert v.logprobs == (0.0, -0.25, -0.5, -0.75)
    # Only the 3 asked for, not the bucket's 4.
    assert v.top_logprobs == tuple(tuple((4 * r + j, -(4 * r + j) / 2) for j in range(3)) for r in range(4))
    assert all(type(t) is int and type(lp) is float for row in v.top_logprobs for t, lp in row)
    assert dd.token_ids == (104,) and dd.logprobs is None and dd.top_logprobs is None


def test_prompt_logprobs_layout_and_unpacking():
    seqs = (
        _seq("a", (10, 11, 12), 0, (0,), (2,), want_prompt_logprobs=True),  # whole prompt: 2 successors known
        _seq("b", (20, 21), 0, (1,), (), want_prompt_logprobs=True, next_token_id=22),  # chunk: 2 successors
        _seq("c", (30,), 5, (2, 3), (0,)),  # a decode without prompt logprobs
    )
    batch = build_batch(StepInput(sequences=seqs), CONFIG)
    d = batch.device
    assert d.all_logits
    _eq(d.tokens, [30, 10, 11, 12, 20, 21, 0, 0])
    _eq(d.targets, [0, 11, 12, 0, 21, 22, 0, 0])
    assert batch.num_prompt_logprobs == (2, 2, None)
    prompt_lps = -np.arange(8, dtype=np.float32)
    out = unpack_outputs(batch, np.array([7, 8]), np.zeros(2), np.zeros((2, 0)), np.zeros((2, 0)), prompt_lps)
    assert out["a"].prompt_logprobs == (-1.0, -2.0)
    assert out["b"].prompt_logprobs == (-4.0, -5.0) and out["b"].token_ids == ()
    assert out["c"].prompt_logprobs is None and out["c"].token_ids == (8,)


def test_a_scheduled_step_carries_its_step_input():
    seqs = (_seq("a", (1, 2), 0, (0,), (1,)), _seq("b", (3,), 0, (1,), (0,)))
    step = ScheduledStep.make(3, StepInput(sequences=seqs))
    assert step.step_id == 3 and dict(step.num_scheduled_tokens) == {"a": 2, "b": 1}
    assert step.num_tokens == 3 and step.num_sequences == 2
    batch = build_batch(step.step_input, CONFIG)
    assert batch.request_ids == ("a", "b")
    with pytest.raises(ValueError, match="appears twice"):
        ScheduledStep.make(4, StepInput(sequences=seqs + (seqs[0],)))


@pytest.mark.parametrize("seq, message", [
    (_seq("bad", (5, 100), 0, (0,), (1,)), r"request bad: token id 100 outside the vocabulary \[0, 100\)"),
    (_seq("bad", (-1,), 0, (0,), (0,)), "request bad: token id -1 outside the vocabulary"),
    (_seq("bad", (), 0, (0,), ()), "request bad: token_ids is empty"),
    (_seq("bad", (5, 6), 63, tuple(range(16)), (1,)), r"request bad: positions \[63, 65\) outside the model's "
                                                        "context of 64"),
    (_seq("bad", (5, 6), -1, (0,), (1,)), r"request bad: positions \[-1, 1\)"),
    (_seq("bad", (5, 6), 3, (0,), (1,)), "request bad: page_ids: 1 pages cannot hold 5 tokens"),
    (_seq("bad", (5,), 0, (16,), (0,)), r"request bad: page_ids: page 16 outside \[0, 16\)"),
    (_seq("bad", (5,), 0, (-1,), (0,)), r"request bad: page_ids: page -1 outside \[0, 16\)"),
    (_seq("bad", (5, 6), 0, (0,), (2,)), r"request bad: sample_offsets \(2,\) must be increasing indices"),
    (_seq("bad", (5, 6), 0, (0,), (1, 0)), "request bad: sample_offsets"),
    (_seq("bad", (5, 6), 0, (0,), (1, 1)), "request bad: sample_offsets"),
    (_seq("bad", (5, 6), 0, (0,), (), next_token_id=100), "request bad: next_token_id 100 outside the vocabulary"),
])
def test_rejects_out_of_range_sequences(seq, message):
    good = _seq("good", (1,), 0, (2,), (0,))
    with pytest.raises(ValueError, match=message):
        build_batch(StepInput(sequences=(good, seq)), CONFIG)


def test_rejects_an_empty_step_and_repeated_requests():
    with pytest.raises(ValueError, match="no sequences"):
        build_batch(StepInput(sequences=()), CONFIG)
    seq = _seq("a", (1,), 0, (2,), (0,))
    with pytest.raises(ValueError, match="request a appears twice"):
        build_batch(StepInput(sequences=(seq, seq)), CONFIG)


@pytest.mark.parametrize("node, message", [
    (SharedPrefix(start_page=0, page_ids=(1, 3), members=(0, 1)), r"shared_prefixes\[0\]: pages differ from "
                                                                  "request s0's pages"),
    (SharedPrefix(start_page=0, page_ids=(1, 2, 3), members=(0,)), r"shared_prefixes\[0\]: reaches position 12, "
                                                                   "past request s0's first query at 9"),
    (SharedPrefix(start_page=0, page_ids=(1, 2), members=(0, 5)), r"shared_prefixes\[0\]: member 5 is not a "
                                                                  "sequence"),
    (SharedPrefix(start_page=1, page_ids=(2,), members=(0, 1)), "shared_prefixes: request s0's nodes leave a gap"),
    (SharedPrefix(start_page=0, page_ids=(), members=(0, 1)), r"shared_prefixes\[0\]: needs pages"),
    (SharedPrefix(start_page=0, page_ids=(1, 2), members=(0, 0)), r"shared_prefixes\[0\]: .*distinct members"),
])
def test_rejects_inconsistent_shared_prefixes(node, message):
    seqs = (_seq("s0", (50,), 9, (1, 2, 3), (0,)), _seq("s1", (51,), 9, (1, 2, 4), (0,)))
    with pytest.raises(ValueError, match=message):
        build_batch(StepInput(sequences=seqs, shared_prefixes=(node,)), CONFIG)
