"""Pipeline stages of the model on one device: which parameters each stage holds, and
the stages run one after the other equal the whole Transformer (untied and tied LM
head, a dense batch). The runner on several devices: tests/sharding/pipeline_checks.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.models.pipeline import PipelineStage, split_params, stage_layers, stage_param_names
from jaxinfer.models.transformer import AttentionMetadata, Transformer, init_params, logical_axes

CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64)
TIED = dataclasses.replace(CONFIG, tie_word_embeddings=True)


def test_stage_layers_and_names():
    assert [list(stage_layers(4, 2, s)) for s in range(2)] == [[0, 1], [2, 3]]
    assert [list(stage_layers(4, 4, s)) for s in range(4)] == [[0], [1], [2], [3]]
    with pytest.raises(ValueError, match="pipeline_parallel_size: 3 does not divide num_layers 4"):
        stage_layers(4, 3, 0)
    with pytest.raises(ValueError, match="stage: 2 is not in"):
        stage_layers(4, 2, 2)
    assert stage_param_names(CONFIG, 2, 0) == ("embed_tokens", "layers_0", "layers_1")
    assert stage_param_names(CONFIG, 2, 1) == ("layers_2", "layers_3", "norm", "lm_head")
    assert stage_param_names(CONFIG, 4, 2) == ("layers_2",)
    # A tied embedding is the LM head: the last stage holds a copy of it.
    assert stage_param_names(TIED, 2, 1) == ("embed_tokens", "layers_2", "layers_3", "norm")
    with pytest.raises(ValueError, match="stage 1 needs \\['norm'"):
        split_params(CONFIG, {k: v for k, v in init_params(CONFIG, jax.random.key(0)).items() if k != "norm"}, 2)


@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
@pytest.mark.parametrize("pp", [2, 4])
def test_stages_equal_the_whole_model(config, pp):
    params = init_params(config, jax.random.key(0), init_std=0.3)
    batch, length = 2, 6
    tokens = jax.random.randint(jax.random.key(1), (batch * length,), 0, config.vocab_size, jnp.int32)
    positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)
    metadata = AttentionMetadata.dense(batch, length)
    want, _ = Transformer(config).apply({"params": params}, tokens, positions, None, metadata)
    x = tokens
    stage_params = split_params(config, params, pp)
    axes = split_params(config, logical_axes(config), pp)
    for s in range(pp):
        stage = PipelineStage(config, s, pp)
        # A stage creates exactly the parameters (and logical axes) split_params gives it.
        shapes = jax.eval_shape(lambda: stage.init(jax.random.key(0), x, positions, None, metadata))["params"]
        assert set(shapes) == set(stage_params[s]) == set(axes[s]), s
        x, caches = stage.apply({"params": stage_params[s]}, x, positions, None, metadata)
        assert caches is None
        assert x.shape == ((batch * length, config.hidden_size) if s < pp - 1 else want.shape), (s, x.shape)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5, rtol=0)
