"""ModelRunner: the only owner of device arrays (parameters, KV pages) and of jax.jit.

Path: engine -> StepInput -> **runner** (pad to a shape bucket, one compiled step:
model forward over the flat ragged batch + KV write into pages + attention + sampling)
-> StepOutput -> engine.

Shapes. XLA compiles once per input shape, so every step is padded to buckets: tokens
per step and sequences per step to powers of two, pages per
sequence to a power of two (multiples of 8 past 16), the query block (the longest query run, capped at
QUERY_BLOCK) to a power of two, and the attention rows (decode rows and query blocks
of longer runs) to powers of two. A
long mixed workload therefore compiles a bounded number of programs; `num_compiles` counts them and `compile_seconds`
sums the time of the steps that compiled. The KV pages are donated to each step, so
XLA updates them in place.

Shared prefixes (Hydragen). When the StepInput lists SharedPrefix nodes (pages several
sequences share, found by the scheduler), each node becomes prefix rows: the tokens of
all its members, PREFIX_QUERY_BLOCK per row, against the node's pages, computed once per
row instead of once per sequence; each member's own rows then start at its deepest
node's end (`kv_starts`), and the attention op merges both by log-sum-exp. The prefix
rows are bucketed like the rest (rows, queries per row, pages per row).

Safety. Every token id, page id and position is checked on the host before it reaches
the device: XLA clamps out-of-range gathers silently, which would read another
request's KV or a wrong embedding. Shared-prefix nodes are checked against the
members' own page lists.
"""
from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models.transformer import AttentionMetadata, PrefixRows, Transformer
from jaxinfer.runtime import sampler
from jaxinfer.types import StepInput, StepOutput

