"""Attention kernels alone: plain vs shared-prefix (Hydragen) paths, against the roofline and jax's own kernel.

    python scripts/benchmark_kernels.py [--batch 8,32,64] [--context 512,2048] [--prefix_fraction 0,0.5,0.9]
    python scripts/benchmark_kernels.py --q_lens 1,32 --json_out runs/bench/kernels_prefill.json
    python scripts/benchmark_kernels.py --batch 4 --context 256 --interpret_on_cpu   # code-path check on CPU
    python scripts/benchmark_kernels.py --plot runs/bench/kernels.png   # + roofline chart (ms vs bytes moved)

Each shape is `batch` sequences of `context` tokens in a paged KV cache (shuffled page
ids) whose first `prefix` tokens (the fraction, rounded down to whole pages) are the
same pages for every sequence: one shared-prefix tree node, as prefix caching lays it
out. Every sequence has `q_len` new query tokens at the end of its context (1 = decode,
the case Hydragen is for; larger = a prefill chunk). The metadata is built as
jaxinfer.runtime.input_batch builds it (page-table buckets, prefix rows of
PREFIX_QUERY_BLOCK queries of any members against the shared pages).

Rows per shape, each timed as one jitted call (median of --repeats after warm-up):
- plain: `ragged_paged_attention` over each sequence's full page table.
- shared (prefix > 0): `shared_prefix_attention`: the prefix stage reads the shared
  pages once per prefix row, the suffix stage each sequence's own pages, merged by
  log-sum-exp.
- peer (decode only): jax's own Pallas paged attention
  (jax.experimental.pallas.ops.{gpu,tpu}.paged_attention) at the same shapes, with its
  [kv_heads, pages, page_size, head_dim] cache (transposed once, outside the timing)
  and q pre-scaled by sm_scale (it applies no scale).
Both of ours run with every impl of --impls: "xla" (the reference, the CPU path) and
"pallas" (the GPU/TPU kernel). On CPU the Pallas kernels and the peer would only run
in interpret mode, an emulator whose time says nothing about the kernel, so they are
skipped unless --interpret_on_cpu (then they run and are checked, times marked).

Roofline: the bytes a path must move (K/V it reads: every sequence its whole context on
the plain path; the prefix once per prefix row plus each sequence's suffix on the
shared path; plus q read and out written) over the memory bandwidth measured in this
run (bench_common.measure_memory_bandwidth). "% roofline" = roofline time / measured
time; "x plain" = plain time / this row's time with the same impl (peer rows: plain
time of --peer_baseline_impl / peer time). Note the plain path reads the prefix through
the same physical pages for every sequence, so caches may serve part of it.
Correctness: every row's max |out - plain xla| (float32 of the outputs), printed.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from typing import NamedTuple

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

_BATCH = flags.DEFINE_list("batch", "8,32,64", "Sequences per call.")
_CONTEXT = flags.DEFINE_list("context", "512,2048", "Tokens of each sequence's context (new queries included).")
_PREFIX_FRACTION = flags.DEFINE_list("prefix_fraction", "0,0.5,0.9",
                                     "Shared prefix as a fraction of the context (whole pages, rounded down); "
                                     "0 = no sharing (plain path only).")
_Q_LENS = flags.DEFINE_list("q_lens", "1", "Query tokens per sequence: 1 = decode; e.g. 1,32 adds prefill chunks.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None, "Query heads (default 32; CPU 12).")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", None, "KV heads (default 8; CPU 4).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", None, "Head dim (default 128; CPU 64).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "q / KV dtype (default bfloat16; CPU float32).")
_IMPLS = flags.DEFINE_list("impls", "xla,pallas", "Impls of our ops (on CPU pallas is skipped, see "
                           "--interpret_on_cpu).")
_PREFIX_QUERY_BLOCK = flags.DEFINE_integer("prefix_query_block", None,
                                           "Queries per prefix row (default: the runner's PREFIX_QUERY_BLOCK).")
_PEER = flags.DEFINE_bool("peer", True, "Also time jax's own Pallas paged attention (decode shapes).")
_PEER_BASELINE = flags.DEFINE_string("peer_baseline_impl", "pallas", "Our plain impl the peer is compared with.")
_PEER_PAGES_PER_BLOCK = flags.DEFINE_integer("peer_pages_per_compute_block", 8,
                                             "Peer's pages per compute block (the largest divisor of the pages "
                                             "per sequence up to this is used).", lower_bound=1)
_PEER_K_SPLITS = flags.DEFINE_integer("peer_k_splits", 16, "GPU peer's key splits (largest divisor up to this).",
                                      lower_bound=1)
_INTERPRET_ON_CPU = flags.DEFINE_bool("interpret_on_cpu", False,
                                      "On CPU, run the Pallas kernels (impl pallas -> pallas_interpret) and the GPU "
                                      "peer in interpret mode: checks the code paths; times are meaningless.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per row (median reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per row before timing (the first compiles).",
                               lower_bound=1)
_BANDWIDTH_MIB = flags.DEFINE_integer("bandwidth_mib", None,
                                      "Buffer of the bandwidth measurement (default 2048; CPU 512).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of data and page shuffles.")
_JSON = flags.DEFINE_string("json_out", "runs/bench/kernels.json", "JSON report path.")
_PLOT = flags.DEFINE_string("plot", None, "Also draw the roofline (ms per call vs bytes moved) here (PNG; "
                            "scripts/plotting.py, needs matplotlib).")

_CPU_SKIP_NOTE = ("skipped on CPU: it would only run in Pallas interpret mode there, an emulator whose timing "
                  "means nothing (run on a GPU/TPU, or pass --interpret_on_cpu to check the code path and correctness)")


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _max_abs_diff(a, b) -> float:
    import jax.numpy as jnp
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


class _Case:
    """Host metadata of one shape, built the way the model runner builds it."""

    def __init__(self, batch, context, prefix_fraction, prefix_len, q_len, page_size, perm, prefix_query_block):
        import numpy as np

        from jaxinfer.runtime.input_batch import bucket, page_bucket
        L = page_size
        ctx_pages = -(-context // L)
        prefix_pages = prefix_len // L
        suffix_pages = ctx_pages - prefix_pages
        shared = perm[:prefix_pages]
        own = perm[prefix_pages:prefix_pages + batch * suffix_pages].reshape(batch, suffix_pages)
        pages = np.concatenate([np.broadcast_to(shared, (batch, prefix_pages)), own], axis=1)  # [B, ctx_pages]
        self.batch, self.context, self.prefix_len, self.q_len = batch, context, prefix_len, q_len
        self.prefix_fraction = prefix_fraction
        self.num_tokens = batch * q_len
        self.cu_q_lens = (np.arange(batch + 1) * q_len).astype(np.int32)
        self.kv_lens = np.full(batch, context, np.int32)
        self.positions = np.tile(context - q_len + np.arange(q_len), batch).astype(np.int32)
        self.page_tables = np.zeros((batch, page_bucket(ctx_pages)), np.int32)
        self.page_tables[:, :ctx_pages] = pages
        self.peer_tables = pages.astype(np.int32)  # unpadded: the peer needs divisible page counts
        # Shared path: each sequence's own rows start at the prefix end; one prefix tree
        # node whose members are all the sequences (input_batch._prefix_rows).
        self.kv_starts = np.full(batch, prefix_len, np.int32)
        self.suffix_tables = np.zeros((batch, page_bucket(suffix_pages)), np.int32)
        self.suffix_tables[:, :suffix_pages] = own
        block = min(prefix_query_block, bucket(self.num_tokens))
        self.num_prefix_rows = -(-self.num_tokens // block)  # real rows (the rest are bucket padding)
        rows = bucket(self.num_prefix_rows)
        q_index = np.full((rows, block), self.num_tokens, np.int32)
        q_index.reshape(-1)[:self.num_tokens] = np.arange(self.num_tokens)
        kv_ends = np.zeros(rows, np.int32)
        kv_ends[:self.num_prefix_rows] = prefix_len
        prefix_tables = np.zeros((rows, page_bucket(max(prefix_pages, 1))), np.int32)
        prefix_tables[:self.num_prefix_rows, :prefix_pages] = shared
        self.prefix = (q_index, np.zeros(rows, np.int32), kv_ends, prefix_tables)
        self.prefix_block = block


def _bytes(case, kv_heads, num_heads, head_dim, itemsize):
    """Bytes the plain and shared paths must move at least (K/V read, q read, out written)."""
    per_token_kv = 2 * kv_heads * head_dim * itemsize
    qo = 2 * case.num_tokens * num_heads * head_dim * itemsize
    plain_kv = case.batch * case.context * per_token_kv
    shared_kv = (case.num_prefix_rows * case.prefix_len + case.batch * (case.context - case.prefix_len)) * per_token_kv
    return plain_kv + qo, shared_kv + qo, plain_kv, shared_kv


def _peer_fn(backend, interpret, num_pages_per_seq):
    """jax's own paged attention (decode) as fn(q, k_pages_t, v_pages_t, tables, lengths), or raise."""
    import jax
    ppcb = _largest_divisor(num_pages_per_seq, _PEER_PAGES_PER_BLOCK.value)
    if backend == "tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
        op = functools.partial(paged_attention, pages_per_compute_block=ppcb)

        def call(q, k, v, tables, lengths):
            return op(q, k, v, lengths, tables)
        name = "jax-tpu-paged"
    else:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention
        k_splits = _largest_divisor(num_pages_per_seq, _PEER_K_SPLITS.value)
        ppcb = _largest_divisor(num_pages_per_seq // k_splits, _PEER_PAGES_PER_BLOCK.value)
        op = functools.partial(paged_attention, k_splits=k_splits, pages_per_compute_block=ppcb,
                               interpret=interpret)

        def call(q, k, v, tables, lengths):
            return op(q, k, v, tables, lengths)
        name = "jax-gpu-paged" + ("(interp)" if interpret else "")
    return jax.jit(call), name


def _run_row(fn, args, repeats, warmup):
    """(output, median seconds, seconds of the first call, which compiles) of a jitted fn."""
    import jax
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    seconds = bench_common.time_call(fn, *args, repeats=repeats, warmup=max(warmup - 1, 0))
    return out, seconds, first


class _Setup(NamedTuple):
    """What every shape of the sweep shares."""

    backend: str
    on_cpu: bool
    run_impls: list  # (label, impl passed to the op, timing meaningful)
    run_peer: bool
    peer_baseline: str
    num_heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    sm_scale: float
    bandwidth: float  # bytes / s
    repeats: int
    warmup: int


def _bench_shape(setup: _Setup, case: _Case, q, k_pages, v_pages, peer_kv):
    """Times and checks every row of one shape; returns (shape report, peer_kv for reuse)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.pallas import prefix_attention as pa
    from jaxinfer.pallas import ragged_paged_attention as rpa
    has_prefix = case.prefix_len > 0
    plain_bytes, shared_bytes, plain_kv, shared_kv = _bytes(case, setup.kv_heads, setup.num_heads, setup.head_dim,
                                                            setup.itemsize)
    shape = {"batch": case.batch, "context": case.context, "prefix_fraction": case.prefix_fraction,
             "prefix_len": case.prefix_len, "q_len": case.q_len, "num_tokens": case.num_tokens,
             "num_prefix_rows": case.num_prefix_rows if has_prefix else 0,
             "prefix_query_block": case.prefix_block if has_prefix else None,
             "plain_bytes": plain_bytes, "plain_kv_bytes": plain_kv,
             "shared_bytes": shared_bytes if has_prefix else None,
             "shared_kv_bytes": shared_kv if has_prefix else None,
             "ideal_shared_speedup": plain_bytes / shared_bytes if has_prefix else None,
             "rows": []}
    plain_args = (q, k_pages, v_pages, jnp.asarray(case.cu_q_lens), jnp.asarray(case.kv_lens),
                  jnp.asarray(case.page_tables))
    shared_args = (q, k_pages, v_pages, jnp.asarray(case.positions), jnp.asarray(case.cu_q_lens),
                   jnp.asarray(case.kv_lens), jnp.asarray(case.suffix_tables), jnp.asarray(case.kv_starts),
                   pa.PrefixRows(*map(jnp.asarray, case.prefix)))
    outputs = {}  # (path, label) -> output
    plain_ms = {}  # label -> ms

    def add_row(path, label, timed, fn, args, num_bytes, baseline_ms=None):
        row = {"path": path, "impl": label, "timing_meaningful": timed, "bytes": num_bytes,
               "roofline_ms": 1e3 * num_bytes / setup.bandwidth}
        try:
            out, seconds, first = _run_row(fn, args, setup.repeats, setup.warmup)
            outputs[(path, label)] = out
            row.update(ms=1e3 * seconds, first_call_s=first, pct_of_roofline=100 * row["roofline_ms"] / (1e3 * seconds))
            if baseline_ms is not None:
                row["x_plain"] = baseline_ms / row["ms"]
        except Exception as e:  # a kernel that cannot take a shape is reported, not fatal
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  {path} {label}: FAILED {row['error'][:300]}")
        shape["rows"].append(row)
        return row

    for label, impl, timed in setup.run_impls:
        fn = jax.jit(functools.partial(rpa.ragged_paged_attention, max_q_len=case.q_len, sm_scale=setup.sm_scale,
                                       impl=impl))
        row = add_row("plain", label, timed, fn, plain_args, plain_bytes)
        if "ms" in row:
            plain_ms[label] = row["ms"]
    if has_prefix:
        for label, impl, timed in setup.run_impls:
            fn = jax.jit(functools.partial(pa.shared_prefix_attention, max_q_len=case.q_len, sm_scale=setup.sm_scale,
                                           impl=impl))
            add_row("shared", label, timed, fn, shared_args, shared_bytes, plain_ms.get(label))
    if setup.run_peer and case.q_len == 1:
        try:
            peer, name = _peer_fn(setup.backend, setup.on_cpu, case.peer_tables.shape[1])
            if peer_kv is None:  # [K, P, L, H], once per cache
                peer_kv = jax.block_until_ready((jnp.transpose(k_pages, (2, 0, 1, 3)),
                                                 jnp.transpose(v_pages, (2, 0, 1, 3))))
            q_scaled = (q.astype(jnp.float32) * setup.sm_scale).astype(q.dtype)  # the peer applies no scale
            peer_args = (q_scaled, *peer_kv, jnp.asarray(case.peer_tables), jnp.asarray(case.kv_lens))
        except Exception as e:
            shape["rows"].append({"path": "peer", "impl": "jax", "error": f"{type(e).__name__}: {e}"[:2000]})
            print(f"  peer: FAILED {type(e).__name__}: {e}"[:300])
        else:
            base_label = next((lbl for lbl, impl, _ in setup.run_impls if impl.startswith(setup.peer_baseline)),
                              setup.peer_baseline)
            row = add_row("peer", name, not setup.on_cpu, peer, peer_args, plain_bytes,
                          baseline_ms=plain_ms.get(base_label))
            if "x_plain" in row:
                row["x_plain_impl"] = base_label

    # Correctness against the oracle: plain xla (else the first plain row that ran).
    ref_key = ("plain", "xla") if ("plain", "xla") in outputs else next((k for k in outputs if k[0] == "plain"), None)
    checks = {}
    if ref_key is not None:
        shape["reference"] = "/".join(ref_key)
        for row in shape["rows"]:
            key = (row["path"], row["impl"])
            if key in outputs and key != ref_key:
                row["max_abs_diff_vs_ref"] = _max_abs_diff(outputs[key], outputs[ref_key])
    for label, _, _ in setup.run_impls:
        if ("shared", label) in outputs and ("plain", label) in outputs:
            checks[f"shared-plain ({label})"] = _max_abs_diff(outputs[("shared", label)], outputs[("plain", label)])
        if label != "xla":
            for path in ("plain", "shared"):
                if (path, label) in outputs and (path, "xla") in outputs:
                    checks[f"{label}-xla ({path})"] = _max_abs_diff(outputs[(path, label)], outputs[(path, "xla")])
    for (path, label), out in outputs.items():
        if path == "peer" and ref_key is not None:
            checks[f"peer-{'/'.join(ref_key)}"] = _max_abs_diff(out, outputs[ref_key])
    shape["checks"] = checks
    return shape, peer_kv


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxinfer.pallas import ragged_paged_attention as rpa
    from jaxinfer.runtime.input_batch import PREFIX_QUERY_BLOCK, QUERY_BLOCK

    backend = jax.default_backend()
    on_cpu = backend not in ("gpu", "tpu")
    batches = [int(x) for x in _BATCH.value]
    contexts = [int(x) for x in _CONTEXT.value]
    fractions = [float(x) for x in _PREFIX_FRACTION.value]
    q_lens = [int(x) for x in _Q_LENS.value]
    num_heads = _NUM_HEADS.value or (12 if on_cpu else 32)
    kv_heads = _NUM_KV_HEADS.value or (4 if on_cpu else 8)
    head_dim = _HEAD_DIM.value or (64 if on_cpu else 128)
    L = _PAGE_SIZE.value
    dtype = jnp.dtype(_DTYPE.value or ("float32" if on_cpu else "bfloat16"))
    impls = _IMPLS.value
    prefix_block = _PREFIX_QUERY_BLOCK.value or PREFIX_QUERY_BLOCK
    bandwidth_mib = _BANDWIDTH_MIB.value or (512 if on_cpu else 2048)
    sm_scale = head_dim ** -0.5
    if num_heads % kv_heads:
        raise app.UsageError(f"--num_heads {num_heads} is not a multiple of --num_kv_heads {kv_heads}")
    for q_len in q_lens:
        if not 1 <= q_len <= QUERY_BLOCK:
            raise app.UsageError(f"--q_lens: {q_len} outside [1, {QUERY_BLOCK}] (the runner splits longer chunks "
                                 f"into rows of QUERY_BLOCK={QUERY_BLOCK} queries)")
    for impl in impls:
        if impl not in rpa.IMPLS:
            raise app.UsageError(f"--impls: {impl!r} not in {rpa.IMPLS}")

    notes = []
    run_impls = []  # (label, impl passed to the op, timing meaningful)
    for impl in impls:
        if on_cpu and impl == "pallas":
            if _INTERPRET_ON_CPU.value:
                run_impls.append(("pallas(interp)", "pallas_interpret", False))
            else:
                notes.append(f"impl pallas (our kernels): {_CPU_SKIP_NOTE}")
        elif impl.endswith("interpret"):
            run_impls.append((impl, impl, False))
        else:
            run_impls.append((impl, impl, True))
    run_peer = _PEER.value and (not on_cpu or _INTERPRET_ON_CPU.value)
    if _PEER.value and not run_peer:
        notes.append(f"peer (jax.experimental.pallas.ops.gpu/tpu paged_attention): {_CPU_SKIP_NOTE}")
    if _PEER.value and any(q > 1 for q in q_lens):
        notes.append("peer: jax's paged_attention is decode-only; not run for q_len > 1")
    if not run_impls:
        raise app.UsageError("no impl left to run on this backend (see the notes above)")
    for note in notes:
        print(f"note: {note}")

    print(f"measuring memory bandwidth ({bandwidth_mib} MiB float32 GEMV) ...")
    bandwidth = bench_common.measure_memory_bandwidth(bandwidth_mib << 20)
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s on {jax.devices()[0]}")
    setup = _Setup(backend=backend, on_cpu=on_cpu, run_impls=run_impls, run_peer=run_peer,
                   peer_baseline=_PEER_BASELINE.value, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim,
                   itemsize=dtype.itemsize, sm_scale=sm_scale, bandwidth=bandwidth, repeats=_REPEATS.value,
                   warmup=_WARMUP.value)

    rng = np.random.RandomState(_SEED.value)
    key = jax.random.key(_SEED.value)
    shapes = []
    for batch in batches:
        for context in contexts:
            num_pages = batch * -(-context // L) + 1  # enough for no sharing at all; one spare
            kk, kv, key = jax.random.split(key, 3)
            k_pages = jax.random.normal(kk, (num_pages, L, kv_heads, head_dim), jnp.float32).astype(dtype)
            v_pages = jax.random.normal(kv, (num_pages, L, kv_heads, head_dim), jnp.float32).astype(dtype)
            peer_kv = None
            for q_len in q_lens:
                kq, key = jax.random.split(key)
                q = jax.random.normal(kq, (batch * q_len, num_heads, head_dim), jnp.float32).astype(dtype)
                seen_prefix = set()
                for fraction in fractions:
                    prefix_len = int(fraction * context) // L * L
                    prefix_len = max(0, min(prefix_len, (context - q_len) // L * L))
                    if prefix_len in seen_prefix:
                        continue
                    seen_prefix.add(prefix_len)
                    perm = rng.permutation(num_pages).astype(np.int32)
                    case = _Case(batch, context, fraction, prefix_len, q_len, L, perm, prefix_block)
                    shape, peer_kv = _bench_shape(setup, case, q, k_pages, v_pages, peer_kv)
                    shapes.append(shape)
                    _print_shape(shape)
            del k_pages, v_pages, peer_kv

    report = {"env": bench_common.environment(),
              "config": {"batch": batches, "context": contexts, "prefix_fraction": fractions, "q_lens": q_lens,
                         "num_heads": num_heads, "num_kv_heads": kv_heads, "head_dim": head_dim, "page_size": L,
                         "dtype": dtype.name, "impls": [label for label, _, _ in run_impls],
                         "prefix_query_block": prefix_block, "repeats": _REPEATS.value, "warmup": _WARMUP.value,
                         "peer": run_peer, "interpret_on_cpu": _INTERPRET_ON_CPU.value, "seed": _SEED.value},
              "memory_bandwidth_gb_s": bandwidth / 1e9, "bandwidth_buffer_mib": bandwidth_mib,
              "notes": notes, "shapes": shapes}
    _print_summary(report)
    bench_common.write_json(_JSON.value, report)
    if _PLOT.value:
        import plotting
        plotting.plot_kernels(report, _PLOT.value)


_HEADER = (f"{'batch':>6s}{'ctx':>6s}{'prefix':>7s}{'q':>4s}  {'path':7s}{'impl':22s}{'ms':>10s}{'MB':>9s}"
           f"{'roof ms':>10s}{'% roof':>8s}{'x plain':>9s}{'max err':>10s}")
_printed_header = []


def _print_shape(shape):
    if not _printed_header:
        print(_HEADER)
        _printed_header.append(True)
    lead = f"{shape['batch']:6d}{shape['context']:6d}{shape['prefix_len']:7d}{shape['q_len']:4d}  "
    for row in shape["rows"]:
        impl = row["impl"] + ("" if row.get("timing_meaningful", True) else " *")
        if "error" in row:
            print(f"{lead}{row['path']:7s}{impl[:22]:22s}  error: {row['error'][:80]}")
            continue
        x_plain = f"{row['x_plain']:9.2f}" if "x_plain" in row else f"{'':9s}"
        err = row.get("max_abs_diff_vs_ref")
        err = f"{err:10.1e}" if err is not None else f"{'-':>10s}"
        print(f"{lead}{row['path']:7s}{impl[:22]:22s}{row['ms']:10.3f}{row['bytes'] / 1e6:9.1f}"
              f"{row['roofline_ms']:10.3f}{row['pct_of_roofline']:8.1f}{x_plain}{err}")
        lead = " " * len(lead)
    extra = []
    if shape["ideal_shared_speedup"]:
        extra.append(f"ideal shared speed-up (bytes) {shape['ideal_shared_speedup']:.2f}x, "
                     f"{shape['num_prefix_rows']} prefix row(s) of {shape['prefix_query_block']}")
    extra += [f"|{k}| {v:.1e}" for k, v in shape["checks"].items()]
    if extra:
        print(" " * len(lead) + "check: " + "; ".join(extra))


def _print_summary(report):
    c = report["config"]
    print(f"\n{c['num_heads']} q heads / {c['num_kv_heads']} kv heads, head_dim {c['head_dim']}, "
          f"page {c['page_size']}, {c['dtype']}; memory bandwidth {report['memory_bandwidth_gb_s']:.1f} GB/s "
          f"(measured in this run)")
    print("ms: median per call; roof ms: bytes / bandwidth; x plain: plain ms / this ms (same impl; peer: vs "
          "plain of --peer_baseline_impl); max err: max |out - plain xla|; * = interpret mode, time meaningless")
    for note in report["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    app.run(main)
