"""Page tables: a request can never read a page it does not own.

Hand-crafted bad StepInputs are refused on the host (runtime/step_checks.py, run by
input_batch.build_batch) with a ValueError naming the request and field, before any
array is built; for valid steps, every page id the device receives is in range and
every page a row can read (positions below its kv_len) is one of its own sequence's
pages. Random steps check both directions: valid ones lay out only owned, in-range
pages; each random corruption of a valid one is refused.
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from jaxinfer.runtime.input_batch import BatchConfig, build_batch
from jaxinfer.types import ScheduledSequence, SharedPrefix, StepInput

P, L = 32, 4
CONFIG = BatchConfig(page_size=L, num_pages=P, vocab_size=50, max_positions=64)  # at most 16 pages a sequence


def _seq(rid, tokens, start, pages, offsets=None):
    return ScheduledSequence(request_id=rid, token_ids=tuple(tokens), start_position=start, page_ids=tuple(pages),
                             sample_offsets=(len(tokens) - 1,) if offsets is None else tuple(offsets),
                             temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)


GOOD = _seq("good", [1], 5, [20, 21])


@pytest.mark.parametrize("bad, message", [
    (_seq("bad", [1, 2], 0, [P]), rf"request bad: page_ids: page {P} outside \[0, {P}\)"),
    (_seq("bad", [1, 2], 0, [-1]), rf"request bad: page_ids: page -1 outside \[0, {P}\)"),
    (_seq("bad", [1, 2], 4, [0, 2**40]), r"request bad: page_ids: page 1099511627776 outside"),
    (_seq("bad", [1, 2], 0, list(range(17))), "request bad: page_ids: 17 pages, more than the 16 a sequence of 64"),
    (_seq("bad", [1, 2, 3], 6, [0, 1]), "request bad: page_ids: 2 pages cannot hold 9 tokens"),
    (_seq("bad", [1], 0, []), "request bad: page_ids: 0 pages cannot hold 1 tokens"),
    (_seq("bad", [1, 2], 4, [3, 3]), "request bad: page_ids: a page appears twice in its page table"),
    (_seq("bad", [1, 2], 0, [1.5]), "request bad: page_ids: must be integers"),
    (_seq("bad", [1, 2], 0, ["3"]), "request bad: page_ids: must be integers"),
    (_seq("bad", [1, 2], 0, [None]), "request bad: page_ids: must be integers"),
    (_seq("bad", [1.0, 2], 0, [0]), "request bad: token_ids: must be integers"),
    # Both write page 21 ("good" its position 5, "bad" its position 8).
    (_seq("bad", [7], 8, [4, 5, 21]), "request (good|bad): page_ids: page 21, which it writes in this step, is also "
                                      "in the page table of request (good|bad)"),
    # It reads page 21 (its positions 0..3), which "good" writes in this step.
    (_seq("bad", [7], 8, [21, 4, 5]), "request good: page_ids: page 21, which it writes in this step, is also in "
                                      "the page table of request bad"),
])
def test_bad_page_tables_are_refused_on_the_host(bad, message):
    with pytest.raises(ValueError, match=message):
        build_batch(StepInput(sequences=(GOOD, bad)), CONFIG)
    with pytest.raises(ValueError, match=message):
        build_batch(StepInput(sequences=(bad, GOOD)), CONFIG)


def test_two_sequences_writing_one_page_are_refused():
    a = _seq("a", [1, 2], 0, [7])
    b = _seq("b", [3], 2, [7])  # writes position 2 of page 7, as a does
    with pytest.raises(ValueError, match="page 7, which it writes in this step, is also in the page table"):
        build_batch(StepInput(sequences=(a, b)), CONFIG)


def test_reading_a_shared_full_page_is_allowed():
    # Prefix-cache sharing: both read page 3 (positions 0..3), each writes its own page.
    a = _seq("a", [1, 2], 4, [3, 8])
    b = _seq("b", [5], 4, [3, 9])
    batch = build_batch(StepInput(sequences=(a, b)), CONFIG)
    assert set(np.unique(batch.device.page_tables)) <= {0, 3, 8, 9}


@pytest.mark.parametrize("node, message", [
    (SharedPrefix(start_page=0, page_ids=(3, 4), members=(0, 1)), r"shared_prefixes\[0\]: pages differ from "
                                                                  r"request b's pages"),
    (SharedPrefix(start_page=0, page_ids=(3,), members=(0, 2)), r"shared_prefixes\[0\]: member 2 is not a sequence"),
    (SharedPrefix(start_page=0, page_ids=(3,), members=(0, -1)), r"shared_prefixes\[0\]: member -1 is not"),
    (SharedPrefix(start_page=0, page_ids=(P + 1,), members=(0, 1)), r"shared_prefixes\[0\]: pages differ"),
    (SharedPrefix(start_page=1, page_ids=(4,), members=(0,)), r"request a's nodes leave a gap"),
    (SharedPrefix(start_page=0, page_ids=(3, 4, 5), members=(0,)), r"shared_prefixes\[0\]: reaches position 12"),
    (SharedPrefix(start_page=0, page_ids=(), members=(0,)), r"shared_prefixes\[0\]: needs pages"),
    (SharedPrefix(start_page=0, page_ids=(3,), members=(0, 0)), r"shared_prefixes\[0\]: needs .* distinct members"),
])
def test_bad_shared_prefix_nodes_are_refused(node, message):
    a = _seq("a", [1, 2], 8, [3, 4, 5])
    b = _seq("b", [6], 8, [3, 9, 10])
    with pytest.raises(ValueError, match=message):
        build_batch(StepInput(sequences=(a, b), shared_prefixes=(node,)), CONFIG)


def _random_valid_step(rng: random.Random) -> StepInput:
    """Sequences over disjoint private pages, some sharing full prefix pages they only read."""
    free = list(range(P))
    rng.shuffle(free)
    shared = [free.pop() for _ in range(rng.randint(0, 3))]  # full pages some sequences share
    seqs = []
    for i in range(rng.randint(1, 5)):
        use_shared = shared[:rng.randint(0, len(shared))] if rng.random() < 0.5 else []
        start = len(use_shared) * L + rng.randint(0, 6)
        num = rng.randint(1, 9)
        end = start + num
        own = [free.pop() for _ in range(-(-end // L) - len(use_shared)) if free]
        if len(use_shared) + len(own) < -(-end // L):
            break
        pages = use_shared + own + [free.pop() for _ in range(rng.randint(0, 2)) if free]  # spare pages past end
        seqs.append(_seq(f"r{i}", [rng.randrange(50) for _ in range(num)], start, pages))
    if not seqs:
        seqs.append(_seq("r", [1], 0, [free.pop()]))
    return StepInput(sequences=tuple(seqs))


def _assert_only_owned_pages(step: StepInput, batch) -> None:
    d = batch.device
    assert d.page_tables.min() >= 0 and d.page_tables.max() < P
    assert d.slot_mapping.min() >= 0 and d.slot_mapping.max() <= P * L
    real = np.zeros(d.tokens.size, bool)
    for i, seq in enumerate(step.sequences):
        off = int(batch.token_offsets[i])
        real[off:off + len(seq.token_ids)] = True
        slots = d.slot_mapping[off:off + len(seq.token_ids)]
        assert set((slots // L).tolist()) <= set(seq.page_ids)  # writes only into its own pages
    assert (d.slot_mapping[~real] == P * L).all()  # padding writes nowhere
    # Rows: the pages a row can read (its keys below kv_len) are its sequence's.
    starts, ends = batch.token_offsets, batch.token_offsets + batch.num_tokens
    for r in range(d.kv_lens.size):
        kv_len = int(d.kv_lens[r])
        if kv_len == 0:
            continue
        last_query = int(d.cu_q_lens[r + 1]) - 1
        (owner,) = np.flatnonzero((starts <= last_query) & (last_query < ends))
        seq = step.sequences[int(owner)]
        visible = d.page_tables[r, :-(-kv_len // L)]
        assert list(visible) == list(seq.page_ids[:len(visible)])


def _corruptions(step: StepInput, rng: random.Random):
    """(description, corrupted step) pairs a host check must refuse."""
    i = rng.randrange(len(step.sequences))
    seq = step.sequences[i]
    pages = list(seq.page_ids)
    j = rng.randrange(len(pages))

    def with_pages(new):
        seqs = list(step.sequences)
        seqs[i] = dataclasses.replace(seq, page_ids=tuple(new))
        return StepInput(sequences=tuple(seqs))

    yield "out of range", with_pages(pages[:j] + [rng.choice([P, P + 7, -1, -P])] + pages[j + 1:])
    yield "too short", with_pages(pages[:(seq.start_position + len(seq.token_ids) - 1) // L])
    if len(pages) > 1:
        yield "duplicate", with_pages(pages[:j] + [pages[j - 1]] + pages[j + 1:])
    yield "too long", with_pages(pages + list(range(P))[:16])
    others = [s for k, s in enumerate(step.sequences) if k != i]
    if others:  # it writes into a page another sequence holds
        victim = rng.choice(others).page_ids[0]
        write_page = (seq.start_position + len(seq.token_ids) - 1) // L
        if victim not in pages:
            yield "writes another's page", with_pages(pages[:write_page] + [victim] + pages[write_page + 1:])


def test_random_steps_reach_the_device_with_owned_in_range_pages_only():
    rng = random.Random(0)
    refused = 0
    for _ in range(300):
        step = _random_valid_step(rng)
        _assert_only_owned_pages(step, build_batch(step, CONFIG))
        for what, bad in _corruptions(step, rng):
            with pytest.raises(ValueError, match="page_ids") as info:
                build_batch(bad, CONFIG)
            assert "whole-step" not in str(info.value), what  # the per-sequence checks named it
            refused += 1
    assert refused > 900
