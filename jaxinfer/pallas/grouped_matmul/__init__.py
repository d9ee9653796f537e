"""Public op: grouped matmul (rows sorted by group, one weight matrix per group).

Path: runner -> model (MoE layer: tokens sorted by expert) -> **grouped_matmul** ->
model. Dropless MoE (MegaBlocks, Gale et al. 2023, "block-sparse" formulation): every
token copy is computed by its expert, however unevenly the experts are loaded; there is
no capacity factor and no dense loop over all experts.

The one dispatch point for this op. Shapes and dtypes are validated here (ValueError
naming the argument), then `impl` picks the implementation:

- "xla": reference.py (`jax.lax.ragged_dot`). Default on CPU.
- "pallas": the kernel of the backend: kernel_gpu.py (Triton lowering) on GPU,
  kernel_tpu.py (Mosaic) on TPU. Default there.
- "pallas_interpret": the GPU kernel in Pallas interpret mode (runs on CPU; tests).
- "pallas_tpu_interpret": the TPU kernel under TPU interpret mode (runs on CPU; tests).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxinfer.pallas.grouped_matmul import reference

__all__ = ["IMPLS", "grouped_matmul"]

IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_tpu_interpret")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check(lhs, rhs, group_sizes) -> None:
    if lhs.ndim != 2 or jnp.dtype(lhs.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"lhs: expected float32 / bfloat16 / float16 [M, K], got {lhs.dtype} {lhs.shape}")
    if rhs.ndim != 3 or jnp.dtype(rhs.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"rhs: expected float32 / bfloat16 / float16 [E, K, N], got {rhs.dtype} {rhs.shape}")
    if jnp.dtype(rhs.dtype) != jnp.dtype(lhs.dtype):
        raise ValueError(f"rhs: dtype {rhs.dtype} differs from lhs's {lhs.dtype}")
    if rhs.shape[1] != lhs.shape[1]:
        raise ValueError(f"rhs: contraction dim K={rhs.shape[1]} does not match lhs's K={lhs.shape[1]}")
    if rhs.shape[0] < 1:
        raise ValueError(f"rhs: needs at least one group, got shape {rhs.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"group_sizes: expected [E] = [{rhs.shape[0]}], got shape {group_sizes.shape}")
    if jnp.dtype(group_sizes.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"group_sizes: expected int32, got {group_sizes.dtype}")


def _default_impl() -> str:
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
                   impl: Optional[str] = None) -> jax.Array:
    """out[r] = lhs[r] @ rhs[e] for each row r of group e (rows sorted by group).

    Args:
      lhs: [M, K] float rows; group e owns rows [offsets[e], offsets[e + 1]) with
        offsets = (0, cumsum(group_sizes)).
      rhs: [E, K, N] weights, same dtype as lhs.
      group_sizes: [E] int32, non-negative (values are data: not checked). Rows past
        their sum are zero in the result; groups are cut at M if the sum exceeds it.
      out_dtype: result dtype; None = lhs.dtype. Accumulation is float32.
      impl: one of IMPLS, or None for the backend's default.
    Returns:
      [M, N] in out_dtype.
    Raises:
      ValueError: a shape, dtype or impl is invalid (named).
    """
    _check(lhs, rhs, group_sizes)
    impl = impl or _default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not available; choose one of {IMPLS}")
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), out_dtype)
    if impl == "xla":
        return reference.grouped_matmul(lhs, rhs, group_sizes, out_dtype=out_dtype)
    if impl == "pallas_interpret" or (impl == "pallas" and jax.default_backend() == "gpu"):
        from jaxinfer.pallas.grouped_matmul import kernel_gpu
        return kernel_gpu.grouped_matmul(lhs, rhs, group_sizes, out_dtype=out_dtype,
                                         interpret=impl == "pallas_interpret")
    from jaxinfer.pallas.grouped_matmul import kernel_tpu
    if impl == "pallas_tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            return kernel_tpu.grouped_matmul(lhs, rhs, group_sizes, out_dtype=out_dtype)
    if jax.default_backend() != "tpu":
        raise ValueError(f"impl: 'pallas' needs a GPU or TPU backend, this one is {jax.default_backend()!r}; "
                         f"use 'xla' or an interpret impl")
    return kernel_tpu.grouped_matmul(lhs, rhs, group_sizes, out_dtype=out_dtype)
