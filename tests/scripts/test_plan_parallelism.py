"""scripts/plan_parallelism.py: the memory formula against the model's parameters, the
validity rules, the collective bytes, the recommendation and the CLI (in-process)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import pytest
from jax.sharding import PartitionSpec

from jaxinfer.config import ModelConfig
from jaxinfer.models import transformer
from jaxinfer.models.registry import model_config_from_hf

from script_loader import load_script


# The engine's weight rules (jaxinfer.sharding.rules), written out so that this test
# checks the planner against the rules as specified: logical name -> mesh axis.
_RULES = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "expert": "expert",
          "expert_mlp": "tensor", "embed": None, "norm": None, "router_expert": None}


@pytest.fixture(scope="module")
def mod():
    return load_script("plan_parallelism")


def _tiny(**kwargs) -> ModelConfig:
    base = dict(family="llama", vocab_size=1000, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=8,
                num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return ModelConfig(**{**base, **kwargs})


# Two layers where four add nothing (each distinct shape costs a trace of the model).
CONFIGS = {
    "llama_untied_vocab_1001": _tiny(vocab_size=1001),  # K = 2 < tp up to 8; V % tp != 0; pp up to 4
    "llama_tied": _tiny(vocab_size=1024, tie_word_embeddings=True, num_layers=2),
    "llama_tied_vocab_1001_biases": _tiny(vocab_size=1001, tie_word_embeddings=True, qkv_bias=True, o_bias=True,
                                          mlp_bias=True, num_layers=2),
    "qwen2_qkv_bias": _tiny(family="qwen2", num_kv_heads=4, qkv_bias=True, num_layers=2),
    "mixtral_like": _tiny(family="mixtral", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                          num_layers=2),
    # dense MLPs in layers 0 and 3: the first and last stages differ from the middle ones
    "qwen3_moe_like": _tiny(family="qwen3_moe", qk_norm=True, num_kv_heads=4, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=16, dense_mlp_layers=(0, 3)),
}


@functools.lru_cache(maxsize=None)
def _leaves(config: ModelConfig) -> tuple:
    """(path, shape, logical spec) of every parameter."""
    shapes = jax.tree_util.tree_flatten_with_path(transformer.param_shapes(config))[0]
    specs = jax.tree_util.tree_leaves(transformer.logical_axes(config), is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(shapes) == len(specs)
    return tuple((tuple(k.key for k in path), leaf.shape, tuple(spec)) for (path, leaf), spec in zip(shapes, specs))


def _stage_bytes_from_parameters(mod, config: ModelConfig, tp: int, ep: int, pp: int, dtype_bytes: int) -> list:
    """Per stage, a device's bytes, summed over the model's actual parameters split per the rules."""
    run = dataclasses.replace(config, vocab_size=mod.padded_vocab_size(config.vocab_size, tp),
                              num_kv_heads=mod.kv_heads_for_tp(config.num_kv_heads, tp))
    sizes = {"tensor": tp, "expert": ep}
    per_stage = [0] * pp
    for path, shape, spec in _leaves(run):
        used, local = set(), list(shape)
        for dim, name in enumerate(spec):
            axis = _RULES[name] if name is not None else None
            if axis is not None and axis not in used:  # a mesh axis splits one dim at most
                used.add(axis)
                assert local[dim] % sizes[axis] == 0, (path, shape, spec, tp, ep)
                local[dim] //= sizes[axis]
        if path[0].startswith("layers_"):
            stages = {int(path[0].split("_")[1]) // (config.num_layers // pp)}
        elif path[0] == "embed_tokens":  # tied: the last stage holds a copy for the LM head
            stages = {0, pp - 1} if config.tie_word_embeddings else {0}
        else:  # the final norm and the LM head
            stages = {pp - 1}
        for s in stages:
            per_stage[s] += math.prod(local) * dtype_bytes
    return per_stage


def test_padded_vocab_and_kv_heads(mod):
    assert mod.padded_vocab_size(128256, 8) == 128256  # divisible: not padded
    assert mod.padded_vocab_size(1001, 8) == 1024  # next multiple of lcm(64, 8) = 64
    assert mod.padded_vocab_size(32000, 3) == 32064  # lcm(64, 3) = 192: 167 * 192
    assert mod.padded_vocab_size(50, 1) == 50
    assert [mod.kv_heads_for_tp(8, tp) for tp in (1, 2, 8, 16)] == [8, 8, 8, 16]
    assert mod.kv_heads_for_tp(4, 8) == 8


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_bytes_match_the_parameters_split_by_the_rules(mod, name):
    config = CONFIGS[name]
    checked = 0
    for num_devices in (8, 4, 2):
        for tp, ep, pp in mod.layouts(config, num_devices):
            if mod.layout_error(config, tp, ep, pp) is not None:
                continue
            for dtype_bytes in (2, 4):
                expected = _stage_bytes_from_parameters(mod, config, tp, ep, pp, dtype_bytes)
                assert mod.stage_weight_bytes(config, tp, ep, pp, dtype_bytes) == expected, (tp, ep, pp)
                assert mod.per_device_weight_bytes(config, tp, ep, pp, dtype_bytes) == max(expected)
            checked += 1
    assert checked >= (9 if config.num_experts else 6)  # the MoE configs also ran ep > 1


def test_presets_have_the_checkpoints_parameter_counts(mod):
    # The parameter counts of the HF checkpoints (their safetensors index: total_size / 2).
    counts = {"llama-3-8b": 8030261248, "llama-3-70b": 70553706496, "mixtral-8x7b": 46702792704,
              "qwen3-30b-a3b": 30532122624}
    for name, count in counts.items():
        config = model_config_from_hf(mod.PRESETS[name])
        assert mod.per_device_weight_bytes(config, 1, 1, 1, dtype_bytes=1) == count, name
    qwen3 = model_config_from_hf(mod.PRESETS["qwen3-30b-a3b"])  # K = 4: tp 8 holds one replicated head
    assert mod.kv_bytes_per_token_per_device(qwen3, 8, 1, 2) == mod.kv_bytes_per_token_per_device(qwen3, 4, 1, 2)


def test_kv_bytes_per_token_by_hand(mod):
    config = model_config_from_hf(mod.PRESETS["llama-3-70b"])  # L 80, K 8, H 128
    assert mod.kv_bytes_per_token_per_device(config, tp=1, pp=1, kv_dtype_bytes=2) == 2 * 80 * 8 * 128 * 2
    assert mod.kv_bytes_per_token_per_device(config, tp=2, pp=4, kv_dtype_bytes=2) == 2 * 20 * 4 * 128 * 2
    assert mod.kv_bytes_per_token_per_device(config, tp=8, pp=1, kv_dtype_bytes=4) == 2 * 80 * 1 * 128 * 4
    # tp 16 > K 8: K' = 16 heads, still one per device.
    assert mod.kv_bytes_per_token_per_device(config, tp=16, pp=1, kv_dtype_bytes=2) == 2 * 80 * 1 * 128 * 2


def test_invalid_layouts_name_the_reason(mod):
    config = _tiny(num_heads=6, num_kv_heads=3, intermediate_size=60, num_layers=3)
    assert mod.layout_error(config, 1, 1, 3) is None
    assert mod.layout_error(config, 3, 1, 1) is None
    assert mod.layout_error(config, 6, 1, 1) is None  # tp 6 > K 3, 6 % 3 == 0: replicated kv heads
    assert "num_heads 6 % tp 4" in mod.layout_error(config, 4, 1, 1)
    assert "num_kv_heads 3 % tp 2" in mod.layout_error(config, 2, 1, 1)
    assert "intermediate_size 60 % tp 8" in mod.layout_error(config, 8, 1, 1)
    assert "num_layers 3 % pp 2" in mod.layout_error(config, 1, 1, 2)
    assert "needs a MoE model" in mod.layout_error(config, 1, 2, 1)
    moe = _tiny(family="mixtral", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=24, num_kv_heads=8,
                intermediate_size=64)
    assert "num_experts 6 % ep 4" in mod.layout_error(moe, 1, 4, 1)
    assert "moe_intermediate_size 24 % tp 16" in mod.layout_error(moe, 16, 1, 1)
    assert mod.layout_error(moe, 8, 1, 1) is None  # no dense layer: intermediate_size is not split
    assert "tp 8 % num_kv_heads 3" in mod.layout_error(_tiny(num_heads=24, num_kv_heads=3), 8, 1, 1)


def test_dense_layouts_have_no_expert_axis(mod):
    config = _tiny()
    assert mod.layouts(config, 8) == [(1, 1, 8), (2, 1, 4), (4, 1, 2), (8, 1, 1)]
    assert len(mod.layouts(CONFIGS["mixtral_like"], 8)) == 10


def test_collective_bytes_per_token(mod):
    settings = mod.PlanSettings(num_devices=8, context=128, kv_memory_fraction=0.9, batch=4, mfu=0.5,
                                dtype_bytes=2, kv_dtype_bytes=2)
    hw = mod.HARDWARE["h100"]
    dense = _tiny(vocab_size=1024)
    row = mod.estimate(dense, hw, 8, 1, 1, 4, settings)
    assert row.collective_bytes_per_token_per_layer == 2 * (2 * 7 / 8 * 32 * 2)  # two all-reduces over tp 8
    per_token = 4 * row.collective_bytes_per_token_per_layer + 7 / 8 * 1024 * 4  # + logits all-gather
    assert row.collective_bytes_per_step == pytest.approx(4 * per_token)
    row = mod.estimate(dense, hw, 1, 1, 4, 4, settings)
    assert row.collective_bytes_per_step == 4 * 3 * 32 * 2  # no tp: 3 stage boundaries, a send of D each
    moe = CONFIGS["mixtral_like"]  # the MoE output: one all-reduce over the tp * ep = 8 group
    row = mod.estimate(moe, hw, 2, 4, 1, 4, settings)
    assert row.collective_bytes_per_token_per_layer == 2 * (1 / 2) * 64 + 2 * (7 / 8) * 64


def test_expected_experts_hit(mod):
    assert mod.expected_experts_hit(8, 2, 1) == pytest.approx(2)
    assert mod.expected_experts_hit(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))
    assert mod.expected_experts_hit(128, 8, 256) == pytest.approx(128, rel=1e-6)


def test_llama_3_70b_on_8_h100_recommends_tp8_and_fits(mod):
    config = model_config_from_hf(mod.PRESETS["llama-3-70b"])
    settings = mod.PlanSettings(num_devices=8, context=4096, kv_memory_fraction=0.9, batch=None, mfu=0.5,
                                dtype_bytes=2, kv_dtype_bytes=2)
    rows = mod.plan(config, mod.HARDWARE["h100"], settings)
    assert [(r.tp, r.pp) for r in rows] == [(1, 8), (2, 4), (4, 2), (8, 1)]
    (best,) = [r for r in rows if r.recommended]
    assert (best.tp, best.ep, best.pp) == (8, 1, 1) and best.fits and best.batch == 256
    # By hand, elements per device at tp 8: per layer q 8192^2/8, k+v 2*8192*1024/8, o 8192^2/8,
    # norms 2*8192, MLP 3*8192*28672/8; embedding and LM head 128256*8192/8 each; final norm.
    layer = 8192 * 8192 // 8 * 2 + 2 * 8192 * 1024 // 8 + 2 * 8192 + 3 * 8192 * 28672 // 8
    assert best.weight_bytes == 2 * (80 * layer + 2 * 128256 * 8192 // 8 + 8192) == 17640734720
    assert best.max_batch == int(0.9 * (80 * 2**30 - best.weight_bytes) // (4096 * 2 * 80 * 128 * 2))
    assert all(best.tpot_s < r.tpot_s for r in rows if r is not best)
    # 141 GB of bf16 weights do not fit in 8 x 16 GiB of TPU v5e: nothing is recommended.
    rows = mod.plan(config, mod.HARDWARE["tpu-v5e"], settings)
    assert not any(r.fits or r.recommended for r in rows) and all(r.max_batch == 0 for r in rows)


def _run_cli(mod, capsys, *args) -> str:
    flag_values = mod.test_flag_values
    flag_values(["plan_parallelism", *args])
    try:
        mod.main(["plan_parallelism"])
    finally:
        flag_values.unparse_flags()
    return capsys.readouterr().out


def test_cli_preset_writes_json(mod, capsys, tmp_path):
    path = tmp_path / "plan.json"
    out = _run_cli(mod, capsys, "--preset=llama-3-70b", "--hardware=h100", f"--json_out={path}")
    assert "recommended: tp=8 ep=1 pp=1" in out
    result = json.loads(path.read_text())
    assert result["hardware"]["name"] == "h100" and result["settings"]["num_devices"] == 8
    assert [r["recommended"] for r in result["rows"]] == [False, False, False, True]
    assert result["rows"][-1]["weight_bytes"] == 17640734720


def test_cli_model_folder_with_an_invalid_layout(mod, capsys, tmp_path):
    # 6 experts: ep 4 is invalid
    hf = dict(mod.PRESETS["qwen3-30b-a3b"], num_hidden_layers=6, num_experts=6, num_experts_per_tok=2)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    path = tmp_path / "plan.json"
    out = _run_cli(mod, capsys, f"--model={tmp_path}", "--hardware=tpu-v6e", "--num_devices=4", "--dtype=float32",
                   "--kv_dtype=bfloat16", "--context=1024", "--batch=8", f"--json_out={path}")
    assert "tp1 ep4 pp1   invalid: num_experts 6 % ep 4 != 0" in out
    rows = json.loads(path.read_text())["rows"]
    assert sum(r["recommended"] for r in rows) == 1 and all(r["batch"] == 8 for r in rows if r["error"] is None)
    config = model_config_from_hf(hf)
    tp4 = next(r for r in rows if (r["tp"], r["ep"], r["pp"]) == (4, 1, 1))
    assert tp4["weight_bytes"] == mod.per_device_weight_bytes(config, 4, 1, 1, 4)
    assert tp4["kv_bytes_per_token"] == 2 * 6 * 1 * 128 * 2
