"""Host checks of a StepInput before any of it reaches the device (numpy only, no jax).

Path: engine -> StepInput -> input_batch.build_batch -> **check_step** -> arrays -> runner.

Why. XLA clamps out-of-range gathers and drops out-of-range scatters silently, so a bad
page id would not fail on the device: it would read (or write) another request's KV.
Every id, position and page therefore is checked here, on the host, and a bad step is
refused with a ValueError naming the request (or `shared_prefixes`) and the field.

What is checked, per sequence:
- `token_ids`: integers, at least one, each in [0, V); `next_token_id` in [0, V);
- positions `[start_position, start_position + len(token_ids))` inside the model's
  context;
- `page_ids`: integers in [0, P); no page twice; enough pages to hold every position up
  to the last fed token, and no more than a sequence of the whole context could use
  (ceil(max_positions / L));
- `sample_offsets`: increasing indices into the fed tokens;
and across the step:
- request ids are distinct (outputs are keyed by them);
- a page a sequence writes in this step (the pages holding its fed positions) is in no
  other sequence's page table: a request can never read (or write) a page another one
  is filling;
- shared-prefix nodes (`_check_shared`): pages, start page and members valid; each
  member's own page list holds the node's pages at the node's place; the node ends at
  or before the member's first query; a member's nodes tile its positions from 0.

The common case runs as a handful of whole-step array operations (`_step_is_valid`);
only when that fails do the per-sequence checks run to name the first bad request and
field.
"""
from __future__ import annotations

import itertools

import numpy as np


