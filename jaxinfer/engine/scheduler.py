"""Scheduler: decides which tokens of which requests run in the next step (no jax).

Path: engine -> **scheduler** -> StepInput -> runner. Continuous batching with
chunked prefill in the manner of Sarathi-Serve (Agrawal et al., OSDI 2024): each step
has a token budget (`max_num_batched_tokens`); every running decode gets its one token
first (decode-maximal batching), then partially prefilled prompts continue, then
waiting requests are admitted, each taking min(remaining prompt, budget left). Requests
join and leave at every step.

Admission order is by priority (lower first), then arrival (first come first served).
A request is admitted only when pages for all of its current tokens can be had; pages
of its prefix already in the prefix cache are shared instead of recomputed (at least
one token is always left to compute, to produce the next-token logits). When a running
decode needs a page and none is free, the running request of the lowest priority that
was admitted most recently is preempted: its pages are freed (its computed full pages
stay in the prefix cache) and it is recomputed later -- or, with a SwapSpace
(EngineConfig.preemption_mode "swap" / "auto", engine/swap.py), its computed pages are
copied to host memory first (a SwapOut op) and, when it is admitted again, written into
new pages (a SwapIn op) so that it goes on with no recompute. The engine takes the ops
with `take_swap_ops()` right after `schedule()` and runs them, in order, before the
step: pages a swap-out frees may be handed out, and written, in that very step.

The step protocol. `schedule()` returns a frozen ScheduledStep (the runner's StepInput
plus the tokens scheduled per request id); `update(step, output)` takes it back with
the runner's StepOutput and matches the two by request id, so a request aborted in
between is skipped and a sequence may carry several sampled positions or none. (The
engine still runs schedule -> execute -> update in turn: `schedule()` works from
`num_computed`, which only `update()` advances, so overlapping step N+1 with step N
needs the scheduler to count tokens in flight first.) The
token-level stop rules (EOS, stop token ids, max_tokens) are applied here; stop
strings, which need text, are the output processor's. A sequence whose output is not
`finite` (a NaN / Inf in its logits) gets nothing of the step: `fail` ends it, drops
the pages it computed from the prefix cache and frees its pages.

Prefixes in flight. A waiting request whose leading full pages a running request is
computing right now (same tokens, same cache salt; not yet in the prefix cache) stays
waiting, without blocking the requests behind it, until they are registered, and then
shares them instead of computing its own copies (`_prefix_in_flight`; counted in
`num_prefix_waits`). The samples of one prompt (SamplingParams.n) are the common case:
samples 1.. wait while sample 0 computes the prompt, then recompute only its last page.

Logit processing. Each ScheduledSequence that samples carries its penalties (with the
prompt and the generated ids, only when a penalty is on), its logit_bias, and, while
fewer than min_tokens ids were generated, the ids min_tokens bans (EOS unless
ignore_eos, stop token ids).

Speculative decoding (engine/speculative.py). `schedule(drafts)` takes draft ids per
decoding request: a decode's sequence is then its last token followed by its drafts,
sampled at every offset, as far as the token budget allows and only when the drafts'
pages are free (a draft never preempts). `update` appends the drafts that equal the
token sampled before them and the token sampled after the last of those, counts the
K/V of exactly those as computed, and frees the pages only rejected drafts occupied.

Shared prefixes. With a `SharedPrefixPolicy`, each StepInput also lists the tree of
prefix pages its sequences share (engine/shared_prefix.py), for the runner's
shared-prefix (Hydragen) attention path.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from typing import Optional

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import Request, Status
from jaxinfer.engine.shared_prefix import find_shared_prefixes
from jaxinfer.engine.speculative import SpecCounters, num_accepted
from jaxinfer.engine.swap import SwapIn, SwapOut, SwapSpace
from jaxinfer.types import ScheduledSequence, ScheduledStep, StepInput, StepOutput


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedPrefixPolicy:
    """The cost rule of the shared-prefix path (see engine/shared_prefix.py)."""

    min_tokens: int  # smallest shared node worth the path, in tokens
    min_seqs: int  # fewest sequences sharing a node


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_batched_tokens: int, max_num_seqs: int,
                 shared_prefix: Optional[SharedPrefixPolicy] = None, swap_space: Optional[SwapSpace] = None):
        self.block_manager = block_manager
        self.swap_space = swap_space  # None = every preemption recomputes
        self.swap_ops: list = []  # SwapOut / SwapIn of the last schedule(), until take_swap_ops()
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.shared_prefix = shared_prefix
        self.waiting: list = []  # sorted by (priority, arrival_index)
        self.running: list = []  # in admission order
        self.num_preemptions = 0  # both kinds
        self.num_recompute_preemptions = 0
        self.num_prefix_waits = 0  # admissions put off for a prefix in flight (_prefix_in_flight), per step
        self.failed: list = []  # requests update() failed (non-finite outputs), until take_failed()
        self.spec = SpecCounters()  # speculative decoding: drafts verified and accepted
        # Called before a waiting request (not swapped out) is admitted; False = not yet,
        # and nothing behind it is admitted either (Splitwise: its decode pages are reserved
        # first, engine/splitwise.py). None = always.
        self.admission_gate = None
        self._admissions = itertools.count()
        self._step_ids = itertools.count()

    @staticmethod
    def _order(request: Request):
        return request.priority, request.arrival_index

    def add(self, request: Request) -> None:
        bisect.insort(self.waiting, request, key=self._order)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------- pages

    def _release_pages(self, request: Request) -> None:
        self.block_manager.free(request.page_ids)
        request.page_ids = []
        request.num_registered_pages = 0
        request.num_hit_pages = 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        if not self._swap_out(request):
            self._release_pages(request)
            request.num_computed = 0
            self.num_recompute_preemptions += 1
        request.status = Status.WAITING
        self.add(request)
        self.num_preemptions += 1

    def _swap_out(self, request: Request) -> bool:
        """Swaps a preempted request out when the SwapSpace says so and has room: its
        computed pages go to a SwapOut op, every page it holds is freed, num_computed is
        kept. Returns False (nothing done) for a recompute."""
        space = self.swap_space
        if space is None:
            return False
        num_pages = self.block_manager.pages_needed(request.num_computed)
        if space.choose(num_pages, request.num_computed) != "swap" or not space.reserve(request.request_id,
                                                                                         num_pages):
            return False
        self.swap_ops.append(SwapOut(request.request_id, tuple(request.page_ids[:num_pages])))
        self.block_manager.free(request.page_ids)
        request.page_ids = []
        request.swapped_out = True
        return True

    def take_swap_ops(self) -> list:
        """The SwapOut / SwapIn ops of the last schedule(), in the order they must run."""
        ops, self.swap_ops = self.swap_ops, []
        return ops

    def _victim(self) -> Request:
        # Lowest priority (largest value) first; among equals the most recently admitted.
        return max(self.running, key=lambda r: (r.priority, r.admission_index))

    def _grow(self, request: Request, num_tokens: int, scheduled: set) -> bool:
        """Gives `request` pages for num_tokens tokens, preempting others if needed."""
        bm = self.block_manager
        need = bm.pages_needed(num_tokens) - len(request.page_ids)
        while need > bm.num_free_pages:
            victim = self._victim()
            if victim is request:
                self._preempt(request)
                return False
            if victim in scheduled:
                return False
            self._preempt(victim)
        if need > 0:
            request.page_ids += bm.allocate(need)
        return True

    def _admit(self, request: Request) -> bool:
        """Allocates pages for the request's tokens, sharing cached prefix pages (a
        swapped-out request gets new pages instead, and a SwapIn op for its copy)."""
        bm = self.block_manager
        if request.swapped_out:
            num_new = bm.pages_needed(request.num_tokens)
            if not bm.can_allocate(num_new):
                return False
            request.page_ids = bm.allocate(num_new)
            num_copied = self.swap_space.num_pages_of(request.request_id)
            self.swap_ops.append(SwapIn(request.request_id, tuple(request.page_ids[:num_copied])))
            request.swapped_out = False
            # Restored pages are private copies: none came from the cache, none is
            # registered yet (update() registers those whose hash the cache lost).
            request.num_registered_pages = 0
            request.num_hit_pages = 0
            return True
        num_tokens = request.num_tokens
        taken = bm.acquire(request.full_page_hashes(bm.page_size), (num_tokens - 1) // bm.page_size, num_tokens)
        if taken is None:
            return False
        request.page_ids, num_hits = taken
        request.num_computed = num_hits * bm.page_size
        request.num_registered_pages = request.num_hit_pages = num_hits
        if request.num_cached_tokens is None:  # a preempted request's re-admission is not counted
            request.num_cached_tokens = request.num_computed
        bm.record_lookup(num_tokens, request.num_computed)
        return True

    def _prefix_in_flight(self, request: Request) -> bool:
        """A running request is still computing full pages of this request's prefix that
        the prefix cache does not hold yet: admitted now, this request would compute its
        own copies of them (the same prompt prefix twice, in the same steps). It waits
        until they are registered and then shares them. Only prompt pages of prompts
        still being computed count, so the wait ends: when the other finishes its
        prompt, is preempted, or leaves."""
        bm = self.block_manager
        if not bm.enable_prefix_caching or request.swapped_out:
            return False
        mine = request.full_page_hashes(bm.page_size)[:(request.num_tokens - 1) // bm.page_size]
        if not mine:
            return False
        cached = None
        for other in self.running:
            if other.prompt_computed:
                continue
            theirs = other.full_page_hashes(bm.page_size)[:len(other.prompt_ids) // bm.page_size]
            shared = 0
            for a, b in zip(mine, theirs):  # hash chains: equal at i means equal up to i
                if a != b:
                    break
                shared += 1
            if shared <= other.num_registered_pages:
                continue
            if cached is None:
                cached = len(bm.match_prefix(mine, max_pages=len(mine)))
            if shared > cached:
                return True
        return False

    # ---------------------------------------------------------------- steps

    def decoding(self) -> list:
        """The running requests whose next step is a decode (one token left to compute)."""
        return [r for r in self.running if r.num_tokens - r.num_computed == 1]

    def schedule(self, drafts: Optional[dict] = None, *, busy=(), token_budget: Optional[int] = None
                 ) -> Optional[ScheduledStep]:
        """Returns the next step (None if there is nothing to run).

        `drafts` (speculative decoding, engine/speculative.py): request id -> draft ids
        fed after a decode's last token and verified in this step; a decode takes them
        as far as the token budget and the free pages go (drafts never preempt).
        `busy` (depth-wise batching, engine/depthwise.py): ids of running requests whose
        last scheduled tokens are still in flight; they are not scheduled.
        `token_budget`: this step's budget when below max_num_batched_tokens.
        """
        budget = self.max_num_batched_tokens if token_budget is None else min(token_budget,
                                                                              self.max_num_batched_tokens)
        chosen: list = []  # (request, num_tokens) in batch order
        chosen_set: set = set()
        taken_drafts: dict = {}  # request id -> the drafts it runs this step
        bm = self.block_manager

        def take(request: Request, num_tokens: int) -> None:
            nonlocal budget
            chosen.append((request, num_tokens))
            chosen_set.add(request)
            budget -= num_tokens

        for request in self.decoding():
            if budget <= 0:
                break
            if request.request_id in busy:
                continue
            draft = tuple((drafts or {}).get(request.request_id, ()))[:budget - 1]
            if draft and (bm.pages_needed(request.num_computed + 1 + len(draft))
                          - max(len(request.page_ids), bm.pages_needed(request.num_computed + 1))
                          > bm.num_free_pages):
                draft = ()
            if request in self.running and self._grow(request, request.num_computed + 1 + len(draft), chosen_set):
                take(request, 1 + len(draft))
                if draft:
                    taken_drafts[request.request_id] = draft
        for request in list(self.running):
            remaining = request.num_tokens - request.num_computed
            if budget <= 0 or request in chosen_set or remaining <= 1 or request.request_id in busy:
                continue
            take(request, min(remaining, budget))
        index = 0
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[index]
            if self._prefix_in_flight(request):
                self.num_prefix_waits += 1
                index += 1  # its prefix is being computed by a running request: wait for those pages
                continue
            if self.admission_gate is not None and not request.swapped_out and not self.admission_gate(request):
                break
            if not self._admit(request):
                break
            self.waiting.pop(index)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.perf_counter()
            request.status = Status.RUNNING
            request.admission_index = next(self._admissions)
            self.running.append(request)
            take(request, min(request.num_tokens - request.num_computed, budget))
        if not chosen:
            return None
        sequences = tuple(self._sequence(r, n, taken_drafts.get(r.request_id, ())) for r, n in chosen)
        shared = ()
        if self.shared_prefix is not None and len(sequences) >= self.shared_prefix.min_seqs:
            shared = find_shared_prefixes(sequences, self.block_manager.page_size,
                                          min_tokens=self.shared_prefix.min_tokens,
                                          min_seqs=self.shared_prefix.min_seqs)
        return ScheduledStep.make(next(self._step_ids), StepInput(sequences=sequences, shared_prefixes=shared),
                                  taken_drafts)

    @staticmethod
    def _sequence(request: Request, num_tokens: int, drafts: tuple = ()) -> ScheduledSequence:
        start = request.num_computed
        ids = request.all_ids + list(drafts)
        end = start + num_tokens
        params = request.params
        samples = end == len(ids)
        penalties = samples and params.has_penalties
        banned = samples and request.below_min_tokens and request.min_tokens_ban_ids
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=tuple(ids[start:end]),
            start_position=start,
            page_ids=tuple(request.page_ids),
            sample_offsets=tuple(range(num_tokens - 1 - len(drafts), num_tokens)) if samples else (),
            temperature=float(params.temperature),
            top_k=int(params.top_k),
            top_p=float(params.top_p),
            min_p=float(params.min_p),
            seed=request.seed,
            want_logprobs=params.want_logprobs,
            num_top_logprobs=params.num_top_logprobs,
            want_prompt_logprobs=params.prompt_logprobs and start < len(request.prompt_ids) - 1,
            next_token_id=ids[end] if end < len(request.prompt_ids) else None,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            prompt_token_ids=request.prompt_tuple if penalties else (),
            output_token_ids=tuple(request.output_ids) + drafts if penalties else (),
            logit_bias=params.logit_bias if samples else (),
            banned_token_ids=request.min_tokens_ban_ids if banned else (),
            ban_until_position=len(request.prompt_ids) + params.min_tokens,
            exit_threshold=params.early_exit_threshold if samples else None,
        )

    def update(self, step: ScheduledStep, step_output: StepOutput) -> list:
        """Applies the runner's output for `step`, matching it to requests by id.

        Marks the scheduled tokens as computed, caches the pages they filled, records
        prompt logprobs, appends sampled tokens (stopping at the first one that ends
        the request) and frees the pages of finished requests. A request that left
        the scheduler since `step` was made (aborted) is skipped.

        Returns:
          (request, number of tokens appended) for each request that received tokens,
          in batch order.
        """
        bm = self.block_manager
        running = {r.request_id: r for r in self.running}
        touched = []
        for request_id, num_tokens in step.num_scheduled_tokens.items():
            request = running.get(request_id)
            if request is None:
                continue
            out = step_output.outputs.get(request_id)
            if out is None:
                raise ValueError(f"step_output: no output for request {request_id!r} of step {step.step_id}")
            if not out.finite:  # NaN / Inf in its logits: nothing of this step is kept
                self.fail(request)
                continue
            first_target = request.num_computed + 1
            drafts = step.draft_token_ids.get(request_id, ())
            tokens = out.token_ids
            if drafts:  # the accepted drafts, then the token sampled after them
                accepted = num_accepted(drafts, tokens)
                self.spec.record(len(drafts), accepted)
                tokens = tokens[:accepted + 1]
            num_new = 0
            for j, token in enumerate(tokens):
                request.append_token(token, out.logprobs[j] if out.logprobs is not None else None,
                                     out.top_logprobs[j] if out.top_logprobs is not None else None)
                num_new += 1
                if request.is_finished:
                    break
            # K/V kept: every fed token but the drafts, and the drafts now in the sequence
            # (those before the last appended token); a rejected draft's slot is rewritten later.
            request.num_computed += num_tokens - len(drafts) + (num_new - 1 if drafts else 0)
            if request.num_computed >= len(request.prompt_ids):
                request.prompt_computed = True
            num_full = request.num_computed // bm.page_size
            if num_full > request.num_registered_pages:
                hashes = request.full_page_hashes(bm.page_size)
                for i in range(request.num_registered_pages, num_full):
                    bm.register(request.page_ids[i], hashes[i])
                request.num_registered_pages = num_full
            for j, lp in enumerate(out.prompt_logprobs or ()):
                # After a preemption a prompt is recomputed: keep the first value only.
                target = first_target + j
                if target < len(request.prompt_ids) and target == len(request.prompt_logprobs) + 1:
                    request.prompt_logprobs.append(lp)
            if drafts and not request.is_finished:  # roll back: free the pages only rejected drafts used
                keep = bm.pages_needed(request.num_tokens)
                if len(request.page_ids) > keep:
                    bm.free(request.page_ids[keep:])
                    del request.page_ids[keep:]
            if num_new:
                touched.append((request, num_new))
            if request.is_finished:
                self.finish(request)
        return touched

    def detach(self, request: Request) -> None:
        """Takes a running request out (Splitwise: its prompt is done here and moves to the
        decode side): its pages are freed, the full ones it registered stay cached."""
        self.running.remove(request)
        self._release_pages(request)

    def attach(self, request: Request, page_ids: list, num_cached_pages: int) -> None:
        """Takes a request whose first num_computed tokens' K/V are already in `page_ids`
        (Splitwise: copied from the prefill side; its leading num_cached_pages came from
        this side's prefix cache) as a running request."""
        request.page_ids = list(page_ids)
        request.num_registered_pages = request.num_hit_pages = num_cached_pages
        request.status = Status.RUNNING
        request.admission_index = next(self._admissions)
        self.running.append(request)

    def fail(self, request: Request) -> None:
        """Ends a request whose step produced a non-finite value (finish reason "error").

        The step's tokens were not applied and the pages it wrote were not registered.
        The pages the request computed and registered in earlier steps are dropped from
        the prefix cache too (a NaN in the K/V shows in the logits only when a later
        query reads it); pages it took from the cache stay. Then its pages are freed.
        The engine takes it with take_failed().
        """
        self.block_manager.unregister(request.page_ids[request.num_hit_pages:request.num_registered_pages])
        request.num_registered_pages = request.num_hit_pages
        self.finish(request, "error")
        self.failed.append(request)

    def take_failed(self) -> list:
        failed, self.failed = self.failed, []
        return failed

    def finish(self, request: Request, reason: Optional[str] = None) -> None:
        """Ends a request (with `reason` unless it already has one) and frees its pages."""
        if reason is not None:
            request.finish(reason)
        # Finished even without a reason (the engine's stop-string finish sets it itself).
        request.status = Status.FINISHED
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release_pages(request)
        if self.swap_space is not None:  # its host copy, and a copy op not yet run, go too
            self.swap_space.discard(request.request_id)
            self.swap_ops = [op for op in self.swap_ops if op.request_id != request.request_id]
        request.swapped_out = False
