"""The int4 weight-only matmul op: layout, reference, both Pallas kernels in interpret mode.

The reference is checked first against numpy on hand-made values, then each kernel
against the reference (MARLIN's metric: mean|C - C_ref| / mean|C_ref|, one tolerance per
dtype). The default grid pairs each M with one (dtype, scheme) so that every M, dtype
and scheme is covered at least once per kernel; the full product is `-m slow`.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import int4_matmul as op

# mean|C - C_ref| / mean|C_ref|. The kernels form the same products as the reference
# (weights dequantized in float32, cast to x's dtype) and differ only in accumulation
# order; bf16 outputs are rounded to bf16 (relative step 2^-8).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 5e-3}
KERNEL_IMPLS = ("pallas_interpret", "pallas_tpu_interpret")


def _operands(m, k, n, group_size, symmetric, dtype, seed=0):
    rng = np.random.RandomState(seed)
    codes = rng.randint(0, 16, size=(k, n)).astype(np.uint8)
    scales = (0.01 + 0.05 * rng.rand(k // group_size, n)).astype(np.float32)
    zeros = None if symmetric else rng.randint(0, 16, size=(k // group_size, n)).astype(np.float32)
    x = jnp.asarray(rng.randn(m, k), dtype)
    return x, op.pack(codes, group_size), jnp.asarray(scales), None if zeros is None else jnp.asarray(zeros)


def _relative_error(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.abs(out - ref).mean() / np.abs(ref).mean())


# ---------------------------------------------------------------------------- layout + reference

def test_pack_layout_by_hand():
    # One group of g = 4 rows: packed row j holds row j (low nibble) and row 2 + j (high).
    codes = np.array([[1, 15], [2, 0], [3, 7], [4, 8]], np.uint8)  # [K=4, N=2]
    packed = np.asarray(op.pack(codes, 4))
    np.testing.assert_array_equal(packed, [[1 | 3 << 4, 15 | 7 << 4], [2 | 4 << 4, 0 | 8 << 4]])
    np.testing.assert_array_equal(np.asarray(op.unpack(packed, 4)), codes)


def test_pack_roundtrip_two_groups():
    codes = np.random.RandomState(0).randint(0, 16, size=(256, 8)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(op.unpack(op.pack(codes, 128), 128)), codes)


def test_reference_matches_numpy_dequantize_then_matmul():
    # K = 4, N = 2, g = 2: two groups, hand-picked scales and zero points.
    codes = np.array([[0, 15], [8, 9], [12, 1], [3, 8]], np.uint8)
    scales = np.array([[0.5, 0.25], [2.0, 1.0]], np.float32)
    zeros = np.array([[8, 10], [4, 8]], np.float32)
    x = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    w_asym = np.array([[(0 - 8) * 0.5, (15 - 10) * 0.25], [(8 - 8) * 0.5, (9 - 10) * 0.25],
                       [(12 - 4) * 2.0, (1 - 8) * 1.0], [(3 - 4) * 2.0, (8 - 8) * 1.0]], np.float32)
    w_sym = (codes.astype(np.float32) - 8) * np.repeat(scales, 2, axis=0)
    packed = op.pack(codes, 2)
    np.testing.assert_array_equal(np.asarray(op.dequantize(packed, jnp.asarray(scales), jnp.asarray(zeros), 2)),
                                  w_asym)
    out = op.int4_matmul(jnp.asarray(x), packed, jnp.asarray(scales), jnp.asarray(zeros), group_size=2, impl="xla")
    np.testing.assert_allclose(np.asarray(out), x @ w_asym, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), [[-4.0 + 0.0 + 8.0 - 6.0, 1.25 + 0.5 - 3.5 + 0.0]], rtol=1e-6)
    out = op.int4_matmul(jnp.asarray(x), packed, jnp.asarray(scales), None, group_size=2, impl="xla")
    np.testing.assert_allclose(np.asarray(out), x @ w_sym, rtol=1e-6)


@pytest.mark.parametrize("k, group_size, symmetric", [(1536, 128, True), (640, 32, False)])
def test_reference_in_several_scan_steps_matches_numpy(k, group_size, symmetric):
    # 12 groups of 128 -> 3 steps of 4 groups; 20 groups of 32 -> 2 steps of 10.
    x, packed, scales, zeros = _operands(3, k, 64, group_size, symmetric, jnp.float32)
    w = np.asarray(op.dequantize(packed, scales, zeros, group_size))
    out = op.int4_matmul(x, packed, scales, zeros, group_size=group_size, impl="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(x, np.float64) @ w, rtol=1e-4, atol=1e-4)


def test_reference_bf16_uses_bf16_products_and_f32_accumulation():
    x, packed, scales, zeros = _operands(4, 256, 128, 128, False, jnp.bfloat16)
    w = np.asarray(op.dequantize(packed, scales, zeros, 128)).astype(jnp.bfloat16).astype(np.float32)
    want = np.asarray(x, np.float32) @ w
    out = op.int4_matmul(x, packed, scales, zeros, group_size=128, out_dtype=jnp.float32, impl="xla")
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- kernels vs reference

# (M, dtype, symmetric): every M once per kernel; together all four (dtype, scheme) pairs.
DEFAULT_GRID = [(1, jnp.float32, True), (16, jnp.bfloat16, False), (64, jnp.float32, False),
                (256, jnp.bfloat16, True)]
SLOW_GRID = [(m, d, s) for m, d, s in itertools.product((1, 5, 16, 64, 129, 256), (jnp.float32, jnp.bfloat16),
                                                        (True, False))]


def _check_kernel(impl, m, k, n, group_size, dtype, symmetric):
    x, packed, scales, zeros = _operands(m, k, n, group_size, symmetric, dtype, seed=m)
    ref = op.int4_matmul(x, packed, scales, zeros, group_size=group_size, impl="xla")
    out = op.int4_matmul(x, packed, scales, zeros, group_size=group_size, impl=impl)
    assert out.shape == (m, n) and out.dtype == dtype
    assert _relative_error(out, ref) < TOLERANCE[jnp.dtype(dtype)]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("m, dtype, symmetric", DEFAULT_GRID)
def test_kernel_matches_reference(impl, m, dtype, symmetric):
    _check_kernel(impl, m, 256, 256, 128, dtype, symmetric)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernel_small_groups_and_three_k_tiles(impl):
    # g = 64: the TPU kernel puts two groups in one K tile; K = 384: three tiles.
    _check_kernel(impl, 16, 384, 128, 64, jnp.float32, False)


def test_tpu_kernel_under_force_tpu_interpret_mode():
    # The TPU kernel exactly as on a TPU, with the interpreter switched on around it.
    from jax.experimental.pallas import tpu as pltpu

    from jaxinfer.pallas.int4_matmul import kernel_tpu
    x, packed, scales, zeros = _operands(8, 256, 128, 128, True, jnp.float32)
    ref = op.int4_matmul(x, packed, scales, zeros, group_size=128, impl="xla")
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        out = jax.jit(lambda *a: kernel_tpu.int4_matmul(*a, None, group_size=128, out_dtype=jnp.float32))(
            x, packed, scales)
    assert _relative_error(out, ref) < TOLERANCE[jnp.dtype(jnp.float32)]


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("m, dtype, symmetric", SLOW_GRID)
@pytest.mark.parametrize("k, n, group_size", [(256, 256, 128), (512, 384, 128), (256, 128, 32), (1024, 256, 256)])
def test_kernel_matches_reference_sweep(impl, m, dtype, symmetric, k, n, group_size):
    _check_kernel(impl, m, k, n, group_size, dtype, symmetric)


@pytest.mark.parametrize("platform, module", [("cuda", "kernel_gpu"), ("tpu", "kernel_tpu")])
def test_kernels_lower_for_their_backend(platform, module):
    # Lowers (Pallas -> Triton IR / Mosaic MLIR) without the device: catches kernels that
    # only work in interpret mode. Compiling and running them needs the real hardware.
    import importlib

    from jax import export
    kernel = importlib.import_module(f"jaxinfer.pallas.int4_matmul.{module}")
    args = (jax.ShapeDtypeStruct((16, 512), jnp.bfloat16), jax.ShapeDtypeStruct((256, 256), jnp.uint8),
            jax.ShapeDtypeStruct((4, 256), jnp.float32), jax.ShapeDtypeStruct((4, 256), jnp.float32))
    fn = jax.jit(lambda x, p, s, z: kernel.int4_matmul(x, p, s, z, group_size=128, out_dtype=jnp.bfloat16))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=(platform,), disabled_checks=checks)(*args).mlir_module()
    assert "int4_matmul" in text


# ---------------------------------------------------------------------------- validation

def test_default_impl_on_cpu_is_the_reference():
    x, packed, scales, _ = _operands(3, 64, 8, 32, True, jnp.float32)  # N = 8: only the reference takes it
    out = op.int4_matmul(x, packed, scales, group_size=32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(op.int4_matmul(x, packed, scales, group_size=32,
                                                                              impl="xla")))


@pytest.mark.parametrize("change, field", [
    (dict(x=jnp.zeros((2, 3, 256))), "x"),
    (dict(x=jnp.zeros((2, 256), jnp.int32)), "x"),
    (dict(packed=jnp.zeros((128, 128), jnp.int8)), "packed"),
    (dict(packed=jnp.zeros((64, 128), jnp.uint8)), "packed"),
    (dict(scales=jnp.ones((3, 128))), "scales"),
    (dict(scales=jnp.ones((2, 64))), "scales"),
    (dict(zeros=jnp.ones((2, 64))), "zeros"),
    (dict(group_size=3), "group_size"),
    (dict(group_size=96), "group_size"),  # ragged K: 256 is not a multiple of 96
    (dict(impl="cuda"), "impl"),
])
def test_invalid_arguments_name_the_argument(change, field):
    x, packed, scales, _ = _operands(2, 256, 128, 128, True, jnp.float32)
    kwargs = dict(x=x, packed=packed, scales=scales, zeros=None, group_size=128, impl="xla")
    kwargs.update(change)
    with pytest.raises(ValueError, match=field):
        op.int4_matmul(**kwargs)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_kernels_reject_ragged_n_and_small_groups(impl):
    x, packed, scales, _ = _operands(2, 256, 192, 128, True, jnp.float32)  # N = 192: not a multiple of 128
    with pytest.raises(ValueError, match="packed: N=192"):
        op.int4_matmul(x, packed, scales, group_size=128, impl=impl)
    x, packed, scales, _ = _operands(2, 256, 128, 16, True, jnp.float32)
    with pytest.raises(ValueError, match="group_size"):
        op.int4_matmul(x, packed, scales, group_size=16, impl=impl)
