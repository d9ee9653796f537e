"""Continuous depth-wise batching of a recursive model: the host side (no jax).

Path: engine -> scheduler (new tokens) -> **DepthwisePipeline** (new + in-flight rows,
each at its loop) -> runtime/depthwise_runner.py -> back here -> scheduler.update.
Relaxed Recursive Transformers (Bae et al. 2024, arXiv 2410.20672, §3.3): the B shared
layers are looped L / B times; since every loop runs the same weights, one call of the
block can carry tokens at different depths. Each engine step here runs the block once:
the tokens the scheduler picked this step enter at loop 0, and every *entry* already in
flight (the tokens of an earlier step) goes one loop deeper. An entry leaves after its
last loop, or, when it samples and its request has an early-exit threshold, after the
first exit loop where the exit's confidence (max probability) reaches the threshold.

Design (argued in docs/recursive.md with measurements):
- One loop per step for every entry. A request has at most one entry that the scheduler
  waits for (`busy`): a decode or a prompt chunk is not scheduled again until its entry
  has delivered, so a lone request's chunk takes num_loops steps; the batch fills the
  block with other requests' entries at other depths.
- The token budget covers all rows: the scheduler gets max_num_batched_tokens minus the
  rows in flight, so the runner's rows (and compiled shapes) stay within the budget.
- Early exit with KV fill: an exited token's sample is delivered at once (the request
  can schedule its next token next step), and the entry stays in flight as a *fill* entry
  through its remaining loops, writing the K/V those loops need (the hidden state goes on
  through the shared block, so the cache is what the full model computes from it).
  Ordering makes this safe without waiting: the next token enters at loop 0 a step after
  the exit and reaches loop k + i a step after the fill wrote loop k + i.
- Entries hold a reference on their request's pages until they leave (BlockManager
  share / free), so an abort or a preemption never hands out a page an entry still
  writes; an entry whose request left, or was preempted and readmitted, delivers nothing
  (its fill entries still finish, since cached pages may depend on them).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Optional

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.errors import NonFiniteOutput
from jaxinfer.types import ScheduledStep, StepInput, StepOutput


@dataclasses.dataclass(eq=False)
class Entry:
    """Tokens of one scheduled sequence going through the loops."""

    key: str  # the runner's sequence id (unique per entry)
    step_id: int  # the ScheduledStep it came from
    seq: object  # the scheduler's ScheduledSequence (logical pages)
    pages: tuple  # pages it holds a reference on
    loop: int = 0
    fill: bool = False  # exited early: runs its remaining loops for the K/V only
    decode: bool = False  # one generated token (not a prompt's): the only kind that may exit early


@dataclasses.dataclass
class DepthwiseCounters:
    """Metrics of the pipeline."""

    num_steps: int = 0  # depth-wise steps run (engine steps with the block called)
    num_rows: int = 0  # rows run, summed over steps (entries' tokens, incl. fill)
    num_fill_rows: int = 0  # rows run by fill entries
    num_mixed_steps: int = 0  # steps whose rows sat at more than one loop
    num_sampled_tokens: int = 0  # tokens delivered by sampling entries
    sampled_loops: int = 0  # loops those tokens ran before they were sampled
    exits_per_loop: dict = dataclasses.field(default_factory=dict)  # exit loop (1-based) -> tokens

    def as_metrics(self, num_loops: int, copy_fill_rows: int = 0) -> dict:
        return {"depthwise_steps": self.num_steps, "depthwise_rows": self.num_rows,
                "depthwise_copy_fill_rows": copy_fill_rows,
                "depthwise_fill_rows": self.num_fill_rows, "depthwise_mixed_steps": self.num_mixed_steps,
                "mean_loops_per_token": (self.sampled_loops / self.num_sampled_tokens
                                         if self.num_sampled_tokens else 0.0),
                "early_exits_per_loop": {str(k): self.exits_per_loop.get(k, 0) for k in range(1, num_loops)},
                "num_early_exits": sum(self.exits_per_loop.values())}


class DepthwisePipeline:
    """The in-flight entries of a depth-wise batched engine (see the module docstring)."""

    def __init__(self, block_manager: BlockManager, *, num_loops: int, exit_loops: tuple,
                 default_threshold: Optional[float] = None, kv_fill: str = "compute"):
        self.block_manager = block_manager
        self.kv_fill = kv_fill  # "copy": the runner writes an exit's skipped K/V in the exit step
        self.num_loops = num_loops
        self.exit_loops = frozenset(exit_loops)  # 1-based loop counts with an exit head
        self.default_threshold = default_threshold
        self.entries: list = []
        self.busy: dict = {}  # request id -> its entry the scheduler waits for
        self.counters = DepthwiseCounters()
        self._keys = itertools.count()

    @property
    def num_rows(self) -> int:
        """Rows the next step carries before any new token."""
        return sum(len(e.seq.token_ids) for e in self.entries)

    def token_budget(self, max_num_batched_tokens: int) -> int:
        return max_num_batched_tokens - self.num_rows

    def admit(self, step: Optional[ScheduledStep], prompt_lens: dict) -> None:
        """Takes the scheduler's new sequences in at loop 0 (they hold their pages from now).
        `prompt_lens`: request id -> prompt length (only a decode token may exit early)."""
        for seq in (step.step_input.sequences if step is not None else ()):
            decode = len(seq.token_ids) == 1 and seq.start_position >= prompt_lens.get(seq.request_id, 0)
            entry = Entry(key=f"d{next(self._keys)}", step_id=step.step_id, seq=seq, pages=tuple(seq.page_ids),
                          decode=decode)
            self.block_manager.share(entry.pages)
            self.busy[seq.request_id] = entry
            self.entries.append(entry)

    def drop_stale(self, running_ids) -> None:
        """Ends entries whose request left the scheduler (or was preempted and readmitted):
        nothing will read what they write (fill entries go on: cached pages may need them)."""
        keep = []
        for e in self.entries:
            rid = e.seq.request_id
            if not e.fill and (rid not in running_ids or self.busy.get(rid) is not e):
                self._release(e)
            else:
                keep.append(e)
        self.entries = keep

    def step_input(self) -> StepInput:
        """The runner's input: every entry at its loop, sampling only where it may leave."""
        seqs = []
        for e in self.entries:
            samples = bool(e.seq.sample_offsets) and not e.fill
            last = e.loop == self.num_loops - 1
            threshold = self._threshold(e.seq) if samples and not last and e.decode else None
            may_exit = threshold is not None and (e.loop + 1) in self.exit_loops
            keep = samples and (last or may_exit)
            seqs.append(dataclasses.replace(
                e.seq, request_id=e.key, loop=e.loop, exit_threshold=threshold if may_exit else None,
                sample_offsets=e.seq.sample_offsets if keep else (),
                want_prompt_logprobs=e.seq.want_prompt_logprobs and last and not e.fill,
                next_token_id=e.seq.next_token_id if last else None))
        return StepInput(sequences=tuple(seqs))

    def _threshold(self, seq) -> Optional[float]:
        return seq.exit_threshold if seq.exit_threshold is not None else self.default_threshold

    def advance(self, output: StepOutput) -> tuple:
        """Applies the runner's output: returns (ScheduledStep, StepOutput) of the entries
        that deliver now, for scheduler.update (None, None when none does)."""
        self.counters.num_steps += 1
        self.counters.num_mixed_steps += len({e.loop for e in self.entries}) > 1
        delivered, outputs, keep = [], {}, []
        for e in self.entries:
            out = output.outputs[e.key]
            n = len(e.seq.token_ids)
            self.counters.num_rows += n
            if e.fill:
                self.counters.num_fill_rows += n
            last = e.loop == self.num_loops - 1
            current = not e.fill and self.busy.get(e.seq.request_id) is e
            sampled = bool(out.token_ids)
            if current and (last or sampled or not out.finite):
                delivered.append(e.seq)
                outputs[e.seq.request_id] = dataclasses.replace(out, request_id=e.seq.request_id)
                del self.busy[e.seq.request_id]
                if sampled:
                    self.counters.num_sampled_tokens += len(out.token_ids)
                    self.counters.sampled_loops += (e.loop + 1) * len(out.token_ids)
                    if not last:
                        self.counters.exits_per_loop[e.loop + 1] = self.counters.exits_per_loop.get(e.loop + 1, 0) + 1
                if not last and sampled and out.finite and self.kv_fill == "compute":
                    e.fill = True  # its deeper loops' K/V are still to write ("copy": written already)
            if last or not e.fill and (not current or sampled) or not out.finite:
                self._release(e)
            else:
                e.loop += 1
                keep.append(e)
        self.entries = keep
        if not delivered:
            return None, None
        step = ScheduledStep.make(self.counters.num_steps, StepInput(sequences=tuple(delivered)))
        return step, StepOutput(outputs=outputs, stats=output.stats)

    def fail_all(self) -> list:
        """Drops every entry (a step raised); returns the ids of the requests with one in
        flight. The entries' pages leave the prefix cache: their deeper loops' K/V may be missing."""
        failed = list(dict.fromkeys([*self.busy, *(e.seq.request_id for e in self.entries)]))
        for e in self.entries:
            self.block_manager.unregister(e.pages)
            self._release(e)
        self.entries, self.busy = [], {}
        return failed

    def _release(self, entry: Entry) -> None:
        self.block_manager.free(entry.pages)


