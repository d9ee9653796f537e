"""The grouped matmul op: reference by hand, the tile schedule, both kernels in interpret mode.

The reference (jax.lax.ragged_dot) is checked first against numpy on hand-made groups,
then each kernel against the reference. Group sizes are data, not shapes: each kernel
is compiled once per shape and run on every group layout of that shape (empty groups,
one group with every row, rows past the groups, sizes adding up to more than M, group
boundaries inside and on row tiles).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.pallas import grouped_matmul as op
from jaxinfer.pallas.grouped_matmul import reference

# max |out - ref| / max |ref|: the kernels form the same products as the reference and
# differ only in accumulation order; bf16 outputs are rounded to bf16 (step 2^-8).
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2}
KERNEL_IMPLS = ("pallas_interpret", "pallas_tpu_interpret")


def _numpy_grouped(lhs, rhs, sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
    for e, size in enumerate(sizes):
        end = min(start + size, lhs.shape[0])
        out[start:end] = lhs[start:end] @ rhs[e]
        start = end
    return out


def _operands(m, k, n, e, dtype, seed=0):
    rng = np.random.RandomState(seed)
    return jnp.asarray(rng.randn(m, k), dtype), jnp.asarray(rng.randn(e, k, n), dtype)


# ---------------------------------------------------------------------------- reference + schedule

def test_reference_by_hand():
    lhs = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], np.float32)  # [M=4, K=2]
    rhs = np.array([[[1.0, 0.0], [0.0, 1.0]],  # group 0: identity
                    [[9.0, 9.0], [9.0, 9.0]],  # group 1: empty
                    [[0.0, 2.0], [1.0, 0.0]]], np.float32)  # group 2: swap columns, double one
    out = op.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray([1, 0, 2], jnp.int32), impl="xla")
    np.testing.assert_array_equal(np.asarray(out), [[1, 2], [4, 6], [6, 10], [0, 0]])  # row 3: past the groups
    # Sizes adding up to more than M: the last group is cut at M.
    out = op.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray([3, 0, 5], jnp.int32), impl="xla")
    np.testing.assert_array_equal(np.asarray(out), [[1, 2], [3, 4], [5, 6], [8, 14]])


def _numpy_visits(sizes, num_tiles, block_m):
    visits, start = [], 0
    for e, size in enumerate(sizes):
        if size:
            visits += [(t, e) for t in range(start // block_m, (start + size - 1) // block_m + 1)]
        start += size
    return visits


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile for every layout
def _schedule(group_sizes, num_tiles, block_m):
    return reference.tile_visits(reference.group_offsets(group_sizes, num_tiles * block_m), num_tiles, block_m)


@pytest.mark.parametrize("sizes", [[5, 0, 20, 0, 3], [0, 0, 0, 0, 0], [0, 32, 0, 0, 0], [8, 8, 8, 8, 0],
                                   [1, 1, 1, 1, 1], [0, 0, 0, 0, 9]])
def test_tile_visits_enumerate_the_tiles_of_each_nonempty_group(sizes):
    block_m, num_tiles = 8, 4  # M = 32
    group, tile, count = _schedule(jnp.asarray(sizes, jnp.int32), num_tiles, block_m)
    want = _numpy_visits(sizes, num_tiles, block_m)
    assert group.shape == (num_tiles + len(sizes) - 1,) and int(count) == len(want)
    assert list(zip(np.asarray(tile)[:len(want)].tolist(), np.asarray(group)[:len(want)].tolist())) == want
    last = want[-1] if want else (0, 0)  # padding repeats the last real visit
    assert all((t, g) == last for t, g in zip(np.asarray(tile)[len(want):], np.asarray(group)[len(want):]))


# ---------------------------------------------------------------------------- kernels vs reference

# Group layouts of E = 5 over M = 37 rows (bm = 64 / 48 rows: one tile, cut by several
# boundaries), as fractions of M so that the bigger shape reuses them.
LAYOUTS = [[5, 0, 20, 0, 3],  # empty groups between, rows past the groups
           [0, 37, 0, 0, 0],  # one group holds every row
           [0, 0, 0, 0, 0],  # no rows at all
           [10, 10, 10, 10, 10],  # sizes add up to more than M
           [0, 0, 0, 0, 37],  # only the last group
           [1, 1, 1, 1, 33]]  # a boundary after every one of the first rows
# (M, K, N, E, dtype, layouts): one tile with N, K below the lane width; a single group;
# several row tiles with K and N of three 128-wide tiles (M = 130: not a multiple of
# any row tile; boundaries inside and exactly on tiles).
SHAPES = {
    "one_tile": (37, 64, 96, 5, jnp.float32, LAYOUTS),
    "one_group": (20, 32, 48, 1, jnp.float32, [[20], [0], [7], [50]]),
    "many_tiles_bf16": (130, 384, 384, 4, jnp.bfloat16, [[60, 0, 70, 0], [16, 48, 0, 66], [0, 0, 130, 0],
                                                         [128, 1, 0, 1]]),
}


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(impl, shape):
    m, k, n, e, dtype, layouts = SHAPES[shape]
    lhs, rhs = _operands(m, k, n, e, dtype)
    kernel = jax.jit(lambda l, r, g: op.grouped_matmul(l, r, g, impl=impl))  # one compile for every layout
    for sizes in layouts:
        group_sizes = jnp.asarray(sizes, jnp.int32)
        ref = op.grouped_matmul(lhs, rhs, group_sizes, impl="xla")
        out = kernel(lhs, rhs, group_sizes)
        assert out.shape == (m, n) and out.dtype == dtype
        ref32, out32 = np.asarray(ref, np.float32), np.asarray(out, np.float32)
        scale = max(float(np.abs(ref32).max()), 1.0)
        assert np.abs(out32 - ref32).max() <= TOLERANCE[jnp.dtype(dtype)] * scale, sizes
        np.testing.assert_array_equal(out32[sum(sizes):], 0.0)  # rows past the groups are zero
        if dtype == jnp.float32:
            np.testing.assert_allclose(out32, _numpy_grouped(lhs, rhs, sizes), rtol=1e-5, atol=1e-4)


def test_out_dtype_and_empty_lhs():
    lhs, rhs = _operands(6, 32, 16, 2, jnp.bfloat16)
    sizes = jnp.asarray([2, 4], jnp.int32)
    out = op.grouped_matmul(lhs, rhs, sizes, out_dtype=jnp.float32, impl="xla")
    assert out.dtype == jnp.float32
    want = _numpy_grouped(np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), [2, 4])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-4)  # bf16 products, f32 sums
    for impl in ("xla",) + KERNEL_IMPLS:
        assert op.grouped_matmul(lhs[:0], rhs, sizes, impl=impl).shape == (0, 16)


def test_default_impl_on_cpu_is_the_reference():
    lhs, rhs = _operands(7, 16, 8, 3, jnp.float32)
    sizes = jnp.asarray([3, 0, 4], jnp.int32)
    np.testing.assert_array_equal(np.asarray(op.grouped_matmul(lhs, rhs, sizes)),
                                  np.asarray(op.grouped_matmul(lhs, rhs, sizes, impl="xla")))


@pytest.mark.parametrize("platform, module", [("cuda", "kernel_gpu"), ("tpu", "kernel_tpu")])
def test_kernels_lower_for_their_backend(platform, module):
    # Lowers (Pallas -> Triton IR / Mosaic MLIR) without the device: catches kernels that
    # only work in interpret mode. Compiling and running them needs the real hardware.
    import importlib

    from jax import export
    kernel = importlib.import_module(f"jaxinfer.pallas.grouped_matmul.{module}")
    args = (jax.ShapeDtypeStruct((256, 512), jnp.bfloat16), jax.ShapeDtypeStruct((8, 512, 768), jnp.bfloat16),
            jax.ShapeDtypeStruct((8,), jnp.int32))
    fn = jax.jit(lambda l, r, g: kernel.grouped_matmul(l, r, g, out_dtype=jnp.bfloat16))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(fn, platforms=(platform,), disabled_checks=checks)(*args).mlir_module()
    assert "grouped_matmul" in text


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("change, field", [
    (dict(lhs=jnp.zeros((2, 3, 8))), "lhs"),
    (dict(lhs=jnp.zeros((4, 8), jnp.int32)), "lhs"),
    (dict(rhs=jnp.zeros((8, 16))), "rhs"),
    (dict(rhs=jnp.zeros((3, 8, 16), jnp.bfloat16)), "rhs: dtype"),
    (dict(rhs=jnp.zeros((3, 9, 16))), "rhs: contraction"),
    (dict(rhs=jnp.zeros((0, 8, 16))), "rhs: needs at least one group"),
    (dict(group_sizes=jnp.zeros((2,), jnp.int32)), "group_sizes"),
    (dict(group_sizes=jnp.zeros((3,), jnp.int64 if jax.config.x64_enabled else jnp.uint32)), "group_sizes"),
    (dict(group_sizes=jnp.zeros((3,), jnp.float32)), "group_sizes: expected int32"),
    (dict(impl="cuda"), "impl"),
])
def test_invalid_arguments_name_the_argument(change, field):
    kwargs = dict(lhs=jnp.zeros((4, 8)), rhs=jnp.zeros((3, 8, 16)), group_sizes=jnp.zeros((3,), jnp.int32),
                  impl="xla")
    kwargs.update(change)
    with pytest.raises(ValueError, match=field):
        op.grouped_matmul(**kwargs)
