"""Pipeline-parallel engine checks on 8 fake CPU devices (imported by eight_devices.py,
which runs with XLA_FLAGS=--xla_force_host_platform_device_count=8).

Model: the tiny random Qwen3 of tests/hf_models.py (q/k norm, head_dim 32 != D / N,
sliding window on some layers) with 4 layers, so PP 2 puts two layers on each stage.
The first step's two prompts (5 + 11 tokens) are cut into two microbatches of 8 tokens,
so the longer prompt is split across microbatches; decode steps split their rows.

What is checked: greedy tokens equal HF's and one device's at PP 2 and PP 2 x TP 2;
seeded sampled tokens, sampled log-probs and prompt log-probs equal one device's;
`weight_bytes_per_device` / `kv_cache_bytes_per_device` equal scripts/
plan_parallelism.py's formulas; the bubble fraction is the model's (p - 1) / (m + p - 1)
for these steps; a pipeline size that does not divide the layers is refused before
loading. `-m slow` (SLOW_CHECKS) adds PP 4, PP 2 x TP 4, a tied-embedding Qwen2 and
Qwen3-MoE at PP 2 x EP 2.
"""
from __future__ import annotations

import functools
import tempfile

import numpy as np

import engine_checks  # noqa: E402 - this folder is on sys.path when run as a script
from engine_checks import MAX_TOKENS, PROMPTS

NUM_LAYERS = 4


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """(folder, config, HF greedy continuations of PROMPTS) of a 4-layer tiny model."""
    import torch

    import hf_models
    from jaxinfer.models import checkpoint, registry
    path = tempfile.mkdtemp(prefix=f"jaxinfer-pp-{name}-")
    hf = hf_models.build(name, path, num_hidden_layers=NUM_LAYERS)
    want = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=0)
        want.append(out[0, len(prompt):].tolist())
    return path, registry.model_config_from_hf(checkpoint.read_hf_config(path)), want


def _scored():
    from jaxinfer.config import SamplingParams
    return SamplingParams(max_tokens=2, temperature=0.0, logprobs=2, prompt_logprobs=True, ignore_eos=True)


def _run_layouts(name: str, layouts, check_scores: bool = True) -> list:
    """Runs every layout; greedy tokens equal HF, seeded samples equal across layouts,
    log-probs close to the first layout's. Returns each layout's metrics."""
    path, config, want = _model(name)
    plan = engine_checks._plan()
    first, all_metrics = None, []
    for sizes in layouts:
        with engine_checks._session(path, **sizes) as session:
            got = [o.token_ids for o in session.generate(PROMPTS, engine_checks._greedy())]
            assert got == want, (name, sizes, got, want)
            sampled = [o.token_ids for o in session.generate(PROMPTS, engine_checks._sampled())]
            scored = session.generate(PROMPTS[1:], _scored())[0] if check_scores else None
            metrics = session.metrics()
            if sizes.get("pipeline_parallel_size", 1) > 1:  # warm-up: every stage's program, no page written
                key = (8, 8, 0, 8, 16, 1, None, True, False, 0, 0, 0, False)
                report = session.async_engine.call(lambda engine: engine.warmup([key, key]))
                assert report["compiled"] == 1 and session.metrics()["num_compiles"] == metrics["num_compiles"]
                assert [o.token_ids for o in session.generate(PROMPTS, engine_checks._greedy())] == want
        run = (sampled, scored)
        if first is None:
            first = run
        else:
            assert sampled == first[0], (name, sizes, sampled, first[0])
            if check_scores:
                assert scored.token_ids == first[1].token_ids, (sizes, scored.token_ids)
                np.testing.assert_allclose(scored.logprobs, first[1].logprobs, atol=1e-4, err_msg=str(sizes))
                np.testing.assert_allclose(scored.prompt_logprobs, first[1].prompt_logprobs, atol=1e-4,
                                           err_msg=str(sizes))
        tp, ep = sizes.get("tensor_parallel_size", 1), sizes.get("expert_parallel_size", 1)
        pp = sizes.get("pipeline_parallel_size", 1)
        assert metrics["mesh_shape"] == {"pipeline": pp, "expert": ep, "tensor": tp}, metrics["mesh_shape"]
        assert metrics["num_devices"] == pp * ep * tp
        assert metrics["weight_bytes_per_device"] == plan.per_device_weight_bytes(config, tp, ep, pp, 4), \
            (sizes, metrics["weight_bytes_per_device"], plan.stage_weight_bytes(config, tp, ep, pp, 4))
        tokens = 48 * 4  # num_pages * page_size (engine_checks._session)
        assert metrics["kv_cache_bytes_per_device"] == tokens * plan.kv_bytes_per_token_per_device(config, tp, pp, 4), \
            (sizes, metrics["kv_cache_bytes_per_device"])
        if pp > 1:
            assert 0.0 < metrics["pipeline_bubble_fraction"] < 1.0, metrics
            assert metrics["pipeline_stage_weight_bytes_per_device"] == plan.stage_weight_bytes(config, tp, ep, pp, 4)
        else:
            assert "pipeline_bubble_fraction" not in metrics
        all_metrics.append(metrics)
    return all_metrics


