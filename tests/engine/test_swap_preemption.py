"""Preemption by swapping KV pages to host memory (EngineConfig.preemption_mode).

A pool far too small for the load forces preemptions. With preemption_mode="swap" the
preempted requests' computed pages go to host memory and come back into new pages:
their tokens (greedy and seeded sampling) equal an unconstrained run's, nothing is fed
twice (the batched token count equals a run without preemption), every swap-out is
swapped in, and at the end no page and no host byte is held. A host pool too small for
a request's pages falls back to recompute (same tokens); "auto" picks by the measured
cost rule (unit-tested on hand-made numbers); aborting a swapped request frees its host
copy; a swap copy that raises fails its requests and leaks nothing; an int8 cache
swaps its values and scales. The runtime's page mover is checked alone (padding to
buckets, other pages untouched, float and quantized pools). `-m slow`: in a subprocess
with 4 fake CPU devices, the engine on TP 2, PP 2 and PP 2 x TP 2 meshes (tokens equal
each request alone on that mesh, cache shardings unchanged).

Workload: 6 requests, even ones greedy and odd ones seeded sampling, so one run checks
both and every test shares one set of compiled step programs.

Model: a tiny random Llama (2 layers, 2 KV heads) on a real ModelRunner, one per cache
format for the module (the engines share its compiled programs). The unconstrained
reference is each request alone on the same runner (max_num_seqs=1, never preempted).
"""
from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.swap import RateEstimate, SwapSpace, swap_is_cheaper
from jaxinfer.engine.validation import NewRequest
from jaxinfer.models.transformer import init_params
from jaxinfer.runtime import kv_cache, kv_swap
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.sharding.mesh import make_mesh
from reliability.reliability_helpers import assert_idle, run_to_end

MODEL = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=128)
NUM_PAGES, PAGE_SIZE = 24, 4  # 96 tokens of KV
# 6 requests of 10 + 14 tokens = 6 pages each: 36 pages offered to a pool of 24.
NUM_REQUESTS, PROMPT_LEN, MAX_TOKENS = 6, 10, 14


@functools.lru_cache(maxsize=1)
def _params():
    # A larger init than the default so that greedy tokens vary with the context.
    return init_params(MODEL, jax.random.PRNGKey(0), init_std=0.5)


@functools.lru_cache(maxsize=None)
def _runner(kv_cache_dtype: str = "auto") -> ModelRunner:
    return ModelRunner(MODEL, _params(), page_size=PAGE_SIZE, num_pages=NUM_PAGES, dtype=jnp.float32,
                       kv_cache_dtype=kv_cache_dtype)


def _engine(kv_cache_dtype="auto", **fields) -> Engine:
    runner = _runner(kv_cache_dtype)
    fields.setdefault("max_num_batched_tokens", 16)
    fields.setdefault("max_num_seqs", NUM_REQUESTS)
    config = EngineConfig(page_size=PAGE_SIZE, num_pages=NUM_PAGES, compilation_cache_dir="",
                          shared_prefix_attention=False, kv_cache_dtype=kv_cache_dtype, **fields)
    return Engine(MODEL, runner, config)


