"""Engine: the loop schedule -> execute -> update that serves many requests at once.

Architecture. Single-threaded and synchronous: the caller (InferenceSession) adds
requests and calls `step()` until `has_unfinished` is False; each step asks the
Scheduler for a StepInput, hands it to the ModelRunner (the only code that touches
the device), then applies the StepOutput: computed-token counts, sampled tokens,
detokenization, stop conditions, and frees the pages of finished requests. The engine
owns the Request objects, the Scheduler owns the waiting/running queues, the
BlockManager owns page bookkeeping, the runner owns the device arrays. Only this file
talks to the runtime.
"""
from __future__ import annotations

import itertools
import random
import time
from typing import Optional

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.detokenizer import IncrementalDetokenizer
from jaxinfer.engine.request import Request, Status
from jaxinfer.engine.scheduler import Scheduler, SharedPrefixPolicy
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.types import RequestOutput


class Engine:
    """Continuous-batching engine over one ModelRunner.

    Args:
      model_config: the model's shape (vocabulary and context checks).
      runner: the ModelRunner executing steps; its page pool sizes the BlockManager.
      engine_config: scheduling limits.
      tokenizer: optional; without it requests must be token ids and text stays "".
      eos_token_ids: ids that end a request (unless ignore_eos).
    """

    def __init__(self, model_config: ModelConfig, runner: ModelRunner, engine_config: EngineConfig,
                 tokenizer=None, eos_token_ids: tuple = ()):
        self.model_config = model_config
        self.runner = runner
        self.config = engine_config
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = min(engine_config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        self.block_manager = BlockManager(runner.num_pages, runner.page_size,
                                          enable_prefix_caching=engine_config.enable_prefix_caching)
        policy = None
        if engine_config.shared_prefix_attention and engine_config.enable_prefix_caching:
            policy = SharedPrefixPolicy(min_tokens=engine_config.shared_prefix_min_tokens,
                                        min_seqs=engine_config.shared_prefix_min_seqs)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens=engine_config.max_num_batched_tokens,
                                   max_num_seqs=engine_config.max_num_seqs, shared_prefix=policy)
        self.requests: dict = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_scheduled_seqs = 0
        self._seed_rng = random.Random()
        self.num_steps = 0
        self.num_batched_tokens = 0
        self.host_seconds = 0.0

    def add_request(self, prompt_ids: list, params: SamplingParams, request_id: Optional[str] = None,
                    priority: int = 0, cache_salt: Optional[str] = None) -> Request:
        """Validates and queues one request.

        Raises:
          ValueError: naming the field, for an empty prompt, ids outside the vocabulary,
            or a prompt + max_tokens beyond the context or beyond the page pool.
        """
        vocab = self.model_config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt: empty prompt (needs at least one token)")
        for t in prompt_ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt: token id {t!r} outside the vocabulary [0, {vocab})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"= {total} exceeds the model's context of {self.max_model_len}")
        if self.block_manager.pages_needed(total) > self.block_manager.num_pages:
            raise ValueError(f"max_tokens: prompt + max_tokens = {total} tokens can never fit in the KV cache "
                             f"({self.block_manager.num_pages} pages of {self.block_manager.page_size})")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority: expected an int, got {priority!r}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt: expected a string or None, got {type(cache_salt).__name__}")
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids: {t} outside the vocabulary [0, {vocab})")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer is not None else None
        request = Request(request_id, prompt_ids, params, seed, detok, self.eos_token_ids, priority=priority,
                          cache_salt=cache_salt, arrival_index=next(self._arrivals))
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list:
        """Runs one step; returns the requests that received a token in it."""
        start = time.perf_counter()
        step_input, chosen = self.scheduler.schedule()
        if step_input is None:
            return []
        step_output = self.runner.execute(step_input)
        touched = self.scheduler.update(chosen, step_output)
        self.num_steps += 1
        self.num_batched_tokens += sum(n for _, n in chosen)
        self.num_scheduled_seqs += len(chosen)
        # Host time: everything but the runner's device call (its input packing counts).
        self.host_seconds += time.perf_counter() - start - self.runner.last_device_seconds
        return touched

    def output(self, request: Request) -> RequestOutput:
        ttft = (request.first_token_time or request.arrival_time) - request.arrival_time
        n = len(request.output_ids)
        tpot = ((request.last_token_time - request.first_token_time) / (n - 1)) if n > 1 else 0.0
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_ids),
            token_ids=list(request.output_ids), text=request.text, finish_reason=request.finish_reason,
            logprobs=list(request.logprobs) if request.params.logprobs else None,
            prompt_logprobs=list(request.prompt_logprobs) if request.params.prompt_logprobs else None,
            time_to_first_token=ttft, time_per_output_token=tpot)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix page (the next requests recompute everything)."""
        self.block_manager.reset_prefix_cache()

    def abort(self, request: Request) -> None:
        """Stops a request wherever it is and frees its pages."""
        if not request.is_finished:
            self.scheduler.finish(request)
            request.finish_reason = request.finish_reason or "abort"
            request.status = Status.FINISHED
        self.release(request)

    def release(self, request: Request) -> None:
        """Forgets a finished request."""
        self.requests.pop(request.request_id, None)

    def metrics(self) -> dict:
        bm = self.block_manager
        steps = max(self.num_steps, 1)
        return {
            "num_steps": self.num_steps,
            "num_batched_tokens": self.num_batched_tokens,
            "mean_batch_tokens": self.num_batched_tokens / steps,
            "mean_batch_seqs": self.num_scheduled_seqs / steps,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_compiles": self.runner.num_compiles,
            "compile_seconds": self.runner.compile_seconds,
            "host_seconds": self.host_seconds,
            "host_ms_per_step": 1000 * self.host_seconds / steps,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_pages": bm.num_free_pages,
            "num_total_pages": bm.num_pages,
            "num_cached_pages": bm.num_cached_pages,
            "prefix_cache_queries": bm.num_cache_queries,
            "prefix_cache_hits": bm.num_cache_hits,
            "prefix_cache_hit_rate": bm.num_cache_hits / max(bm.num_cache_queries, 1),
            "shared_prefix_steps": self.runner.num_shared_prefix_steps,
            "shared_prefix_tokens_saved": self.runner.num_shared_prefix_tokens_saved,
            "weight_bytes": self.runner.weight_bytes,
            "kv_cache_bytes": self.runner.kv_cache_bytes,
        }
