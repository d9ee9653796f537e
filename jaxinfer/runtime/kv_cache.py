"""The paged KV cache on the device: how many pages fit, and allocating them on a mesh.

Path: session / engine set-up -> **num_pages_for** (pages that fit the budget and the
devices) -> block manager (hands out page ids) and ModelRunner, which owns the arrays:
it calls **allocate** once and then donates the caches to every step. This module sizes
and allocates; it keeps no arrays itself.

Layout: per layer a (k_pages, v_pages) pair, each [P, L, K, H] (P pages, L tokens per
page, K kv heads, H head dim) of the activation dtype, or, with EngineConfig(kv_cache_dtype=
"int8" | "fp8"), each a QuantizedPages of int8 / float8 values [P, L, K, H] and float32
scales [P, L, K] (jaxinfer/pallas/ragged_paged_attention/quantized.py), sharded by jaxinfer.sharding.rules.kv_cache_sharding:
KV heads split over the mesh's "tensor" axis when its size divides K, replicated
otherwise (e.g. one KV head on 4 devices); pages, page tokens and head dim are never
split, and every "data" / "expert" replica holds the whole pool.

Sizes are per device: `max_kv_cache_bytes` is what ONE device may spend on KV pages,
so a tensor-parallel mesh holds more pages in the same budget, and the two pools of a
disaggregated engine (prefill mesh, decode mesh) are sized each on its own devices.
A pipeline stage's devices hold only its L / pp layers' pages (`num_layers=`), so a
pipeline of pp stages holds pp times the pages of one stage's budget for all L layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.config import MAX_MODEL_DIM, EngineConfig, ModelConfig
from jaxinfer.pallas.ragged_paged_attention.quantized import KV_CACHE_DTYPES, QuantizedPages, token_head_bytes
from jaxinfer.sharding.mesh import mesh_size
from jaxinfer.sharding.rules import kv_cache_sharding

# Share of a device's free memory (after the parameters are placed) the pool may take;
# the rest is left to the step's activations and XLA's scratch buffers.
MAX_FREE_MEMORY_FRACTION = 0.9


def _to_dtype(dtype: Any, field: str = "dtype") -> np.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"{field}: not a dtype: {dtype!r}") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{field}: the KV cache needs a floating dtype, got {dt.name}")
    return dt


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    """Shape and dtype of the whole KV pool (every layer's K and V page arrays)."""

    num_layers: int  # one (k_pages, v_pages) pair per layer
    num_pages: int  # P: pages in the pool (page ids 0 .. P-1)
    page_size: int  # L: tokens per page
    num_kv_heads: int  # K
    head_dim: int  # H
    dtype: Any = "float32"  # name or numpy/jax dtype; normalised to a numpy dtype
    kv_cache_dtype: str = "auto"  # "auto" = pages of `dtype`; "int8" / "fp8": quantized pages

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {self.kv_cache_dtype!r} not in {KV_CACHE_DTYPES}")
        for name in ("num_layers", "num_pages", "page_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        object.__setattr__(self, "dtype", _to_dtype(self.dtype))

    @classmethod
    def for_model(cls, model_config: ModelConfig, *, num_pages: int, page_size: int, dtype,
                  kv_cache_dtype: str = "auto") -> "KVCacheSpec":
        """The spec of `model_config`'s cache with `num_pages` pages of `page_size` tokens."""
        return cls(num_layers=model_config.num_layers, num_pages=num_pages, page_size=page_size,
                   num_kv_heads=model_config.num_kv_heads, head_dim=model_config.head_dim, dtype=dtype,
                   kv_cache_dtype=kv_cache_dtype)

    @property
    def page_shape(self) -> tuple:
        """Shape (P, L, K, H) of one layer's K (or V) page array."""
        return (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)


def kv_heads_per_device(num_kv_heads: int, mesh: Optional[Mesh] = None) -> int:
    """KV heads one device holds: K / (tensor size) when it divides K, else all K."""
    if mesh is None:
        return num_kv_heads
    axes = kv_cache_sharding(mesh, num_kv_heads=num_kv_heads).spec[2]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return num_kv_heads // math.prod(mesh_size(mesh, a) for a in axes)


def bytes_per_page(model_config: ModelConfig, page_size: int, dtype, mesh: Optional[Mesh] = None, *,
                   num_layers: Optional[int] = None, kv_cache_dtype: str = "auto") -> int:
    """Bytes ONE device holds for one page: every layer it holds, K and V.

    Args:
      model_config: the model (layers, KV heads, head dim).
      page_size: L, tokens per page.
      dtype: cache dtype (name or dtype).
      mesh: the runner's mesh; None = one device. KV heads are split over its "tensor"
        axis when that divides them, else replicated (each device holds all of them).
      num_layers: layers one device holds (a pipeline stage's L / pp); None = all.
      kv_cache_dtype: "auto" (pages of `dtype`), "int8" or "fp8" (one byte per element
        plus a float32 scale per token and kv head).
    Returns:
      2 * L * (K per device) * (H * itemsize, or H + 4 quantized) * num_layers.
    """
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size: must be an int >= 1, got {page_size!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: {kv_cache_dtype!r} not in {KV_CACHE_DTYPES}")
    per_token_head = token_head_bytes(kv_cache_dtype, model_config.head_dim, _to_dtype(dtype).itemsize)
    heads = kv_heads_per_device(model_config.num_kv_heads, mesh)
    layers = model_config.num_layers if num_layers is None else num_layers
    return 2 * page_size * heads * per_token_head * layers


def free_device_bytes(devices: Sequence[Any]) -> Optional[int]:
    """Free memory of the most loaded of `devices`, from `memory_stats()`.

    Returns:
      min over the devices of bytes_limit - bytes_in_use, or None when no device
      reports a `bytes_limit` (CPU returns no stats).
    """
    free = [stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            for stats in (device.memory_stats() for device in devices)
            if stats and "bytes_limit" in stats]
    return min(free) if free else None


def num_pages_for(model_config: ModelConfig, engine_config: EngineConfig, *, dtype, max_model_len: int,
                  mesh: Optional[Mesh] = None, num_layers: Optional[int] = None) -> int:
    """Pages in the pool: `engine_config.num_pages`, or as many as the budget allows.

    Without `num_pages`: min(max_kv_cache_bytes // bytes_per_page, ceil(max_model_len /
    page_size) * max_num_seqs), at least 1, with `max_kv_cache_bytes` read as a
    per-device budget. Where the devices report their memory (GPU, TPU), also at most
    MAX_FREE_MEMORY_FRACTION of the free memory of the mesh's most loaded device (of
    this process): call
    it after the parameters are on the devices.

    Args:
      model_config: the model.
      engine_config: page_size, num_pages, max_kv_cache_bytes, max_num_seqs.
      dtype: cache dtype (name or dtype).
      max_model_len: longest sequence (prompt + output) in tokens.
      mesh: the runner's mesh; None = the default device (`jax.devices()[0]`).
      num_layers: layers one device holds (a pipeline stage's L / pp); None = all.
    Returns:
      The number of pages, >= 1.
    """
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    if not isinstance(max_model_len, int) or isinstance(max_model_len, bool) or max_model_len < 1:
        raise ValueError(f"max_model_len: must be an int >= 1, got {max_model_len!r}")
    page_size = engine_config.page_size
    page_bytes = bytes_per_page(model_config, page_size, dtype, mesh, num_layers=num_layers,
                                kv_cache_dtype=engine_config.kv_cache_dtype)
    pages_per_seq = -(-max_model_len // page_size)
    num_pages = min(engine_config.max_kv_cache_bytes // page_bytes, pages_per_seq * engine_config.max_num_seqs)
    num_pages = min(num_pages, MAX_MODEL_DIM // page_size)  # KV slots (page * L + offset) are int32
    # This process's devices only: another process's device cannot be asked (several
    # processes agree on the smallest pool, runtime/step_broadcast.agreed_num_pages).
    devices = [jax.devices()[0]] if mesh is None else [
        d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    free = free_device_bytes(devices)
    if free is not None:
        num_pages = min(num_pages, int(free * MAX_FREE_MEMORY_FRACTION) // page_bytes)
    return max(1, num_pages)


def allocate(spec: KVCacheSpec, mesh: Mesh) -> tuple:
    """Zeroed KV pages on `mesh`, created on the devices (nothing is built on the host).

    Args:
      spec: the pool's shape and dtype.
      mesh: the runner's mesh; pages placed with `kv_cache_sharding(mesh)`.
    Returns:
      Per layer a (k_pages, v_pages) pair of [P, L, K, H] arrays of `spec.dtype` (or of
      QuantizedPages for an int8 / fp8 cache), each its own buffer (the runner donates
      them to every step).
    """
    sharding = kv_cache_sharding(mesh, num_kv_heads=spec.num_kv_heads)
    shape = spec.page_shape
    if spec.kv_cache_dtype == "auto":
        def pages():
            return jnp.zeros(shape, spec.dtype)
        page_sharding = sharding
    else:
        def pages():
            return QuantizedPages.zeros(shape, spec.kv_cache_dtype)
        scales = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[:3]))
        page_sharding = QuantizedPages(sharding, scales)

    def zeros():
        return tuple((pages(), pages()) for _ in range(spec.num_layers))

    out_shardings = tuple((page_sharding, page_sharding) for _ in range(spec.num_layers))
    return jax.jit(zeros, out_shardings=out_shardings)()


def cache_bytes(kv_caches) -> int:
    """Logical size of the caches: every array's global shape * itemsize, summed.

    Each array counts once, whatever its sharding: split heads are not counted per
    shard, and replicas (data / expert axes, or heads a mesh cannot split) are not
    counted again. Per-device bytes are `bytes_per_page(..., mesh) * num_pages`.
    """
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kv_caches)))  # quantized: values + scales
