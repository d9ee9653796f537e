"""Quantized KV pages: int8 or float8 (e4m3) values with one scale per token and kv head.

Path: runner (allocates the pages, jaxinfer/runtime/kv_cache.py) -> model -> attention
(`write_kv` quantizes the step's K/V as it writes them) -> row attention (the XLA
reference and both Pallas kernels read the quantized pages and fold the scales in).

Layout. A quantized cache of one layer is a `QuantizedPages` pair of arrays:
`values [P, L, K, H]` (int8 or float8_e4m3fn, the same layout as a float cache) and
`scales [P, L, K]` float32, with `x ~= values * scales[..., None]`. Every token's scale
is written with the token, in the same slot, so a page is self-contained: prefix
caching, page sharing and preemption move nothing but page ids, exactly as for a float
cache.

Scheme. Symmetric, per (token, kv head): scale = max |x| over the head dim / QMAX, then
int8 rounds x / scale to the nearest integer in [-127, 127] and float8 casts x / scale
(in [-448, 448]) to e4m3 with round-to-nearest-even. A zero vector gets scale 1 and
zeros. int8 keeps a relative error of at most 1/254 of the head's largest element per
element; e4m3 keeps 3 mantissa bits (about 6% relative error per element) but a wide
range inside the head. Bytes per token and kv head: H + 4, against 2H (bfloat16) or 4H
(float32): 1.9x the pages of a bf16 cache in the same memory at H = 128, 3.8x of a
float32 one.

How attention uses the scales: for keys, scores = (q . k_int) * k_scale (one multiply
per score instead of one per element of K); for values, the probabilities are scaled,
P @ V = (P * v_scale) @ v_int. The kernels never materialize a float copy of a page.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KV_CACHE_DTYPES", "QMAX", "QuantizedPages", "dequantize", "is_quantized", "quantize_tokens",
           "storage_dtype", "token_head_bytes"]

# EngineConfig.kv_cache_dtype values (jaxinfer/config repeats them: it does not import jax).
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}  # the largest magnitude of each storage format
_STORAGE = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def storage_dtype(kv_cache_dtype: str):
    """The values' dtype of a quantized cache ("int8" or "fp8")."""
    if kv_cache_dtype not in _STORAGE:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} is not a quantized format; choose one of "
                         f"{tuple(_STORAGE)}")
    return _STORAGE[kv_cache_dtype]


def token_head_bytes(kv_cache_dtype: str, head_dim: int, float_itemsize: int) -> int:
    """Bytes one token takes in one kv head's K (or V) pages."""
    if kv_cache_dtype == "auto":
        return head_dim * float_itemsize
    return head_dim * np.dtype(storage_dtype(kv_cache_dtype)).itemsize + 4  # + the float32 scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedPages:
    """One layer's K (or V) pages, quantized: values [P, L, K, H] and scales [P, L, K]."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    @property
    def format(self) -> str:
        return "int8" if self.values.dtype == jnp.int8 else "fp8"

    @classmethod
    def zeros(cls, shape: tuple, kv_cache_dtype: str, sharding=None) -> "QuantizedPages":
        """An empty cache of [P, L, K, H] values (zeros, scales 1); `sharding` applies to
        the values and, without its last axis, to the scales."""
        values = jnp.zeros(shape, storage_dtype(kv_cache_dtype))
        scales = jnp.ones(shape[:-1], jnp.float32)
        if sharding is not None:
            values = jax.device_put(values, sharding)
            scales = jax.device_put(scales, _drop_last_axis(sharding))
        return cls(values, scales)


def _drop_last_axis(sharding):
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return sharding
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(spec)[:3]))


def is_quantized(pages) -> bool:
    return isinstance(pages, QuantizedPages)


def quantize_tokens(x: jax.Array, values_dtype) -> tuple[jax.Array, jax.Array]:
    """[..., H] floats -> (values [..., H] of values_dtype, scales [...] float32)."""
    fmt = "int8" if values_dtype == jnp.int8 else "fp8"
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = amax / QMAX[fmt]
    # A zero (or non-finite) head: scale 1, so dequantization never divides by zero;
    # NaN / Inf inputs stay visible (NaN values, or a NaN scale) rather than vanish.
    scale = jnp.where(scale > 0, scale, jnp.where(jnp.isnan(amax), jnp.nan, 1.0))
    y = x / scale[..., None]
    if fmt == "int8":
        y = jnp.clip(jnp.round(y), -QMAX[fmt], QMAX[fmt])
    else:
        y = jnp.clip(y, -QMAX[fmt], QMAX[fmt])
    return y.astype(values_dtype), scale


def dequantize(values: jax.Array, scales: jax.Array) -> jax.Array:
    """values [..., H] and scales [...] -> float32 [..., H]."""
    return values.astype(jnp.float32) * scales[..., None]
