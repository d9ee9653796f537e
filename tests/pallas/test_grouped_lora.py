"""The grouped LoRA matmul op: reference by hand and vs a per-row loop, both kernels in interpret mode.

The reference (stacked-rank XLA matmuls) is checked against a float64 numpy loop over
rows, then each kernel against the reference. Group sizes are data, not shapes: each
kernel is compiled once per shape and run on every group layout of that shape (empty
groups, one group with every row, padding rows past the groups, boundaries inside and
on row tiles). Padding rows must come out as exactly x @ W (no LoRA term).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import grouped_lora as op
from jaxinfer.pallas.grouped_lora import reference

# max |out - ref| / max |ref|: the kernels form the same products as the reference and
# differ only in accumulation order; bf16 outputs are rounded to bf16 (step 2^-8).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
KERNEL_IMPLS = ("pallas_interpret", "pallas_tpu_interpret")
SCALE = 0.5


def _naive(x, w, lora_a, lora_b, sizes, scale):
    """float64, one row at a time: y[t] = x[t] W + scale (x[t] A[g]^T) B[g]^T."""
    x, w, a, b = (np.asarray(v, np.float64) for v in (x, w, lora_a, lora_b))
    out = x @ w
    depth = np.repeat(np.arange(len(sizes)), sizes)[:x.shape[0]]  # rows past the groups: none
    for t, g in enumerate(depth):
        out[t] += scale * ((x[t] @ a[g].T) @ b[g].T)
    return out


def _operands(t, i, o, g, r, dtype, seed=0):
    rng = np.random.RandomState(seed)
    return (jnp.asarray(rng.randn(t, i), dtype), jnp.asarray(rng.randn(i, o) / np.sqrt(i), dtype),
            jnp.asarray(rng.randn(g, r, i) / np.sqrt(i), dtype), jnp.asarray(rng.randn(g, o, r), dtype))


def _rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.abs(out - ref).max() / max(np.abs(ref).max(), 1.0)


# (T, in, out, G, r, dtype, layouts). T = 1 (decode), 7 (under one tile), 64 (a tile
# edge), 100 (several GPU tiles, not a multiple of any); in / out 64, 96 (padded by the
# GPU kernel, a whole-dimension block on TPU), 128.
SHAPES = {
    "t1_g1": (1, 64, 64, 1, 4, jnp.float32, [[1], [0]]),
    "t7_g3_bf16": (7, 96, 128, 3, 8, jnp.bfloat16, [[2, 0, 5], [0, 0, 0], [0, 7, 0], [1, 1, 1]]),
    "t64_g3": (64, 128, 96, 3, 4, jnp.float32, [[20, 0, 30], [0, 64, 0], [16, 16, 32], [0, 0, 1]]),
    "t100_g3_bf16": (100, 64, 128, 3, 8, jnp.bfloat16, [[30, 0, 50], [0, 0, 100], [64, 16, 20], [1, 0, 0]]),
}


# ---------------------------------------------------------------------------- reference

def test_reference_by_hand():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], np.float32)  # [T=4, in=2]
    w = np.eye(2, dtype=np.float32)  # [in, out=2]
    lora_a = np.array([[[1.0, 0.0]], [[9.0, 9.0]], [[0.0, 1.0]]], np.float32)  # [G=3, r=1, in]: x0, -, x1
    lora_b = np.array([[[1.0], [0.0]], [[9.0], [9.0]], [[0.0], [2.0]]], np.float32)  # [G, out, r]
    out = op.grouped_lora_matmul(*(jnp.asarray(v) for v in (x, w, lora_a, lora_b)),
                                 jnp.asarray([1, 0, 2], jnp.int32), scale=0.5, impl="xla")
    # row 0 (depth 0): + 0.5 * (x0, 0); rows 1-2 (depth 2): + 0.5 * (0, 2 x1); row 3: padding.
    np.testing.assert_array_equal(np.asarray(out), [[1.5, 2], [3, 8], [5, 12], [7, 8]])
    np.testing.assert_array_equal(np.asarray(reference.row_depths(jnp.asarray([1, 0, 2], jnp.int32), 4)),
                                  [0, 2, 2, -1])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_reference_matches_a_per_row_loop(shape):
    t, i, o, g, r, _, layouts = SHAPES[shape]
    args = _operands(t, i, o, g, r, jnp.float32)
    fn = jax.jit(lambda x, w, a, b, s: op.grouped_lora_matmul(x, w, a, b, s, scale=SCALE, impl="xla"))
    for sizes in layouts:
        out = fn(*args, jnp.asarray(sizes, jnp.int32))
        np.testing.assert_allclose(np.asarray(out), _naive(*args, sizes, SCALE), rtol=1e-5, atol=1e-5)


def test_reference_bf16_and_cut_groups_under_jit():
    args = _operands(7, 64, 64, 2, 4, jnp.bfloat16)
    fn = jax.jit(lambda x, w, a, b, s: op.grouped_lora_matmul(x, w, a, b, s, scale=2.0, impl="xla"))
    out = fn(*args, jnp.asarray([3, 4], jnp.int32))
    assert out.dtype == jnp.bfloat16
    assert _rel_err(out, _naive(*args, [3, 4], 2.0)) < 2e-2
    # Under jit the sizes are data: a sum past T is cut at T (the last group loses rows).
    out = fn(*args, jnp.asarray([5, 10], jnp.int32))
    assert _rel_err(out, _naive(*args, [5, 2], 2.0)) < 2e-2


# ---------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(impl, shape):
    t, i, o, g, r, dtype, layouts = SHAPES[shape]
    args = _operands(t, i, o, g, r, dtype)
    kernel = jax.jit(lambda x, w, a, b, s: op.grouped_lora_matmul(x, w, a, b, s, scale=SCALE, impl=impl))
    no_lora = np.asarray(kernel(*args, jnp.zeros((g,), jnp.int32)), np.float32)  # x @ W, every row padding
    for sizes in layouts:
        group_sizes = jnp.asarray(sizes, jnp.int32)
        ref = op.grouped_lora_matmul(*args, group_sizes, scale=SCALE, impl="xla")
        out = kernel(*args, group_sizes)
        assert out.shape == (t, o) and out.dtype == dtype
        assert _rel_err(out, ref) <= TOLERANCE[jnp.dtype(dtype)], sizes
        # Padding rows: exactly the shared matmul, no LoRA term.
        np.testing.assert_array_equal(np.asarray(out, np.float32)[sum(sizes):], no_lora[sum(sizes):])
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(out), _naive(*args, sizes, SCALE), rtol=1e-5, atol=1e-5)


def test_padding_rows_are_x_at_w():
    x, w, a, b = _operands(9, 64, 64, 3, 4, jnp.float32)
    x = x.at[6:].set(0.0)  # the caller's zero padding rows
    for impl in ("xla",) + KERNEL_IMPLS:
        out = np.asarray(op.grouped_lora_matmul(x, w, a, b, jnp.asarray([2, 0, 4], jnp.int32), impl=impl))
        np.testing.assert_array_equal(out[6:], 0.0)  # zero rows stay zero: no LoRA term, no bias


def test_empty_x_and_default_impl():
    x, w, a, b = _operands(7, 64, 64, 3, 4, jnp.float32)
    sizes = jnp.asarray([3, 0, 4], jnp.int32)
    np.testing.assert_array_equal(np.asarray(op.grouped_lora_matmul(x, w, a, b, sizes)),
                                  np.asarray(op.grouped_lora_matmul(x, w, a, b, sizes, impl="xla")))
    for impl in ("xla",) + KERNEL_IMPLS:
        out = op.grouped_lora_matmul(x[:0], w, a, b, jnp.zeros((3,), jnp.int32), impl=impl)
        assert out.shape == (0, 64)


@pytest.mark.parametrize("platform, module", [("cuda", "kernel_gpu"), ("tpu", "kernel_tpu")])
def test_kernels_lower_for_their_backend(platform, module):
    # Lowers (Pallas -> Triton IR / Mosaic MLIR) without the device: catches kernels that
    # only work in interpret mode. Compiling and running them needs the real hardware.
    import importlib

    from jax import export
    kernel = importlib.import_module(f"jaxinfer.pallas.grouped_lora.{module}")
    args = (jax.ShapeDtypeStruct((256, 512), jnp.bfloat16), jax.ShapeDtypeStruct((512, 768), jnp.bfloat16),
            jax.ShapeDtypeStruct((4, 16, 512), jnp.bfloat16), jax.ShapeDtypeStruct((4, 768, 16), jnp.bfloat16),
            jax.ShapeDtypeStruct((4,), jnp.int32))
    fn = jax.jit(lambda x, w, a, b, s: kernel.grouped_lora_matmul(x, w, a, b, s, scale=2.0))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=(platform,), disabled_checks=checks)(*args).mlir_module()
    assert "grouped_lora_matmul" in text


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("change, field", [
    (dict(x=jnp.zeros((2, 3, 8))), "x"),
    (dict(x=jnp.zeros((4, 8), jnp.int32)), "x"),
    (dict(w=jnp.zeros((8,))), "w: expected"),
    (dict(w=jnp.zeros((9, 16))), "w: input dim"),
    (dict(w=jnp.zeros((8, 16), jnp.bfloat16)), "w: dtype"),
    (dict(lora_a=jnp.zeros((3, 8))), "lora_a: expected"),
    (dict(lora_a=jnp.zeros((3, 2, 9))), "lora_a: input dim"),
    (dict(lora_a=jnp.zeros((0, 2, 8)), lora_b=jnp.zeros((0, 16, 2)), group_sizes=jnp.zeros((0,), jnp.int32)),
     "lora_a: needs at least one group"),
    (dict(lora_b=jnp.zeros((3, 16, 4))), "lora_b"),
    (dict(lora_b=jnp.zeros((3, 12, 2))), "lora_b"),
    (dict(lora_b=jnp.zeros((16, 2))), "lora_b: expected"),
    (dict(group_sizes=jnp.zeros((2,), jnp.int32)), "group_sizes"),
    (dict(group_sizes=jnp.zeros((3, 1), jnp.int32)), "group_sizes"),
    (dict(group_sizes=jnp.zeros((3,), jnp.float32)), "group_sizes: expected int32"),
    (dict(group_sizes=jnp.asarray([2, 2, 1], jnp.int32)), "group_sizes: sum 5 exceeds"),
    (dict(group_sizes=jnp.asarray([2, -1, 1], jnp.int32)), "group_sizes: negative"),
    (dict(impl="cuda"), "impl"),
])
def test_invalid_arguments_name_the_argument(change, field):
    kwargs = dict(x=jnp.zeros((4, 8)), w=jnp.zeros((8, 16)), lora_a=jnp.zeros((3, 2, 8)),
                  lora_b=jnp.zeros((3, 16, 2)), group_sizes=jnp.asarray([1, 0, 2], jnp.int32), impl="xla")
    kwargs.update(change)
    with pytest.raises(ValueError, match=field):
        op.grouped_lora_matmul(**kwargs)
