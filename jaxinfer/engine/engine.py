"""Engine: the loop schedule -> execute -> update that serves many requests at once.

Architecture. The Engine is synchronous and not thread-safe: one thread owns it. In a
session that is always the AsyncEngine's loop thread (engine/async_engine.py); code
that builds an Engine itself (tests, scripts) owns it in its own thread. It owns the Request objects and
the OutputProcessor; the Scheduler owns the waiting / running queues, the
BlockManager the page bookkeeping, the ModelRunner the device arrays. Only this file
talks to the runtime, and only through the step protocol of jaxinfer.types: each
step the Scheduler makes a ScheduledStep, the runner turns its StepInput into a
StepOutput (with the step's StepStats), `Scheduler.update(step, output)` applies it
by request id, and the OutputProcessor turns new tokens into text and stream deltas.

Requests enter through `add_requests` (validated as a batch by engine/validation.py
before any is queued) and leave when their last StreamDelta has been returned by
`step` or `abort`: the engine forgets them then.

Failures. A step whose runner (or update) raises fails that step's requests
(StepFailed: their pages freed, the engine forgets them) and the engine goes on. A
request whose sampled logits held a NaN or Inf (the runner checks every row,
`SequenceOutput.finite`) fails alone with NonFiniteOutput, kept for `take_errors()`:
nothing of that step is applied to it, the pages it wrote are never registered in the
prefix cache (nor the pages it computed earlier: scheduler.fail), and the other
requests of the step go on as if it had not been there. The request counters of
`metrics()` always add up: added = finished + aborted + failed + tracked.

Samples (SamplingParams.n > 1). `add_requests` runs a request of n samples as n
requests "{request_id}-{i}" (validation.expand_samples: n = 1 each, sample 0 keeps the
seed, sample i > 0 a seed derived from (seed, i)); their outputs carry `index` i and
`parent_request_id`. With prefix caching on, samples 1.. wait while sample 0 computes
the prompt's full pages (scheduler: prefixes in flight) and then share them: only the
prompt's last page (partial, or full when the prompt fills its pages, as at least one
token is always recomputed) is computed again per sample. With prefix caching off the
samples run independently, each computing the whole prompt. Each sample is aborted by
its own id.

Preemption (EngineConfig.preemption_mode). A request preempted for lack of pages is
recomputed later ("recompute"), or its computed pages are copied to host memory and
written back into new pages when it resumes ("swap"; "auto" picks per request by
measured cost): the SwapSpace of engine/swap.py holds the copies and the rule; the
scheduler emits SwapOut / SwapIn ops with its step and `step` runs them on the runner
(swap_out / swap_in) before the step itself. Aborting, failing or finishing a swapped
request drops its host copy.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import time
from typing import Optional, Sequence

import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.depthwise import DepthwisePipeline, depthwise_step
from jaxinfer.engine.errors import NonFiniteOutput, RequestFailed, StepFailed  # noqa: F401 - re-exported
from jaxinfer.engine.output_processor import OutputProcessor
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler, SharedPrefixPolicy
from jaxinfer.engine.speculative import draft_limit, make_proposer, timed_propose
from jaxinfer.engine.swap import SwapOut, optional_space
from jaxinfer.engine.validation import (NewRequest, RequestLimits, expand_samples, resolve_max_model_len,
                                        sample_ids, validate_requests)
from jaxinfer.runtime import warmup as warmup_lib
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.types import StepStats, StreamDelta


@dataclasses.dataclass
class _Counters:
    """Sums of the StepStats of every step, plus host time outside the runner."""

    num_steps: int = 0
    num_batched_tokens: int = 0
    num_padded_tokens: int = 0
    num_scheduled_seqs: int = 0
    num_compiles: int = 0
    compile_seconds: float = 0.0
    device_seconds: float = 0.0
    host_seconds: float = 0.0
    shared_prefix_steps: int = 0
    shared_prefix_tokens_saved: int = 0
    num_failed_steps: int = 0
    # requests: queued (each sample counts), then ended one way or another
    num_requests_added: int = 0
    num_requests_finished: int = 0  # length, eos, stop
    num_requests_aborted: int = 0  # by the caller
    num_requests_failed: int = 0  # a failed step, a non-finite output, an error of its own
    # warm-up (Engine.warmup): programs compiled or loaded ahead of traffic, not in num_compiles
    warmup_programs: int = 0
    warmup_seconds: float = 0.0

    def add(self, stats: StepStats, num_seqs: int, host_seconds: float) -> None:
        self.num_steps += 1
        self.num_batched_tokens += stats.num_tokens
        self.num_padded_tokens += stats.num_padded_tokens
        self.num_scheduled_seqs += num_seqs
        self.num_compiles += int(stats.is_compile)
        self.compile_seconds += stats.device_seconds if stats.is_compile else 0.0
        self.device_seconds += stats.device_seconds
        self.host_seconds += host_seconds
        self.shared_prefix_steps += int(stats.is_shared_prefix)
        self.shared_prefix_tokens_saved += stats.shared_prefix_tokens_saved


class Engine:
    """Continuous-batching engine over one ModelRunner.

    Args:
      model_config: the model's shape (vocabulary and context checks).
      runner: the ModelRunner executing steps; its page pool sizes the BlockManager.
      engine_config: scheduling limits.
      tokenizer: optional; without it requests must be token ids and text stays "".
      eos_token_ids: ids that end a request (unless ignore_eos).
      draft_runner: the draft model's runner, for engine_config.speculative method "draft".
    """

    def __init__(self, model_config: ModelConfig, runner: ModelRunner, engine_config: EngineConfig,
                 tokenizer=None, eos_token_ids: tuple = (), draft_runner=None):
        self.model_config = model_config
        self.runner = runner
        self.config = engine_config
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = resolve_max_model_len(model_config, engine_config)
        self.block_manager = BlockManager(runner.num_pages, runner.page_size,
                                          enable_prefix_caching=engine_config.enable_prefix_caching)
        policy = None
        if engine_config.shared_prefix_attention and engine_config.enable_prefix_caching:
            policy = SharedPrefixPolicy(min_tokens=engine_config.shared_prefix_min_tokens,
                                        min_seqs=engine_config.shared_prefix_min_seqs)
        mode = engine_config.preemption_mode
        if mode != "recompute" and not getattr(runner, "supports_swap", False):
            raise ValueError(f"preemption_mode: {mode!r} needs a runner that can copy KV pages to the host "
                             f"(swap_out / swap_in, in one process); {type(runner).__name__} cannot here: use "
                             f"\"recompute\"")
        # Host bytes of one page of every layer (K and V, scales included; all stages).
        self.swap_space = optional_space(mode, engine_config.swap_space_bytes,
                                         runner.kv_cache_bytes // max(runner.num_pages, 1))
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens=engine_config.max_num_batched_tokens,
                                   max_num_seqs=engine_config.max_num_seqs, shared_prefix=policy,
                                   swap_space=self.swap_space)
        self.output_processor = OutputProcessor(tokenizer)
        self.proposer = make_proposer(engine_config.speculative, draft_runner)  # None = no speculation
        self.limits = RequestLimits(vocab_size=model_config.vocab_size, max_model_len=self.max_model_len,
                                    num_pages=runner.num_pages, page_size=runner.page_size,
                                    early_exit=getattr(runner, "depthwise", False))
        self.requests: dict = {}  # request id -> Request, until its last delta is returned
        # request id -> the exception that failed that request alone in `step` (its
        # pages freed, the engine forgot it); the owner takes them with take_errors()
        self.request_errors: dict = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._seed_rng = random.Random()
        self._counters = _Counters()
        # Depth-wise batching of a recursive model (engine/depthwise.py): the runner says so.
        self.depthwise = (DepthwisePipeline(self.block_manager, num_loops=runner.num_loops,
                                            exit_loops=runner.exit_loops,
                                            default_threshold=engine_config.early_exit_threshold,
                                            kv_fill=runner.kv_fill)
                          if getattr(runner, "depthwise", False) else None)
        if self.depthwise is None and engine_config.early_exit_threshold is not None:
            raise ValueError("early_exit_threshold: early exit needs depth-wise batching (a recursive model folder "
                             "and depthwise_batching not False)")
        self._weight_bytes = runner.weight_bytes
        self._kv_cache_bytes = runner.kv_cache_bytes
        self._device_info = runner.device_info()

    # ------------------------------------------------------------------ requests

    def add_requests(self, requests: Sequence[NewRequest]) -> list:
        """Validates every request, then queues them all; returns their ids.

        A request with params.n > 1 is queued as its n samples: its n ids, in order, are
        in the returned list (so the list is longer than `requests`).

        Raises:
          ValueError: naming the field and the request's index; nothing is queued.
        """
        requests = validate_requests(list(requests), self.limits)
        given = {r.request_id for r in requests if r.request_id is not None}
        taken = set(self.requests)
        named = []
        for i, r in enumerate(requests):
            request_id, n = r.request_id, r.params.n
            while request_id is None or (r.request_id is None and (request_id in given or request_id in taken or any(
                    c in taken for c in (sample_ids(request_id, n) if n > 1 else ())))):
                request_id = str(next(self._ids))
            items = expand_samples(r, request_id) if n > 1 else [dataclasses.replace(r, request_id=request_id)]
            for item in items:
                if item.request_id in taken:
                    raise ValueError(f"request_id[{i}]: {item.request_id!r} is already in use")
                taken.add(item.request_id)
            named += items
        for r in named:
            seed = r.params.seed if r.params.seed is not None else self._seed_rng.getrandbits(63)
            request = Request(r.request_id, list(r.prompt_ids), r.params, seed, self.eos_token_ids,
                              priority=r.priority, cache_salt=r.cache_salt, arrival_index=next(self._arrivals),
                              index=r.index, parent_id=r.parent_id)
            self.requests[r.request_id] = request
            self.output_processor.add(request)
            self.scheduler.add(request)
        self._counters.num_requests_added += len(named)
        return [r.request_id for r in named]

    def add_request(self, prompt_ids, params: SamplingParams, request_id: Optional[str] = None,
                    priority: int = 0, cache_salt: Optional[str] = None) -> str:
        """Validates and queues one request of n = 1 (add_requests takes n > 1); returns its id."""
        if getattr(params, "n", 1) != 1:
            raise ValueError(f"params.n: add_request queues one sample, got n={params.n}; use add_requests")
        (rid,) = self.add_requests([NewRequest(prompt_ids=prompt_ids, params=params, request_id=request_id,
                                               priority=priority, cache_salt=cache_salt)])
        return rid

    @property
    def has_unfinished(self) -> bool:
        # Depth-wise: entries in flight (fill entries of finished requests too) hold pages.
        return self.scheduler.has_unfinished or bool(self.depthwise is not None and self.depthwise.entries)

    def abort(self, request_id: str) -> Optional[StreamDelta]:
        """Stops a request wherever it is and frees its pages.

        Returns:
          its last StreamDelta (finish_reason "abort" unless it had finished), or None
          for an id the engine does not hold.
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, "abort")
        return self._last_delta(request)

    def _forget(self, request: Request) -> None:
        self.output_processor.remove(request.request_id)
        del self.requests[request.request_id]
        if hasattr(self.proposer, "release"):  # the draft model's pages of the request
            self.proposer.release(request.request_id)

    def _last_delta(self, request: Request) -> StreamDelta:
        delta = self.output_processor.delta(request)
        self._forget(request)
        if request.finish_reason == "abort":
            self._counters.num_requests_aborted += 1
        else:
            self._counters.num_requests_finished += 1
        return delta

    def _fail(self, request: Request, error: Optional[BaseException]) -> None:
        """Ends a request with an error: pages freed, forgotten; `error` kept for take_errors()."""
        if not request.is_finished:
            self._finish(request, "error")
        self._forget(request)
        self._counters.num_requests_failed += 1
        if error is not None:
            self.request_errors[request.request_id] = error

    # ------------------------------------------------------------------ steps

    def step(self) -> list:
        """Runs one step.

        Returns:
          a StreamDelta for each request that received tokens in the step; a request's
          last delta (finish_reason set, with its RequestOutput) also forgets it.
        """
        start = time.perf_counter()
        if self.depthwise is not None:
            return depthwise_step(self, start)
        drafts = None
        if self.proposer is not None:
            decodes = self.scheduler.decoding()
            k = self.config.speculative.num_speculative_tokens
            limits = {r.request_id: draft_limit(r, k) for r in decodes}
            drafts = timed_propose(self.proposer, decodes, limits, self.scheduler.spec) if decodes else None
        step = self.scheduler.schedule(drafts)
        swap_ops = self.scheduler.take_swap_ops()
        if swap_ops:
            self._run_swaps(swap_ops, step)
        if step is None:
            return []
        touched, stats = self._execute(self.scheduler, self.runner, step)
        deltas = self._deliver(touched, stats)
        # Host time: everything but the runner's device call (its batch building counts).
        self._counters.add(stats, step.num_sequences, time.perf_counter() - start - stats.device_seconds)
        if self.swap_space is not None:  # the "auto" rule's prefill speed
            self.swap_space.observe_step(stats.num_tokens, step.num_sequences, stats.device_seconds, stats.is_compile)
        return deltas

    def _execute(self, scheduler: Scheduler, runner, step, result=None) -> tuple:
        """Runs `step` on `runner` (or takes its output from `result()`, a step run
        elsewhere) and applies it to `scheduler`; returns (touched, stats).

        A runner (or update) error fails the step's requests and raises StepFailed; a
        request with non-finite logits fails alone (NonFiniteOutput)."""
        try:
            step_output = result() if result is not None else runner.execute(step.step_input)
            touched = scheduler.update(step, step_output)
        except Exception as e:  # noqa: BLE001 - fail this step's requests only
            scheduler.take_failed()  # (a partial update's): failed below with the rest
            self._fail_step(e, list(step.num_scheduled_tokens))
        for request in scheduler.take_failed():  # non-finite logits: failed alone
            self._fail(request, NonFiniteOutput(
                request.request_id, f"request {request.request_id!r}: the model produced a non-finite value (NaN or "
                f"Inf) in its logits in step {step.step_id}; the request was failed and its pages were not cached"))
        return touched, step_output.stats

    def _deliver(self, touched: list, stats: StepStats) -> list:
        """Text and stream deltas of the requests that received tokens (stop strings end them)."""
        deltas = []
        for request, num_new in touched:
            try:
                if stats.is_compile and len(request.output_ids) > num_new:  # a decode step of this request
                    request.decode_compile_seconds += stats.device_seconds
                if self.output_processor.process(request, num_new) == "stop":
                    self._finish(request)
                    request.finish_reason = "stop"
                if request.is_finished:
                    deltas.append(self._last_delta(request))
                else:
                    deltas.append(self.output_processor.delta(request))
            except Exception as e:  # noqa: BLE001 - e.g. detokenizing: this request fails alone
                if request.request_id in self.requests:
                    self._fail(request, e)
                else:
                    self.request_errors[request.request_id] = e
        return deltas

    def _finish(self, request: Request, reason: Optional[str] = None) -> None:
        """Ends a request in the scheduler that holds it (with `reason` unless it has one)."""
        self.scheduler.finish(request, reason)

    def _run_swaps(self, ops: list, step) -> None:
        """Runs the step's SwapOut / SwapIn ops in order (before the step writes any page).

        A copy that raises fails the requests of every op and of the step (their pages
        and host copies freed), as a failed step does: a request whose copy did not
        happen has no K/V to go on with.
        """
        space = self.swap_space
        try:
            for op in ops:
                if isinstance(op, SwapOut):
                    host = self.runner.swap_out(op.page_ids)
                    space.store(op.request_id, host, host.nbytes, host.stats.seconds, not host.stats.is_compile)
                else:
                    stats = self.runner.swap_in(space.take(op.request_id), op.page_ids)
                    space.swapped_in(stats.nbytes, stats.seconds, not stats.is_compile)
        except Exception as e:  # noqa: BLE001 - fail the requests involved, keep serving
            self._fail_step(e, list(dict.fromkeys([op.request_id for op in ops] + (
                list(step.num_scheduled_tokens) if step is not None else []))))

    def _fail_step(self, error: BaseException, request_ids: list) -> None:
        """Fails `request_ids` (pages freed, forgotten), counts a failed step and raises
        StepFailed (the error travels in it); the engine keeps serving."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._fail(request, None)
        self._counters.num_failed_steps += 1
        raise StepFailed(error, request_ids) from error

    def take_errors(self) -> dict:
        """The requests failed alone since the last call: {request id: exception}."""
        errors, self.request_errors = self.request_errors, {}
        return errors

    def warmup_grid(self, context_tokens: Optional[int] = None) -> list:
        """The shape keys of this configuration's unmixed steps (runtime/warmup.grid_keys)
        up to `context_tokens` (None = max_model_len; larger is cut to it)."""
        if context_tokens is not None and (isinstance(context_tokens, bool) or not isinstance(context_tokens, int)
                                           or context_tokens < 1):
            raise ValueError(f"context_tokens: expected a positive int or None, got {context_tokens!r}")
        context = self.max_model_len if context_tokens is None else min(context_tokens, self.max_model_len)
        return warmup_lib.grid_keys(max_num_seqs=self.config.max_num_seqs,
                                    max_num_batched_tokens=self.config.max_num_batched_tokens,
                                    context_tokens=context, page_size=self.runner.page_size)

    def warmup(self, keys: Sequence[tuple], on_program=None) -> dict:
        """Compiles (or loads from the persistent cache) the step program of each shape key
        before traffic needs it (runner.warm: no page is written, no request is touched).

        Args:
          keys: shape keys (runtime/warmup.py); invalid ones raise ValueError first.
          on_program: called after each key (a progress bar's update).
        Returns:
          {"programs": keys given, "compiled": programs new to this process, "seconds",
          "flushes": times the runner dropped every program to stay under the process's
          memory-map limit (runtime/program_memory.py; XLA:CPU holds ~140 step programs
          here), "held": keys whose program is still held at the end (all of them unless
          a flush happened: then the last ones)}.
        """
        keys = [warmup_lib.check_key(k) for k in keys]
        budget = getattr(self.runner, "map_budget", None)
        flushes_before = budget.num_flushes if budget is not None else 0
        start = time.perf_counter()
        compiled, held = 0, set()
        for key in keys:
            flushes = budget.num_flushes if budget is not None else 0
            compiled += int(self.runner.warm(key))
            if budget is not None and budget.num_flushes != flushes:
                held.clear()  # the runner dropped every program (this one too)
            else:
                held.add(key)
            if on_program is not None:
                on_program()
        seconds = time.perf_counter() - start
        self._counters.warmup_programs += compiled
        self._counters.warmup_seconds += seconds
        return {"programs": len(keys), "compiled": compiled, "seconds": seconds,
                "flushes": (budget.num_flushes if budget is not None else 0) - flushes_before, "held": len(held)}

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix page (the next requests recompute everything)."""
        self.block_manager.reset_prefix_cache()

    def metrics(self) -> dict:
        bm = self.block_manager
        c = self._counters
        steps = max(c.num_steps, 1)
        return {
            "num_steps": c.num_steps,
            "num_batched_tokens": c.num_batched_tokens,
            "num_padded_tokens": c.num_padded_tokens,
            "mean_batch_tokens": c.num_batched_tokens / steps,
            "mean_batch_seqs": c.num_scheduled_seqs / steps,
            "num_preemptions": self.scheduler.num_preemptions,  # recompute + swap
            "num_recompute_preemptions": self.scheduler.num_recompute_preemptions,
            "num_prefix_waits": self.scheduler.num_prefix_waits,
            **self.scheduler.spec.metrics(),
            **_swap_metrics(self.swap_space),
            "num_failed_steps": c.num_failed_steps,
            "num_requests_added": c.num_requests_added,
            "num_requests_finished": c.num_requests_finished,
            "num_requests_aborted": c.num_requests_aborted,
            "num_requests_failed": c.num_requests_failed,
            "num_requests_tracked": len(self.requests),
            "num_compiles": c.num_compiles,
            "compile_seconds": c.compile_seconds,
            "warmup_programs": c.warmup_programs,
            "warmup_seconds": c.warmup_seconds,
            "device_seconds": c.device_seconds,
            "host_seconds": c.host_seconds,
            "host_ms_per_step": 1000 * c.host_seconds / steps,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_free_pages": bm.num_free_pages,
            "num_total_pages": bm.num_pages,
            "num_cached_pages": bm.num_cached_pages,
            "prefix_cache_queries": bm.num_cache_queries,
            "prefix_cache_hits": bm.num_cache_hits,
            "prefix_cache_hit_rate": bm.num_cache_hits / max(bm.num_cache_queries, 1),
            "shared_prefix_steps": c.shared_prefix_steps,
            "shared_prefix_tokens_saved": c.shared_prefix_tokens_saved,
            "weight_bytes": self._weight_bytes,
            "kv_cache_bytes": self._kv_cache_bytes,
            "max_model_len": self.max_model_len,
            **self._device_info,
            **_router_metrics(getattr(self.runner, "expert_token_counts", None)),
            # A pipelined runner's figures (pipeline_bubble_fraction, ...); none otherwise.
            **(self.runner.pipeline_metrics() if hasattr(self.runner, "pipeline_metrics") else {}),
            **(self.depthwise.counters.as_metrics(self.depthwise.num_loops, self.runner.num_copy_fill_rows)
               if self.depthwise is not None else {}),
        }


def _swap_metrics(space) -> dict:
    """Preemption by swapping (engine/swap.py); zeros with preemption_mode "recompute"."""
    if space is not None:
        return space.metrics()
    return {"num_swap_outs": 0, "num_swap_ins": 0, "swap_out_bytes": 0, "swap_in_bytes": 0, "swap_seconds": 0.0,
            "num_swapped_requests": 0, "swap_space_used_bytes": 0, "swap_space_bytes": 0, "num_swap_fallbacks": 0}


def _router_metrics(counts) -> dict:
    """Router statistics of a MoE model from its [MoE layers, experts] token counts:
    tokens per expert summed over layers, and the load imbalance (the busiest expert's
    tokens over the mean, averaged over layers; 1.0 = perfectly even)."""
    if counts is None or counts.size == 0:
        return {}
    means = counts.mean(axis=1)
    imbalance = float(np.mean(np.where(means > 0, counts.max(axis=1) / np.maximum(means, 1e-9), 1.0)))
    return {"expert_tokens": counts.sum(axis=0).tolist(), "router_load_imbalance": imbalance}
