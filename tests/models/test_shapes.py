"""Full-size configs checked with jax.eval_shape: no weights are allocated."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from jaxinfer.models import registry
from jaxinfer.models.transformer import AttentionMetadata, Transformer, logical_axes, param_shapes

# config.json fields of the published checkpoints, with their published parameter counts.
REAL = {
    "Llama-3-8B": (dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                   8_030_261_248),
    "Mistral-7B": (dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        max_position_embeddings=32768, sliding_window=4096), 7_241_732_096),
    "Qwen2-7B": (dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                      max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False),
                 7_615_616_512),
    "Gemma-2B": (dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                      num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                      max_position_embeddings=8192, hidden_act="gelu_pytorch_tanh"), 2_506_172_416),
}


# Published checkpoints of the Qwen3 and MoE families, checked on one layer (the layers
# are identical): count = all but the layers + num_layers * one layer's parameters.
REAL_ONE_LAYER = {
    "Qwen3-8B": (dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                      num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
                 8_190_735_360),
    "Mixtral-8x7B": (dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                          num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1000000.0),
                     46_702_792_704),
    "Qwen3-30B-A3B": (dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                           moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                           num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                           max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=False),
                      30_532_122_624),
}


@pytest.mark.parametrize("name", list(REAL_ONE_LAYER))
def test_real_config_shapes_one_layer(name):
    hf, expected_params = REAL_ONE_LAYER[name]
    config = registry.model_config_from_hf(hf | {"num_hidden_layers": 1})
    shapes = param_shapes(config, jnp.bfloat16)
    per_layer = sum(x.size for x in jax.tree.leaves(shapes["layers_0"]))
    total = sum(x.size for x in jax.tree.leaves(shapes)) + (hf["num_hidden_layers"] - 1) * per_layer
    assert total == expected_params
    if config.num_experts:
        mlp = shapes["layers_0"]["mlp"]
        assert mlp["gate_proj"].shape == (config.num_experts, config.hidden_size, config.moe_intermediate_size)
        assert mlp["down_proj"].shape == (config.num_experts, config.moe_intermediate_size, config.hidden_size)
    # A decode step of 8 sequences, shapes only: 8 * top-k token copies through the experts.
    kv = jax.ShapeDtypeStruct((16, 16, config.num_kv_heads, config.head_dim), jnp.bfloat16)
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    model = Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    def step(params, caches, tokens, positions, slots, cu, kv_lens, tables):
        meta = AttentionMetadata(slot_mapping=slots, cu_q_lens=cu, kv_lens=kv_lens, page_tables=tables, max_q_len=1)
        return model.apply({"params": params}, tokens, positions, caches, meta)

    logits, _ = jax.eval_shape(step, shapes, ((kv, kv),), i32(8), i32(8), i32(8), i32(9), i32(8), i32(8, 2))
    assert logits.shape == (8, config.vocab_size)


@pytest.mark.parametrize("name", list(REAL))
def test_real_config_shapes(name):
    hf, expected_params = REAL[name]
    config = registry.model_config_from_hf(hf)
    shapes = param_shapes(config, jnp.bfloat16)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected_params
    layer = shapes["layers_0"]["self_attn"]
    assert layer["q_proj"]["kernel"].shape == (config.hidden_size, config.num_heads * config.head_dim)
    assert layer["k_proj"]["kernel"].shape == (config.hidden_size, config.num_kv_heads * config.head_dim)

    # One decode step of 8 sequences over a paged cache, shapes only.
    page_size, num_pages, seqs = 16, 64, 8
    kv = jax.ShapeDtypeStruct((num_pages, page_size, config.num_kv_heads, config.head_dim), jnp.bfloat16)
    caches = tuple((kv, kv) for _ in range(config.num_layers))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    model = Transformer(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)

    def step(params, caches, tokens, positions, slots, cu, kv_lens, tables):
        meta = AttentionMetadata(slot_mapping=slots, cu_q_lens=cu, kv_lens=kv_lens, page_tables=tables, max_q_len=1)
        return model.apply({"params": params}, tokens, positions, caches, meta)

    logits, new_caches = jax.eval_shape(step, shapes, caches, i32(seqs), i32(seqs), i32(seqs), i32(seqs + 1),
                                        i32(seqs), i32(seqs, 8))
    assert logits.shape == (seqs, config.vocab_size) and logits.dtype == jnp.float32
    assert len(new_caches) == config.num_layers and new_caches[0][0].shape == kv.shape


def test_logical_axes_cover_every_weight():
    config = registry.model_config_from_hf(REAL["Qwen2-7B"][0] | {"num_hidden_layers": 1})
    axes = logical_axes(config)
    attn = axes["layers_0"]["self_attn"]
    assert tuple(attn["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(attn["k_proj"]["bias"]) == ("kv_heads",)
    assert tuple(axes["layers_0"]["mlp"]["down_proj"]["kernel"]) == ("mlp", "embed")
    assert tuple(axes["embed_tokens"]) == ("vocab", "embed")
    assert tuple(axes["lm_head"]["kernel"]) == ("embed", "vocab")


@pytest.mark.parametrize("hf, field", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
          num_attention_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2),
     "intermediate_size"),
    (dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
          num_attention_heads=3, num_key_value_heads=2), "num_kv_heads"),
])
def test_bad_configs_are_named(hf, field):
    with pytest.raises(ValueError, match=field):
        registry.model_config_from_hf(hf)
