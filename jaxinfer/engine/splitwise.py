"""SplitwiseEngine: prompts on a prefill runner, decodes on a decode runner (one process).

Splitwise (Patel et al., ISCA 2024) runs the two phases of a request on different
machines: the prompt phase is compute-bound, the token phase memory-bound, and a long
prompt computed beside decodes stalls them (the TPOT interference of colocated
serving). Here the two phases get two ModelRunners on two meshes
(`EngineConfig(disaggregation="splitwise", num_prefill_devices=N,
prefill_tensor_parallel_size=..., decode_tensor_parallel_size=...)`: the first N devices
prefill, the next ones decode), each with its own KV page pool, prefix cache and
compiled programs, and two Schedulers over them; this engine is the one host component
that knows both pools.

A request's life:
1. It waits on the prefill side. Before it is admitted there, pages for its prompt and
   first token are reserved on the decode side (`Scheduler.admission_gate`), sharing
   the full prompt pages the decode side's prefix cache already holds: a request is
   never prefilled without somewhere to decode, and a prefix cached on the decode side
   is not sent again.
2. The prefill scheduler runs its prompt in Sarathi chunks (its own token budget; only
   prompts run there) and samples the first token.
3. Its prompt pages (all but those the decode side had cached) are copied to the
   reserved pages (runtime/kv_transfer.py: device to device, resharded), its prefill
   pages are freed (the full ones stay in the prefill prefix cache), and it joins the
   decode scheduler as a running decode (`Scheduler.attach`).
4. It decodes there until it finishes. A decode preempted for pages (recompute mode)
   is recomputed on the decode side itself.

The two loops are decoupled: a prefill step runs on a worker thread and stays in flight
across `step()` calls, each of which runs one decode step on the engine thread; the
prefill step is applied by the first call that finds it done (or that has no decode to
run, which then waits for it), and only then is the next prefill step scheduled. So a
decode step never carries prompt tokens and never waits for a long prefill step
(`decode_steps_beside_prefill` counts the decode steps run while one was in flight).
Nothing is shared between the loops while a prefill step is in flight: the prefill
scheduler (its pages, its prefix cache, the decode-side reservations made at its
admission) is touched only between prefill steps, and a request aborted meanwhile is
skipped when the step is applied (its pages were freed at the abort; the in-flight
step's writes to them land before any later prefill step is dispatched).
Greedy and seeded tokens are those of the colocated engine: the same positions are
computed with the same keys.

Metrics (on top of the Engine's, whose page and queue figures cover both pools):
`num_kv_transfers`, `kv_transfer_bytes`, `kv_transfer_seconds` (all exposed: the copy
runs after the prompt's last chunk; streaming it layer by layer during the prefill is
not done), `prefill_*` and `decode_*` queue lengths and free pages, and the TTFT split
summed over handed-off requests: `ttft_prefill_queue_seconds` (arrival -> first prefill
step), `ttft_prefill_seconds` (-> first token), `ttft_transfer_seconds`.
"""
from __future__ import annotations

import concurrent.futures
import time
from typing import Optional

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.engine.engine import Engine, StepFailed
from jaxinfer.engine.request import Request
from jaxinfer.engine.scheduler import Scheduler
from jaxinfer.engine.validation import RequestLimits
from jaxinfer.runtime.kv_transfer import PageTransfer
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.sharding.mesh import splitwise_meshes


def build_runners(model_config: ModelConfig, params, engine_config: EngineConfig, *, dtype, max_model_len: int):
    """(prefill runner, decode runner) on the meshes EngineConfig's disaggregation fields name,
    each with the page pool its mesh's memory gives (EngineConfig.num_pages / max_kv_cache_bytes)."""
    c = engine_config
    prefill_mesh, decode_mesh = splitwise_meshes(c.num_prefill_devices or c.prefill_tensor_parallel_size,
                                                 c.prefill_tensor_parallel_size, c.decode_tensor_parallel_size)
    return tuple(ModelRunner.from_config(model_config, params, c, dtype=dtype, max_model_len=max_model_len, mesh=mesh)
                 for mesh in (prefill_mesh, decode_mesh))


