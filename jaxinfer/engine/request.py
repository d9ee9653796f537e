"""Request: the host-side state of one generation request (no jax).

Owned by the engine; the scheduler reads and advances `num_computed` and `page_ids`,
output processing appends tokens and text. A request's tokens are its prompt followed
by its generated ids; `num_computed` of them have their K/V in the cache.
"""
from __future__ import annotations

import enum
import time
from typing import Optional

from jaxinfer.config import SamplingParams
from jaxinfer.engine.block_manager import page_hashes


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_ids: list, params: SamplingParams, seed: int,
                 detokenizer=None, eos_token_ids: tuple = (), priority: int = 0,
                 cache_salt: Optional[str] = None, arrival_index: int = 0):
        self.request_id = request_id
        self.priority = priority  # lower runs first (vLLM's convention)
        self.cache_salt = cache_salt  # prefix-cache namespace (per tenant)
        self.arrival_index = arrival_index  # FCFS tie-break among equal priorities
        self.admission_index = -1  # set by the scheduler at each admission
        self.page_hashes: list = []  # hash chain of the full pages of all_ids
        self.num_registered_pages = 0  # leading pages registered in the prefix cache
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = seed
        self.detokenizer = detokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.output_ids: list = []
        self.logprobs: list = []
        self.prompt_logprobs: list = []
        self.text = ""
        self.num_emitted_chars = 0  # streamed so far
        self.num_computed = 0  # tokens with K/V in the cache
        self.page_ids: list = []
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.arrival_time = time.perf_counter()
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self._max_stop_len = max((len(s) for s in params.stop), default=0)

    @property
    def all_ids(self) -> list:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def full_page_hashes(self, page_size: int) -> list:
        """The hash chain of every full page of all_ids (extended lazily)."""
        num_full = self.num_tokens // page_size
        if len(self.page_hashes) < num_full:
            start = len(self.page_hashes)
            self.page_hashes += page_hashes(self.all_ids, page_size, self.cache_salt, start,
                                            self.page_hashes[-1] if start else None)
        return self.page_hashes

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int, logprob: Optional[float]) -> None:
        """Adds a generated token, updates the text and decides whether to stop."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token_id)
        if self.params.logprobs:
            self.logprobs.append(logprob)
        params = self.params
        is_eos = token_id in self.eos_token_ids and not params.ignore_eos
        is_stop_id = token_id in params.stop_token_ids
        if self.detokenizer is not None and not (is_eos or is_stop_id):
            delta = self.detokenizer.add(token_id)
            if delta:
                start = max(0, len(self.text) - self._max_stop_len + 1)
                self.text += delta
                hits = [at for at in (self.text.find(stop, start) for stop in params.stop) if at >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.finish("stop")
                    return
        if is_eos:
            self.finish("eos")
        elif is_stop_id:
            self.finish("stop")
        elif len(self.output_ids) >= params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            if reason != "stop" and self.detokenizer is not None:
                self.text += self.detokenizer.flush()
            self.finish_reason = reason
        self.status = Status.FINISHED

    def take_stream_delta(self) -> str:
        """Text not streamed yet; holds back what could still become a stop string."""
        end = len(self.text)
        if not self.is_finished and self._max_stop_len > 1:
            end = max(self.num_emitted_chars, end - self._max_stop_len + 1)
        delta = self.text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return delta
