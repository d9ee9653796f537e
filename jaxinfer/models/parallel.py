"""What a model needs to run over a tensor / expert / pipeline parallel mesh: the size
checks, the padded vocabulary, the replicated KV heads, and the parameter expansion for
both (the pipeline's split of layers into stages is jaxinfer.models.pipeline).

Path: session -> **check_parallel_sizes** (before any weight is read) -> checkpoint
(lazy or loaded) -> **expand_params** -> sharding.placement.place -> runner, which
runs `Transformer(mesh_model_config(config, tp), mesh=...)`.

Three rules, vLLM's (and Megatron's) where they exist:
- Every split dim must divide: query heads, each dense layer's MLP width, each expert's
  ffn width over the tensor size; experts over the expert size; layers over the
  pipeline size. Otherwise a ValueError naming the EngineConfig field and the numbers.
- KV heads (K) and tensor size (tp): tp <= K needs K % tp == 0 and each device holds
  K / tp heads. tp > K needs tp % K == 0: each KV head is repeated r = tp / K times
  (the columns of k_proj / v_proj, biases, int4 codes, scales and zeros), so the model
  runs with K' = tp heads, one per device, and KV pages hold one head per device. The
  memory cost (r copies of every KV head on the mesh) is what vLLM pays too, and it
  shows in `kv_cache_bytes_per_device`. Query head n attends KV head n // (N / K'),
  which is a copy of n // (N / K): the grouping is unchanged because tp divides N.
- Vocabulary (V): when tp does not divide V (32001-token fine-tunes), the embedding
  rows and the untied LM head's columns are zero-padded to V' = the next multiple of
  lcm(64, tp) (vLLM pads to multiples of 64). The runner slices logits back to [:, :V]
  before penalties, sampling and log-probs, so a padded id is never sampled or counted.

Dimension codes: N query heads, K KV heads, K' heads the mesh model runs with, H head
dim, D model dim, V vocab, V' padded vocab.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.sharding import placement

VOCAB_PADDING = 64  # vLLM's default vocabulary padding multiple


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """V': V when tp divides it, else the next multiple of lcm(64, tp)."""
    if vocab_size % tp == 0:
        return vocab_size
    step = math.lcm(VOCAB_PADDING, tp)
    return -(-vocab_size // step) * step


def kv_heads_for_tp(num_kv_heads: int, tp: int) -> int:
    """K': K, or tp when tp > K (each KV head repeated tp / K times)."""
    return max(num_kv_heads, tp)


def check_parallel_sizes(config: ModelConfig, tensor_parallel_size: int = 1, expert_parallel_size: int = 1,
                         pipeline_parallel_size: int = 1, int4_group_size: Optional[int] = None) -> None:
    """Raises a ValueError naming the field and the numbers for a layout the model cannot take.

    Args:
      config: the model (as in the checkpoint: real V and K).
      tensor_parallel_size, expert_parallel_size, pipeline_parallel_size: EngineConfig's sizes.
      int4_group_size: g of int4 weights, if any: row-parallel layers (o_proj, down_proj)
        split their group scales over the tensor axis, so tp must divide in / g.
    """
    tp, ep, pp = tensor_parallel_size, expert_parallel_size, pipeline_parallel_size
    errors = []
    if config.num_heads % tp:
        errors.append(f"tensor_parallel_size: {tp} does not divide num_heads {config.num_heads}")
    k = config.num_kv_heads
    if tp <= k and k % tp:
        errors.append(f"tensor_parallel_size: {tp} does not divide num_kv_heads {k}")
    if tp > k and tp % k:
        errors.append(f"tensor_parallel_size: {tp} is more than num_kv_heads {k} but not a multiple of it "
                      f"(KV heads are replicated tp / K times)")
    dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
    if dense and config.intermediate_size % tp:
        errors.append(f"tensor_parallel_size: {tp} does not divide intermediate_size {config.intermediate_size}")
    if config.num_experts:
        if config.moe_intermediate_size % tp:
            errors.append(f"tensor_parallel_size: {tp} does not divide moe_intermediate_size "
                          f"{config.moe_intermediate_size}")
        if config.num_experts % ep:
            errors.append(f"expert_parallel_size: {ep} does not divide num_experts {config.num_experts}")
    elif ep > 1:
        errors.append(f"expert_parallel_size: {ep} needs a mixture-of-experts model; this {config.family} "
                      f"model has no experts")
    if pp > 1 and config.num_layers % pp:  # layer i lives on stage i // (L / pp): stages hold equal layers
        errors.append(f"pipeline_parallel_size: {pp} does not divide num_layers {config.num_layers}")
    if int4_group_size and tp > 1:
        for name, width in (("hidden of o_proj", config.num_heads * config.head_dim),
                            ("intermediate_size of down_proj", config.intermediate_size if dense else 0)):
            if width and (width // int4_group_size) % tp:
                errors.append(f"tensor_parallel_size: {tp} does not divide the {width // int4_group_size} int4 "
                              f"groups of {int4_group_size} rows of {name} ({width})")
    if errors:
        raise ValueError("; ".join(errors))


def mesh_model_config(config: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config the sharded model runs with: padded V', replicated K' heads."""
    tp = tensor_parallel_size
    return dataclasses.replace(config, vocab_size=padded_vocab_size(config.vocab_size, tp),
                               num_kv_heads=kv_heads_for_tp(config.num_kv_heads, tp))


def _vocab_map(vocab_size: int, padded: int) -> np.ndarray:
    return np.concatenate([np.arange(vocab_size), np.full(padded - vocab_size, -1)]).astype(np.int64)


def _head_map(num_kv_heads: int, expanded: int, head_dim: int) -> np.ndarray:
    """Columns of a [.., K * H] projection -> [.., K' * H]: head j' is a copy of head j' // r."""
    repeat = expanded // num_kv_heads
    heads = np.arange(expanded) // repeat  # source head of each expanded head
    return (heads[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1).astype(np.int64)


def expand_params(config: ModelConfig, params: dict, tensor_parallel_size: int) -> dict:
    """`params` of `config` as the parameters of `mesh_model_config(config, tp)`.

    Leaves may be arrays or lazy sharding.placement sources (nothing is read then); a
    tree that needs no change comes back as it is. Int4 layers keep their output
    columns unpacked (codes pack input rows), so the same column map serves `packed`,
    `scales`, `zeros` and `bias` (`perm`, over input rows, is left alone).
    """
    target = mesh_model_config(config, tensor_parallel_size)
    if target == config:
        return params
    out = dict(params)
    if target.vocab_size != config.vocab_size:
        vocab = _vocab_map(config.vocab_size, target.vocab_size)
        out["embed_tokens"] = placement.remap(params["embed_tokens"], 0, vocab)  # [V', D]
        if "lm_head" in params:  # [D, V'] (int4: every leaf has V as its last dim)
            out["lm_head"] = {name: (leaf if name == "perm" else placement.remap(leaf, leaf_ndim(leaf) - 1, vocab))
                              for name, leaf in params["lm_head"].items()}
    if target.num_kv_heads != config.num_kv_heads:
        heads = _head_map(config.num_kv_heads, target.num_kv_heads, config.head_dim)
        for i in range(config.num_layers):
            layer = dict(out[f"layers_{i}"])
            attn = dict(layer["self_attn"])
            for proj in ("k_proj", "v_proj"):
                attn[proj] = {name: (leaf if name == "perm" else placement.remap(leaf, leaf_ndim(leaf) - 1, heads))
                              for name, leaf in attn[proj].items()}
            layer["self_attn"] = attn
            out[f"layers_{i}"] = layer
    return out


def leaf_ndim(leaf) -> int:
    return len(leaf.shape)
