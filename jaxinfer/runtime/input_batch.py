"""Host batch builder: a StepInput -> the padded arrays of one compiled step (numpy only).

Path: engine -> StepInput -> **build_batch** -> StepBatch -> ModelRunner (device) ->
arrays -> **unpack_outputs** -> StepOutput. No jax here: the runner owns the device.

Glossary (used in this module, the runner, the model's AttentionMetadata and the
attention ops):
- *token*: one entry of the flat batch `[T]`: the fed tokens of every sequence,
  concatenated (decodes first), then padding up to the token bucket.
- *sequence*: one request's share of the step (ScheduledSequence).
- *query*: one token of a sequence, attending to that sequence's keys up to its position.
- *attention row*: up to `max_q_len` (<= QUERY_BLOCK) consecutive queries of ONE
  sequence that share its page table; a sequence of n queries is ceil(n / max_q_len)
  rows. In a mixed step (prefill chunks and decodes), each decode is a *decode row* of
  one query laid out first (`num_decode_rows`), so decodes are not padded to the
  chunk's query block. Padding rows own no query and have kv_len 0.
- *prefix row* (shared-prefix path): up to PREFIX_QUERY_BLOCK queries of any members of
  one SharedPrefix node, attending to that node's pages only; the members' own rows
  then start at their deepest node's end (`kv_starts`).
- *sample row*: one position whose next token is sampled (a ScheduledSequence's sample
  offsets); logits are computed for these rows only (all tokens when prompt logprobs
  are wanted).

Shapes. XLA compiles once per input shape, so every dimension is padded to a bucket:
tokens, attention rows and sample rows to powers of two; pages per row to a power of
two up to 16, multiples of 8 up to 64, then steps of about 1/8 (page_bucket); the query
block to a power of two. `StepBatch.shape_key` identifies the compiled program.

Logit processing. Penalty histories (padded to a power of two >= 16) and bias entries
(logit_bias, then min_tokens bans as -inf; a power of two >= 4) exist only when some
sample row of the step uses them (else None: no such path is compiled).

Safety. Every token id, page id and position is checked before it reaches the device
(runtime/step_checks.py, the first thing build_batch does): XLA clamps out-of-range
gathers silently, which would read another request's KV or a wrong embedding. Errors
are ValueErrors naming the request or `shared_prefixes` and the field.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, NamedTuple, Optional

import numpy as np

from jaxinfer.runtime import step_checks
from jaxinfer.types import SequenceOutput, StepInput

QUERY_BLOCK = 32  # queries per attention row at most
# Queries (of any members) per prefix row. NOTE: large, so that a node's pages are
# read once per step: the kernels tile a row's queries themselves (M tiles), and the XLA
# reference gathers a row's pages once, which on CPU is the cost that matters.
PREFIX_QUERY_BLOCK = 512


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def page_bucket(n: int) -> int:
    """Pages per row: powers of two up to 16, multiples of 8 up to 64, then steps of at
    most 1/8 (rounded up to multiples of 8: 72, 88, 104, 120, 136, 160, ...).

    The XLA reference gathers every padded page of every row, so the padding stays
    small where contexts are long (at most 8 pages up to 64, then at most ~1/8 of the
    row plus 8), while the number of buckets, each one compiled step program per batch
    shape, grows with the log of the context past 64 pages instead of linearly (a 4K
    context at pages of 16: 22 buckets instead of 35).
    """
    if n <= 16:
        return bucket(n)
    if n <= 64:
        return -(-n // 8) * 8
    size = 64
    while size < n:
        size = -(-(size * 9) // 64) * 8  # ceil(size * 9 / 8) rounded up to a multiple of 8
    return size


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """What the builder checks against and how it pads."""

    page_size: int  # L
    num_pages: int  # P; page ids must be in [0, P)
    vocab_size: int  # token ids must be in [0, V)
    max_positions: int  # positions must be < this (the model's context)
    query_block: int = QUERY_BLOCK
    prefix_query_block: int = PREFIX_QUERY_BLOCK


class PrefixRowArrays(NamedTuple):
    """Host arrays of the prefix rows (the runner turns them into the op's PrefixRows)."""

    q_index: np.ndarray  # [Rp, Qp] int32 token of each query (T = padding)
    kv_starts: np.ndarray  # [Rp] int32 first key position of the node
    kv_ends: np.ndarray  # [Rp] int32 end of the node's key range (padding rows: 0)
    page_tables: np.ndarray  # [Rp, Pp] int32 the node's pages


class PenaltyArrays(NamedTuple):
    """Per sample row: the ids the penalties count (sampler.apply_penalties)."""

    history: np.ndarray  # [S, H] int32 prompt ids (repetition penalty only), then generated ids; padding 0
    prompt_lens: np.ndarray  # [S] int32 leading prompt entries of each row
    lens: np.ndarray  # [S] int32 valid entries of each row
    presence: np.ndarray  # [S] float32 (padding rows 0)
    frequency: np.ndarray  # [S] float32 (0)
    repetition: np.ndarray  # [S] float32 (1)


class BiasArrays(NamedTuple):
    """Per sample row: ids whose logits get a bias (sampler.apply_logit_bias)."""

    token_ids: np.ndarray  # [S, B] int32 (padding 0)
    biases: np.ndarray  # [S, B] float32: logit_bias values, -inf for min_tokens bans (padding 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceBatch:
    """Everything the compiled step reads: arrays (pytree leaves) and static fields.

    The runner registers it as a pytree (ARRAY_FIELDS are leaves, STATIC_FIELDS part
    of the compiled program's identity).
    """

    tokens: np.ndarray  # [T] int32 token ids (padding: 0)
    positions: np.ndarray  # [T] int32 position of each token in its sequence
    slot_mapping: np.ndarray  # [T] int32 flat KV slot page * L + offset (padding: P * L, dropped)
    targets: np.ndarray  # [T] int32 successor of each token, for prompt logprobs
    cu_q_lens: np.ndarray  # [R + 1] int32 cumulative queries per attention row
    kv_lens: np.ndarray  # [R] int32 keys of each row's sequence visible to its last query
    page_tables: np.ndarray  # [R, Pr] int32 each row's pages, from kv_starts on
    kv_starts: Optional[np.ndarray]  # [R] int32 first own key of each row (shared-prefix path), else None
    prefix: Optional[PrefixRowArrays]  # prefix rows (shared-prefix path), else None
    logits_indices: np.ndarray  # [S] int32 token of each sample row
    temperature: np.ndarray  # [S] float32 per sample row
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] float32
    min_p: np.ndarray  # [S] float32
    seed_hi: np.ndarray  # [S] uint32 high half of the request's seed
    seed_lo: np.ndarray  # [S] uint32 low half
    sample_pos: np.ndarray  # [S] int32 position of the token being sampled (its key's fold-in)
    penalties: Optional[PenaltyArrays]  # when a sample row has a penalty, else None
    logit_bias: Optional[BiasArrays]  # when a sample row has a logit bias or min_tokens ban, else None
    # [T] float32 value added to each token's logits and written K/V (runtime/faults.py:
    # NaN / Inf on an injected request's tokens, 0 elsewhere); None = no fault (always, outside tests)
    fault: Optional[np.ndarray] = None
    max_q_len: int  # static: queries per attention row at most
    num_decode_rows: int  # static: leading rows of at most one query
    all_greedy: bool  # static: every sample row is greedy (skips the sort)
    all_logits: bool  # static: logits of every token (prompt logprobs)
    num_top_logprobs: int  # static: most likely alternatives returned per sample row (bucketed)

    ARRAY_FIELDS = ("tokens", "positions", "slot_mapping", "targets", "cu_q_lens", "kv_lens", "page_tables",
                    "kv_starts", "prefix", "logits_indices", "temperature", "top_k", "top_p", "min_p", "seed_hi",
                    "seed_lo", "sample_pos", "penalties", "logit_bias", "fault")
    STATIC_FIELDS = ("max_q_len", "num_decode_rows", "all_greedy", "all_logits", "num_top_logprobs")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepBatch:
    """A built step: the device part and the host layout to unpack its results."""

    device: DeviceBatch
    request_ids: tuple  # per sequence, in StepInput order
    token_offsets: np.ndarray  # [num sequences] first flat token of each sequence
    num_tokens: np.ndarray  # [num sequences] fed tokens of each sequence
    sample_starts: np.ndarray  # [num sequences] first sample row of each sequence
    num_samples: np.ndarray  # [num sequences] sample rows of each sequence
    want_logprobs: tuple  # per sequence
    num_top_logprobs: tuple  # per sequence (as asked, not bucketed)
    num_prompt_logprobs: tuple  # per sequence: prompt logprobs to return, or None
    num_real_tokens: int  # tokens before padding
    shape_key: tuple  # identifies the compiled program
    shared_prefix_tokens_saved: int  # see StepStats