def check_qwen3_pipeline_parallel():
    one, pp2 = _run_layouts("qwen3", [{}, dict(pipeline_parallel_size=2)])
    # m = min(pp, tokens) microbatches of near-equal tokens: every step but the scored
    # request's last one (1 decode token: m = 1, bubble 1/2) has two of equal padded
    # cost (8 + 8 prefill tokens, 1 + 1 decodes): bubble (p - 1) / (m + p - 1) = 1/3.
    _assert_two_stage_bubble(pp2)
    # Half the layers per device: half the KV bytes; weights roughly half (stage 1 holds
    # the LM head, stage 0 the embedding).
    assert pp2["kv_cache_bytes_per_device"] * 2 == one["kv_cache_bytes_per_device"]
    assert pp2["weight_bytes_per_device"] < 0.6 * one["weight_bytes_per_device"], (pp2, one)


def _assert_two_stage_bubble(metrics):
    assert metrics["pipeline_stages"] == 2 and 1.8 < metrics["pipeline_microbatches_per_step"] < 2.0, metrics
    assert 1 / 3 < metrics["pipeline_bubble_fraction"] < 0.35, metrics["pipeline_bubble_fraction"]


def check_pipeline_sizes_refused():
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig
    path = _model("qwen3")[0]
    try:
        InferenceSession.from_pretrained(path, engine=EngineConfig(pipeline_parallel_size=3))
    except ValueError as err:
        assert "pipeline_parallel_size: 3 does not divide num_layers 4" in str(err), str(err)
    else:
        raise AssertionError("pipeline_parallel_size=3 on 4 layers must be refused")
    # EngineConfig.pipeline_microbatches reaches the runner (construction only, no step).
    with InferenceSession.from_pretrained(path, engine=EngineConfig(pipeline_parallel_size=2, pipeline_microbatches=3,
                                                                    num_pages=8)) as session:
        assert session.engine.runner.num_microbatches == 3
    # The runners check their mesh before placing anything.
    from jaxinfer.runtime.model_runner import ModelRunner
    from jaxinfer.runtime.pipeline_runner import PipelineRunner
    from jaxinfer.sharding import make_mesh
    config = _model("qwen3")[1]
    for make, message in ((lambda: ModelRunner(config, {}, page_size=4, num_pages=8, mesh=make_mesh(pipeline=2)),
                           "mesh: pipeline axis of 2"),
                          (lambda: PipelineRunner(config, {}, page_size=4, num_pages=8, dtype="float32",
                                                  mesh=make_mesh(tensor=2)), "mesh: pipeline axis is 1"),
                          (lambda: PipelineRunner(config, {}, page_size=4, num_pages=8, dtype="float32",
                                                  mesh=make_mesh(pipeline=2), num_microbatches=0),
                           "num_microbatches: must be an int >= 1, got 0")):
        try:
            make()
        except ValueError as err:
            assert message in str(err), (message, str(err))
        else:
            raise AssertionError(f"must raise: {message}")


def check_pipeline_more_layouts():
    # PP 4 (one layer per stage) and PP 2 x TP 4 (KV heads 2 < TP: repeated).
    _run_layouts("qwen3", [{}, dict(pipeline_parallel_size=4), dict(pipeline_parallel_size=2, tensor_parallel_size=4)])
    # Tied embeddings: the last stage holds a copy of the table (the planner counts it).
    _, pp2, pp2_tp2 = _run_layouts("qwen2", [{}, dict(pipeline_parallel_size=2),
                                             dict(pipeline_parallel_size=2, tensor_parallel_size=2)])
    # TP inside each stage: the same schedule (bubble), half the KV bytes per device.
    for metrics in (pp2, pp2_tp2):
        _assert_two_stage_bubble(metrics)
    assert pp2["pipeline_bubble_fraction"] == pp2_tp2["pipeline_bubble_fraction"]
    assert pp2_tp2["kv_cache_bytes_per_device"] * 2 == pp2["kv_cache_bytes_per_device"]


def check_moe_pipeline_parallel():
    path, config, _ = _model("qwen3_moe")
    one, pp2 = _run_layouts("qwen3_moe", [dict(expert_parallel_size=2),
                                          dict(pipeline_parallel_size=2, expert_parallel_size=2)],
                            check_scores=False)
    # Router statistics add up over stages and microbatches: the same counts as one stage.
    assert pp2["expert_tokens"] == one["expert_tokens"] and sum(one["expert_tokens"]) > 0, (pp2, one)


CHECKS = [check_qwen3_pipeline_parallel, check_pipeline_sizes_refused]
SLOW_CHECKS = [check_pipeline_more_layouts, check_moe_pipeline_parallel]