def depthwise_step(engine, start: float) -> list:
    """One depth-wise step (engine/depthwise.py): new tokens enter at loop 0, every
    entry in flight goes one loop deeper, those that leave are applied to the scheduler."""
    pipe = engine.depthwise
    pipe.drop_stale({r.request_id for r in engine.scheduler.running})
    step = engine.scheduler.schedule(busy=pipe.busy,
                                     token_budget=pipe.token_budget(engine.config.max_num_batched_tokens))
    engine.scheduler.take_swap_ops()  # none: depth-wise batching preempts by recompute only
    pipe.admit(step, {s.request_id: len(engine.requests[s.request_id].prompt_ids)
                      for s in (step.step_input.sequences if step is not None else ())})
    if not pipe.entries:
        return []
    step_input = pipe.step_input()
    try:
        output = engine.runner.execute(step_input)
        done, done_output = pipe.advance(output)
        touched = engine.scheduler.update(done, done_output) if done is not None else []
    except Exception as e:  # noqa: BLE001 - fail the requests in flight only
        failed = pipe.fail_all()
        engine.runner.reset()
        engine.scheduler.take_failed()
        engine._fail_step(e, failed)
    for request in engine.scheduler.take_failed():
        engine._fail(request, NonFiniteOutput(
            request.request_id, f"request {request.request_id!r}: the model produced a non-finite value (NaN or "
            f"Inf) in depth-wise step {pipe.counters.num_steps}; the request was failed and its pages were not "
            f"cached"))
    deltas = engine._deliver(touched, output.stats)
    engine._counters.add(output.stats, len(step_input.sequences),
                         time.perf_counter() - start - output.stats.device_seconds)
    if pipe.entries and not engine.scheduler.has_unfinished:
        # Only fill entries of finished requests are left: run them out now (at most
        # num_loops - 1 steps), so an idle engine holds no page.
        deltas += depthwise_step(engine, time.perf_counter())
    return deltas