def shape_key_of(device: DeviceBatch) -> tuple:
    """The compiled program's identity: every array shape and static field of `device`.

    (T, S, D, R, Pr, max_q_len, prefix (Rp, Qp, Pp) or None, all_greedy, all_logits,
    num_top_logprobs, penalty history width or 0, bias width or 0, fault): plain ints,
    bools, None and one tuple, so it round-trips through JSON (runtime/warmup.py builds a
    DeviceBatch of these shapes to compile the program before traffic needs it).
    """
    prefix = device.prefix
    return (int(device.tokens.size), int(device.logits_indices.size), int(device.num_decode_rows),
            int(device.kv_lens.size), int(device.page_tables.shape[1]), int(device.max_q_len),
            None if prefix is None else (*map(int, prefix.q_index.shape), int(prefix.page_tables.shape[1])),
            bool(device.all_greedy), bool(device.all_logits), int(device.num_top_logprobs),
            0 if device.penalties is None else int(device.penalties.history.shape[1]),
            0 if device.logit_bias is None else int(device.logit_bias.token_ids.shape[1]),
            device.fault is not None)


def _prefix_rows(step: StepInput, config: BatchConfig, offsets, ends, lens, max_q_len: int, num_tokens: int):
    """The prefix rows, their bucketed shape, and the prefix tokens not re-read."""
    nodes = step.shared_prefixes
    members_tokens = [np.concatenate([np.arange(offsets[i], ends[i]) for i in node.members]) for node in nodes]
    block = min(config.prefix_query_block, bucket(max(t.size for t in members_tokens)))
    rows_per_node = [-(-t.size // block) for t in members_tokens]
    num_rows = bucket(sum(rows_per_node))
    max_pages = page_bucket(max(len(node.page_ids) for node in nodes))
    q_index = np.full((num_rows, block), num_tokens, np.int32)
    kv_starts = np.zeros(num_rows, np.int32)
    kv_ends = np.zeros(num_rows, np.int32)
    tables = np.zeros((num_rows, max_pages), np.int32)
    row, saved = 0, 0
    for node, tokens, num_node_rows in zip(nodes, members_tokens, rows_per_node):
        for r in range(num_node_rows):
            chunk = tokens[r * block:(r + 1) * block]
            q_index[row, :chunk.size] = chunk
            kv_starts[row] = node.start_page * config.page_size
            kv_ends[row] = (node.start_page + len(node.page_ids)) * config.page_size
            tables[row, :len(node.page_ids)] = node.page_ids
            row += 1
        plain_reads = sum(-(-int(lens[i]) // max_q_len) for i in node.members)
        saved += (plain_reads - num_node_rows) * len(node.page_ids) * config.page_size
    return PrefixRowArrays(q_index, kv_starts, kv_ends, tables), (num_rows, block, max_pages), saved


def _ragged(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray, width: int, dtype) -> np.ndarray:
    """[rows, width]: row r holds flat[starts[r]:starts[r] + lens[r]], then zeros."""
    columns = np.arange(width)
    if not flat.size:
        return np.zeros((starts.size, width), dtype)
    values = flat.take(starts[:, None] + columns[None, :], mode="clip")
    return np.where(columns[None, :] < lens[:, None], values, 0).astype(dtype)


def _logit_arrays(seqs, num_rows: int, row_seq: np.ndarray, sample_pos: np.ndarray, vocab_size: int):
    """PenaltyArrays and BiasArrays of the sample rows (None when no row needs them)."""
    samples = [bool(s.sample_offsets) for s in seqs]
    penalised = [n and (s.repetition_penalty != 1.0 or s.presence_penalty != 0.0 or s.frequency_penalty != 0.0)
                 for s, n in zip(seqs, samples)]
    num_real = row_seq.size
    penalties = None
    if any(penalised):
        knobs = np.zeros((num_rows, 3), np.float32)
        knobs[:, 2] = 1.0
        knobs[:num_real] = np.array([(s.presence_penalty, s.frequency_penalty, s.repetition_penalty) if p
                                     else (0.0, 0.0, 1.0) for s, p in zip(seqs, penalised)], np.float32)[row_seq]
        # Per sequence: its prompt (counted by a repetition penalty only), then its output.
        parts = [((s.prompt_token_ids if s.repetition_penalty != 1.0 else ()), s.output_token_ids) if p else ((), ())
                 for s, p in zip(seqs, penalised)]
        plens = np.array([len(a) for a, _ in parts], np.int64)
        olens = np.array([len(b) for _, b in parts], np.int64)
        full_prompt = np.array([len(s.prompt_token_ids) for s in seqs], np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(a, b) for a, b in parts), np.int64,
                           int((plens + olens).sum()))
        starts = np.concatenate([[0], np.cumsum(plens + olens)[:-1]]).astype(np.int64)
        # A row counts the generated ids before its sampled position.
        num_out = np.clip(sample_pos[:num_real] - full_prompt[row_seq], 0, olens[row_seq])
        lens, prompt_lens, row_starts = np.zeros((3, num_rows), np.int64)
        lens[:num_real] = plens[row_seq] + num_out
        prompt_lens[:num_real] = plens[row_seq]
        row_starts[:num_real] = starts[row_seq]
        history = _ragged(flat, row_starts, lens, bucket(int(lens.max()), 16), np.int32)
        penalties = PenaltyArrays(history, prompt_lens.astype(np.int32), lens.astype(np.int32), *knobs.T.copy())
    # Per sequence: its logit_bias entries, then its bans (a row takes the bans only
    # while its sampled position is below ban_until_position).
    entries = [(s.logit_bias, s.banned_token_ids) if n else ((), ()) for s, n in zip(seqs, samples)]
    if not any(b or ban for b, ban in entries):
        return penalties, None
    nbias, nban = (np.array([len(e[k]) for e in entries], np.int64) for k in (0, 1))
    total = int((nbias + nban).sum())
    ids = np.fromiter(itertools.chain.from_iterable(itertools.chain((t for t, _ in b), ban) for b, ban in entries),
                      np.int64, total)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"logit_bias / banned_token_ids: token id outside the vocabulary [0, {vocab_size})")
    values = np.fromiter(itertools.chain.from_iterable(
        itertools.chain((v for _, v in b), (-np.inf for _ in ban)) for b, ban in entries), np.float64, total)
    until = np.array([s.ban_until_position for s in seqs], np.int64)
    lens, row_starts = np.zeros((2, num_rows), np.int64)
    lens[:num_real] = nbias[row_seq] + np.where(sample_pos[:num_real] < until[row_seq], nban[row_seq], 0)
    row_starts[:num_real] = np.concatenate([[0], np.cumsum(nbias + nban)[:-1]]).astype(np.int64)[row_seq]
    if not lens.any():
        return penalties, None
    width = bucket(int(lens.max()), 4)
    return penalties, BiasArrays(_ragged(ids, row_starts, lens, width, np.int32),
                                 _ragged(values, row_starts, lens, width, np.float32))


def build_batch(step: StepInput, config: BatchConfig, faults: Optional[Mapping[str, float]] = None) -> StepBatch:
    """Validates a step and lays it out as padded arrays (see the module docstring).

    `faults` (tests only, runtime/faults.py): request id -> the NaN / Inf value its
    tokens get in `DeviceBatch.fault`; None (or no id of this step) = no fault array.

    Raises:
      ValueError: naming the request (or `shared_prefixes`) whose ids, positions,
        pages or sample offsets are out of range.
    """
    seqs = step.sequences
    page_size = config.page_size
    # Every id, position and page checked (runtime/step_checks.py); the whole step's ids
    # and pages come back concatenated in step order.
    lens, starts, num_own_pages, flat_ids, flat_pages, suffix_page = step_checks.check_step(step, config)
    num_tokens = bucket(int(lens.sum()))
    # Each sequence's own rows read its pages from suffix_page on (0 without sharing).
    max_pages = page_bucket(max(len(s.page_ids) - int(p) for s, p in zip(seqs, suffix_page)))
    max_q_len = min(bucket(int(lens.max())), config.query_block)
    is_decode = lens == 1
    num_real_decodes = int(is_decode.sum())
    is_mixed = max_q_len > 1 and num_real_decodes > 0
    num_decode_rows = bucket(num_real_decodes) if is_mixed else 0

    # [num sequences] flat layout: decodes first, otherwise in step order.
    order = np.argsort(~is_decode, kind="stable")
    ends = np.empty(len(seqs), np.int64)
    ends[order] = np.cumsum(lens[order])
    offsets = ends - lens
    # Each flat token j of sequence i (step order) goes to offsets[i] + its index in i.
    src_start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    page_start = np.concatenate([[0], np.cumsum(num_own_pages)[:-1]]).astype(np.int64)
    index_in_seq = np.arange(flat_ids.size) - np.repeat(src_start, lens)
    dest = np.repeat(offsets, lens) + index_in_seq
    pos = np.repeat(starts, lens) + index_in_seq
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.full(num_tokens, config.num_pages * page_size, np.int32)  # dropped
    targets = np.zeros(num_tokens, np.int32)
    tokens[dest] = flat_ids
    positions[dest] = pos
    slots[dest] = flat_pages[np.repeat(page_start, lens) + pos // page_size] * page_size + pos % page_size
    # The target of a token is the next fed token, or next_token_id after the last one.
    targets[dest[:-1]] = flat_ids[1:]
    targets[ends - 1] = [0 if s.next_token_id is None else s.next_token_id for s in seqs]
    # [num sequences, Pr]: each sequence's own pages from suffix_page on.
    columns = np.arange(max_pages)
    in_table = columns[None, :] < (num_own_pages - suffix_page)[:, None]
    tables = (flat_pages.take((page_start + suffix_page)[:, None] + columns[None, :], mode="clip")
              * in_table).astype(np.int32)

    # Attention rows, in flat-batch order: row r covers queries [q_lo, q_hi) of
    # sequence row_seq[r]; in a mixed step the decode rows come first.
    row_order = order[num_real_decodes:] if is_mixed else order
    row_seq = np.repeat(row_order, -(-lens[row_order] // max_q_len))
    # The reference computes padding rows too, so their count is a tight power of two.
    num_rows = num_decode_rows + bucket(row_seq.size)
    first_row = np.concatenate([[True], row_seq[1:] != row_seq[:-1]])
    row_block = np.arange(row_seq.size) - np.maximum.accumulate(np.where(first_row, np.arange(row_seq.size), 0))
    row_q_end = np.minimum((row_block + 1) * max_q_len, lens[row_seq])
    cu_q_lens = np.full(num_rows + 1, ends.max(), np.int32)
    kv_lens = np.zeros(num_rows, np.int32)
    kv_starts = np.zeros(num_rows, np.int32)
    page_tables = np.zeros((num_rows, max_pages), np.int32)
    cu_q_lens[0] = 0
    if is_mixed:
        dec = order[:num_real_decodes]
        cu_q_lens[1:num_real_decodes + 1] = ends[dec]
        cu_q_lens[num_real_decodes + 1:num_decode_rows + 1] = num_real_decodes  # padding rows
        kv_lens[:num_real_decodes] = starts[dec] + 1
        kv_starts[:num_real_decodes] = suffix_page[dec] * page_size
        page_tables[:num_real_decodes] = tables[dec]
    base = num_decode_rows
    cu_q_lens[base + 1:base + row_seq.size + 1] = offsets[row_seq] + row_q_end
    kv_lens[base:base + row_seq.size] = starts[row_seq] + row_q_end
    page_tables[base:base + row_seq.size] = tables[row_seq]
    kv_starts[base:base + row_seq.size] = suffix_page[row_seq] * page_size
    prefix, tokens_saved = None, 0
    if step.shared_prefixes:
        prefix, _, tokens_saved = _prefix_rows(step, config, offsets, ends, lens, max_q_len, num_tokens)

    # Sample rows, in step order.
    num_samples = np.array([len(s.sample_offsets) for s in seqs], np.int64)
    sample_starts = np.concatenate([[0], np.cumsum(num_samples)[:-1]]).astype(np.int64)
    num_real_samples = int(num_samples.sum())
    num_sample_rows = bucket(num_real_samples)
    row_seq_of_sample = np.repeat(np.arange(len(seqs)), num_samples)  # [real sample rows] -> sequence
    sample_offsets = np.fromiter(itertools.chain.from_iterable(s.sample_offsets for s in seqs), np.int64,
                                 num_real_samples)

    # One [sample rows, field] table; padding rows sample greedily from row 0's logits.
    fields = np.zeros((num_sample_rows, 6), np.float64)
    fields[:, 4] = 1.0  # top_p of padding rows
    fields[:num_real_samples] = np.array(
        [(o, st, s.temperature, s.top_k, s.top_p, s.min_p) for o, st, s in zip(offsets.tolist(), starts.tolist(), seqs)],
        np.float64).reshape(len(seqs), 6)[row_seq_of_sample]
    fields[:num_real_samples, :2] += sample_offsets[:, None]
    fields[:num_real_samples, 1] += 1  # sample_pos: the position of the sampled token
    logits_indices, sample_pos, top_k = (fields[:, c].astype(np.int32) for c in (0, 1, 3))
    temperature, top_p, min_p = (fields[:, c].astype(np.float32) for c in (2, 4, 5))
    seeds = np.zeros(num_sample_rows, np.uint64)
    seeds[:num_real_samples] = np.array([s.seed for s in seqs], np.uint64)[row_seq_of_sample]
    all_greedy = all(s.temperature <= 0 or s.top_k == 1 for s, n in zip(seqs, num_samples) if n)
    all_logits = any(s.want_prompt_logprobs for s in seqs)
    max_top = max(s.num_top_logprobs if num_samples[i] else 0 for i, s in enumerate(seqs))
    num_top_logprobs = bucket(max_top) if max_top else 0
    penalties, bias = _logit_arrays(seqs, num_sample_rows, row_seq_of_sample, sample_pos.astype(np.int64),
                                    config.vocab_size)
    fault = None
    if faults and any(s.request_id in faults for s in seqs):
        fault = np.zeros(num_tokens, np.float32)
        fault[dest] = np.repeat(np.array([faults.get(s.request_id, 0.0) for s in seqs], np.float32), lens)

    device = DeviceBatch(
        tokens=tokens, positions=positions, slot_mapping=slots, targets=targets, cu_q_lens=cu_q_lens,
        kv_lens=kv_lens, page_tables=page_tables, kv_starts=kv_starts if prefix is not None else None,
        prefix=prefix, logits_indices=logits_indices, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, seed_hi=(seeds >> np.uint64(32)).astype(np.uint32),
        seed_lo=(seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32), sample_pos=sample_pos, penalties=penalties,
        logit_bias=bias, fault=fault, max_q_len=max_q_len,
        num_decode_rows=num_decode_rows, all_greedy=bool(all_greedy), all_logits=all_logits,
        num_top_logprobs=num_top_logprobs)
    shape_key = shape_key_of(device)
    return StepBatch(
        device=device, request_ids=tuple(s.request_id for s in seqs), token_offsets=offsets, num_tokens=lens,
        sample_starts=sample_starts, num_samples=num_samples,
        want_logprobs=tuple(s.want_logprobs for s in seqs),
        num_top_logprobs=tuple(s.num_top_logprobs for s in seqs),
        num_prompt_logprobs=tuple((n if s.next_token_id is not None else n - 1) if s.want_prompt_logprobs else None
                                  for s, n in zip(seqs, lens.tolist())),
        num_real_tokens=int(lens.sum()), shape_key=shape_key, shared_prefix_tokens_saved=tokens_saved)


def unpack_outputs(batch: StepBatch, sampled: np.ndarray, logprobs: np.ndarray, top_ids: np.ndarray,
                   top_logprobs: np.ndarray, prompt_logprobs: np.ndarray,
                   finite: Optional[np.ndarray] = None,
                   tokens_finite: Optional[np.ndarray] = None) -> Mapping[str, SequenceOutput]:
    """The step's results per request id.

    Args:
      batch: the StepBatch that was run.
      sampled: [S] int sampled id of each sample row.
      logprobs: [S] float log p of each sampled id.
      top_ids, top_logprobs: [S, n] the n most likely ids of each sample row and their
        log p (n = the bucketed num_top_logprobs; n = 0 when none was asked).
      prompt_logprobs: [T] float log p of each token's successor (empty unless all_logits).
      finite: [S] bool: the sample row's logits were all finite (None = all were).
      tokens_finite: [T] bool: the K/V the token wrote was all finite (None = all was).
    """
    outputs = {}
    for i, request_id in enumerate(batch.request_ids):
        rows = range(int(batch.sample_starts[i]), int(batch.sample_starts[i] + batch.num_samples[i]))
        n_top = batch.num_top_logprobs[i]
        num_prompt = batch.num_prompt_logprobs[i]
        offset = int(batch.token_offsets[i])
        is_finite = ((finite is None or bool(all(finite[r] for r in rows))) and
                     (tokens_finite is None or bool(tokens_finite[offset:offset + int(batch.num_tokens[i])].all())))
        outputs[request_id] = SequenceOutput(
            request_id=request_id,
            token_ids=tuple(int(sampled[r]) for r in rows),
            logprobs=tuple(float(logprobs[r]) for r in rows) if batch.want_logprobs[i] else None,
            top_logprobs=tuple(tuple((int(t), float(lp)) for t, lp in zip(top_ids[r, :n_top], top_logprobs[r, :n_top]))
                               for r in rows) if n_top else None,
            prompt_logprobs=(tuple(float(x) for x in prompt_logprobs[offset:offset + num_prompt])
                             if num_prompt is not None else None),
            finite=is_finite)
    return outputs