def _requests(shared_prefix=0, seed=0):
    """Even requests greedy, odd ones seeded sampling: one workload checks both (and
    every test's engines share one set of compiled step programs)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 97) for _ in range(shared_prefix)]
    out = []
    for i in range(NUM_REQUESTS):
        prompt = prefix + [rng.randrange(3, 97) for _ in range(PROMPT_LEN - shared_prefix)]
        params = (SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=100 + i, ignore_eos=True)
                  if i % 2 else SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        out.append(NewRequest(prompt_ids=tuple(prompt), params=params, request_id=f"r{i}"))
    return out


def _run(engine: Engine, requests, max_steps=2000) -> dict:
    engine.add_requests(requests)
    return {rid: out.token_ids for rid, out in run_to_end(engine, max_steps).items()}


def _assert_idle(engine: Engine) -> None:
    assert_idle(engine)
    m = engine.metrics()
    assert m["num_swapped_requests"] == 0 and m["swap_space_used_bytes"] == 0


# Tokens fed when nothing is recomputed: every prompt token, and every generated token
# but the last (distinct prompts: no prefix-cache hits).
FED_WITHOUT_RECOMPUTE = NUM_REQUESTS * (PROMPT_LEN + MAX_TOKENS - 1)


@functools.lru_cache(maxsize=None)
def _reference(kv_cache_dtype="auto", shared_prefix=0) -> dict:
    engine = _engine(kv_cache_dtype, max_num_seqs=1)
    out = _run(engine, _requests(shared_prefix))
    assert engine.metrics()["num_preemptions"] == 0
    return out


def test_swap_gives_the_unconstrained_tokens_without_recompute():
    engine = _engine(preemption_mode="swap")
    assert NUM_REQUESTS * 6 > engine.block_manager.num_pages
    outputs = _run(engine, _requests())
    reference = _reference()
    assert outputs == reference
    assert len(set(map(tuple, reference.values()))) == NUM_REQUESTS  # greedy and seeded, all different
    m = engine.metrics()
    assert m["num_swap_outs"] > 0 and m["num_swap_ins"] == m["num_swap_outs"]
    assert m["num_preemptions"] == m["num_swap_outs"] and m["num_recompute_preemptions"] == 0
    assert m["swap_in_bytes"] == m["swap_out_bytes"] > 0 and m["swap_seconds"] > 0
    # Bytes moved are whole pages of every layer's K and V.
    assert m["swap_out_bytes"] % (m["kv_cache_bytes"] // NUM_PAGES) == 0
    # No token was fed twice: the swapped requests went on from where they were.
    assert m["num_batched_tokens"] == FED_WITHOUT_RECOMPUTE
    _assert_idle(engine)


def test_recompute_mode_is_unchanged_and_recomputes():
    engine = _engine()  # the default: preemption_mode="recompute"
    assert engine.config.preemption_mode == "recompute" and engine.swap_space is None
    outputs = _run(engine, _requests())
    assert outputs == _reference()
    m = engine.metrics()
    assert m["num_preemptions"] == m["num_recompute_preemptions"] > 0 and m["num_swap_outs"] == 0
    assert m["num_batched_tokens"] > FED_WITHOUT_RECOMPUTE
    _assert_idle(engine)


def test_swap_space_too_small_falls_back_to_recompute():
    engine = _engine(preemption_mode="swap", swap_space_bytes=1)  # less than one page
    outputs = _run(engine, _requests())
    assert outputs == _reference()
    m = engine.metrics()
    assert m["num_swap_outs"] == 0 and m["num_swap_fallbacks"] == m["num_recompute_preemptions"] > 0
    _assert_idle(engine)


def test_swap_space_for_some_requests_only_mixes_both_kinds():
    runner = _runner()
    page_bytes = runner.kv_cache_bytes // NUM_PAGES
    engine = _engine(preemption_mode="swap", swap_space_bytes=4 * page_bytes)
    outputs = _run(engine, _requests())
    assert outputs == _reference()
    m = engine.metrics()
    assert m["num_preemptions"] == m["num_swap_outs"] + m["num_recompute_preemptions"]
    assert m["num_swap_ins"] == m["num_swap_outs"]
    _assert_idle(engine)


def test_swap_with_prefix_cache_sharing():
    # 8 of 10 prompt tokens shared: swapped requests held pages others share; they get
    # private copies back and every request keeps the unconstrained tokens.
    engine = _engine(preemption_mode="swap")
    outputs = _run(engine, _requests(shared_prefix=8))
    assert outputs == _reference(shared_prefix=8)
    m = engine.metrics()
    assert m["num_swap_outs"] > 0 and m["prefix_cache_hits"] > 0
    _assert_idle(engine)


def test_auto_mode_stays_correct_and_measures():
    engine = _engine(preemption_mode="auto")
    outputs = _run(engine, _requests())
    assert outputs == _reference()
    m = engine.metrics()
    assert m["num_preemptions"] > 0
    assert m["num_preemptions"] == m["num_swap_outs"] + m["num_recompute_preemptions"]
    assert m["num_swap_ins"] == m["num_swap_outs"]
    assert m["swap_bytes_per_second"] > 0 and m["prefill_tokens_per_second"] > 0
    _assert_idle(engine)


def test_auto_mode_recomputes_when_swapping_costs_more():
    engine = _engine(preemption_mode="auto")
    space = engine.swap_space
    space.bandwidth = RateEstimate(1.0)  # 1 byte/s: a swap would take hours
    outputs = _run(engine, _requests())
    assert outputs == _reference()
    m = engine.metrics()
    assert m["num_swap_outs"] == 0 and m["num_recompute_preemptions"] > 0
    _assert_idle(engine)


def test_cost_rule_on_hand_made_numbers():
    # 1 MB at 1 GB/s: 2 ms out and back in; 100 tokens at 10k tokens/s: 10 ms.
    assert swap_is_cheaper(10**6, 100, 1e9, 1e4)
    # The same bytes over a 100 MB/s link (20 ms) cost more than the recompute.
    assert not swap_is_cheaper(10**6, 100, 1e8, 1e4)
    assert swap_is_cheaper(5 * 10**5, 100, 1e8, 1e4)  # exactly equal: swap (10 ms vs 10 ms)
    space = SwapSpace("auto", capacity_bytes=10**9, bytes_per_page=1000)
    space.bandwidth, space.prefill_speed = RateEstimate(1e6), RateEstimate(1e3)
    assert space.choose(num_pages=4, num_tokens=16) == "swap"  # 8 ms vs 16 ms
    assert space.choose(num_pages=10, num_tokens=16) == "recompute"  # 20 ms vs 16 ms
    assert space.choose(num_pages=0, num_tokens=0) == "recompute"  # nothing to keep
    assert SwapSpace("swap", 10**9, 1000).choose(10**6, 1) == "swap"
    assert SwapSpace("recompute", 10**9, 1000).choose(1, 10**6) == "recompute"


def test_rate_estimate_starts_at_the_prior_and_follows_measurements():
    rate = RateEstimate(4e9)
    assert rate.rate == pytest.approx(4e9)
    rate.add(1e6, 1e-2)  # 100 MB/s measured: it replaces the prior
    assert rate.rate == pytest.approx(1e8)
    for _ in range(30):
        rate.add(2e6, 1e-2)  # the load changed: 200 MB/s
    assert rate.rate == pytest.approx(2e8, rel=0.02)
    rate.add(0, 0.0)  # empty measurements are ignored
    assert rate.num_measurements == 31


def test_swap_space_accounting():
    space = SwapSpace("swap", capacity_bytes=3000, bytes_per_page=1000)
    assert space.reserve("a", 2) and space.used_bytes == 2000
    assert not space.reserve("b", 2) and space.num_swap_fallbacks == 1 and space.used_bytes == 2000
    space.store("a", "copy-a", 2000, 0.5, measured=True)
    assert space.num_swap_outs == 1 and space.swap_seconds == 0.5 and space.bandwidth.num_measurements == 1
    assert space.take("a") == "copy-a" and space.used_bytes == 0 and space.num_swapped == 0
    assert space.reserve("b", 3)
    space.discard("b")
    space.discard("never-swapped")
    assert space.used_bytes == 0 and space.num_swapped == 0
    with pytest.raises(ValueError, match="preemption_mode"):
        SwapSpace("sometimes", 1, 1)


def test_abort_of_a_swapped_request_frees_its_host_copy():
    engine = _engine(preemption_mode="swap")
    engine.add_requests(_requests())
    for _ in range(500):
        engine.step()
        if engine.metrics()["num_swapped_requests"]:
            break
    swapped = [r for r in engine.scheduler.waiting if r.swapped_out]
    assert swapped, "no request was swapped out"
    used = engine.metrics()["swap_space_used_bytes"]
    victim = swapped[0]
    size = engine.swap_space.num_pages_of(victim.request_id) * engine.swap_space.bytes_per_page
    delta = engine.abort(victim.request_id)
    assert delta.is_finished and delta.output.finish_reason == "abort"
    m = engine.metrics()
    assert m["swap_space_used_bytes"] == used - size and not engine.swap_space.holds(victim.request_id)
    while engine.has_unfinished:  # the others finish with their own tokens
        for d in engine.step():
            if d.is_finished:
                assert d.output.token_ids == _reference()[d.request_id]
    _assert_idle(engine)


def test_a_failing_swap_fails_its_requests_and_frees_everything(monkeypatch):
    from jaxinfer.engine.engine import StepFailed
    engine = _engine(preemption_mode="swap")
    runner = engine.runner

    def broken(page_ids):
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "swap_out", broken)
    engine.add_requests(_requests())
    failure = None
    for _ in range(500):
        try:
            engine.step()
        except StepFailed as e:
            failure = e
            break
    assert failure is not None and "device lost" in str(failure.error)
    assert failure.request_ids and not any(rid in engine.requests for rid in failure.request_ids)
    assert engine.metrics()["num_swapped_requests"] == 0 and engine.metrics()["swap_space_used_bytes"] == 0
    monkeypatch.undo()
    outputs = _run(engine, [])  # the others finish with their own tokens
    assert all(outputs[rid] == _reference()[rid] for rid in outputs)
    assert set(outputs) | set(failure.request_ids) == {f"r{i}" for i in range(NUM_REQUESTS)}
    _assert_idle(engine)


def test_int8_cache_swaps_values_and_scales():
    engine = _engine("int8", preemption_mode="swap")
    outputs = _run(engine, _requests())
    assert outputs == _reference("int8")
    m = engine.metrics()
    assert m["num_swap_outs"] > 0 and m["num_batched_tokens"] == FED_WITHOUT_RECOMPUTE
    # Values (1 byte) and float32 scales per token and head: H + 4 bytes, K and V, 2 layers.
    assert m["swap_out_bytes"] % (2 * 2 * PAGE_SIZE * MODEL.num_kv_heads * (MODEL.head_dim + 4)) == 0
    _assert_idle(engine)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_page_mover_round_trip_pads_to_buckets_and_leaves_other_pages(kv_cache_dtype):
    mesh = make_mesh()
    spec = kv_cache.KVCacheSpec(num_layers=2, num_pages=8, page_size=2, num_kv_heads=2, head_dim=4,
                                kv_cache_dtype=kv_cache_dtype)
    pool = kv_cache.allocate(spec, mesh)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))

    def fill(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jax.random.randint(next(keys), x.shape, -100, 100).astype(x.dtype)
        return jax.random.normal(next(keys), x.shape).astype(x.dtype)

    pool = jax.device_put(jax.tree.map(fill, pool), jax.tree.map(lambda x: x.sharding, pool))
    before = jax.device_get(pool)
    mover = kv_swap.PageMover(pool, mesh)
    host = kv_swap.swap_out([mover], [pool], [5, 1, 6])  # 3 pages: padded to a bucket of 4
    assert host.num_pages == 3 and host.nbytes == kv_cache.cache_bytes(pool) * 3 // 8
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(host.data))
    assert host.stats.is_compile and not kv_swap.swap_out([mover], [pool], [2, 3, 4]).stats.is_compile
    pools = [pool]
    stats = kv_swap.swap_in([mover], pools, host, [0, 7, 3])
    assert stats.num_pages == 3 and stats.nbytes == host.nbytes
    after = jax.device_get(pools[0])
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(new[[0, 7, 3]], old[[5, 1, 6]])
        np.testing.assert_array_equal(new[[1, 2, 4, 5, 6]], old[[1, 2, 4, 5, 6]])
    assert [kv_swap.bucket(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    with pytest.raises(ValueError, match="page_ids"):
        kv_swap.swap_in([mover], pools, host, [0, 1])


@pytest.mark.parametrize("fields, field", [
    (dict(preemption_mode="sometimes"), "preemption_mode"),
    (dict(preemption_mode=None), "preemption_mode"),
    (dict(swap_space_bytes=-1), "swap_space_bytes"),
    (dict(swap_space_bytes=1.5), "swap_space_bytes"),
    (dict(swap_space_bytes=True), "swap_space_bytes"),
])
def test_engine_config_errors_name_the_field(fields, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(**fields)
    assert EngineConfig().preemption_mode == "recompute" and EngineConfig(swap_space_bytes=0).swap_space_bytes == 0


def test_a_runner_that_cannot_swap_is_refused(scripted_engine):
    with pytest.raises(ValueError, match="^preemption_mode: 'swap' needs a runner"):
        scripted_engine(preemption_mode="swap")
    assert scripted_engine(preemption_mode="recompute").swap_space is None


_MULTI_DEVICE = textwrap.dedent("""
    import random, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    import test_swap_preemption as t
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.engine import Engine
    from jaxinfer.runtime.model_runner import ModelRunner
    from jaxinfer.sharding.mesh import make_mesh
    assert len(jax.devices()) == 4
    for name, mesh in [("tp2", make_mesh(tensor=2)), ("pp2", make_mesh(pipeline=2)),
                       ("pp2xtp2", make_mesh(pipeline=2, tensor=2))]:
        runner = ModelRunner.from_config(t.MODEL, t._params(), EngineConfig(page_size=t.PAGE_SIZE,
                                         num_pages=t.NUM_PAGES), dtype=jnp.float32, max_model_len=128, mesh=mesh)
        shardings = jax.tree.map(lambda x: x.sharding, runner.kv_caches)
        fields = dict(page_size=t.PAGE_SIZE, num_pages=t.NUM_PAGES, compilation_cache_dir="",
                      shared_prefix_attention=False, max_num_batched_tokens=16)
        # The reference: each request alone on the same mesh (never preempted).
        reference = t._run(Engine(t.MODEL, runner, EngineConfig(max_num_seqs=1, **fields)), t._requests())
        engine = Engine(t.MODEL, runner, EngineConfig(max_num_seqs=t.NUM_REQUESTS, preemption_mode="swap", **fields))
        outputs = t._run(engine, t._requests())
        m = engine.metrics()
        assert outputs == reference, name
        assert m["num_swap_outs"] > 0 and m["num_batched_tokens"] == t.FED_WITHOUT_RECOMPUTE, (name, m)
        assert jax.tree.map(lambda x: x.sharding, runner.kv_caches) == shardings, name
        t._assert_idle(engine)
        print("PASS", name, m["num_swap_outs"])
""")


@pytest.mark.slow
def test_swap_on_tensor_and_pipeline_meshes():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAXINFER_COMPILATION_CACHE_DIR="")
    proc = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, os.path.dirname(os.path.abspath(__file__))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("PASS") == 3, proc.stdout
