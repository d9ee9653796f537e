"""The decoder-only transformer of the Llama / Mistral / Qwen2 / Gemma / Qwen3 families
and the sparse-MoE Mixtral / Qwen3-MoE families (their MLP: jaxinfer.models.moe).

Path of a request: runner -> **model** -> attention op (jaxinfer.pallas) -> sampler.
The forward pass works on a flat ragged batch of tokens (prefill chunks and decodes of
many sequences, concatenated) and receives the paged KV cache and its metadata as
arguments: it writes the new K/V into the pages and returns the updated pages; it never
allocates the cache. `kv_caches=None` runs a dense batch (training, scoring) with the
same code: the batch's own K/V are viewed as one page per sequence.

Dimension codes: T tokens, S sequences, D model dim, N query heads, K kv heads, H head
dim, V vocab, P pages, L page size.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import GatedMLP, Int4Format, Linear, RMSNorm, apply_rope, rope_inv_freq
from jaxinfer.models.moe import MoE
from jaxinfer.pallas.attention import AttentionMetadata, PrefixRows, attention
from jaxinfer.sharding import rules
from jaxinfer.sharding.mesh import shard_map

__all__ = ["AttentionMetadata", "DecoderLayer", "PrefixRows", "Transformer", "embed", "embedding_param", "final_logits",
           "init_params", "logical_axes", "param_shapes"]


class Attention(nn.Module):
    config: ModelConfig
    layer: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: Optional[str] = None
    init_std: float = 0.02
    quant: Optional[Int4Format] = None  # init: int4 projections (see Linear)
    mesh: Optional[Any] = None  # the runner's jax.sharding.Mesh: attention runs per shard (shard_map)

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata: AttentionMetadata):
        cfg = self.config
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, init_std=self.init_std, quant=self.quant,
                     mesh=self.mesh)
        num_tokens = x.shape[0]
        q = Linear(cfg.num_heads * cfg.head_dim, use_bias=cfg.qkv_bias, axes=("embed", "heads"),
                   name="q_proj", **dense)(x)
        k = Linear(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"),
                   name="k_proj", **dense)(x)
        v = Linear(cfg.num_kv_heads * cfg.head_dim, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"),
                   name="v_proj", **dense)(x)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)  # [T, N, H]
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # [T, K, H]
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)  # [T, K, H]
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's H dims, before RoPE
            norm = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        run = functools.partial(attention, sm_scale=cfg.head_dim ** -0.5, sliding_window=cfg.sliding_window(self.layer),
                                impl=self.attention_impl)
        if self.mesh is not None and self.mesh.size > 1 and kv_cache is not None:
            run = _per_shard_attention(run, self.mesh, metadata)
        out, new_cache = run(q, k, v, positions, kv_cache, metadata)
        out = out.reshape(num_tokens, cfg.num_heads * cfg.head_dim)  # [T, N * H]
        out = Linear(cfg.hidden_size, use_bias=cfg.o_bias, axes=("heads", "embed"), name="o_proj",
                     **dense)(out)
        return out, new_cache


def _per_shard_attention(run, mesh, metadata: AttentionMetadata):
    """`run` (the attention op) per shard of `mesh`: each device attends with its own
    query heads, KV heads and KV pages (all split over "tensor" by the rules table), so
    the Pallas kernels see one device's heads and no collective is needed; the step's
    metadata and positions are replicated. The o_proj after it (row parallel) sums."""
    heads = rules.named_sharding(mesh, ("activation_length", "activation_heads", None)).spec
    kv_heads = rules.named_sharding(mesh, ("activation_length", "activation_kv_heads", None)).spec
    pages = tuple(rules.kv_cache_sharding(mesh).spec)
    meta = jax.tree.map(lambda _: P(), metadata)

    def per_shard(q, k, v, positions, kv_cache, metadata):
        # [P, L, K, H] pages and, for a quantized cache, their [P, L, K] scales: split alike.
        cache_specs = jax.tree.map(lambda x: P(*pages[:x.ndim]), kv_cache)
        return shard_map(run, mesh, in_specs=(heads, kv_heads, kv_heads, P(), cache_specs, meta),
                         out_specs=(heads, cache_specs))(q, k, v, positions, kv_cache, metadata)
    return per_shard


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    attention_impl: Optional[str] = None
    init_std: float = 0.02
    quant: Optional[Int4Format] = None  # init: int4 projections (see Linear)
    grouped_matmul_impl: Optional[str] = None  # MoE layers' grouped matmul (None = backend default)
    mesh: Optional[Any] = None  # the runner's mesh (per-shard attention and experts)

    @nn.compact
    def __call__(self, x, positions, kv_cache, metadata):
        cfg = self.config
        norm = dict(eps=cfg.rms_norm_eps, weight_offset=cfg.norm_weight_offset, dtype=self.dtype,
                    param_dtype=self.param_dtype)
        h = RMSNorm(name="input_layernorm", **norm)(x)
        h, new_cache = Attention(cfg, self.layer, self.dtype, self.param_dtype, self.attention_impl,
                                 self.init_std, quant=self.quant, mesh=self.mesh,
                                 name="self_attn")(h, positions, kv_cache, metadata)
        x = x + h
        h = RMSNorm(name="post_attention_layernorm", **norm)(x)
        if cfg.is_moe_layer(self.layer):
            mlp = MoE(cfg, self.dtype, self.param_dtype, self.init_std, self.grouped_matmul_impl, self.mesh,
                      name="mlp")
        else:
            mlp = GatedMLP(cfg, self.dtype, self.param_dtype, self.init_std, quant=self.quant, mesh=self.mesh,
                           name="mlp")
        return x + mlp(h), new_cache


class Transformer(nn.Module):
    """Token ids in, logits (and the updated KV pages) out.

    Attributes:
      config: the model shape.
      dtype: activation dtype (float32 or bfloat16); norms, softmax and logits run in float32.
      param_dtype: dtype the parameters are created in by `init`.
      attention_impl: forwarded to the attention op (None = its default for the backend).
      init_std: std of the normal init of linear/embedding weights (init only).
      quant: create int4 linear parameters in this format (init only: at apply time
        each Linear follows the parameters it is given, float or int4). MoE experts
        stay float.
      grouped_matmul_impl: forwarded to the MoE layers' grouped matmul op.
      mesh: the runner's jax.sharding.Mesh when it has more than one device: attention
        and the MoE experts then run per shard (shard_map, partition specs from the
        logical-axis rules); everything else is partitioned by XLA from the parameters'
        shardings. The model still names logical axes only.
    """

    config: ModelConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    init_std: float = 0.02
    quant: Optional[Int4Format] = None
    grouped_matmul_impl: Optional[str] = None
    mesh: Optional[Any] = None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, kv_caches, metadata: AttentionMetadata,
                 logits_indices: Optional[jax.Array] = None):
        """Runs the model over a flat token batch.

        Args:
          tokens: [T] int32 token ids.
          positions: [T] int32 position of each token in its sequence.
          kv_caches: per layer a (k_pages, v_pages) pair of [P, L, K, H], or None for a
            dense batch (see AttentionMetadata.dense).
          metadata: AttentionMetadata of this batch.
          logits_indices: optional [S] int32 rows of the batch to compute logits for
            (e.g. the last token of each sequence); None = every token.
        Returns:
          (logits [T or S, V] float32, new kv_caches or None).
        """
        cfg = self.config
        embedding = embedding_param(self, cfg)  # [V, D]
        x = embed(cfg, embedding, tokens, self.dtype)  # [T, D]

        new_caches = []
        for i in range(cfg.num_layers):
            cache = None if kv_caches is None else kv_caches[i]
            x, cache = DecoderLayer(cfg, i, self.dtype, self.param_dtype, self.attention_impl,
                                    self.init_std, quant=self.quant, grouped_matmul_impl=self.grouped_matmul_impl,
                                    mesh=self.mesh, name=f"layers_{i}")(x, positions, cache, metadata)
            new_caches.append(cache)

        logits = final_logits(self, cfg, x, embedding, logits_indices)
        return logits, (None if kv_caches is None else tuple(new_caches))


def embedding_param(module: nn.Module, config: ModelConfig) -> jax.Array:
    """The "embed_tokens" [V, D] parameter of `module` (Transformer or a pipeline stage).

    Call it inside the module's compact `__call__`; it reads the module's `init_std`
    and `param_dtype`.
    """
    return module.param("embed_tokens", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=module.init_std), ("vocab", "embed")),
        (config.vocab_size, config.hidden_size), module.param_dtype)


def final_logits(module: nn.Module, config: ModelConfig, x: jax.Array, embedding: Optional[jax.Array],
                 logits_indices: Optional[jax.Array]) -> jax.Array:
    """Final norm, then the LM head (the embedding when tied): [T or S, V] float32.

    Call it inside the compact `__call__` of `module` (Transformer or the last pipeline
    stage): the "norm" and "lm_head" submodules it creates become the caller's, with
    the caller's dtype, param_dtype, init_std, quant and mesh.

    Args:
      module: the calling module.
      config: the model shape.
      x: [T, D] residual stream after the last decoder layer.
      embedding: [V, D] the embedding table (read when the embeddings are tied).
      logits_indices: optional [S] rows to compute logits for; None = every token.
    """
    x = RMSNorm(config.rms_norm_eps, config.norm_weight_offset, module.dtype, module.param_dtype, name="norm")(x)
    if logits_indices is not None:
        x = x[logits_indices]  # [S, D]
    if config.tie_word_embeddings:
        logits = jnp.dot(x, embedding.astype(module.dtype).T, preferred_element_type=jnp.float32)
    else:
        head_quant = module.quant if module.quant is not None and module.quant.quantize_lm_head else None
        logits = Linear(config.vocab_size, use_bias=False, axes=("embed", "vocab"), dtype=module.dtype,
                        param_dtype=module.param_dtype, init_std=module.init_std, quant=head_quant,
                        mesh=module.mesh, name="lm_head")(x)
    return logits.astype(jnp.float32)


def embed(config: ModelConfig, embedding: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """The residual stream's input: embedding rows [T, D] of tokens [T] in `dtype`."""
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)  # [T, D]
    if config.scale_embeddings:
        # Gemma rounds the normalizer to the activation dtype before multiplying.
        x = x * jnp.asarray(config.hidden_size ** 0.5, dtype=dtype)
    return x


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32, init_std: float = 0.02,
                quant: Optional[Int4Format] = None):
    """Random parameters (a plain nested dict of arrays) for `config`.

    With `quant`, the linear layers get int4 parameters (zero codes, unit scales): the
    shapes and dtypes a quantized checkpoint restores into.
    """
    model = Transformer(config, dtype=dtype, param_dtype=dtype, init_std=init_std, quant=quant)
    tokens = jnp.zeros((2,), jnp.int32)
    variables = model.init(rng, tokens, jnp.arange(2, dtype=jnp.int32), None, AttentionMetadata.dense(1, 2))
    return nn.meta.unbox(variables["params"])


def param_shapes(config: ModelConfig, dtype=jnp.float32, quant: Optional[Int4Format] = None):
    """Shapes/dtypes of the parameters (jax.ShapeDtypeStruct leaves); allocates nothing."""
    return jax.eval_shape(lambda rng: init_params(config, rng, dtype, quant=quant), jax.random.key(0))


def logical_axes(config: ModelConfig, quant: Optional[Int4Format] = None):
    """The logical axis names of every parameter, as a tree matching the parameters."""
    model = Transformer(config, quant=quant)
    variables = jax.eval_shape(lambda rng: model.init(
        rng, jnp.zeros((2,), jnp.int32), jnp.arange(2, dtype=jnp.int32), None, AttentionMetadata.dense(1, 2)),
        jax.random.key(0))
    return nn.get_partition_spec(variables)["params"]
