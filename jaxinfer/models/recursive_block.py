"""The relaxed recursive block run once over rows at mixed loop depths (depth-wise batching).

Path: runner (runtime/depthwise_runner.py) -> **block_forward** -> attention op and the
grouped LoRA op (jaxinfer.pallas) -> runner. Relaxed Recursive Transformers (Bae et al.
2024, arXiv 2410.20672, §3.3 "continuous depth-wise batching"): every loop runs the same
shared layers, so tokens at different loop depths go through one call of the block; row t
at loop l computes each projection with W_shared + B_l A_l (the grouped LoRA op, rows
sorted by loop) and its loop's own norm vectors, and reads / writes the K/V of the
effective layer l * B + j.

KV layout: one cache per block layer j, of num_loops * P pages; loop l of a sequence uses
pages page_id + l * P (the runner offsets the page tables), so the ragged paged attention
op runs unchanged: a row's page table simply points into its loop's range.

Parameters ("bp", from `device_params`): "outer" (embed_tokens, norm, lm_head as in the
Transformer), "block"[j] (the shared flat tree of layer j: kernels, and vectors when the
norms are shared), "lora"[j][target] = (A [G, r, in], B [G, out, r]) stacked over the G
loops, "vecs"[j][key] = [G, dim] the per-loop vectors (norms "per_loop").

Dimension codes: T rows (tokens), D model dim, G loops, N / K query / kv heads, H head dim.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models import recursive
from jaxinfer.models.layers import activation, apply_rope, rope_inv_freq
from jaxinfer.models.transformer import embed
from jaxinfer.pallas.attention import AttentionMetadata, attention
from jaxinfer.pallas.grouped_lora import grouped_lora_matmul

__all__ = ["BlockRows", "FillRows", "block_forward", "check_supported", "copy_fill", "device_params", "exit_logits"]


class BlockRows(NamedTuple):
    """Per-row depth layout of one step (arrays; built on the host by the runner)."""

    loop: np.ndarray  # [T] int32 loop of each row in the batch layout (padding rows: 0)
    perm: np.ndarray  # [T] int32 batch row of each loop-sorted row (padding rows last)
    inv_perm: np.ndarray  # [T] int32 loop-sorted position of each batch row
    group_sizes: np.ndarray  # [G] int32 real rows per loop (sorted order)
    carry_index: np.ndarray  # [T] int32 row of the previous step's hidden states, -1 = embed the token


class FillRows(NamedTuple):
    """K/V to write for early-exited tokens' skipped loops ("copy" fill), one row per
    (token, skipped loop), sorted by loop (arrays built on the host by the runner)."""

    src: np.ndarray  # [F] int32 row (batch layout) whose hidden state after this pass is copied
    loop: np.ndarray  # [F] int32 the skipped loop the row writes
    group_sizes: np.ndarray  # [G] int32 real rows per loop
    positions: np.ndarray  # [F] int32 the token's position
    slots: np.ndarray  # [F] int32 physical KV slot in that loop's pages (padding: out of range)
    sample_row: np.ndarray  # [F] int32 the token's sample row: it writes only if that row exits


def check_supported(config: ModelConfig, spec: recursive.RecursiveSpec) -> None:
    """Raises ValueError when the block cannot run its loops in one call."""
    windows = {tuple(config.sliding_window(loop * spec.num_blocks + j) for j in range(spec.num_blocks))
               for loop in range(spec.num_loops)}
    if len(windows) > 1:
        raise ValueError(f"depthwise_batching: the model's sliding windows differ between loops ({sorted(windows)}); "
                         f"one call of the shared block needs the same window in every loop")


def device_params(rp: Mapping, spec: recursive.RecursiveSpec, dtype) -> dict:
    """bp (see the module docstring) as jax arrays in `dtype`."""
    def cast(x):
        return jnp.asarray(np.asarray(x, np.float32)).astype(dtype)

    bp = {"outer": jax.tree.map(cast, rp["outer"]), "block": [], "lora": [], "vecs": []}
    for j in range(spec.num_blocks):
        bp["block"].append({k: cast(v) for k, v in rp["block"][j].items()})
        lora = {}
        for target in rp["lora"][0][j]:
            lora[target] = (cast(np.stack([np.asarray(rp["lora"][l][j][target]["A"]) for l in range(spec.num_loops)])),
                            cast(np.stack([np.asarray(rp["lora"][l][j][target]["B"]) for l in range(spec.num_loops)])))
        bp["lora"].append(lora)
        bp["vecs"].append({k: cast(np.stack([np.asarray(rp["per_loop"][l][j][k]) for l in range(spec.num_loops)]))
                           for k in rp["per_loop"][0][j]})
    return bp


def _vector(bp, j: int, key: str, loop_rows) -> Optional[jax.Array]:
    """Layer j's vector `key` per row ([T, dim], from each row's loop), or shared ([dim]), or None."""
    if key in bp["vecs"][j]:
        return jnp.take(bp["vecs"][j][key], loop_rows, axis=0)
    return bp["block"][j].get(key)


def _rms(x, scale, eps: float, offset: float, dtype):
    """RMSNorm as jaxinfer.models.layers.RMSNorm, with a [T, D] or [D] scale."""
    x32 = x.astype(jnp.float32)
    x_hat = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return (x_hat * (offset + scale.astype(jnp.float32))).astype(dtype)
    return scale.astype(dtype) * x_hat.astype(dtype)


def block_forward(config: ModelConfig, spec: recursive.RecursiveSpec, bp, tokens, carry, rows: BlockRows,
                  positions, kv_caches, metadata: AttentionMetadata, *, dtype, attention_impl=None,
                  lora_impl=None):
    """One pass of the shared block over a ragged batch whose rows sit at mixed loops.

    Args:
      tokens: [T] int32 ids (read by rows with carry_index -1: they start loop 0).
      carry: [C, D] the previous step's output hidden states (rows at loop > 0 read theirs).
      rows: BlockRows of the step.
      positions, metadata: as for the Transformer (page tables already offset per loop).
      kv_caches: per block layer (k_pages, v_pages) of [G * P, L, K, H].
    Returns:
      (hidden [T, D] after this pass, in the batch layout; the new kv_caches).
    """
    cfg = config
    x = embed(cfg, bp["outer"]["embed_tokens"], tokens, dtype)
    x = jnp.where((rows.carry_index >= 0)[:, None], jnp.take(carry, jnp.maximum(rows.carry_index, 0), axis=0)
                  .astype(dtype), x)
    x = jnp.take(x, rows.perm, axis=0)  # [T, D] loop-sorted from here on
    loop_rows = jnp.take(rows.loop, rows.perm)  # [T] loop of each sorted row
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    eps, offset = cfg.rms_norm_eps, cfg.norm_weight_offset
    num_tokens = x.shape[0]

    def proj(j, h, name):
        y = grouped_lora_matmul(h, bp["block"][j][name + ".kernel"].astype(dtype), *bp["lora"][j][name],
                                rows.group_sizes, impl=lora_impl) if name in bp["lora"][j] else \
            jnp.dot(h, bp["block"][j][name + ".kernel"].astype(dtype), preferred_element_type=jnp.float32)
        bias = _vector(bp, j, name + ".bias", loop_rows)
        if bias is not None:
            y = y.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(dtype)

    unsort = lambda a: jnp.take(a, rows.inv_perm, axis=0)  # noqa: E731 - sorted rows -> batch layout
    new_caches = []
    for j in range(spec.num_blocks):
        h = _rms(x, _vector(bp, j, "input_layernorm.scale", loop_rows), eps, offset, dtype)
        q = proj(j, h, "self_attn.q_proj").reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = proj(j, h, "self_attn.k_proj").reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = proj(j, h, "self_attn.v_proj").reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = _rms(q, _vector(bp, j, "self_attn.q_norm.scale", loop_rows)[:, None]
                     if "self_attn.q_norm.scale" in bp["vecs"][j] else bp["block"][j]["self_attn.q_norm.scale"],
                     eps, 0.0, dtype)
            k = _rms(k, _vector(bp, j, "self_attn.k_norm.scale", loop_rows)[:, None]
                     if "self_attn.k_norm.scale" in bp["vecs"][j] else bp["block"][j]["self_attn.k_norm.scale"],
                     eps, 0.0, dtype)
        q, k, v = unsort(q), unsort(k), unsort(v)  # attention runs in the batch layout
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out, cache = attention(q, k, v, positions, kv_caches[j], metadata, sm_scale=cfg.head_dim ** -0.5,
                               sliding_window=cfg.sliding_window(j), impl=attention_impl)
        new_caches.append(cache)
        out = jnp.take(out.reshape(num_tokens, cfg.num_heads * cfg.head_dim), rows.perm, axis=0)
        x = x + proj(j, out, "self_attn.o_proj")
        h = _rms(x, _vector(bp, j, "post_attention_layernorm.scale", loop_rows), eps, offset, dtype)
        hidden = activation(cfg.hidden_act, proj(j, h, "mlp.gate_proj")) * proj(j, h, "mlp.up_proj")
        x = x + proj(j, hidden, "mlp.down_proj")
    return unsort(x), tuple(new_caches)


def copy_fill(config: ModelConfig, spec: recursive.RecursiveSpec, bp, hidden, fill: FillRows, exited,
              kv_caches, *, dtype, lora_impl=None):
    """Writes, for each fill row whose token exited, the K/V of its skipped loop computed
    from the token's exit hidden state (CALM's state propagation, Schuster et al. 2022):
    for every block layer j, k / v = proj_{loop, j}(RMSNorm_{loop, j}(h_exit)), RoPE on k.

    Args:
      hidden: [T, D] this pass's output (batch layout); exited: [S] bool per sample row.
    Returns:
      the new kv_caches.
    """
    from jaxinfer.pallas import ragged_paged_attention as rpa

    cfg = config
    h = jnp.take(hidden, fill.src, axis=0)  # [F, D]
    pages = getattr(kv_caches[0][0], "values", kv_caches[0][0])  # [P, L, ...] (quantized: its values)
    num_slots = pages.shape[0] * pages.shape[1]
    slots = jnp.where(jnp.take(exited, fill.sample_row), fill.slots, num_slots)  # not exited: dropped
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    out = []
    for j in range(spec.num_blocks):
        hn = _rms(h, _vector(bp, j, "input_layernorm.scale", fill.loop), cfg.rms_norm_eps, cfg.norm_weight_offset,
                  dtype)
        kv = []
        for name in ("self_attn.k_proj", "self_attn.v_proj"):
            w = bp["block"][j][name + ".kernel"].astype(dtype)
            y = grouped_lora_matmul(hn, w, *bp["lora"][j][name], fill.group_sizes, impl=lora_impl) \
                if name in bp["lora"][j] else jnp.dot(hn, w, preferred_element_type=jnp.float32)
            bias = _vector(bp, j, name + ".bias", fill.loop)
            if bias is not None:
                y = y.astype(jnp.float32) + bias.astype(jnp.float32)
            kv.append(y.astype(dtype).reshape(h.shape[0], cfg.num_kv_heads, cfg.head_dim))
        k, v = kv
        if cfg.qk_norm:
            k = _rms(k, _vector(bp, j, "self_attn.k_norm.scale", fill.loop)[:, None]
                     if "self_attn.k_norm.scale" in bp["vecs"][j] else bp["block"][j]["self_attn.k_norm.scale"],
                     cfg.rms_norm_eps, 0.0, dtype)
        k = apply_rope(k, fill.positions, inv_freq)
        out.append(rpa.write_kv(kv_caches[j][0], kv_caches[j][1], k, v, slots))
    return tuple(out)


def exit_logits(config: ModelConfig, bp, hidden, rows_index, dtype) -> jax.Array:
    """Final norm + LM head of hidden[rows_index]: [S, V] float32 (the Transformer's head)."""
    outer = bp["outer"]
    x = _rms(jnp.take(hidden, rows_index, axis=0), outer["norm"]["scale"], config.rms_norm_eps,
             config.norm_weight_offset, dtype)
    head = outer["embed_tokens"].T if config.tie_word_embeddings else outer["lm_head"]["kernel"]
    return jnp.dot(x, head.astype(dtype), preferred_element_type=jnp.float32)
