"""The sparse mixture-of-experts MLP of Mixtral and Qwen3-MoE: routing and expert compute.

Path: runner -> model (DecoderLayer) -> **MoE** -> grouped_matmul op (jaxinfer.pallas)
-> model.

Dimension codes: T tokens, D model dim, E experts, k experts per token (top-k), F each
expert's ffn dim, C = T * k token copies.

Dropless routing (MegaBlocks, Gale et al. 2023): each token is copied once per chosen
expert, the C copies are sorted by expert (a stable argsort, so copies of one expert
keep token order), and each of gate / up / down is one grouped matmul over the sorted
copies with the expert's weights; the results are put back in token order with the
inverse permutation (a gather), weighted by the routing probabilities and summed over
the k copies. Every copy is computed, however unevenly the experts are loaded: no
capacity factor, no token dropped, no dense loop over all experts.

Router (transformers' MixtralTopKRouter / Qwen3MoeTopKRouter): logits = x @ W_router,
softmax over all E experts in float32, the top-k probabilities, renormalised to sum to
1 when `norm_topk_prob` (always for Mixtral). Exact ties between probabilities go to
the lower expert index (jax.lax.top_k); torch.topk promises no order for them.

NOTE (padding): the engine pads the token batch to a bucket; padding tokens are routed
like any other and add rows to their experts' groups. Routing is per token and nothing
is dropped, so padding never changes a real token's experts or weights; and each row of
a grouped matmul depends only on its own input row, so padding only moves the sorted
position a real copy lands at: its value changes at most by float rounding (a matmul
with more rows may block its sums differently; measured ~1e-7 of the output scale on
CPU). Tested.
With a capacity factor, padding could have evicted real tokens.

Expert weights are stacked [E, ...] arrays (the checkpoint loader stacks HF's
per-expert tensors) with logical axes ("expert", "embed", "expert_mlp"), so an
expert-parallel mesh can split them over experts (jaxinfer.sharding.rules). They stay
float when a model is quantized to int4 (only Linear layers are).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import activation
from jaxinfer.pallas.grouped_matmul import grouped_matmul


def route(router_logits: jax.Array, num_experts_per_tok: int, norm_topk_prob: bool):
    """Top-k routing: (weights [T, k] float32, expert ids [T, k] int32) from logits [T, E]."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [T, E]
    weights, experts = jax.lax.top_k(probs, num_experts_per_tok)  # [T, k]
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int):
    """Orders the T * k token copies by expert.

    Args:
      experts: [T, k] int32 expert of each copy.
      num_experts: E.
    Returns:
      (order [C] int32: copy index at each sorted position (copy c is token c // k),
       inverse [C] int32: sorted position of each copy,
       group_sizes [E] int32: copies per expert).
    """
    flat = experts.reshape(-1)  # [C]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [C]
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))  # [C]
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1)  # [E]
    return order, inverse, group_sizes


class MoE(nn.Module):
    """Sparse MoE MLP: sum_k p_k * down_e(act(gate_e(x)) * up_e(x)) over the top-k experts e."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float = 0.02
    matmul_impl: Optional[str] = None  # grouped_matmul impl; None = the backend's default

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        num_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
        hidden, ffn = cfg.hidden_size, cfg.moe_intermediate_size
        init = nn.initializers.normal(stddev=self.init_std)

        def weight(name, axes, shape):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        router = weight("router", ("embed", "router_expert"), (hidden, num_experts))  # [D, E]
        gate_w = weight("gate_proj", ("expert", "embed", "expert_mlp"), (num_experts, hidden, ffn))  # [E, D, F]
        up_w = weight("up_proj", ("expert", "embed", "expert_mlp"), (num_experts, hidden, ffn))  # [E, D, F]
        down_w = weight("down_proj", ("expert", "expert_mlp", "embed"), (num_experts, ffn, hidden))  # [E, F, D]

        x = x.astype(self.dtype)
        num_tokens = x.shape[0]
        logits = jnp.dot(x, router.astype(self.dtype), preferred_element_type=jnp.float32)  # [T, E]
        weights, experts = route(logits, top_k, cfg.norm_topk_prob)  # [T, k] each
        order, inverse, group_sizes = sort_by_expert(experts, num_experts)
        copies = jnp.take(x, order // top_k, axis=0)  # [C, D] sorted by expert

        def matmul(lhs, w):
            return grouped_matmul(lhs, w.astype(self.dtype), group_sizes, impl=self.matmul_impl)

        h = activation(cfg.hidden_act, matmul(copies, gate_w)) * matmul(copies, up_w)  # [C, F]
        out = matmul(h, down_w)  # [C, D] sorted by expert
        out = jnp.take(out, inverse, axis=0).reshape(num_tokens, top_k, hidden)  # [T, k, D] token order
        out = jnp.sum(out.astype(jnp.float32) * weights[:, :, None], axis=1)  # [T, D]
        return out.astype(self.dtype)
