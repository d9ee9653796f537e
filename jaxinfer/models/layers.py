"""Building blocks shared by every family: linear, RMSNorm, RoPE, gated MLP, embedding.

Dimension codes: T tokens, D model dim, F ffn dim, N query heads, K kv heads, H head
dim, V vocab. Parameters live in `param_dtype`; matmuls accumulate in float32
(`preferred_element_type`) and return `dtype` activations, like HF's bf16 kernels.
Each weight carries logical axis names for jaxinfer.sharding.rules. A Linear may hold
its weight as group-wise int4 instead (see Int4Format and jaxinfer.pallas.int4_matmul).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxinfer.config import ModelConfig, RopeScaling
from jaxinfer.pallas.int4_matmul import int4_matmul
from jaxinfer.sharding import rules
from jaxinfer.sharding.mesh import shard_map


def _init(std: float):
    return nn.initializers.normal(stddev=std)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int4Format:
    """How quantized Linear layers store their weights (jaxinfer.quant writes this format).

    A quantized Linear holds, instead of `kernel` [K, N] (K = in, N = out features):
      packed: uint8 [K/2, N], two 4-bit codes per byte in the group-halves layout of
        jaxinfer.pallas.int4_matmul (low nibbles: first half of each group's rows).
      scales: float32 [K/g, N], one per group of g input rows and output column.
      zeros: float32 [K/g, N] zero points in code units (asymmetric only; symmetric
        weights use the fixed zero point 8): w = (q - zero) * scale.
      perm: int32 [K] (act_order only): stored row i is input feature perm[i], so the
        layer computes x[:, perm] @ W_stored (GPTQ's activation order, regrouped).
    """

    group_size: int = 128  # g: input rows per scale; must divide every quantized layer's K
    symmetric: bool = True  # zero point fixed at 8 (no `zeros`); else per-group zero points
    act_order: bool = False  # rows stored permuted, with a `perm` parameter
    quantize_lm_head: bool = False  # also the (untied) LM head; embeddings always stay float

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size: must be an even int >= 2, got {self.group_size!r}")


def _arange_init(key, shape, dtype):
    del key
    return jnp.arange(shape[0], dtype=dtype)


class Linear(nn.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (HF stores [out, in]: transposed on load).

    The weight is either a float `kernel` or int4 (`packed`, `scales`, optional `zeros`
    and `perm`, see Int4Format). NOTE: at apply time the parameters decide which: a
    quantized parameter tree runs through the int4 op whatever `quant` says, so code that
    builds a Transformer for float weights (the runner, scoring scripts) runs quantized
    weights unchanged. `quant` only shapes the parameters that `init` creates.

    Each call sows its input into the "intermediates" collection (a no-op unless the
    caller makes that collection mutable): GPTQ calibration reads them.

    On a mesh (`mesh` set), the int4 op runs per shard (shard_map; a Pallas kernel
    cannot be partitioned by XLA): a column-parallel layer (out dim split) needs no
    collective, a row-parallel one (in dim split, with its group scales) psums its
    partial products. Float kernels are left to XLA's partitioner.
    """

    features: int
    use_bias: bool
    axes: Sequence[Optional[str]]  # logical names of the kernel's (in, out) dims
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = 0.02
    quant: Optional[Int4Format] = None  # init: create int4 parameters in this format
    mesh: Optional[Any] = None  # the runner's jax.sharding.Mesh (int4 runs per shard), or None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self.sow("intermediates", "inputs", x)
        if self.quant is not None or self.has_variable("params", "packed"):
            y = self._int4_matmul(x)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(_init(self.init_std), tuple(self.axes)),
                                (x.shape[-1], self.features), self.param_dtype)
            y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)

    def _int4_matmul(self, x: jax.Array) -> jax.Array:
        num_in, axes = x.shape[-1], tuple(self.axes)
        if self.has_variable("params", "packed"):  # apply: the stored parameters define the format
            group_size = num_in // self.get_variable("params", "scales").shape[0]
            symmetric = not self.has_variable("params", "zeros")
            act_order = self.has_variable("params", "perm")
        else:
            group_size, symmetric, act_order = self.quant.group_size, self.quant.symmetric, self.quant.act_order
            if num_in % group_size:
                raise ValueError(f"group_size: {group_size} does not divide the {num_in} input features of "
                                 f"layer {'/'.join(self.path)}")
        group_shape = (num_in // group_size, self.features)
        packed = self.param("packed", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                            (num_in // 2, self.features), jnp.uint8)
        scales = self.param("scales", nn.with_logical_partitioning(nn.initializers.ones, axes), group_shape,
                            jnp.float32)
        zeros = None if symmetric else self.param(
            "zeros", nn.with_logical_partitioning(nn.initializers.zeros, axes), group_shape, jnp.float32)
        if act_order:
            perm = self.param("perm", nn.with_logical_partitioning(_arange_init, (None,)), (num_in,), jnp.int32)
            x = jnp.take(x, perm, axis=-1)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, num_in).astype(self.dtype)  # [T, K]
        matmul = functools.partial(int4_matmul, group_size=group_size, out_dtype=jnp.float32)
        if self.mesh is None or self.mesh.size == 1:
            y = matmul(x2, packed, scales, zeros)  # [T, N]
        else:
            y = _per_shard_int4(matmul, self.mesh, axes, x2, packed, scales, zeros)
        return y.reshape(*lead, self.features)


def _per_shard_int4(matmul, mesh, axes, x, packed, scales, zeros):
    """int4 `matmul` of x [T, K] per shard of the weights' split (see Linear)."""
    in_axis, out_axis = rules.named_sharding(mesh, axes).spec  # mesh axis (or None) of K and of N
    weight = P(in_axis, out_axis)
    groups = (packed, scales) + (() if zeros is None else (zeros,))

    def local(x, packed, scales, *rest):
        y = matmul(x, packed, scales, rest[0] if rest else None)
        return y if in_axis is None else jax.lax.psum(y, in_axis)

    run = shard_map(local, mesh, in_specs=(P(None, in_axis),) + (weight,) * len(groups),
                    out_specs=P(None, out_axis))
    return run(x, *groups)


class RMSNorm(nn.Module):
    """RMSNorm in float32. Llama: w * cast(x_hat); Gemma (offset 1): cast(x_hat * (1 + w))."""

    eps: float
    weight_offset: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.weight_offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        x_hat = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.weight_offset:
            return (x_hat * (self.weight_offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale.astype(self.dtype) * x_hat.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[RopeScaling]) -> jax.Array:
    """Inverse frequencies [H/2] (float32), with `linear` or `llama3` scaling applied."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3 (Llama 3.1 report): long wavelengths are divided by `factor`, short ones
    # kept, and the band between is interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates x [T, heads, H] by its positions [T] (HF's rotate-half layout)."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, H]
    cos = jnp.cos(emb).astype(x.dtype)[:, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.gelu(x, approximate=False)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU for Llama/Mistral/Qwen2, GeGLU for Gemma."""

    config: ModelConfig
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    init_std: float = 0.02
    quant: Optional[Int4Format] = None  # init: int4 projections (see Linear)
    mesh: Optional[Any] = None  # the runner's mesh (int4 per shard), or None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = dict(use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                     init_std=self.init_std, quant=self.quant, mesh=self.mesh)
        gate = Linear(cfg.intermediate_size, axes=("embed", "mlp"), name="gate_proj", **dense)(x)
        up = Linear(cfg.intermediate_size, axes=("embed", "mlp"), name="up_proj", **dense)(x)
        hidden = activation(cfg.hidden_act, gate) * up  # [T, F]
        return Linear(cfg.hidden_size, axes=("mlp", "embed"), name="down_proj", **dense)(hidden)
