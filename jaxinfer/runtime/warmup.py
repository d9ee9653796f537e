"""Warm-up: compile step programs before traffic needs them (host side, numpy only).

Path: InferenceSession.warmup -> Engine.warmup -> **keys** (a recorded profile, a grid
from the EngineConfig) -> runner.warm(key) -> **dummy_batch(key)** -> the runner's
jitted step (compiled, or loaded from the persistent compilation cache) -> held.

A compiled step is identified by `input_batch.shape_key_of(DeviceBatch)`: array shapes
and static fields only, never values. So a program can be compiled from a batch of the
right shapes filled with harmless values: every token's KV slot is the dropped slot
P * L (nothing is written to the pages), every attention row has no query and no key,
every sample row reads token 0. Running it changes nothing but the jit cache.

Which keys:
- *the profile*: every program a runner compiles is appended to a JSON-lines file next
  to the persistent compilation cache (`profiles/<fingerprint>.jsonl`; the fingerprint
  covers the model, dtype, page pool, KV dtype, attention implementation, mesh, platform
  and jax version, so a key is only replayed where it means the same program). The next
  process warms exactly the programs its predecessors needed, also the mixed steps
  (decodes + prefill chunks) whose shapes depend on traffic;
- *the grid* (`grid_keys`): what a configuration reaches without mixing: decode steps
  of every batch bucket at every page bucket up to a context length, a prompt's first
  chunk of every token bucket, and a full-budget chunk at every page bucket; greedy and
  sampled. Penalties, logit biases, log-probs, prompt log-probs and the shared-prefix
  path change the program; they are not in the grid (the profile learns them).

A profile line that does not parse, or whose sizes are absurd, is skipped: a damaged
file costs compiles, never a crash or a huge allocation.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import numpy as np

from jaxinfer.runtime.input_batch import (QUERY_BLOCK, BatchConfig, BiasArrays, DeviceBatch, PenaltyArrays,
                                          PrefixRowArrays, bucket, page_bucket)

KEY_LENGTH = 13
MAX_DIM = 1 << 16  # any one dimension of a replayed key
MAX_ELEMENTS = 1 << 24  # any one array of a replayed key


def dummy_batch(key: tuple, config: BatchConfig) -> DeviceBatch:
    """A DeviceBatch whose shape_key is `key` and whose step writes and reads nothing.

    Raises:
      ValueError: `key` is not a valid shape key (see check_key).
    """
    key = check_key(key)
    (num_tokens, num_samples, num_decode_rows, num_rows, max_pages, max_q_len, prefix_shape, all_greedy,
     all_logits, num_top, history_width, bias_width, fault) = key

    def zeros(*shape, dtype=np.int32):
        return np.zeros(shape, dtype)

    prefix = None
    if prefix_shape is not None:
        prefix_rows, block, prefix_pages = prefix_shape
        prefix = PrefixRowArrays(q_index=np.full((prefix_rows, block), num_tokens, np.int32),  # padding queries
                                 kv_starts=zeros(prefix_rows), kv_ends=zeros(prefix_rows),
                                 page_tables=zeros(prefix_rows, prefix_pages))
    penalties = None
    if history_width:
        penalties = PenaltyArrays(history=zeros(num_samples, history_width), prompt_lens=zeros(num_samples),
                                  lens=zeros(num_samples), presence=zeros(num_samples, dtype=np.float32),
                                  frequency=zeros(num_samples, dtype=np.float32),
                                  repetition=np.ones(num_samples, np.float32))
    bias = None
    if bias_width:
        bias = BiasArrays(token_ids=zeros(num_samples, bias_width),
                          biases=zeros(num_samples, bias_width, dtype=np.float32))
    return DeviceBatch(
        tokens=zeros(num_tokens), positions=zeros(num_tokens),
        slot_mapping=np.full(num_tokens, config.num_pages * config.page_size, np.int32),  # dropped
        targets=zeros(num_tokens), cu_q_lens=zeros(num_rows + 1), kv_lens=zeros(num_rows),
        page_tables=zeros(num_rows, max_pages), kv_starts=zeros(num_rows) if prefix is not None else None,
        prefix=prefix, logits_indices=zeros(num_samples), temperature=np.ones(num_samples, np.float32),
        top_k=zeros(num_samples), top_p=np.ones(num_samples, np.float32),
        min_p=zeros(num_samples, dtype=np.float32), seed_hi=zeros(num_samples, dtype=np.uint32),
        seed_lo=zeros(num_samples, dtype=np.uint32), sample_pos=zeros(num_samples), penalties=penalties,
        logit_bias=bias, fault=zeros(num_tokens, dtype=np.float32) if fault else None, max_q_len=max_q_len,
        num_decode_rows=num_decode_rows, all_greedy=all_greedy, all_logits=all_logits, num_top_logprobs=num_top)


def check_key(key) -> tuple:
    """`key` as a shape-key tuple (lists from JSON become tuples).

    Raises:
      ValueError: wrong length or types, sizes below 1 (or 0 where allowed), any
        dimension above MAX_DIM or array above MAX_ELEMENTS.
    """
    if not isinstance(key, (tuple, list)) or len(key) != KEY_LENGTH:
        raise ValueError(f"shape key: expected a sequence of {KEY_LENGTH} fields, got {key!r:.200}")
    (num_tokens, num_samples, num_decode_rows, num_rows, max_pages, max_q_len, prefix_shape, all_greedy,
     all_logits, num_top, history_width, bias_width, fault) = key

    def count(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_DIM:
            raise ValueError(f"shape key: {name} must be an int in [{minimum}, {MAX_DIM}], got {value!r:.50}")
        return value

    sizes = [count(n, v, m) for n, v, m in (("tokens", num_tokens, 1), ("sample rows", num_samples, 1),
                                            ("decode rows", num_decode_rows, 0), ("rows", num_rows, 1),
                                            ("pages per row", max_pages, 1), ("max_q_len", max_q_len, 1),
                                            ("num_top_logprobs", num_top, 0), ("history width", history_width, 0),
                                            ("bias width", bias_width, 0))]
    if num_decode_rows > num_rows:
        raise ValueError(f"shape key: {num_decode_rows} decode rows of {num_rows} rows")
    if prefix_shape is not None:
        if not isinstance(prefix_shape, (tuple, list)) or len(prefix_shape) != 3:
            raise ValueError(f"shape key: prefix shape must be None or 3 ints, got {prefix_shape!r:.100}")
        prefix_shape = tuple(count("prefix shape", v, 1) for v in prefix_shape)
        if prefix_shape[0] * max(prefix_shape[1:]) > MAX_ELEMENTS:
            raise ValueError(f"shape key: prefix rows {prefix_shape} too large")
    for name, flag in (("all_greedy", all_greedy), ("all_logits", all_logits), ("fault", fault)):
        if not isinstance(flag, bool):
            raise ValueError(f"shape key: {name} must be a bool, got {flag!r:.50}")
    if (num_rows * max_pages > MAX_ELEMENTS or num_samples * max(history_width, bias_width) > MAX_ELEMENTS
            or (all_logits and num_tokens > MAX_DIM)):
        raise ValueError(f"shape key: arrays too large ({num_rows} x {max_pages} pages, {num_samples} x "
                         f"{max(history_width, bias_width)})")
    (num_tokens, num_samples, num_decode_rows, num_rows, max_pages, max_q_len, num_top, history_width,
     bias_width) = sizes
    return (num_tokens, num_samples, num_decode_rows, num_rows, max_pages, max_q_len, prefix_shape, all_greedy,
            all_logits, num_top, history_width, bias_width, fault)


def fingerprint(**fields) -> str:
    """A short stable hash of what makes a shape key mean one program (JSON of `fields`)."""
    text = json.dumps(fields, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class ShapeProfile:
    """The JSON-lines file of the shape keys compiled with one fingerprint.

    `record` appends one line per new key (one write with O_APPEND: concurrent
    processes interleave whole lines); `load` returns the distinct valid keys in file
    order. I/O errors are swallowed: a profile is an optimisation.
    """

    def __init__(self, path: str):
        self.path = path
        self._known: Optional[set] = None

    def load(self) -> list:
        keys, seen = [], set()
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            try:
                key = check_key(json.loads(line, parse_constant=_reject))
            except (ValueError, TypeError, RecursionError):
                continue
            if key not in seen and not key[-1]:  # fault programs are tests' business
                seen.add(key)
                keys.append(key)
        self._known = set(seen)
        return keys

    def record(self, key: tuple) -> None:
        if key[-1]:  # a fault-injection program (tests only)
            return
        if self._known is None:
            self.load()
        if key in self._known:
            return
        self._known.add(key)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (json.dumps(list(key)) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass


def _reject(name):
    raise ValueError(f"not JSON: {name}")


def profile_path(cache_dir: str, fingerprint_hex: str) -> str:
    return os.path.join(cache_dir, "profiles", f"{fingerprint_hex}.jsonl")


def page_ladder(max_pages: int) -> list:
    """Every page bucket a row of at most `max_pages` pages can get."""
    return sorted({page_bucket(n) for n in range(1, max(max_pages, 1) + 1)})


def grid_keys(*, max_num_seqs: int, max_num_batched_tokens: int, context_tokens: int, page_size: int,
              query_block: int = QUERY_BLOCK) -> list:
    """The keys of decode steps and of unmixed prompt chunks (see the module docstring).

    Args:
      max_num_seqs, max_num_batched_tokens, page_size: the EngineConfig's.
      context_tokens: the longest context warmed (<= max_model_len): page buckets above
        it compile when a request first needs them.
    """
    ladder = page_ladder(-(-context_tokens // page_size))
    keys = []

    def add(tokens, samples, rows, pages, q_len):
        for greedy in (True, False):
            key = (tokens, samples, 0, rows, pages, q_len, None, greedy, False, 0, 0, 0, False)
            if key not in seen:
                seen.add(key)
                keys.append(key)

    seen: set = set()
    max_batch = bucket(min(max_num_seqs, max_num_batched_tokens))
    budget = bucket(max_num_batched_tokens)
    for pages in ladder:  # decode steps: n sequences, one query each
        n = 1
        while n <= max_batch:
            add(n, n, n, pages, 1)
            n *= 2
    tokens = 2
    while tokens <= budget:  # one prompt chunk of (tokens / 2, tokens] queries
        q_len = min(tokens, query_block)
        rows = max(1, tokens // q_len)
        lengths = range(tokens // 2 + 1, min(tokens, max_num_batched_tokens, context_tokens) + 1)
        if not lengths:  # no chunk of this many tokens fits the budget or the context
            break
        first = {page_bucket(-(-n // page_size)) for n in lengths}
        later = ladder if tokens == budget else ()  # a long prompt's middle chunks
        for pages in sorted(first | {p for p in later if p >= min(first)}):
            add(tokens, 1, rows, pages, q_len)
        tokens *= 2
    return keys


def merge(*key_lists: Iterable[tuple]) -> list:
    """The distinct keys of several lists, in order."""
    seen, out = set(), []
    for keys in key_lists:
        for key in keys:
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out
