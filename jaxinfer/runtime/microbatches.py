"""Microbatches of a pipelined step (host only: no jax, no numpy): the step's tokens cut
into near-equal parts, the parts' outputs merged back, and the bubble model.

Path: engine -> StepInput -> PipelineRunner.execute -> **split_step** (m StepInputs) ->
input_batch.build_batch each -> stages, wavefront order -> unpack_outputs each ->
**merge_outputs** -> StepOutput; **PipelineSchedule.add** books the step's bubble.

Splitting (Sarathi, Agrawal et al. 2023). The scheduler's token budget
(`max_num_batched_tokens`) already bounds a step; Sarathi's point is that chunks of
near-equal token counts keep pipeline stages evenly loaded. So the step's fed tokens,
concatenated in step order, are cut into m contiguous ranges whose sizes differ by at
most one. A sequence inside one range stays whole; a sequence across a cut becomes one
piece per range, each a ScheduledSequence of its own: its tokens, its start position,
its pages up to its end, the sample offsets inside it, and (for every piece but the
last) the next piece's first token as `next_token_id`, so prompt log-probs join up.
This is exact: the pieces run in order on every stage (stage s runs microbatch k before
k + 1), and attention reads keys from the KV pages, where the earlier piece has already
written them. Steps with shared-prefix nodes (whose members must share a batch) are not
split.

Dimension codes: m microbatches, p stages.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxinfer.types import ScheduledSequence, SequenceOutput, StepInput


def _piece(seq: ScheduledSequence, lo: int, hi: int, page_size: int) -> ScheduledSequence:
    """Tokens [lo, hi) of `seq` as a sequence of their own (see the module docstring)."""
    n = len(seq.token_ids)
    if lo == 0 and hi == n:
        return seq
    end = seq.start_position + hi
    last = hi == n
    return dataclasses.replace(
        seq, token_ids=tuple(seq.token_ids[lo:hi]), start_position=seq.start_position + lo,
        page_ids=tuple(seq.page_ids[:-(-end // page_size)]),
        sample_offsets=tuple(o - lo for o in seq.sample_offsets if lo <= o < hi),
        next_token_id=seq.next_token_id if last else seq.token_ids[hi])


def split_step(step: StepInput, num_microbatches: int, page_size: int) -> list:
    """`step` as at most `num_microbatches` StepInputs of near-equal token counts.

    Args:
      step: the scheduled step.
      num_microbatches: m, the most microbatches wanted (>= 1).
      page_size: L, tokens per KV page (a piece keeps the pages up to its end).
    Returns:
      min(m, tokens of the step) StepInputs whose token counts differ by at most one, in
      the order they must run; [step] itself when it has shared-prefix nodes, fewer than
      two tokens, or m == 1.
    Raises:
      ValueError: num_microbatches < 1, or a request id appears twice in the step
        (its pieces would be merged into one output).
    """
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches: must be an int >= 1, got {num_microbatches!r}")
    seqs = step.sequences
    total = sum(len(s.token_ids) for s in seqs)
    m = min(num_microbatches, total)
    if m <= 1 or step.shared_prefixes:
        return [step]
    seen: set = set()
    for seq in seqs:
        if seq.request_id in seen:
            raise ValueError(f"request {seq.request_id} appears twice in the step")
        seen.add(seq.request_id)
    bounds = [k * total // m for k in range(m + 1)]  # near-equal: sizes differ by at most one
    parts: list = [[] for _ in range(m)]
    start = 0
    for seq in seqs:
        end = start + len(seq.token_ids)
        for k in range(m):
            lo, hi = max(start, bounds[k]), min(end, bounds[k + 1])
            if lo < hi:
                parts[k].append(_piece(seq, lo - start, hi - start, page_size))
        start = end
    return [StepInput(sequences=tuple(p)) for p in parts]


def merge_outputs(parts: Sequence[Mapping[str, SequenceOutput]]) -> dict:
    """The per-request outputs of a step from its microbatches' (in run order).

    A request split into pieces gets its pieces' sampled ids, log-probs, top log-probs
    and prompt log-probs concatenated in order (finite only if every piece was); a field
    a request did not ask for stays None.
    """
    merged: dict = {}
    for outputs in parts:
        for request_id, out in outputs.items():
            prev = merged.get(request_id)
            if prev is None:
                merged[request_id] = out
                continue

            def join(a, b):
                return None if a is None and b is None else tuple(a or ()) + tuple(b or ())

            merged[request_id] = SequenceOutput(
                request_id=request_id, token_ids=prev.token_ids + out.token_ids,
                logprobs=join(prev.logprobs, out.logprobs), top_logprobs=join(prev.top_logprobs, out.top_logprobs),
                prompt_logprobs=join(prev.prompt_logprobs, out.prompt_logprobs),
                finite=prev.finite and out.finite)
    return merged


def schedule_span(costs: Sequence[float], num_stages: int) -> float:
    """Makespan of microbatches of `costs` through `num_stages` equal stages, wavefront order.

    Stage s starts microbatch k when it has finished k - 1 and stage s - 1 has finished
    k: F(s, k) = max(F(s, k - 1), F(s - 1, k)) + c_k. Returns F(p - 1, m - 1).
    """
    finish = [0.0] * num_stages  # F(s, last microbatch seen)
    for cost in costs:
        ready = 0.0  # F(s - 1, k)
        for s in range(num_stages):
            finish[s] = max(finish[s], ready) + cost
            ready = finish[s]
    return finish[-1] if costs else 0.0


@dataclasses.dataclass
class PipelineSchedule:
    """The bubble fraction of the steps run so far, from a cost model, not from timers.

    Each microbatch costs every stage its padded token count (the rows each stage
    really computes; stages hold equal numbers of layers, and the first stage's
    embedding lookup and the last stage's LM head are left out). Per step, with m
    microbatches of costs c_k on p stages: total stage time = p * makespan
    (schedule_span), busy time = p * sum(c_k), idle = total - busy. The fraction is
    idle / total summed over steps: (p - 1) / (m + p - 1) for m equal microbatches.
    """

    num_stages: int
    idle: float = 0.0  # stage-token units
    total: float = 0.0
    num_steps: int = 0
    num_microbatches: int = 0

    def add(self, costs: Sequence[float]) -> None:
        """Books one step whose microbatches cost `costs` (padded tokens each)."""
        span = schedule_span(costs, self.num_stages)
        self.total += self.num_stages * span
        self.idle += self.num_stages * span - self.num_stages * sum(costs)
        self.num_steps += 1
        self.num_microbatches += len(costs)

    @property
    def bubble_fraction(self) -> float:
        """Stage idle time over total stage time, 0.0 before any step."""
        return self.idle / self.total if self.total else 0.0
