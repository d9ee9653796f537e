"""Scheduler: decides which tokens of which requests run in the next step (no jax).

Path: engine -> **scheduler** -> StepInput -> runner. Continuous batching with
chunked prefill in the manner of Sarathi (Agrawal et al., 2023/2024): each step has a
token budget; every running decode gets its one token first (decode-maximal), then
partially prefilled prompts continue, then waiting requests are admitted first come
first served, each taking min(remaining prompt, budget left). A request is admitted
only when pages for all of its current tokens can be allocated; when a decode needs a
page and none is free, the most recently admitted running request is preempted (its
pages freed, to be recomputed later).
"""
from __future__ import annotations

import collections
from typing import Optional

from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.request import Request, Status
from jaxinfer.types import ScheduledSequence, StepInput


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_batched_tokens: int, max_num_seqs: int):
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: collections.deque = collections.deque()
        self.running: list = []  # in admission order
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request.page_ids)
        request.page_ids = []
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _grow(self, request: Request, num_tokens: int, scheduled: set) -> bool:
        """Gives `request` pages for num_tokens tokens, preempting from the tail if needed."""
        bm = self.block_manager
        need = bm.pages_needed(num_tokens) - len(request.page_ids)
        while need > bm.num_free_pages:
            victim = self.running[-1]
            if victim is request or victim in scheduled:
                if victim is request:
                    self._preempt(request)
                return False
            self._preempt(victim)
        if need > 0:
            request.page_ids += bm.allocate(need)
        return True

    def schedule(self) -> tuple[Optional[StepInput], list]:
        """Returns the next StepInput (None if there is nothing to run) and the
        (request, num_tokens) pairs it covers, in batch order."""
        budget = self.max_num_batched_tokens
        chosen: list = []
        chosen_set: set = set()

        def take(request: Request, num_tokens: int) -> None:
            nonlocal budget
            chosen.append((request, num_tokens))
            chosen_set.add(request)
            budget -= num_tokens

        decodes = [r for r in self.running if r.num_tokens - r.num_computed == 1]
        for request in decodes:
            if budget == 0:
                break
            if request in self.running and self._grow(request, request.num_computed + 1, chosen_set):
                take(request, 1)
        for request in list(self.running):
            remaining = request.num_tokens - request.num_computed
            if budget == 0 or request in chosen_set or remaining <= 1:
                continue
            take(request, min(remaining, budget))
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            need = self.block_manager.pages_needed(request.num_tokens)
            if not self.block_manager.can_allocate(need):
                break
            self.waiting.popleft()
            request.page_ids = self.block_manager.allocate(need)
            request.status = Status.RUNNING
            self.running.append(request)
            take(request, min(request.num_tokens, budget))
        if not chosen:
            return None, []
        return StepInput(sequences=tuple(self._sequence(r, n) for r, n in chosen)), chosen

    @staticmethod
    def _sequence(request: Request, num_tokens: int) -> ScheduledSequence:
        start = request.num_computed
        ids = request.all_ids
        end = start + num_tokens
        params = request.params
        return ScheduledSequence(
            request_id=request.request_id,
            token_ids=tuple(ids[start:end]),
            start_position=start,
            page_ids=tuple(request.page_ids),
            sample=end == len(ids),
            temperature=float(params.temperature),
            top_k=int(params.top_k),
            top_p=float(params.top_p),
            min_p=float(params.min_p),
            seed=request.seed,
            want_logprobs=params.logprobs,
            want_prompt_logprobs=params.prompt_logprobs and start < len(request.prompt_ids) - 1,
            next_token_id=ids[end] if end < len(request.prompt_ids) else None,
        )

    def update(self, chosen: list) -> None:
        """Marks the scheduled tokens as computed (their K/V are now in the cache)."""
        for request, num_tokens in chosen:
            request.num_computed += num_tokens

    def finish(self, request: Request) -> None:
        """Releases a finished request's pages."""
        if request in self.running:
            self.running.remove(request)
        self.block_manager.free(request.page_ids)
        request.page_ids = []
