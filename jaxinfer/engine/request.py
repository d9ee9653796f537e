"""Request: the host-side state of one generation request (no jax).

Owned by the engine. The scheduler reads and advances `num_computed` and `page_ids`,
appends sampled tokens (`append_token`) and applies the token-level stop rules (EOS,
stop token ids, max_tokens); the output processor (engine/output_processor.py) turns
the tokens into text and applies stop strings. A request's tokens are its prompt
followed by its generated ids; `num_computed` of them have their K/V in the cache.

Samples of one prompt (SamplingParams.n > 1) are separate Requests ("{parent}-{i}"),
`index` i; every sample but the first waits while the first one computes the prompt's
full pages, then finds them in the prefix cache (Scheduler._prefix_in_flight).
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
                 eos_token_ids: tuple = (), priority: int = 0, cache_salt: Optional[str] = None,
                 arrival_index: int = 0, index: int = 0, parent_id: Optional[str] = None):
        self.request_id = request_id
        self.index = index  # sample index within its prompt (SamplingParams.n)
        self.parent_id = parent_id  # the id the prompt's samples share, or None
        # The prompt's first sample, until its prompt is computed (the scheduler admits
        # this request only then); None = no wait.
        self.prompt_computed = False  # the whole prompt had its K/V computed once
        self.priority = priority  # lower runs first (vLLM's convention)
        self.cache_salt = cache_salt  # prefix-cache namespace (per tenant)
        self.arrival_index = arrival_index  # FCFS tie-break among equal priorities
        self.admission_index = -1  # set by the scheduler at each admission
        self.page_hashes: list = []  # hash chain of the full pages of all_ids
        self.num_registered_pages = 0  # leading pages registered in the prefix cache
        self.num_hit_pages = 0  # leading pages taken from the prefix cache at admission (not computed here)
        self.num_cached_tokens = None  # prompt tokens of those pages at the FIRST admission (reported)
        self.prompt_ids = list(prompt_ids)
        self.prompt_tuple = tuple(self.prompt_ids)  # handed to every step that needs it (penalties)
        self.params = params
        self.seed = seed
        self.eos_token_ids = frozenset(eos_token_ids)
        # what min_tokens bans while too few tokens were generated
        self.min_tokens_ban_ids = tuple(sorted((set() if params.ignore_eos else set(self.eos_token_ids))
                                               | set(params.stop_token_ids)))
        self.output_ids: list = []
        self.logprobs: list = []  # per generated token, if params.want_logprobs
        self.top_logprobs: list = []  # per generated token a {id: log p} dict, if params.num_top_logprobs
        self.prompt_logprobs: list = []
        self.num_computed = 0  # tokens with K/V in the cache
        self.page_ids: list = []
        # Preempted by swapping: its first num_computed tokens' K/V wait in the engine's
        # SwapSpace (engine/swap.py) and it holds no page until it is admitted again.
        self.swapped_out = False
        self.status = Status.WAITING
        self.finish_reason: Optional[str] = None
        self.arrival_time = time.perf_counter()
        self.first_scheduled_time: Optional[float] = None  # set by the scheduler at the first admission
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None
        self.decode_compile_seconds = 0.0  # compiles in steps after its first token

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

    def is_stop_token(self, token_id: int) -> bool:
        """Whether the token ends the request without becoming text (EOS, stop token id)."""
        return (token_id in self.eos_token_ids and not self.params.ignore_eos) or token_id in self.params.stop_token_ids

    @property
    def below_min_tokens(self) -> bool:
        """Fewer than params.min_tokens generated: no EOS / stop token / stop string ends it."""
        return len(self.output_ids) < self.params.min_tokens

    def append_token(self, token_id: int, logprob: Optional[float] = None, top: Optional[tuple] = None) -> None:
        """Adds a generated token and applies the token-level stop rules.

        Sets finish_reason ("eos", "stop" for a stop token id, "length") when the token
        ends the request; the caller frees its pages. Below min_tokens (the sampler bans
        EOS and stop ids there) only max_tokens ends it.
        """
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(token_id)
        if self.params.want_logprobs:
            self.logprobs.append(logprob)
        if self.params.num_top_logprobs:
            self.top_logprobs.append(dict(top or ()))
        if self.below_min_tokens:
            pass
        elif token_id in self.eos_token_ids and not self.params.ignore_eos:
            self.finish("eos")
        elif token_id in self.params.stop_token_ids:
            self.finish("stop")
        elif len(self.output_ids) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        self.status = Status.FINISHED
