"""The sparse MoE MLP: routing by hand, against a per-token loop, padding, loading, axes."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.models import checkpoint, registry
from jaxinfer.models.moe import MoE, route, sort_by_expert
from jaxinfer.sharding import make_mesh
from jaxinfer.sharding.rules import param_shardings
from jaxinfer.models.transformer import logical_axes, param_shapes

P = jax.sharding.PartitionSpec


def _config(**overrides):
    kwargs = dict(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64, qk_norm=True, num_experts=8,
                  num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=True, dense_mlp_layers=(1,))
    return ModelConfig(**{**kwargs, **overrides})


def test_route_by_hand():
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]]))  # softmax = these
    weights, experts = route(logits, 2, norm_topk_prob=True)
    np.testing.assert_array_equal(np.asarray(experts), [[3, 2], [0, 3]])
    np.testing.assert_allclose(np.asarray(weights), [[4 / 7, 3 / 7], [5 / 8, 3 / 8]], rtol=1e-6)
    weights, _ = route(logits, 2, norm_topk_prob=False)  # Qwen3-MoE's default: the raw probabilities
    np.testing.assert_allclose(np.asarray(weights), [[0.4, 0.3], [0.5, 0.3]], rtol=1e-6)


def test_sort_by_expert_by_hand():
    experts = jnp.asarray([[3, 2], [0, 3], [2, 0]], jnp.int32)  # T = 3 tokens, k = 2: copies 0..5
    order, inverse, group_sizes = sort_by_expert(experts, 4)
    np.testing.assert_array_equal(np.asarray(order), [2, 5, 1, 4, 0, 3])  # stable: token order within an expert
    np.testing.assert_array_equal(np.asarray(group_sizes), [2, 0, 2, 2])  # expert 1: empty
    np.testing.assert_array_equal(np.asarray(inverse), [4, 2, 0, 5, 3, 1])
    np.testing.assert_array_equal(np.asarray(order)[np.asarray(inverse)], np.arange(6))


def _moe_params(config, seed=0):
    module = MoE(config, jnp.float32, jnp.float32, init_std=0.5)
    params = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((2, config.hidden_size)))["params"]
    return module, jax.tree.map(np.asarray, jax.tree.map(lambda a: getattr(a, "value", a), params,
                                                         is_leaf=lambda a: hasattr(a, "value")))


def _numpy_moe(params, x, config):
    """Each token through its top-k experts, one at a time (float64)."""
    x = np.asarray(x, np.float64)
    logits = x @ params["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        chosen = np.argsort(-probs[t], kind="stable")[:config.num_experts_per_tok]
        w = probs[t, chosen] / (probs[t, chosen].sum() if config.norm_topk_prob else 1.0)
        for e, p in zip(chosen, w):
            gate, up = x[t] @ params["gate_proj"][e], x[t] @ params["up_proj"][e]
            out[t] += p * ((gate / (1 + np.exp(-gate)) * up) @ params["down_proj"][e])
    return out


def test_moe_matches_a_per_token_loop_and_ignores_padding():
    # Without norm_topk_prob (Qwen3-MoE's default); the HF parity tests run it with.
    config = _config(norm_topk_prob=False)
    module, params = _moe_params(config)
    rng = np.random.RandomState(1)
    real = rng.randn(5, config.hidden_size).astype(np.float32)
    # The engine pads a step's tokens to a bucket; padding rows are routed too: here
    # copies of one real token (its experts' groups grow) and random rows.
    padded = np.concatenate([real, np.repeat(real[:1], 3, axis=0), rng.randn(8, config.hidden_size)]).astype(np.float32)

    @jax.jit
    def run(x):  # (MoE output [T, D], each token's experts [T, k])
        return module.apply({"params": params}, x), route(x @ params["router"], config.num_experts_per_tok, False)[1]

    out, experts = run(jnp.asarray(padded))
    np.testing.assert_allclose(np.asarray(out), _numpy_moe(params, padded, config), rtol=1e-5, atol=1e-5)
    # Nothing is dropped, so real rows keep their experts and their values, up to the
    # rounding of a matmul whose row count changed (measured ~1e-7 of the output scale).
    alone, real_experts = run(jnp.asarray(real))
    np.testing.assert_array_equal(np.asarray(experts[:5]), np.asarray(real_experts))
    scale = float(np.abs(np.asarray(alone)).max())
    np.testing.assert_allclose(np.asarray(out[:5]), np.asarray(alone), rtol=0, atol=1e-6 * scale)


def test_moe_forwards_its_matmul_impl():
    # The kernels themselves are tested against the reference in tests/pallas.
    module = MoE(_config(), jnp.float32, jnp.float32, matmul_impl="cuda")
    with pytest.raises(ValueError, match="impl: 'cuda'"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((3, 32)))  # traced only


# ---------------------------------------------------------------------------- registry

def test_registry_moe_fields():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    qwen = registry.model_config_from_hf(base | dict(
        model_type="qwen3_moe", num_hidden_layers=6, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=8,
        decoder_sparse_step=2, mlp_only_layers=[3], use_sliding_window=True, sliding_window=5))
    assert qwen.dense_mlp_layers == (0, 2, 3, 4)  # (i + 1) % 2 != 0, and layer 3
    assert [qwen.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (16, 4, 8)
    assert not qwen.norm_topk_prob and qwen.qk_norm and qwen.sliding_windows == (5,) * 6
    mixtral = registry.model_config_from_hf(base | dict(model_type="mixtral", num_hidden_layers=2, sliding_window=7))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.moe_intermediate_size) == (8, 2, 48)
    assert mixtral.norm_topk_prob and mixtral.sliding_windows == (7, 7) and not mixtral.qk_norm
    dense = registry.model_config_from_hf(base | dict(model_type="qwen3_moe", num_hidden_layers=2, num_experts=0))
    assert not any(dense.is_moe_layer(i) for i in range(2))
    qwen3 = registry.model_config_from_hf(base | dict(model_type="qwen3", num_hidden_layers=2))
    assert qwen3.head_dim == 128 and qwen3.qk_norm and qwen3.num_experts == 0  # Qwen3Config's head_dim default
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        registry.model_config_from_hf(base | dict(model_type="mixtral", num_hidden_layers=1, num_local_experts=2,
                                                  num_experts_per_tok=3))


# ---------------------------------------------------------------------------- sharding axes

def test_expert_weights_carry_expert_axes():
    config = _config()
    axes = logical_axes(config)
    moe, dense = axes["layers_0"]["mlp"], axes["layers_1"]["mlp"]
    assert tuple(moe["gate_proj"]) == tuple(moe["up_proj"]) == ("expert", "embed", "expert_mlp")
    assert tuple(moe["down_proj"]) == ("expert", "expert_mlp", "embed")
    assert tuple(moe["router"]) == ("embed", "router_expert")
    assert tuple(dense["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["layers_0"]["self_attn"]["q_norm"]["scale"]) == ("norm",)
    shardings = param_shardings(make_mesh(), axes, param_shapes(config))
    assert shardings["layers_0"]["mlp"]["gate_proj"].spec == P("expert", None, "tensor")
    assert shardings["layers_0"]["mlp"]["down_proj"].spec == P("expert", "tensor", None)
    assert shardings["layers_0"]["mlp"]["router"].spec == P(None, None)


# ---------------------------------------------------------------------------- checkpoints

def _rewrite(path, tensors):
    checkpoint.write_safetensors(os.path.join(path, "model.safetensors"), dict(tensors))


def test_expert_tensors_are_stacked_and_errors_name_them(hf_model_dir, tmp_path):
    path, hf = hf_model_dir("mixtral")
    config, params, _ = checkpoint.load_model(path)
    w3 = hf.state_dict()["model.layers.1.mlp.experts.gate_up_proj"][2, 96:].numpy()  # expert 2's up_proj [F, D]
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["up_proj"][2]), w3.T)
    tensors = checkpoint.read_safetensors(os.path.join(path, "model.safetensors"))

    dst = str(tmp_path / "missing")
    shutil.copytree(path, dst)
    _rewrite(dst, {k: v for k, v in tensors.items() if k != "model.layers.0.block_sparse_moe.experts.3.w2.weight"})
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.0\.block_sparse_moe\.experts\.3\.w2"):
        checkpoint.load_model(dst)
    dst = str(tmp_path / "shape")
    shutil.copytree(path, dst)
    _rewrite(dst, {**tensors, "model.layers.1.block_sparse_moe.experts.1.w1.weight": np.zeros((95, 64), np.float32)})
    with pytest.raises(ValueError, match=r"experts\.1\.w1\.weight: shape \(95, 64\) does not match the config's "
                                         r"\(96, 64\) \(in .*shape/model\.safetensors\)"):
        checkpoint.load_model(dst)


def test_moe_folder_roundtrip_keeps_hf_names(hf_model_dir, tmp_path):
    path, _ = hf_model_dir("qwen3_moe")
    config, params, hf_config = checkpoint.load_model(path)
    out = str(tmp_path / "saved")
    checkpoint.save_hf_folder(out, params, config, hf_config, max_shard_bytes=40_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        saved = set(json.load(f)["weight_map"])
    assert saved == set(checkpoint.read_safetensors(os.path.join(path, "model.safetensors")))
    _, params2, _ = checkpoint.load_model(out)
    jax.tree.map(np.testing.assert_array_equal, params, params2)
