"""Public op: grouped LoRA matmul (one shared weight, one LoRA per group of rows).

Path: runner -> model (relaxed recursive block, depth-wise batching) ->
**grouped_lora_matmul** -> model. Relaxed Recursive Transformers (Bae et al. 2024,
arXiv 2410.20672): one block of shared layers is looped, loop l adding its own LoRA
B_l A_l to every linear projection. With continuous depth-wise batching, one call of the
shared block carries tokens at different loop depths; the tokens are sorted by depth,
and each row gets the LoRA of its depth: y = x @ W + scale * (x @ A[d]^T) @ B[d]^T.

The one dispatch point for this op. Shapes and dtypes are validated here (ValueError
naming the argument), then `impl` picks the implementation:

- "xla": reference.py (stacked-rank dense matmuls). Default on CPU.
- "pallas": the kernel of the backend: kernel_gpu.py (Triton lowering) on GPU,
  kernel_tpu.py (Mosaic) on TPU. Default there.
- "pallas_interpret": the GPU kernel in Pallas interpret mode (runs on CPU; tests).
- "pallas_tpu_interpret": the TPU kernel under TPU interpret mode (runs on CPU; tests).

Layouts: x [T, I], w [I, O] (the shared weight, [in, out]), lora_a [G, r, I] and
lora_b [G, O, r] (PEFT's lora_A.weight / lora_B.weight of each depth, stacked). The
kernels use the stacked-rank layout A_cat [I, G*r], B_cat [G*r, O] (reference.stack_lora),
built from these once per call (G*r*(I + O) elements: small next to w).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.pallas.grouped_lora import reference

__all__ = ["IMPLS", "grouped_lora_matmul"]

IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_tpu_interpret")
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check(x, w, lora_a, lora_b, group_sizes) -> None:
    if x.ndim != 2 or jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected float32 / bfloat16 / float16 [T, in], got {x.dtype} {x.shape}")
    for name, array, rank, want in (("w", w, 2, "[in, out]"), ("lora_a", lora_a, 3, "[G, r, in]"),
                                    ("lora_b", lora_b, 3, "[G, out, r]")):
        if array.ndim != rank:
            raise ValueError(f"{name}: expected {want}, got shape {array.shape}")
        if jnp.dtype(array.dtype) != jnp.dtype(x.dtype):
            raise ValueError(f"{name}: dtype {array.dtype} differs from x's {x.dtype}")
    num_in, num_out = w.shape
    if num_in != x.shape[1]:
        raise ValueError(f"w: input dim {num_in} does not match x's {x.shape[1]}")
    num_groups, rank, a_in = lora_a.shape
    if num_groups < 1 or rank < 1:
        raise ValueError(f"lora_a: needs at least one group and rank >= 1, got shape {lora_a.shape}")
    if a_in != num_in:
        raise ValueError(f"lora_a: input dim {a_in} does not match x's {num_in}")
    if lora_b.shape != (num_groups, num_out, rank):
        raise ValueError(f"lora_b: expected [G, out, r] = {(num_groups, num_out, rank)}, got {lora_b.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != num_groups:
        raise ValueError(f"group_sizes: expected [G] = [{num_groups}], got shape {group_sizes.shape}")
    if jnp.dtype(group_sizes.dtype) != jnp.dtype(jnp.int32):
        raise ValueError(f"group_sizes: expected int32, got {group_sizes.dtype}")
    try:  # values known (eager call): check them too; under jit they are data
        sizes = np.asarray(group_sizes)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        sizes = None
    if sizes is not None:
        if (sizes < 0).any():
            raise ValueError(f"group_sizes: negative size in {sizes.tolist()}")
        if int(sizes.sum()) > x.shape[0]:
            raise ValueError(f"group_sizes: sum {int(sizes.sum())} exceeds x's {x.shape[0]} rows")


def _default_impl() -> str:
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def grouped_lora_matmul(x: jax.Array, w: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                        group_sizes: jax.Array, *, scale: float = 1.0, impl: Optional[str] = None) -> jax.Array:
    """y[t] = x[t] @ w + scale * (x[t] @ lora_a[g]^T) @ lora_b[g]^T, g the depth of row t.

    Args:
      x: [T, in] float rows sorted by depth; depth g owns rows [offsets[g],
        offsets[g + 1]) with offsets = (0, cumsum(group_sizes)).
      w: [in, out] the shared weight, same dtype as x.
      lora_a: [G, r, in] each depth's LoRA A (PEFT lora_A.weight), same dtype.
      lora_b: [G, out, r] each depth's LoRA B (PEFT lora_B.weight), same dtype.
      group_sizes: [G] int32 rows per depth, non-negative, summing to at most T.
        Checked when its values are known (eager call); under jit they are data: groups
        are then cut at T. Empty groups are fine.
      scale: the LoRA scaling (alpha / r), a static Python float.
      impl: one of IMPLS, or None for the backend's default.
    Returns:
      [T, out] in x.dtype (float32 accumulation, one rounding). Padding rows (past
      sum(group_sizes)) get no LoRA term: exactly x @ w, so zero rows stay zero.
    Raises:
      ValueError: a shape, dtype, group size or impl is invalid (named).
    """
    _check(x, w, lora_a, lora_b, group_sizes)
    impl = impl or _default_impl()
    if impl not in IMPLS:
        raise ValueError(f"impl: {impl!r} is not available; choose one of {IMPLS}")
    scale = float(scale)
    if x.shape[0] == 0:
        return jnp.zeros((0, w.shape[1]), x.dtype)
    if impl == "xla":
        return reference.grouped_lora_matmul(x, w, lora_a, lora_b, group_sizes, scale=scale)
    if impl == "pallas_interpret" or (impl == "pallas" and jax.default_backend() == "gpu"):
        from jaxinfer.pallas.grouped_lora import kernel_gpu
        return kernel_gpu.grouped_lora_matmul(x, w, lora_a, lora_b, group_sizes, scale=scale,
                                              interpret=impl == "pallas_interpret")
    from jaxinfer.pallas.grouped_lora import kernel_tpu
    if impl == "pallas_tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            return kernel_tpu.grouped_lora_matmul(x, w, lora_a, lora_b, group_sizes, scale=scale)
    if jax.default_backend() != "tpu":
        raise ValueError(f"impl: 'pallas' needs a GPU or TPU backend, this one is {jax.default_backend()!r}; "
                         f"use 'xla' or an interpret impl")
    return kernel_tpu.grouped_lora_matmul(x, w, lora_a, lora_b, group_sizes, scale=scale)
