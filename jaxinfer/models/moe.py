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

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.models.layers import activation
from jaxinfer.pallas.grouped_matmul import grouped_matmul
from jaxinfer.sharding import rules
from jaxinfer.sharding.mesh import shard_map

EXPERT_IN_AXES = ("expert", "embed", "expert_mlp")  # gate / up [E, D, F]
EXPERT_OUT_AXES = ("expert", "expert_mlp", "embed")  # down [E, F, D]


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


def expert_outputs(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_w, up_w, down_w, hidden_act: str,
                   matmul_impl: Optional[str] = None, first_expert: Optional[jax.Array] = None) -> jax.Array:
    """sum_k p_k * expert_k(x) in float32 [T, D] over the experts of `gate_w` / `up_w` / `down_w`.

    Args:
      x: [T, D] tokens; weights, experts: [T, k] routing (all E experts' ids).
      gate_w, up_w: [El, D, F]; down_w: [El, F, D]: the experts held here.
      first_expert: None when these are all E experts; else the global id of the first
        (expert parallel: El = E / ep consecutive experts per device). Copies routed
        elsewhere go to a dummy group El past the real ones, which the grouped matmul
        leaves at zero (rows past the group sizes' sum), and get weight 0: the sum over
        the expert axis (psum) adds each copy exactly once.
    """
    num_local, top_k = gate_w.shape[0], experts.shape[1]
    num_tokens, hidden = x.shape
    if first_expert is None:
        order, inverse, group_sizes = sort_by_expert(experts, num_local)
    else:
        local = experts - first_expert
        mine = (local >= 0) & (local < num_local)  # [T, k]
        order, inverse, group_sizes = sort_by_expert(jnp.where(mine, local, num_local), num_local + 1)
        group_sizes = group_sizes[:num_local]  # the dummy group is never computed
        weights = jnp.where(mine, weights, 0.0)
    copies = jnp.take(x, order // top_k, axis=0)  # [C, D] sorted by expert

    def matmul(lhs, w):
        return grouped_matmul(lhs, w.astype(x.dtype), group_sizes, impl=matmul_impl)

    h = activation(hidden_act, matmul(copies, gate_w)) * matmul(copies, up_w)  # [C, F]
    out = matmul(h, down_w)  # [C, D] sorted by expert
    out = jnp.take(out, inverse, axis=0).reshape(num_tokens, top_k, hidden)  # [T, k, D] token order
    return jnp.sum(out.astype(jnp.float32) * weights[:, :, None], axis=1)  # [T, D]


class MoE(nn.Module):
    """Sparse MoE MLP: sum_k p_k * down_e(act(gate_e(x)) * up_e(x)) over the top-k experts e.

    On a mesh (`mesh` set, more than one device), the experts run per shard: each
    device holds E / ep experts (the "expert" axis) with their ffn dim split over the
    "tensor" axis, computes the copies routed to its experts (routing is replicated:
    every device routes every token), and one psum over ("expert", "tensor") adds the
    partial [T, D] sums. See BUILD.md for why a psum rather than an all-to-all.
    """

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float = 0.02
    matmul_impl: Optional[str] = None  # grouped_matmul impl; None = the backend's default
    mesh: Optional[Any] = None  # jax.sharding.Mesh of the runner, or None (one device)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        num_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
        hidden, ffn = cfg.hidden_size, cfg.moe_intermediate_size
        init = nn.initializers.normal(stddev=self.init_std)

        def weight(name, axes, shape):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        router = weight("router", ("embed", "router_expert"), (hidden, num_experts))  # [D, E]
        gate_w = weight("gate_proj", EXPERT_IN_AXES, (num_experts, hidden, ffn))  # [E, D, F]
        up_w = weight("up_proj", EXPERT_IN_AXES, (num_experts, hidden, ffn))  # [E, D, F]
        down_w = weight("down_proj", EXPERT_OUT_AXES, (num_experts, ffn, hidden))  # [E, F, D]

        x = x.astype(self.dtype)
        logits = jnp.dot(x, router.astype(self.dtype), preferred_element_type=jnp.float32)  # [T, E]
        weights, experts = route(logits, top_k, cfg.norm_topk_prob)  # [T, k] each
        self.sow("intermediates", "experts", experts)  # router statistics (the runner counts them)
        if self.mesh is None or self.mesh.size == 1:
            out = expert_outputs(x, weights, experts, gate_w, up_w, down_w, cfg.hidden_act, self.matmul_impl)
            return out.astype(self.dtype)

        def local(x, weights, experts, gate_w, up_w, down_w):
            first = jax.lax.axis_index("expert") * gate_w.shape[0]
            out = expert_outputs(x, weights, experts, gate_w, up_w, down_w, cfg.hidden_act, self.matmul_impl,
                                 first_expert=first)
            return jax.lax.psum(out, ("expert", "tensor"))

        in_w, out_w = (rules.named_sharding(self.mesh, axes).spec for axes in (EXPERT_IN_AXES, EXPERT_OUT_AXES))
        run = shard_map(local, self.mesh, in_specs=(P(), P(), P(), in_w, in_w, out_w), out_specs=P())
        return run(x, weights, experts, gate_w, up_w, down_w).astype(self.dtype)