def int_array(values, what: str) -> np.ndarray:
    """`values` as an int64 vector; ValueError naming `what` unless they are all integers
    (Python's bools are integers here too, as everywhere in Python)."""
    values = list(values)
    if not values:
        return np.zeros(0, np.int64)
    arr = np.array(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise ValueError(f"{what}: must be integers, got {values[:4]!r}{'...' if len(values) > 4 else ''}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{what}: value {int(arr.max())} is too large")
    return arr.astype(np.int64, copy=False)


def _flat_ints(seqs, field: str):
    """Every sequence's `field` concatenated as int64, or None when some entry is no int
    (or one beyond int64: the slow path names it)."""
    values = list(itertools.chain.from_iterable(getattr(s, field) for s in seqs))
    if not values:
        return np.zeros(0, np.int64)
    arr = np.array(values)
    if arr.ndim != 1 or arr.dtype.kind not in "ib":
        return None
    return arr.astype(np.int64, copy=False)


def max_pages_per_sequence(config) -> int:
    """The most pages one sequence can use: its whole context."""
    return -(-config.max_positions // config.page_size)


def check_sequence(seq, config) -> None:
    """Raises ValueError naming the request and field if one sequence is bad."""
    rid = seq.request_id
    ids = int_array(seq.token_ids, f"request {rid}: token_ids")
    if ids.size == 0:
        raise ValueError(f"request {rid}: token_ids is empty")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        bad = int(ids[(ids < 0) | (ids >= config.vocab_size)][0])
        raise ValueError(f"request {rid}: token id {bad} outside the vocabulary [0, {config.vocab_size})")
    if seq.next_token_id is not None and not (isinstance(seq.next_token_id, (int, np.integer))
                                              and 0 <= seq.next_token_id < config.vocab_size):
        raise ValueError(f"request {rid}: next_token_id {seq.next_token_id!r} outside the vocabulary "
                         f"[0, {config.vocab_size})")
    if not isinstance(seq.start_position, (int, np.integer)) or isinstance(seq.start_position, bool):
        raise ValueError(f"request {rid}: start_position must be an int, got {seq.start_position!r}")
    end = seq.start_position + ids.size
    if seq.start_position < 0 or end > config.max_positions:
        raise ValueError(f"request {rid}: positions [{seq.start_position}, {end}) outside the "
                         f"model's context of {config.max_positions}")
    pages = int_array(seq.page_ids, f"request {rid}: page_ids")
    if pages.size and (pages.min() < 0 or pages.max() >= config.num_pages):
        bad = int(pages[(pages < 0) | (pages >= config.num_pages)][0])
        raise ValueError(f"request {rid}: page_ids: page {bad} outside [0, {config.num_pages})")
    if pages.size * config.page_size < end:
        raise ValueError(f"request {rid}: page_ids: {pages.size} pages cannot hold {end} tokens")
    limit = max_pages_per_sequence(config)
    if pages.size > limit:
        raise ValueError(f"request {rid}: page_ids: {pages.size} pages, more than the {limit} a sequence of "
                         f"{config.max_positions} positions can use")
    if np.unique(pages).size != pages.size:
        raise ValueError(f"request {rid}: page_ids: a page appears twice in its page table")
    offsets = tuple(seq.sample_offsets)
    if any(not isinstance(o, (int, np.integer)) or not 0 <= o < ids.size for o in offsets) \
            or list(offsets) != sorted(set(offsets)):
        raise ValueError(f"request {rid}: sample_offsets {offsets} must be increasing indices into "
                         f"its {ids.size} fed tokens")


def _written_page_mask(starts, ends, num_own_pages, page_size: int) -> np.ndarray:
    """[flat pages] bool: the page holds a position the sequence writes in this step."""
    seq_of = np.repeat(np.arange(num_own_pages.size), num_own_pages)
    first = np.concatenate([[0], np.cumsum(num_own_pages)[:-1]]).astype(np.int64)
    index = np.arange(int(num_own_pages.sum())) - first[seq_of]
    return (index >= (starts // page_size)[seq_of]) & (index <= ((ends - 1) // page_size)[seq_of])


def _writes_are_private(flat_pages, written) -> bool:
    """Each page written in the step occurs once in all the step's tables (its writer's)."""
    ordered = np.sort(flat_pages)
    pages = flat_pages[written]
    return bool((np.searchsorted(ordered, pages, "right") - np.searchsorted(ordered, pages, "left") == 1).all())


def _check_disjoint_writes(seqs, flat_pages, written, num_own_pages) -> None:
    """Raises when a page written by one sequence is in another sequence's table."""
    pages_written = flat_pages[written]
    uniq, counts = np.unique(pages_written, return_counts=True)
    clash = set(uniq[counts > 1].tolist()) | set(np.intersect1d(pages_written, flat_pages[~written]).tolist())
    if not clash:
        return
    page = min(clash)
    seq_of = np.repeat(np.arange(len(seqs)), num_own_pages)
    holders = sorted({int(i) for i in seq_of[flat_pages == page]})
    writers = sorted({int(i) for i in seq_of[(flat_pages == page) & written]})
    raise ValueError(f"request {seqs[writers[0]].request_id}: page_ids: page {page}, which it writes in this "
                     f"step, is also in the page table of request "
                     f"{seqs[next(i for i in holders if i != writers[0])].request_id}")


def _step_is_valid(seqs, config, lens, starts, num_own_pages, flat_ids, flat_pages) -> bool:
    """The checks of check_sequence over the whole step at once (the hot path)."""
    if flat_ids is None or flat_pages is None:
        return False
    ends = starts + lens
    if lens.min() == 0 or starts.min() < 0 or ends.max() > config.max_positions:
        return False
    if flat_ids.min() < 0 or flat_ids.max() >= config.vocab_size:
        return False
    if (num_own_pages * config.page_size < ends).any() or num_own_pages.max() > max_pages_per_sequence(config):
        return False
    if flat_pages.size and (flat_pages.min() < 0 or flat_pages.max() >= config.num_pages):
        return False
    # No page twice in one table: (sequence, page) pairs are distinct.
    keys = np.sort(np.repeat(np.arange(len(seqs), dtype=np.int64), num_own_pages) * config.num_pages + flat_pages)
    if keys.size > 1 and not (keys[1:] != keys[:-1]).all():
        return False
    for s, n in zip(seqs, lens.tolist()):
        if s.next_token_id is not None and not 0 <= s.next_token_id < config.vocab_size:
            return False
        offsets = s.sample_offsets
        if offsets and (offsets[0] < 0 or offsets[-1] >= n
                        or any(a >= b for a, b in zip(offsets, offsets[1:]))):
            return False
    return True


def check_step(step, config):
    """Checks a whole StepInput (see the module docstring).

    Args:
      step: the StepInput.
      config: input_batch.BatchConfig (page_size, num_pages, vocab_size, max_positions).
    Returns:
      (lens [N] int32 fed tokens, starts [N] int32 start positions, num_own_pages [N]
      int64, flat_ids (every sequence's token ids, concatenated, int64), flat_pages
      (their page ids, concatenated, int64), suffix_page [N] int64 (each sequence's
      first own page after its shared-prefix nodes; 0 without them)).
    Raises:
      ValueError: naming the request (or `shared_prefixes`) and the field.
    """
    seqs = step.sequences
    if not seqs:
        raise ValueError("step: no sequences scheduled")
    try:
        lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        starts = np.array([s.start_position for s in seqs], dtype=np.int64)
        num_own_pages = np.array([len(s.page_ids) for s in seqs], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        lens = starts = num_own_pages = None
    flat_ids, flat_pages = _flat_ints(seqs, "token_ids"), _flat_ints(seqs, "page_ids")
    if lens is None or not _step_is_valid(seqs, config, lens, starts, num_own_pages, flat_ids, flat_pages):
        for seq in seqs:  # the slow path names the first bad request and field
            check_sequence(seq, config)
        # Reached only if the whole-step check and the per-sequence checks disagree.
        raise ValueError("step: refused by the whole-step host checks")
    if len({s.request_id for s in seqs}) != len(seqs):  # outputs are keyed by request id: one would be lost
        seen: set = set()
        for seq in seqs:
            if seq.request_id in seen:
                raise ValueError(f"request {seq.request_id} appears twice in the step")
            seen.add(seq.request_id)
    written = _written_page_mask(starts, starts + lens, num_own_pages, config.page_size)
    if len(seqs) > 1 and not _writes_are_private(flat_pages, written):
        _check_disjoint_writes(seqs, flat_pages, written, num_own_pages)  # names the pair
    suffix_page = _check_shared(step, config.page_size) if step.shared_prefixes else np.zeros(len(seqs), np.int64)
    return lens.astype(np.int32), starts.astype(np.int32), num_own_pages, flat_ids, flat_pages, suffix_page


def _check_shared(step, page_size: int) -> np.ndarray:
    """Checks the SharedPrefix nodes; returns each sequence's first own page."""
    seqs = step.sequences
    spans: list = [[] for _ in seqs]
    for n, node in enumerate(step.shared_prefixes):
        members = tuple(node.members)
        if (not node.page_ids or not isinstance(node.start_page, (int, np.integer)) or node.start_page < 0
                or len(members) < 1 or len(set(members)) != len(members)):
            raise ValueError(f"shared_prefixes[{n}]: needs pages, a start page >= 0 and distinct members")
        end = node.start_page + len(node.page_ids)
        for i in members:
            if not (isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= i < len(seqs)):
                raise ValueError(f"shared_prefixes[{n}]: member {i!r} is not a sequence of this step")
            seq = seqs[i]
            if tuple(seq.page_ids[node.start_page:end]) != tuple(node.page_ids):
                raise ValueError(f"shared_prefixes[{n}]: pages differ from request {seq.request_id}'s pages "
                                 f"{node.start_page}..{end - 1}")
            if end * page_size > seq.start_position:
                raise ValueError(f"shared_prefixes[{n}]: reaches position {end * page_size}, past request "
                                 f"{seq.request_id}'s first query at {seq.start_position}")
            spans[i].append((node.start_page, end))
    suffix_page = np.zeros(len(seqs), np.int64)
    for i, own in enumerate(spans):
        for start, end in sorted(own):
            if start != suffix_page[i]:
                raise ValueError(f"shared_prefixes: request {seqs[i].request_id}'s nodes leave a gap or overlap "
                                 f"at page {min(start, suffix_page[i])}")
            suffix_page[i] = end
    return suffix_page
