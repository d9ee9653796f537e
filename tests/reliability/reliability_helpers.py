"""Small engines for the reliability tests.

- A tiny random Llama (two layers, no tokenizer) on a real ModelRunner: the faults,
  storms and pressure these tests apply are the engine's and the runner's business,
  not the model's, and any deterministic model shows whether a request's tokens
  changed. Compiles dominate these tests' time (one program per step shape, seconds
  each on a loaded 2-core machine), so one runner serves the whole session (conftest
  `tiny_runner`) and every engine built over it shares its compiled programs.
- PagedHashRunner: no model, no compiles, but its tokens depend on what it reads back
  from its KV pages; for the storms of thousands of requests.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.validation import NewRequest
from jaxinfer.models.transformer import init_params
from jaxinfer.runtime.model_runner import ModelRunner

MODEL = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=128)


@functools.lru_cache(maxsize=1)
def params():
    # A larger init than the default so that greedy tokens vary with the context.
    return init_params(MODEL, jax.random.PRNGKey(0), init_std=0.5)


NUM_PAGES = 24  # the shared runner's pool: 96 tokens of 4-token pages
PAGE_SIZE = 4


def make_runner(num_pages: int = NUM_PAGES, page_size: int = PAGE_SIZE) -> ModelRunner:
    return ModelRunner(MODEL, params(), page_size=page_size, num_pages=num_pages, dtype=jnp.float32)


def make_engine(runner: ModelRunner, **fields) -> Engine:
    """A fresh Engine (empty queues, every page free) over `runner`.

    Engines over one runner share its compiled programs (one compile per step shape for
    the whole session); what an earlier engine left in the KV pages is never read,
    which the tests also rely on (pages a NaN was written to get reused)."""
    fields.setdefault("shared_prefix_attention", False)
    config = EngineConfig(page_size=runner.page_size, num_pages=runner.num_pages, compilation_cache_dir="", **fields)
    runner.fault_injector = None
    return Engine(MODEL, runner, config)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def new(prompt, max_tokens, request_id=None, **kw) -> NewRequest:
    return NewRequest(prompt_ids=tuple(prompt), params=greedy(max_tokens), request_id=request_id, **kw)


def run_to_end(engine: Engine, max_steps: int = 10_000) -> dict:
    """Steps until nothing is unfinished; returns {request id: RequestOutput} of the
    requests that finished (bounded: fails after max_steps)."""
    outputs = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            return outputs
        for delta in engine.step():
            if delta.is_finished:
                outputs[delta.request_id] = delta.output
    raise AssertionError(f"the engine did not finish within {max_steps} steps")


def assert_idle(engine: Engine) -> None:
    """Nothing tracked, no page held, bookkeeping consistent, counters adding up."""
    bm = engine.block_manager
    bm.check_consistency()
    assert bm.num_referenced_pages() == 0
    assert bm.num_free_pages == bm.num_pages
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.output_processor._states
    m = engine.metrics()
    assert m["num_requests_tracked"] == 0
    assert m["num_requests_added"] == (m["num_requests_finished"] + m["num_requests_aborted"]
                                       + m["num_requests_failed"])


class PagedHashRunner:
    """A runner without a model that still depends on its KV pages, for storms of
    thousands of requests (no compiles).

    Each step goes through the real host checks (runtime/step_checks.py), writes every
    fed token into its KV slot (page * L + offset, as the compiled step does), then
    samples for each sample offset a token that is a hash of the tokens READ BACK from
    the sequence's own pages at positions [0, sampled position). A page freed while in
    use, handed to two requests, or a prefix-cache hit on the wrong page changes what a
    request reads, hence its tokens: survivors must match a clean run token for token.
    """

    def __init__(self, num_pages: int = NUM_PAGES, page_size: int = PAGE_SIZE, vocab_size: int = MODEL.vocab_size):
        from jaxinfer.runtime.input_batch import BatchConfig
        self.num_pages, self.page_size = num_pages, page_size
        self.weight_bytes = self.kv_cache_bytes = 0
        self.batch_config = BatchConfig(page_size=page_size, num_pages=num_pages, vocab_size=vocab_size,
                                        max_positions=MODEL.max_position_embeddings)
        self.slots = np.full(num_pages * page_size, -1, np.int64)  # the "KV": the token in each slot
        self.num_steps = 0

    def device_info(self):
        return {}

    def execute(self, step):
        from jaxinfer.runtime import step_checks
        from jaxinfer.types import SequenceOutput, StepOutput, StepStats
        step_checks.check_step(step, self.batch_config)
        self.num_steps += 1
        L = self.page_size
        for seq in step.sequences:  # every write of the step first, as the device does
            pages = np.asarray(seq.page_ids, np.int64)
            pos = seq.start_position + np.arange(len(seq.token_ids))
            self.slots[pages[pos // L] * L + pos % L] = seq.token_ids
        outputs = {}
        vocab = self.batch_config.vocab_size
        for seq in step.sequences:
            pages = np.asarray(seq.page_ids, np.int64)
            ids = []
            for offset in seq.sample_offsets:
                pos = np.arange(seq.start_position + offset + 1)
                context = self.slots[pages[pos // L] * L + pos % L]
                digest = hashlib.blake2b(context.tobytes(), digest_size=4).digest()
                ids.append(3 + int.from_bytes(digest, "little") % (vocab - 3))
            outputs[seq.request_id] = SequenceOutput(request_id=seq.request_id, token_ids=tuple(ids))
        return StepOutput(outputs=outputs, stats=StepStats(num_tokens=sum(len(s.token_ids) for s in step.sequences)))


def make_hash_engine(num_pages: int = NUM_PAGES, **fields) -> Engine:
    """An Engine over a fresh PagedHashRunner."""
    runner = PagedHashRunner(num_pages=num_pages)
    fields.setdefault("shared_prefix_attention", False)
    config = EngineConfig(page_size=runner.page_size, num_pages=num_pages, compilation_cache_dir="", **fields)
    return Engine(MODEL, runner, config)
