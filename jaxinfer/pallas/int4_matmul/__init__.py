"""Public op: int4 weight-only matmul with group-wise scales (MARLIN-style).

Path: runner -> model (a quantized Linear) -> **int4_matmul** -> model.

The one dispatch point for this op. Shapes and dtypes are validated here (ValueError
naming the argument), then `impl` picks the implementation:

- "xla": reference.py (dequantize, then a float32-accumulated dot). Default on CPU.
- "pallas": the kernel of the backend: kernel_gpu.py (Triton lowering) on GPU,
  kernel_tpu.py (Mosaic) on TPU. Default there.
- "pallas_interpret": the GPU kernel in Pallas interpret mode (runs on CPU; tests).
- "pallas_tpu_interpret": the TPU kernel under TPU interpret mode (runs on CPU; tests).

The packed layout is documented in reference.py; `pack`, `unpack` and `dequantize`
are re-exported here because quantizers and checkpoint loaders build that layout.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas.int4_matmul import reference
from jaxinfer.pallas.int4_matmul.reference import SYMMETRIC_ZERO, dequantize, pack, unpack

__all__ = ["IMPLS", "SYMMETRIC_ZERO", "dequantize", "int4_matmul", "pack", "unpack"]

IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_tpu_interpret")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KERNEL_BLOCK_N = 128  # both Pallas kernels tile N by 128 columns


def _check(x, packed, scales, zeros, group_size: int) -> None:
    if x.ndim != 2:
        raise ValueError(f"x: expected [M, K], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float32, bfloat16 or float16, got {x.dtype}")
    if packed.ndim != 2 or jnp.dtype(packed.dtype) != jnp.dtype(jnp.uint8):
        raise ValueError(f"packed: expected uint8 [K/2, N], got {packed.dtype} {packed.shape}")
    num_in = x.shape[1]
    if packed.shape[0] * 2 != num_in:
        raise ValueError(f"packed: {packed.shape[0]} rows hold {2 * packed.shape[0]} input features, "
                         f"but x has K={num_in}")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size: must be an even int >= 2, got {group_size!r}")
    if num_in % group_size:
        raise ValueError(f"group_size: K={num_in} is not a multiple of the group size {group_size} "
                         f"(ragged K is not supported)")
    want = (num_in // group_size, packed.shape[1])
    if scales.shape != want or jnp.dtype(scales.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"scales: expected float [K/g, N] = {want}, got {scales.dtype} {scales.shape}")
    if zeros is not None and (zeros.shape != want or jnp.dtype(zeros.dtype) not in _FLOAT_DTYPES):
        raise ValueError(f"zeros: expected float [K/g, N] = {want} or None, got {zeros.dtype} {zeros.shape}")


def _check_kernel(packed, group_size: int) -> None:
    num_cols = packed.shape[1]
    if num_cols % KERNEL_BLOCK_N:
        raise ValueError(f"packed: N={num_cols} is not a multiple of {KERNEL_BLOCK_N}, the Pallas kernels' N "
                         f"tile (ragged N is not supported; use impl='xla')")
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size: the Pallas kernels need a power of two >= 32, got {group_size}")


def _default_impl() -> str:
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def int4_matmul(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array] = None, *,
                group_size: int, out_dtype=None, impl: Optional[str] = None) -> jax.Array:
    """y = x @ W with W stored as group-wise int4 (see reference.py for the layout).

    Args:
      x: [M, K] float32 / bfloat16 / float16 activations.
      packed: [K/2, N] uint8 codes, two per byte.
      scales: [K/g, N] float scales.
      zeros: [K/g, N] float zero points, or None for symmetric (zero point 8).
      group_size: g: input rows per scale; even, divides K.
      out_dtype: result dtype; None = x.dtype.
      impl: one of IMPLS, or None for the backend's default.
    Returns:
      [M, N] in out_dtype, accumulated in float32.
    Raises:
      ValueError: a shape or dtype is invalid (named), K is not a multiple of the group
        size, or a Pallas impl is asked for N not a multiple of 128.
    """
    _check(x, packed, scales, zeros, group_size)
    impl = impl or _default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not available; choose one of {IMPLS}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if impl == "xla":
        return reference.int4_matmul(x, packed, scales, zeros, group_size=group_size, out_dtype=out_dtype)
    _check_kernel(packed, group_size)
    if impl == "pallas_interpret" or (impl == "pallas" and jax.default_backend() == "gpu"):
        from jaxinfer.pallas.int4_matmul import kernel_gpu
        return kernel_gpu.int4_matmul(x, packed, scales, zeros, group_size=group_size, out_dtype=out_dtype,
                                      interpret=impl == "pallas_interpret")
    from jaxinfer.pallas.int4_matmul import kernel_tpu
    if impl == "pallas_tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            return kernel_tpu.int4_matmul(x, packed, scales, zeros, group_size=group_size, out_dtype=out_dtype)
    if jax.default_backend() != "tpu":
        raise ValueError(f"impl: 'pallas' needs a GPU or TPU backend, this one is {jax.default_backend()!r}; "
                         f"use 'xla' or an interpret impl")
    return kernel_tpu.int4_matmul(x, packed, scales, zeros, group_size=group_size, out_dtype=out_dtype)
