"""int4 weight-only matmul against the dense matmul it replaces, at decode and prefill rows.

    python scripts/benchmark_int4.py                                  # M = 1, 16, 64, 256; K = N = 4096
    python scripts/benchmark_int4.py --k 4096 --n 11008 --impls xla,pallas --json_out runs/bench/int4.json

Each row times one jitted call (median of --repeats after warm-up) of
`int4_matmul(x [M, K], packed [K/2, N] uint8, scales [K/g, N])` with every impl of
--impls, and of the dense `x @ W` with W [K, N] in --dtype, the matmul int4 replaces.
At small M a matmul is bound by the bytes of its weights, so the roofline of each row is
max(bytes / bandwidth, flops / peak) with the bandwidth and the dense matmul peak both
measured in this run (bench_common): int4 moves K*N/2 bytes of codes plus the scales,
about 3.6x fewer than bf16 at group 128, and reaches at best that speed-up over dense at
M = 1. "% roofline" = roofline time / measured time. On CPU the Pallas kernels would run
in an interpreter, so "pallas" is skipped there.
"""
from __future__ import annotations

import functools
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

_M = flags.DEFINE_list("m", "1,16,64,256", "Rows of x (tokens): 1 = batch-1 decode.")
_K = flags.DEFINE_integer("k", 4096, "Input features (a multiple of --group_size).", lower_bound=2)
_N = flags.DEFINE_integer("n", 4096, "Output features (a multiple of 128 for the Pallas kernels).", lower_bound=1)
_GROUP = flags.DEFINE_integer("group_size", 128, "Input rows per scale.", lower_bound=2)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Activation / dense weight dtype (default bfloat16 on GPU/TPU, float32 on CPU).")
_IMPLS = flags.DEFINE_list("impls", "xla,pallas", "int4 impls to time (pallas is skipped on CPU).")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per row (median reported).", lower_bound=1)
_JSON = flags.DEFINE_string("json_out", "runs/bench/int4.json", "JSON report path.")
_PLOT = flags.DEFINE_string("plot", None, "Draw ms vs M under the dense and int4 roofs here (PNG; needs matplotlib).")


def run(m_values, k, n, group, dtype_name, impls, repeats) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.pallas import int4_matmul as i4
    from jaxinfer.pallas.int4_matmul import reference as i4_ref

    dtype = jnp.dtype(dtype_name)
    if k % group or group % 2:
        raise ValueError(f"group_size: {group} must be even and divide k={k}")
    on_cpu = jax.default_backend() == "cpu"
    impls = [i for i in impls if not (i == "pallas" and on_cpu)]
    rng = np.random.RandomState(0)
    packed = jnp.asarray(i4_ref.pack(rng.randint(0, 16, size=(k, n)).astype(np.uint8), group))
    scales = jnp.asarray(rng.rand(k // group, n) * 0.02 + 1e-3, dtype)
    dense = jnp.asarray(rng.randn(k, n) * 0.02, dtype)
    bandwidth = bench_common.measure_memory_bandwidth()
    peak = bench_common.measure_gemm_flops()
    int4_bytes = packed.nbytes + scales.nbytes
    rows = []
    for m in m_values:
        x = jnp.asarray(rng.randn(m, k), dtype)
        flops = 2 * m * k * n
        io = x.nbytes + m * n * dtype.itemsize
        dense_s = bench_common.time_call(jax.jit(lambda x, w: x @ w), x, dense, repeats=repeats)
        roof_dense = max((dense.nbytes + io) / bandwidth, flops / peak)
        rows.append(dict(m=m, op="dense", impl="xla", seconds=dense_s, weight_bytes=int(dense.nbytes),
                         pct_roofline=100 * roof_dense / dense_s, tflops=flops / dense_s / 1e12))
        roof_int4 = max((int4_bytes + io) / bandwidth, flops / peak)
        for impl in impls:
            op = jax.jit(functools.partial(i4.int4_matmul, group_size=group, impl=impl))
            seconds = bench_common.time_call(op, x, packed, scales, None, repeats=repeats)
            rows.append(dict(m=m, op="int4", impl=impl, seconds=seconds, weight_bytes=int(int4_bytes),
                             pct_roofline=100 * roof_int4 / seconds, tflops=flops / seconds / 1e12,
                             speedup_vs_dense=dense_s / seconds))
    return {"k": k, "n": n, "group_size": group, "dtype": dtype.name, "memory_bandwidth_gb_s": bandwidth / 1e9,
            "dense_peak_tflops": peak / 1e12, "rows": rows, "environment": bench_common.environment()}


def main(argv):
    del argv
    import jax
    dtype = _DTYPE.value or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    report = run([int(m) for m in _M.value], _K.value, _N.value, _GROUP.value, dtype, _IMPLS.value, _REPEATS.value)
    print(f"int4 matmul, K={report['k']} N={report['n']} group {report['group_size']} {report['dtype']}; "
          f"bandwidth {report['memory_bandwidth_gb_s']:.1f} GB/s, dense peak {report['dense_peak_tflops']:.2f} TFLOP/s")
    print(f"{'M':>5} {'op':>6} {'impl':>7} {'ms':>9} {'% roof':>7} {'TFLOP/s':>8} {'x dense':>8}")
    for r in report["rows"]:
        print(f"{r['m']:>5} {r['op']:>6} {r['impl']:>7} {1e3 * r['seconds']:>9.3f} {r['pct_roofline']:>7.1f} "
              f"{r['tflops']:>8.3f} {r.get('speedup_vs_dense', 1.0):>8.2f}")
    bench_common.write_json(_JSON.value, report)
    if _PLOT.value:
        import plotting
        plotting.plot_int4(report, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
