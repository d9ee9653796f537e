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
