"""Pipeline stages of the decoder: a contiguous range of layers, plus the embedding on
the first stage and the final norm and LM head on the last.

Path: session -> ModelRunner.from_config -> runtime/pipeline_runner.py, which builds one
**PipelineStage** per pipeline index (each on its own sub-mesh of the engine's mesh),
gives it the parameters **split_params** selects for it and runs stage s on microbatch
k after stage s - 1 (activations [T, D] handed over with jax.device_put).

Memory model (the one scripts/plan_parallelism.py and docs/plan_parallelism.md compute):
layer i lives on stage i // (L / pp); the first stage also holds the embedding; the last
holds the final norm and the LM head, and a tied embedding (the LM head is the embedding
table) is copied to the last stage, as vLLM does.

Parameter names are the whole model's (`embed_tokens`, `layers_{i}` with the global
layer index i, `norm`, `lm_head`), so a stage's parameters, logical axes and shardings
are sub-trees of the whole model's and a checkpoint needs no renaming. The decoder
layers are the Transformer's own DecoderLayer modules with their global index (a
layer's sliding window and MoE-or-dense kind follow it).

Dimension codes: T tokens, D model dim, V vocab, S sample rows.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import Int4Format
from jaxinfer.models.transformer import AttentionMetadata, DecoderLayer, embed, embedding_param, final_logits


def stage_layers(num_layers: int, pipeline_parallel_size: int, stage: int) -> range:
    """The global indices of the layers stage `stage` holds: [s * L / pp, (s + 1) * L / pp).

    Raises:
      ValueError: pp does not divide L, or `stage` is not in [0, pp) (fields and numbers named).
    """
    pp = pipeline_parallel_size
    if pp < 1 or num_layers % pp:
        raise ValueError(f"pipeline_parallel_size: {pp} does not divide num_layers {num_layers}")
    if not 0 <= stage < pp:
        raise ValueError(f"stage: {stage} is not in [0, {pp})")
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_param_names(config: ModelConfig, pipeline_parallel_size: int, stage: int) -> tuple:
    """Top-level parameter names stage `stage` holds, in the model's order.

    First stage: `embed_tokens`; every stage: its `layers_{i}`; last stage: `norm` and
    `lm_head`, or a copy of `embed_tokens` when the embeddings are tied.
    """
    pp = pipeline_parallel_size
    first, last = stage == 0, stage == pp - 1
    names = ["embed_tokens"] if first or (last and config.tie_word_embeddings) else []
    names += [f"layers_{i}" for i in stage_layers(config.num_layers, pp, stage)]
    if last:
        names += ["norm"] + ([] if config.tie_word_embeddings else ["lm_head"])
    return tuple(names)


def split_params(config: ModelConfig, params: dict, pipeline_parallel_size: int) -> list:
    """The whole model's parameter tree (or its logical axes, shapes, shardings: any tree
    keyed like it) cut into one dict per stage; leaves are shared, never copied or read.

    Raises:
      ValueError: a name a stage needs is missing from `params` (named).
    """
    out = []
    for stage in range(pipeline_parallel_size):
        names = stage_param_names(config, pipeline_parallel_size, stage)
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"params: stage {stage} needs {missing}, which the tree does not have")
        out.append({name: params[name] for name in names})
    return out


class PipelineStage(nn.Module):
    """One pipeline stage: [T] tokens (first stage) or [T, D] activations in; [T, D]
    activations (or, on the last stage, [T or S, V] float32 logits) and the stage's
    updated KV pages out.

    Attributes:
      config: the (mesh) model shape.
      stage: this stage's pipeline index s.
      num_stages: pp.
      dtype, param_dtype, attention_impl, init_std, quant, grouped_matmul_impl, mesh:
        as in Transformer (mesh = this stage's sub-mesh).
    """

    config: ModelConfig
    stage: int
    num_stages: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    init_std: float = 0.02
    quant: Optional[Int4Format] = None
    grouped_matmul_impl: Optional[str] = None
    mesh: Optional[Any] = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @nn.compact
    def __call__(self, inputs: jax.Array, positions: jax.Array, kv_caches, metadata: AttentionMetadata,
                 logits_indices: Optional[jax.Array] = None):
        """Runs this stage's layers over a flat token batch.

        Args:
          inputs: [T] int32 token ids on the first stage, else [T, D] activations.
          positions: [T] int32 position of each token in its sequence.
          kv_caches: per layer of this stage a (k_pages, v_pages) pair of [P, L, K, H]
            (local index: the stage's first layer is 0), or None for a dense batch.
          metadata: AttentionMetadata of the batch.
          logits_indices: last stage only: optional [S] rows to compute logits for.
        Returns:
          (activations [T, D] in `dtype`, or on the last stage logits [T or S, V]
          float32; the stage's new kv_caches or None).
        """
        cfg = self.config
        embedding = embedding_param(self, cfg) if self.is_first or (self.is_last and cfg.tie_word_embeddings) \
            else None
        x = embed(cfg, embedding, inputs, self.dtype) if self.is_first else inputs.astype(self.dtype)  # [T, D]
        new_caches = []
        for local, i in enumerate(stage_layers(cfg.num_layers, self.num_stages, self.stage)):
            cache = None if kv_caches is None else kv_caches[local]
            x, cache = DecoderLayer(cfg, i, self.dtype, self.param_dtype, self.attention_impl, self.init_std,
                                    quant=self.quant, grouped_matmul_impl=self.grouped_matmul_impl, mesh=self.mesh,
                                    name=f"layers_{i}")(x, positions, cache, metadata)
            new_caches.append(cache)
        caches = None if kv_caches is None else tuple(new_caches)
        if not self.is_last:
            return x, caches
        return final_logits(self, cfg, x, embedding, logits_indices), caches