MIN_TOKEN_BUCKET = 1
MIN_SEQ_BUCKET = 1
QUERY_BLOCK = 32  # queries per attention row (see execute)
# Queries (of any members) per shared-prefix row. NOTE: large, so that a node's pages are
# read once per step: the kernels tile a row's queries themselves (M tiles), and the XLA
# reference gathers a row's pages once, which on CPU is the cost that matters.
PREFIX_QUERY_BLOCK = 512


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def page_bucket(n: int) -> int:
    """Pages per sequence: powers of two up to 16, then multiples of 8.

    The XLA reference gathers every padded page of every sequence, so the bucket is
    finer where contexts are long: at most 8 pages of padding past 16 pages.
    """
    return bucket(n) if n <= 16 else -(-n // 8) * 8


class ModelRunner:
    """Runs steps of a model over a paged KV cache it owns.

    Args:
      config: model shape.
      params: parameter tree (already in `dtype`).
      page_size: tokens per KV page (L).
      num_pages: pages in the pool (P).
      dtype: activation and KV-cache dtype.
      attention_impl: forwarded to the attention op.
    """

    def __init__(self, config: ModelConfig, params, *, page_size: int, num_pages: int,
                 dtype=jnp.float32, attention_impl: Optional[str] = None):
        self.config = config
        self.params = params
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = jnp.dtype(dtype)
        self.model = Transformer(config, dtype=self.dtype, param_dtype=self.dtype,
                                 attention_impl=attention_impl)
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)  # [P, L, K, H]
        self.kv_caches = tuple((jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
                               for _ in range(config.num_layers))
        self._step = jax.jit(functools.partial(_step_fn, self.model),
                             static_argnames=("max_q_len", "num_decode_rows", "all_greedy", "all_logits"),
                             donate_argnames=("kv_caches",))
        self._signatures: set = set()
        self.compile_seconds = 0.0  # time of the steps that compiled (warm-up)
        self.last_device_seconds = 0.0  # the last step's jitted call, results fetched
        self.last_host_seconds = 0.0  # the last step's host-side input/output work
        self.num_shared_prefix_steps = 0  # steps that used the shared-prefix path
        # prefix KV tokens not re-read thanks to sharing (per layer): for each node, its
        # tokens x (rows the plain path would have read it in - prefix rows reading it)
        self.num_shared_prefix_tokens_saved = 0

    @property
    def num_compiles(self) -> int:
        return len(self._signatures)

    @property
    def weight_bytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params)))

    @property
    def kv_cache_bytes(self) -> int:
        return int(sum(k.size * k.dtype.itemsize * 2 for k, _ in self.kv_caches))

    def _validate(self, seq) -> None:
        cfg = self.config
        ids = np.asarray(seq.token_ids, dtype=np.int64)
        if ids.size == 0:
            raise ValueError(f"request {seq.request_id}: token_ids is empty")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise ValueError(f"request {seq.request_id}: token id {int(ids[(ids < 0) | (ids >= cfg.vocab_size)][0])} "
                             f"outside the vocabulary [0, {cfg.vocab_size})")
        end = seq.start_position + ids.size
        if seq.start_position < 0 or end > cfg.max_position_embeddings:
            raise ValueError(f"request {seq.request_id}: positions [{seq.start_position}, {end}) outside the "
                             f"model's context of {cfg.max_position_embeddings}")
        pages = np.asarray(seq.page_ids, dtype=np.int64)
        if pages.size * self.page_size < end:
            raise ValueError(f"request {seq.request_id}: {pages.size} pages cannot hold {end} tokens")
        if pages.size and (pages.min() < 0 or pages.max() >= self.num_pages):
            raise ValueError(f"request {seq.request_id}: page id outside [0, {self.num_pages})")

    def _validate_shared(self, step: StepInput) -> np.ndarray:
        """Checks the SharedPrefix nodes; returns each sequence's first own page."""
        seqs = step.sequences
        spans: list = [[] for _ in seqs]
        for n, node in enumerate(step.shared_prefixes):
            members = tuple(node.members)
            end = node.start_page + len(node.page_ids)
            if not node.page_ids or node.start_page < 0 or len(members) < 1 or len(set(members)) != len(members):
                raise ValueError(f"shared_prefixes[{n}]: needs pages, a start page >= 0 and distinct members")
            for i in members:
                if not (isinstance(i, int) and 0 <= i < len(seqs)):
                    raise ValueError(f"shared_prefixes[{n}]: member {i!r} is not a sequence of this step")
                seq = seqs[i]
                if tuple(seq.page_ids[node.start_page:end]) != tuple(node.page_ids):
                    raise ValueError(f"shared_prefixes[{n}]: pages differ from request {seq.request_id}'s pages")
                if end * self.page_size > seq.start_position:
                    raise ValueError(f"shared_prefixes[{n}]: reaches position {end * self.page_size}, past request "
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

    def _prefix_rows(self, step: StepInput, offsets, ends, lens, max_q_len: int, num_tokens: int):
        """Host arrays of the prefix rows, their bucketed shape, and the tokens saved."""
        nodes = step.shared_prefixes
        members_tokens = [np.concatenate([np.arange(offsets[i], ends[i]) for i in node.members]) for node in nodes]
        block = min(PREFIX_QUERY_BLOCK, bucket(max(t.size for t in members_tokens)))
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
                kv_starts[row] = node.start_page * self.page_size
                kv_ends[row] = (node.start_page + len(node.page_ids)) * self.page_size
                tables[row, :len(node.page_ids)] = node.page_ids
                row += 1
            plain_reads = sum(-(-int(lens[i]) // max_q_len) for i in node.members)
            saved += (plain_reads - num_node_rows) * len(node.page_ids) * self.page_size
        return (q_index, kv_starts, kv_ends, tables), (num_rows, block, max_pages), saved

    def execute(self, step: StepInput) -> StepOutput:
        """Runs one step; returns a sampled token for every sequence that asked for one."""
        prep_start = time.perf_counter()
        seqs = step.sequences
        if not seqs:
            raise ValueError("step: no sequences scheduled")
        for seq in seqs:
            self._validate(seq)
        lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int32)
        starts = np.array([s.start_position for s in seqs], dtype=np.int32)
        num_tokens = bucket(int(lens.sum()), MIN_TOKEN_BUCKET)
        num_seqs = bucket(len(seqs), MIN_SEQ_BUCKET)
        # Each sequence's own rows read its pages from suffix_page on (0 without sharing).
        suffix_page = self._validate_shared(step) if step.shared_prefixes else np.zeros(len(seqs), np.int64)
        max_pages = page_bucket(max(len(s.page_ids) - int(p) for s, p in zip(seqs, suffix_page)))
        # Attention sees each sequence as rows of at most QUERY_BLOCK queries sharing its
        # page table, so a long prefill chunk pads at most QUERY_BLOCK - 1 queries per row.
        # Decodes (one token) are laid out first and, in a mixed step, get rows of their
        # own (num_decode_rows) instead of being padded to the chunk's query block.
        max_q_len = min(bucket(int(lens.max())), QUERY_BLOCK)
        is_decode = lens == 1
        num_real_decodes = int(is_decode.sum())
        is_mixed = max_q_len > 1 and num_real_decodes > 0
        num_decode_rows = bucket(num_real_decodes) if is_mixed else 0
        all_greedy = all(s.temperature <= 0 or s.top_k == 1 for s in seqs)
        all_logits = any(s.want_prompt_logprobs for s in seqs)

        order = np.argsort(~is_decode, kind="stable")  # decodes first, otherwise as scheduled
        ends = np.empty(len(seqs), np.int64)
        ends[order] = np.cumsum(lens[order])  # end offset of each sequence in the flat batch
        offsets = ends - lens
        tokens = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slots = np.full(num_tokens, self.num_pages * self.page_size, np.int32)  # dropped
        targets = np.zeros(num_tokens, np.int32)  # successor of each token (prompt logprobs)
        tables = np.zeros((len(seqs), max_pages), np.int32)
        for i, s in enumerate(seqs):
            lo, hi = offsets[i], ends[i]
            pages = np.asarray(s.page_ids, dtype=np.int32)
            pos = starts[i] + np.arange(lens[i], dtype=np.int32)
            tokens[lo:hi] = s.token_ids
            targets[lo:hi - 1] = s.token_ids[1:]
            if s.next_token_id is not None:
                targets[hi - 1] = s.next_token_id
            positions[lo:hi] = pos
            slots[lo:hi] = pages[pos // self.page_size] * self.page_size + pos % self.page_size
            tables[i, :pages.size - suffix_page[i]] = pages[suffix_page[i]:]

        # Attention rows, in flat-batch order. Row r covers queries [q_lo, q_hi) of
        # sequence row_seq[r]; padding rows own no tokens and have kv_len 0.
        if is_mixed:
            seq_order = order[num_real_decodes:]
            row_seq = np.repeat(seq_order, -(-lens[seq_order] // max_q_len))
        else:
            row_seq = np.repeat(order, -(-lens[order] // max_q_len))
        # The reference computes padding rows too, so their count is a tight power of two.
        num_rows = num_decode_rows + bucket(row_seq.size, MIN_SEQ_BUCKET)
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
            kv_starts[:num_real_decodes] = suffix_page[dec] * self.page_size
            page_tables[:num_real_decodes] = tables[dec]
        base = num_decode_rows
        cu_q_lens[base + 1:base + row_seq.size + 1] = offsets[row_seq] + row_q_end
        kv_lens[base:base + row_seq.size] = starts[row_seq] + row_q_end
        page_tables[base:base + row_seq.size] = tables[row_seq]
        kv_starts[base:base + row_seq.size] = suffix_page[row_seq] * self.page_size
        prefix, prefix_shape, tokens_saved = None, None, 0
        if step.shared_prefixes:
            prefix, prefix_shape, tokens_saved = self._prefix_rows(step, offsets, ends, lens, max_q_len, num_tokens)
        else:
            kv_starts = None

        logits_indices = np.zeros(num_seqs, np.int32)
        logits_indices[:len(seqs)] = ends - 1
        temperature = np.zeros(num_seqs, np.float32)
        top_k = np.zeros(num_seqs, np.int32)
        top_p = np.ones(num_seqs, np.float32)
        min_p = np.zeros(num_seqs, np.float32)
        seeds = np.zeros(num_seqs, np.uint64)
        for i, s in enumerate(seqs):
            temperature[i], top_k[i], top_p[i], min_p[i], seeds[i] = s.temperature, s.top_k, s.top_p, s.min_p, s.seed
        seed_hi = (seeds >> np.uint64(32)).astype(np.uint32)
        seed_lo = (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        sample_pos = np.zeros(num_seqs, np.int32)
        sample_pos[:len(seqs)] = starts + lens

        signature = (num_tokens, num_seqs, num_decode_rows, num_rows, max_pages, max_q_len, prefix_shape, all_greedy,
                     all_logits)
        is_new = signature not in self._signatures
        start = time.perf_counter()
        host_seconds = start - prep_start
        sampled, logprobs, prompt_lp, self.kv_caches = self._step(
            self.params, self.kv_caches, tokens, positions, slots, cu_q_lens, kv_lens, page_tables, kv_starts, prefix,
            logits_indices, targets, temperature, top_k, top_p, min_p, seed_hi, seed_lo, sample_pos,
            max_q_len=max_q_len, num_decode_rows=num_decode_rows, all_greedy=all_greedy, all_logits=all_logits)
        sampled, logprobs, prompt_lp = jax.device_get((sampled, logprobs, prompt_lp))
        self.last_device_seconds = time.perf_counter() - start
        if is_new:
            self._signatures.add(signature)
            self.compile_seconds += self.last_device_seconds
        if prefix is not None:
            self.num_shared_prefix_steps += 1
            self.num_shared_prefix_tokens_saved += tokens_saved
        post_start = time.perf_counter()

        out_tokens, out_lps, out_prompt = [], [], []
        for i, s in enumerate(seqs):
            offset = offsets[i]
            n = lens[i]
            out_tokens.append(int(sampled[i]) if s.sample else None)
            out_lps.append(float(logprobs[i]) if s.sample and s.want_logprobs else None)
            num_known = n if s.next_token_id is not None else n - 1
            out_prompt.append(tuple(float(x) for x in prompt_lp[offset:offset + num_known])
                              if s.want_prompt_logprobs else None)
        self.last_host_seconds = host_seconds + time.perf_counter() - post_start
        return StepOutput(sampled_token_ids=tuple(out_tokens), logprobs=tuple(out_lps),
                          prompt_logprobs=tuple(out_prompt))


def _step_fn(model, params, kv_caches, tokens, positions, slots, cu_q_lens, kv_lens, page_tables, kv_starts, prefix,
             logits_indices, targets, temperature, top_k, top_p, min_p, seed_hi, seed_lo, sample_pos, *,
             max_q_len, num_decode_rows, all_greedy, all_logits):
    metadata = AttentionMetadata(slot_mapping=slots, cu_q_lens=cu_q_lens, kv_lens=kv_lens,
                                 page_tables=page_tables, max_q_len=max_q_len, num_decode_rows=num_decode_rows,
                                 kv_starts=kv_starts, prefix=None if prefix is None else PrefixRows(*prefix))
    variables = {"params": params}
    if all_logits:
        all_rows, kv_caches = model.apply(variables, tokens, positions, kv_caches, metadata)  # [T, V]
        logits = all_rows[logits_indices]
        log_probs = jax.nn.log_softmax(all_rows, axis=-1)
        prompt_lp = jnp.take_along_axis(log_probs, targets[:, None], axis=-1)[:, 0]  # [T]
    else:
        logits, kv_caches = model.apply(variables, tokens, positions, kv_caches, metadata, logits_indices)
        prompt_lp = jnp.zeros((0,), jnp.float32)
    keys = sampler.request_keys(seed_hi, seed_lo, sample_pos)
    sampled, logprobs = sampler.sample(logits, temperature, top_k, top_p, min_p, keys, all_greedy=all_greedy)
    return sampled, logprobs, prompt_lp, kv_caches
