"""Engine checks on 8 fake CPU devices: tensor and expert parallel sessions against HF
and against one device. Imported by eight_devices.py (which runs with
XLA_FLAGS=--xla_force_host_platform_device_count=8); each check is a plain function.

Models (tiny random HF checkpoints, built once per process with transformers):
- Llama with 8 query heads and 2 KV heads (KV heads < TP at TP 4 and 8: replicated)
  and a 161-token vocabulary (no TP divides it: padded to 192);
- Mixtral (4 experts, top-2, sliding window) and Qwen3-MoE (8 experts, top-2, one dense
  layer), as in tests/hf_models.py.
A few decode steps per layout keep this inside the suite's budget; the layouts the
issue names beyond these run with `-m slow` (SLOW_CHECKS).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: hf_models

PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
MAX_TOKENS = 5


@functools.lru_cache(maxsize=None)
def _model(name: str):
    """(folder, HF greedy continuations of PROMPTS) of a tiny model."""
    import torch

    import hf_models
    path = tempfile.mkdtemp(prefix=f"jaxinfer-{name}-")
    overrides = dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=161) if name == "llama" else {}
    hf = hf_models.build(name, path, **overrides)
    want = []
    for prompt in PROMPTS:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=0)
        want.append(out[0, len(prompt):].tolist())
    return path, want


def _session(path, **engine):
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig
    return InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, num_pages=48, **engine))


def _greedy():
    from jaxinfer.config import SamplingParams
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _sampled():
    from jaxinfer.config import SamplingParams
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=50, seed=7, ignore_eos=True)


def _plan():
    spec = importlib.util.spec_from_file_location(
        "plan_parallelism_eight", os.path.join(os.path.dirname(os.path.dirname(HERE)), "scripts",
                                               "plan_parallelism.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _check_layouts(name: str, layouts, check_sampling: bool) -> list:
    """Greedy tokens equal HF at every layout; seeded sampled tokens equal across layouts.
    Returns each layout's session metrics."""
    path, want = _model(name)
    sampled, all_metrics = None, []
    for sizes in layouts:
        with _session(path, **sizes) as session:
            got = [o.token_ids for o in session.generate(PROMPTS, _greedy())]
            assert got == want, (name, sizes, got, want)
            if check_sampling:
                tokens = [o.token_ids for o in session.generate(PROMPTS, _sampled())]
                assert sampled is None or tokens == sampled, (sizes, tokens, sampled)
                sampled = tokens
            metrics = session.metrics()
        shape = {"pipeline": 1, "expert": sizes.get("expert_parallel_size", 1),
                 "tensor": sizes.get("tensor_parallel_size", 1)}
        assert metrics["mesh_shape"] == shape and metrics["num_devices"] == shape["expert"] * shape["tensor"]
        all_metrics.append(metrics)
    return all_metrics


LLAMA_TP = (1, 2, 4, 8)


@functools.lru_cache(maxsize=None)
def _llama_tensor_parallel() -> dict:
    layouts = [dict(tensor_parallel_size=tp) for tp in LLAMA_TP]
    return dict(zip(LLAMA_TP, _check_layouts("llama", layouts, check_sampling=True)))


def check_llama_tensor_parallel():
    # TP 2: K = TP; TP 4 and 8: K < TP (heads replicated); 161 % TP != 0 (vocab padded).
    _llama_tensor_parallel()


def check_memory_per_device_agrees_with_the_planner():
    from jaxinfer.models import checkpoint, registry
    path, _ = _model("llama")
    config = registry.model_config_from_hf(checkpoint.read_hf_config(path))
    plan = _plan()
    runs = _llama_tensor_parallel()
    for tp, m in runs.items():
        assert m["weight_bytes_per_device"] == plan.per_device_weight_bytes(config, tp, 1, 1, 4), (tp, m)
        tokens = 48 * 4  # num_pages * page_size
        assert m["kv_cache_bytes_per_device"] == tokens * plan.kv_bytes_per_token_per_device(config, tp, 1, 4), m
    total, four = runs[1], runs[4]
    norms = 4 * config.hidden_size * (2 * config.num_layers + 1)
    # Within 1.1x of total / 4 plus the replicated norms (vocab 161 -> 192 and the KV
    # heads repeated 2 -> 4 are the excess); KV pages: one head of the 2 per device.
    assert four["weight_bytes_per_device"] <= 1.1 * (total["weight_bytes_per_device"] / 4 + norms), (four, total)
    assert four["kv_cache_bytes_per_device"] == total["kv_cache_bytes_per_device"] // 2


def check_moe_expert_parallel():
    from jaxinfer.models import checkpoint, registry
    for name in ("mixtral", "qwen3_moe"):
        layouts = [dict(expert_parallel_size=4, tensor_parallel_size=2), dict(expert_parallel_size=2)]
        runs = _check_layouts(name, layouts, check_sampling=False)
        # Router statistics: every real token counted k times per MoE layer, padding never;
        # the same counts on every layout.
        config = registry.model_config_from_hf(checkpoint.read_hf_config(_model(name)[0]))
        num_tokens = sum(len(p) for p in PROMPTS) + len(PROMPTS) * (MAX_TOKENS - 1)
        num_moe = sum(config.is_moe_layer(i) for i in range(config.num_layers))
        counts = runs[0]["expert_tokens"]
        assert sum(counts) == num_tokens * config.num_experts_per_tok * num_moe, (name, counts)
        assert all(m["expert_tokens"] == counts for m in runs) and runs[0]["router_load_imbalance"] >= 1.0