class SplitwiseEngine(Engine):
    """An Engine whose `runner` / `scheduler` are the prefill side, plus a decode side."""

    def __init__(self, model_config: ModelConfig, prefill_runner, decode_runner, engine_config: EngineConfig,
                 tokenizer=None, eos_token_ids: tuple = ()):
        if engine_config.preemption_mode != "recompute" or engine_config.speculative is not None:
            raise ValueError("disaggregation: 'splitwise' runs with preemption_mode 'recompute' and without "
                             "speculative decoding for now")
        super().__init__(model_config, prefill_runner, engine_config, tokenizer=tokenizer, eos_token_ids=eos_token_ids)
        if decode_runner.page_size != prefill_runner.page_size:
            raise ValueError("page_size: the prefill and decode pools must use the same page size")
        self.decode_runner = decode_runner
        self.decode_block_manager = BlockManager(decode_runner.num_pages, decode_runner.page_size,
                                                 enable_prefix_caching=engine_config.enable_prefix_caching)
        self.decode_scheduler = Scheduler(self.decode_block_manager,
                                          max_num_batched_tokens=engine_config.max_num_batched_tokens,
                                          max_num_seqs=engine_config.max_num_seqs,
                                          shared_prefix=self.scheduler.shared_prefix)
        self.scheduler.admission_gate = self._reserve
        self.limits = RequestLimits(vocab_size=model_config.vocab_size, max_model_len=self.max_model_len,
                                    num_pages=min(prefill_runner.num_pages, decode_runner.num_pages),
                                    page_size=prefill_runner.page_size)
        self.transfer = PageTransfer(prefill_runner, decode_runner)
        self._reserved: dict = {}  # request id -> (decode pages, leading pages from the decode prefix cache)
        self._worker = None  # the thread that runs prefill steps (started with the first one)
        self._pending = None  # (ScheduledStep, Future of its StepOutput): the prefill step in flight
        self.num_decode_steps_beside_prefill = 0  # decode steps run while a prefill step was in flight
        self.num_kv_transfers = 0
        self.kv_transfer_bytes = 0
        self.kv_transfer_seconds = 0.0
        self.num_transfer_compiles = 0
        # TTFT split, summed over the requests handed off: arrival -> first prefill step,
        # first prefill step -> first token, the KV copy.
        self.ttft_split = {"prefill_queue_seconds": 0.0, "prefill_seconds": 0.0, "transfer_seconds": 0.0,
                           "num_requests": 0}

    # ------------------------------------------------------------------ decode pages

    def _reserve(self, request: Request) -> bool:
        """Decode pages for the request's prompt and first token, before its prefill starts."""
        if request.request_id in self._reserved:
            return True
        d = self.decode_scheduler
        if len(d.running) + len(self._reserved) >= d.max_num_seqs:
            return False
        bm = self.decode_block_manager
        num_prompt = len(request.prompt_ids)  # every full prompt page may come from the cache here
        taken = bm.acquire(request.full_page_hashes(bm.page_size), num_prompt // bm.page_size, num_prompt + 1)
        if taken is None:
            return False
        self._reserved[request.request_id] = taken
        return True

    def _release_reservation(self, request_id: str) -> None:
        reserved = self._reserved.pop(request_id, None)
        if reserved is not None:
            self.decode_block_manager.free(reserved[0])

    def _handoff(self, request: Request) -> None:
        """Moves a request whose prompt is done (first token sampled) to the decode side."""
        pages, num_cached = self._reserved.pop(request.request_id)
        num_prompt_pages = self.block_manager.pages_needed(len(request.prompt_ids))
        try:
            stats = self.transfer(request.page_ids[num_cached:num_prompt_pages], pages[num_cached:num_prompt_pages])
        except Exception as e:  # noqa: BLE001 - this request fails alone; the engine goes on
            self.decode_block_manager.free(pages)
            self._fail(request, e)
            return
        self.num_kv_transfers += 1
        self.kv_transfer_bytes += stats.nbytes
        self.kv_transfer_seconds += stats.seconds
        self.num_transfer_compiles += int(stats.is_compile)
        self.scheduler.detach(request)
        self.decode_scheduler.attach(request, pages, num_cached)
        split = self.ttft_split
        split["prefill_queue_seconds"] += request.first_scheduled_time - request.arrival_time
        split["prefill_seconds"] += (request.first_token_time or request.first_scheduled_time) - request.first_scheduled_time
        split["transfer_seconds"] += stats.seconds
        split["num_requests"] += 1

    # ------------------------------------------------------------------ steps

    def step(self) -> list:
        """One decode step, with the prefill side running on its own (see the module docstring).

        A prefill step runs on a worker thread (the two runners share nothing) and may
        span several calls: each call runs one decode step on this thread, then applies
        the prefill step if it has finished (or waits for it when no decode ran), and
        schedules the next prefill step only once the last one is applied."""
        start = time.perf_counter()
        deltas, ran, error = [], [], None
        if self._pending is not None and self._pending[1].done():  # its handoffs join this decode step
            error = self._apply_prefill(deltas, ran)
        d_step = self.decode_scheduler.schedule()
        if self._pending is None:
            p_step = self.scheduler.schedule()
            if p_step is not None:
                if self._worker is None:
                    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfer-prefill")
                self._pending = (p_step, self._worker.submit(self.runner.execute, p_step.step_input))
        if d_step is not None:
            if self._pending is not None:
                self.num_decode_steps_beside_prefill += 1
            try:
                touched, stats = self._execute(self.decode_scheduler, self.decode_runner, d_step)
                deltas += self._deliver(touched, stats)
                ran.append((stats, d_step.num_sequences))
            except StepFailed as e:
                error = error or e  # the prefill step is still applied
        if self._pending is not None and (d_step is None or self._pending[1].done()):
            error = self._apply_prefill(deltas, ran) or error
        for stats, n in ran:
            self._counters.add(stats, n, 0.0)
        if ran:  # host time of the call, once; the device calls overlap
            self._counters.host_seconds += max(0.0, time.perf_counter() - start - max(s.device_seconds for s, _ in ran))
        if error is not None:
            raise error
        return deltas

    def _apply_prefill(self, deltas: list, ran: list):
        """Applies the prefill step in flight (waiting for it): hands finished prompts to
        the decode side; returns its StepFailed, if it failed."""
        p_step, pending = self._pending
        self._pending = None
        try:
            touched, stats = self._execute(self.scheduler, self.runner, p_step, result=pending.result)
        except StepFailed as e:
            return e
        for request, _ in touched:  # prompts done here go to the decode side
            if request.prompt_computed and not request.is_finished and request.request_id in self._reserved:
                self._handoff(request)
        touched = [(r, n) for r, n in touched if r.request_id in self.requests]  # a failed copy: gone
        deltas += self._deliver(touched, stats)
        ran.append((stats, p_step.num_sequences))
        return None

    def warmup(self, keys, on_program=None) -> dict:
        """Engine.warmup of each key on the prefill runner and on the decode runner (which
        shapes each side meets depends on the traffic); `on_program` once per key."""
        total = {"programs": 0, "compiled": 0, "seconds": 0.0, "flushes": 0, "held": 0}
        prefill_runner = self.runner
        for key in keys:
            for runner in (prefill_runner, self.decode_runner):
                self.runner = runner
                try:
                    report = super().warmup([key])
                finally:
                    self.runner = prefill_runner
                for k in ("compiled", "seconds", "flushes", "held"):
                    total[k] += report[k]
            total["programs"] += 1
            if on_program is not None:
                on_program()
        return total

    @property
    def has_unfinished(self) -> bool:
        """Requests on either side, or a prefill step still to apply (even if all of its
        requests were aborted: it is drained before the engine idles)."""
        return self.scheduler.has_unfinished or self.decode_scheduler.has_unfinished or self._pending is not None

    def _finish(self, request: Request, reason: Optional[str] = None) -> None:
        d = self.decode_scheduler
        if request in d.running or request in d.waiting:
            d.finish(request, reason)
        else:
            self.scheduler.finish(request, reason)
        self._release_reservation(request.request_id)

    def _forget(self, request: Request) -> None:
        super()._forget(request)
        self._release_reservation(request.request_id)

    def reset_prefix_cache(self) -> None:
        super().reset_prefix_cache()
        self.decode_block_manager.reset_prefix_cache()

    def metrics(self) -> dict:
        m = super().metrics()
        p, d = self.block_manager, self.decode_block_manager
        m.update({
            "disaggregation": "splitwise",
            "prefill_num_running": len(self.scheduler.running), "prefill_num_waiting": len(self.scheduler.waiting),
            "decode_num_running": len(self.decode_scheduler.running),
            "decode_num_waiting": len(self.decode_scheduler.waiting),
            "num_running": len(self.scheduler.running) + len(self.decode_scheduler.running),
            "num_waiting": len(self.scheduler.waiting) + len(self.decode_scheduler.waiting),
            "prefill_free_pages": p.num_free_pages, "decode_free_pages": d.num_free_pages,
            "num_free_pages": p.num_free_pages + d.num_free_pages, "num_total_pages": p.num_pages + d.num_pages,
            "num_cached_pages": p.num_cached_pages + d.num_cached_pages,
            "num_decode_reservations": len(self._reserved),
            "decode_steps_beside_prefill": self.num_decode_steps_beside_prefill,
            "num_preemptions": self.scheduler.num_preemptions + self.decode_scheduler.num_preemptions,
            "num_kv_transfers": self.num_kv_transfers, "kv_transfer_bytes": self.kv_transfer_bytes,
            "kv_transfer_seconds": self.kv_transfer_seconds, "kv_transfer_exposed_seconds": self.kv_transfer_seconds,
            "kv_transfer_overlapped_seconds": 0.0, "num_transfer_compiles": self.num_transfer_compiles,
            **{f"ttft_{k}": v for k, v in self.ttft_split.items()},
            "kv_cache_bytes": self.runner.kv_cache_bytes + self.decode_runner.kv_cache_bytes,
            "weight_bytes": self.runner.weight_bytes + self.decode_runner.weight_bytes,
        })
        return m
