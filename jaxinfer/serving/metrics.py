"""Prometheus metrics of `jaxinfer serve`, with vLLM's names under the `jaxinfer:` prefix.

Two sources:
- per-request figures observed by the serving core as requests stream (counters and
  histograms: tokens, finished requests by reason, TTFT, inter-token latency,
  end-to-end latency, queue time);
- the engine's own counters, read at scrape time through `AsyncEngine.metrics()` (a
  call on the engine's loop thread) by a custom collector: running / waiting requests,
  KV cache usage, prefix cache queries and hits, compiles, preemptions, shared-prefix
  figures.

Each server has its own CollectorRegistry, so several servers (tests) never share
counters.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "jaxinfer:"

# Buckets in seconds (vLLM's spacing: fine at the low end where interactive SLOs are).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0)


class _EngineCollector:
    """Reads the engine's counters at scrape time."""

    def __init__(self, read: Callable[[], dict], model_name: str):
        self._read = read
        self._model = model_name

    def collect(self):
        m = self._read()
        labels = ["model_name"]
        values = [self._model]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        total = max(m.get("num_total_pages", 0), 1)
        yield gauge("num_requests_running", "Requests in the running batch.", m.get("num_running", 0))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", m.get("num_waiting", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).",
                    1.0 - m.get("num_free_pages", total) / total)
        yield counter("prefix_cache_queries", "Prompt pages looked up in the prefix cache.",
                      m.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Prompt pages found in the prefix cache.", m.get("prefix_cache_hits", 0))
        yield counter("num_preemptions", "Requests preempted (pages reclaimed).", m.get("num_preemptions", 0))
        yield counter("num_compiles", "XLA programs compiled by the engine's steps.", m.get("num_compiles", 0))
        yield counter("compile_seconds", "Seconds spent in steps that compiled.", m.get("compile_seconds", 0.0))
        yield counter("warmup_programs", "Step programs compiled (or loaded) by the warm-up, before traffic.",
                      m.get("warmup_programs", 0))
        yield counter("warmup_seconds", "Seconds the warm-up took.", m.get("warmup_seconds", 0.0))
        yield counter("shared_prefix_steps", "Steps that ran the shared-prefix (Hydragen) attention path.",
                      m.get("shared_prefix_steps", 0))
        yield counter("shared_prefix_tokens_saved", "Prefix KV token reads saved by shared-prefix attention.",
                      m.get("shared_prefix_tokens_saved", 0))
        yield counter("engine_steps", "Engine steps run.", m.get("num_steps", 0))
        # Splitwise disaggregation (zeros when colocated).
        yield counter("kv_transfers", "Prompts whose KV was copied from the prefill to the decode runner.",
                      m.get("num_kv_transfers", 0))
        yield counter("kv_transfer_bytes", "KV bytes copied from the prefill to the decode runner.",
                      m.get("kv_transfer_bytes", 0))
        # Depth-wise batching of a recursive model (zeros otherwise; docs/recursive.md).
        yield counter("depthwise_steps", "Depth-wise steps (one call of the shared block).",
                      m.get("depthwise_steps", 0))
        yield counter("early_exits", "Tokens sampled before the last loop (early exit).", m.get("num_early_exits", 0))
        # Speculative decoding, vLLM's spec_decode names (zeros when it is off).
        yield counter("spec_decode_num_drafts", "Sequences verified with draft tokens.", m.get("spec_num_drafts", 0))
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                      m.get("spec_num_draft_tokens", 0))
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", m.get("spec_num_accepted_tokens", 0))
        per_pos = CounterMetricFamily(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                      "Draft tokens accepted, by position in the draft.", labels=labels + ["position"])
        for position, count in enumerate(m.get("spec_accepted_per_position", ())):
            per_pos.add_metric(values + [str(position)], count)
        yield per_pos


class ServingMetrics:
    """The registry of one server and the per-request instruments."""

    def __init__(self, model_name: str, read_engine_metrics: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self._model = model_name
        r = self.registry
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Finished requests by finish reason.",
                                       labels + ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between generated tokens.", labels,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting before first scheduled.",
                                    labels, buckets=_E2E_BUCKETS, registry=r)
        self.rejected = Counter(PREFIX + "request_rejected", "Requests refused by admission control or drain.",
                                labels + ["reason"], registry=r)
        r.register(_EngineCollector(read_engine_metrics, model_name))

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.labels(self._model).observe(seconds)

    def observe_itl(self, seconds_per_token: float, num_tokens: int) -> None:
        h = self.itl.labels(self._model)
        for _ in range(num_tokens):
            h.observe(seconds_per_token)

    def observe_finished(self, output, e2e_seconds: float) -> None:
        if output is None:
            return
        self.prompt_tokens.labels(self._model).inc(output.num_prompt_tokens)
        self.generation_tokens.labels(self._model).inc(output.num_generated_tokens)
        self.request_success.labels(self._model, output.finish_reason).inc()
        self.e2e.labels(self._model).observe(e2e_seconds)
        queue_time = getattr(output, "queue_time", None)
        if queue_time is not None:
            self.queue_time.labels(self._model).observe(queue_time)

    def observe_rejected(self, reason: str) -> None:
        self.rejected.labels(self._model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