def check_int4_and_shared_prefix_under_tensor_parallel():
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig, SamplingParams
    from jaxinfer.quant import QuantConfig
    import jax
    from jaxinfer.models import checkpoint
    path, _ = _model("llama")
    saved = os.path.join(tempfile.mkdtemp(), "int4")  # an int4 folder, loaded at TP 2 with host leaves
    runs = {}
    for tp in (1, 2):
        engine = EngineConfig(page_size=4, num_pages=48, tensor_parallel_size=tp, shared_prefix_min_tokens=4)
        with InferenceSession.from_pretrained(path, quantization="int4", quantization_config=QuantConfig(group_size=16),
                                              engine=engine) as session:
            int4 = [o.token_ids for o in session.generate(PROMPTS, _greedy())]
            if tp == 1:
                checkpoint.save_hf_folder(saved, session.engine.runner.params, session.model_config,
                                          checkpoint.read_hf_config(path))
        if tp == 2:
            _, host, _ = checkpoint.load_model(saved, on_host=True)
            assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(host))
            with InferenceSession.from_pretrained(saved, engine=engine) as session:
                assert [o.token_ids for o in session.generate(PROMPTS, _greedy())] == int4
        with InferenceSession.from_pretrained(path, engine=engine) as session:
            shared = [1] + list(range(10, 26))
            session.generate([shared], SamplingParams(max_tokens=1, temperature=0.0))  # cache the prefix pages
            prefix = [o.token_ids for o in session.generate([shared + [40 + i, 50 + i] for i in range(3)], _greedy())]
            assert session.metrics()["shared_prefix_steps"] > 0
        runs[tp] = (int4, prefix)
    assert runs[1] == runs[2], runs


def check_pallas_attention_per_shard():
    # The Pallas GPU kernel in interpret mode, per shard (shard_map) at TP 2: two tokens.
    from jaxinfer.config import SamplingParams
    path, want = _model("llama")
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with _session(path, tensor_parallel_size=2, attention_impl="pallas_interpret") as session:
        got = [o.token_ids for o in session.generate(PROMPTS, params)]
    assert got == [w[:2] for w in want], (got, want)


def check_moe_more_layouts():
    for name in ("mixtral", "qwen3_moe"):
        _check_layouts(name, [dict(expert_parallel_size=4), dict(expert_parallel_size=2, tensor_parallel_size=2),
                              dict(tensor_parallel_size=2)], check_sampling=True)


def check_sizes_are_refused_before_loading():
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig
    path, _ = _model("llama")
    cases = [(dict(tensor_parallel_size=3), "tensor_parallel_size: 3 does not divide num_heads 8"),
             (dict(expert_parallel_size=2), "expert_parallel_size: 2 needs a mixture-of-experts model"),
             (dict(pipeline_parallel_size=4), "pipeline_parallel_size: 4 does not divide num_layers 2")]
    for sizes, message in cases:
        try:
            InferenceSession.from_pretrained(path, engine=EngineConfig(**sizes))
        except ValueError as err:
            assert message in str(err), (sizes, str(err))
        else:
            raise AssertionError(f"{sizes} must be refused")
    for name, sizes, message in (
            ("mixtral", dict(expert_parallel_size=8), "expert_parallel_size: 8 does not divide num_experts 4"),
            ("qwen3_moe", dict(expert_parallel_size=8, tensor_parallel_size=2), "= 16 devices, but only 8")):
        try:
            InferenceSession.from_pretrained(_model(name)[0], engine=EngineConfig(**sizes))
        except ValueError as err:
            assert message in str(err), (sizes, str(err))
        else:
            raise AssertionError(f"{name} {sizes} must be refused")


def check_splitwise_disaggregation():
    """Prefill on devices 0-1 (TP 2), decode on 2-3 (TP 2) or on 2 alone (TP 1, the KV
    resharded on the way): greedy tokens equal HF, seeded ones equal one device's, every
    handed-off prompt's pages copied once, nothing leaked; bad layouts refused by name."""
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig
    path, want = _model("llama")
    with _session(path) as one:
        sampled = [o.token_ids for o in one.generate(PROMPTS, _sampled())]
    for decode_tp in (2, 1):
        with _session(path, disaggregation="splitwise", prefill_tensor_parallel_size=2,
                      decode_tensor_parallel_size=decode_tp) as session:
            assert [o.token_ids for o in session.generate(PROMPTS, _greedy())] == want, decode_tp
            assert [o.token_ids for o in session.generate(PROMPTS, _sampled())] == sampled, decode_tp
            engine = session.engine
            assert {d.id for d in engine.runner.mesh.devices.flat} == {0, 1}
            assert {d.id for d in engine.decode_runner.mesh.devices.flat} == set(range(2, 2 + decode_tp))
            m = session.metrics()
            assert m["num_kv_transfers"] == 2 * len(PROMPTS) and m["kv_transfer_bytes"] > 0, m
            assert m["num_free_pages"] == m["num_total_pages"] and m["num_decode_reservations"] == 0, m
    for sizes, message in [(dict(prefill_tensor_parallel_size=4, decode_tensor_parallel_size=2),
                            "prefill_tensor_parallel_size / decode_tensor_parallel_size"),
                           (dict(prefill_tensor_parallel_size=4, decode_tensor_parallel_size=8),
                            "num_prefill_devices + decode_tensor_parallel_size")]:
        try:
            InferenceSession.from_pretrained(path, engine=EngineConfig(disaggregation="splitwise", **sizes))
        except ValueError as err:
            assert message in str(err), (sizes, str(err))
        else:
            raise AssertionError(f"{sizes} must be refused")


CHECKS = [check_llama_tensor_parallel, check_memory_per_device_agrees_with_the_planner, check_moe_expert_parallel,
          check_int4_and_shared_prefix_under_tensor_parallel, check_sizes_are_refused_before_loading,
          check_splitwise_disaggregation]
SLOW_CHECKS = [check_pallas_attention_per_shard, check_moe_more_layouts]
