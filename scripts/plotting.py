"""Charts of the benchmarks' JSON reports (the scripts' --plot FILE.png, and the notebooks).

    import plotting
    plotting.plot_latency(report, "latency.png")        # benchmark_latency.py's report
    plotting.plot_throughput(report, "throughput.png")  # benchmark_throughput.py's report
    plotting.plot_serving(runs, "serving.png")          # benchmark_serving.py's per-rate reports
    plotting.plot_kernels(report, "kernels.png")        # benchmark_kernels.py's report

matplotlib is imported inside the functions, with the Agg backend unless a backend was
chosen already (a notebook's inline backend stays), so the scripts run without
matplotlib when --plot is not given. Each function takes the report dict the script
writes as JSON, draws on a new figure, saves it when `path` is given (PNG, 110 dpi) and
returns the figure (the notebooks display it).
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence


def _pyplot():
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # headless; a notebook that imported pyplot keeps its backend
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, path: Optional[str], title: str):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=110)
        print(f"wrote {path}")
    return fig


def _log(ax, x_base: Optional[int] = None) -> None:
    """Log y (and x, in base x_base, when given) without minor tick labels (they overlap on short ranges)."""
    from matplotlib.ticker import NullFormatter
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    if x_base:
        ax.set_xscale("log", base=x_base)
        ax.xaxis.set_minor_formatter(NullFormatter())


def _pow2_axes(ax, xs, xlabel: str, ylabel: str) -> None:
    """Log y; log-2 x with a tick at each x (linear for a single x); labels, grid, legend."""
    _log(ax, x_base=2 if len(xs) > 1 else None)
    if len(xs) > 1:
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _env_line(report: dict) -> str:
    env = report.get("env") or {}
    device = env.get("device", "?")
    return f"{device}, jax {env.get('jax', '?')}"


def plot_latency(report: dict, path: Optional[str] = None):
    """Decode ms per step (= ms/token of each sequence) vs batch size, under the roofs.

    The memory roof is the weight bytes over the measured bandwidth (every step reads
    every weight once, whatever the batch); the compute roof is 2 x parameters FLOPs per
    token x batch over the measured GEMM rate. The achievable floor is the larger one.
    Uses report["batch_sweep"] (benchmark_latency.py --batch_sizes); a batch-1 report
    gives one point.
    """
    plt = _pyplot()
    sweep = report.get("batch_sweep") or [{
        "batch_size": 1, "decode_ms_per_token": report["jaxinfer"]["decode_ms_per_token"],
        "memory_roofline_ms": report["memory_roofline_ms_per_token"],
        "compute_roofline_ms": report["compute_roofline_ms_per_token"]}]
    sweep = [s for s in sweep if s.get("decode_ms_per_token") is not None]
    if not sweep:
        raise ValueError("report: no decode figures to plot (was --output_len 1?)")
    batches = [s["batch_size"] for s in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    memory = [s["memory_roofline_ms"] for s in sweep]
    compute = [s["compute_roofline_ms"] for s in sweep]
    ax.plot(batches, memory, "--", color="tab:blue", label="memory roof (weights / bandwidth)")
    ax.plot(batches, compute, "--", color="tab:red", label="compute roof (2·params·batch / GEMM rate)")
    ax.plot(batches, [max(m, c) for m, c in zip(memory, compute)], color="0.6", lw=4, alpha=0.35,
            label="roofline (max)")
    ax.plot(batches, [s["decode_ms_per_token"] for s in sweep], "o-", color="black", label="jaxinfer decode")
    hf = (report.get("hf") or {}).get("decode_ms_per_token")
    if hf is not None:
        ax.plot([1], [hf], "s", color="tab:orange", label="HF transformers (batch 1)")
    _pow2_axes(ax, batches, "batch size (sequences decoding together)", "ms per decode step (= ms/token per sequence)")
    params = report["jaxinfer"].get("num_params")
    what = f"{params / 1e6:.0f}M params, " if params else ""
    return _finish(fig, path, f"Decode latency vs batch ({what}{_env_line(report)})")


def plot_throughput(report: dict, path: Optional[str] = None):
    """Output and total tokens/s vs the number of requests, with the compute roof.

    Uses report["sweep"] (benchmark_throughput.py --num_requests_sweep); a single run
    gives one point per series (and the shared-prefix-off run when there is one).
    """
    plt = _pyplot()
    sweep = report.get("sweep") or [{"num_requests": report["workload"]["num_requests"], **report["jaxinfer"]}]
    counts = [s["num_requests"] for s in sweep]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(counts, [s["output_tokens_per_s"] for s in sweep], "o-", label="output tokens/s")
    ax.plot(counts, [s["computed_tokens_per_s"] for s in sweep], "s-", label="tokens computed/s (prompt + output)")
    roof = report.get("compute_roofline_tokens_per_s")
    if roof:
        ax.axhline(roof, ls="--", color="tab:red", label="compute roof (GEMM rate / 2·params)")
    off = report.get("jaxinfer_shared_prefix_off")
    if off is not None and not report.get("sweep"):
        ax.plot(counts, [off["output_tokens_per_s"]], "x", color="tab:purple", ms=9,
                label="output tokens/s, shared-prefix path off")
    _pow2_axes(ax, counts, "requests submitted together", "tokens / s")
    w = report.get("workload", {})
    return _finish(fig, path, f"Throughput vs requests (input {w.get('input_len')}, output {w.get('output_len')}; "
                              f"{_env_line(report)})")


def _rate_value(rate) -> float:
    return float("inf") if str(rate) == "inf" else float(rate)


def plot_serving(runs: Sequence[dict], path: Optional[str] = None, percentiles: Sequence[float] = (50, 90, 99)):
    """TTFT and TPOT percentiles (ms) vs request rate, one report of benchmark_serving.py per rate.

    Each run needs "request_rate" (a number or "inf") and the p<N>_ttft_ms / p<N>_tpot_ms
    keys of serving_bench_lib.compute_metrics. With an "inf" rate (all at once) the axis
    is categorical.
    """
    if not runs:
        raise ValueError("runs: nothing to plot")
    plt = _pyplot()
    runs = sorted(runs, key=lambda r: _rate_value(r["request_rate"]))
    rates = [_rate_value(r["request_rate"]) for r in runs]
    numeric = all(math.isfinite(r) for r in rates)
    xs = rates if numeric else list(range(len(rates)))
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, key, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for p in percentiles:
            ys = [r.get(f"p{p:g}_{key}_ms") for r in runs]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(xs, ys, "o-", label=f"P{p:g}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{key.upper()} (ms)")
        ax.set_title(title, fontsize=9)
        if not numeric:
            ax.set_xticks(xs, [f"{r:g}" for r in rates])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    model = runs[0].get("model", "")
    return _finish(fig, path, f"Serving latency percentiles vs rate ({model}, {runs[0].get('target', '')})")


def plot_kernels(report: dict, path: Optional[str] = None):
    """Attention roofline: ms per call vs bytes moved, every row of every shape, and the memory roof.

    A row on the roof line runs at the measured bandwidth; interpret-mode rows (timing
    not meaningful) and failed rows are left out.
    """
    plt = _pyplot()
    bandwidth = report["memory_bandwidth_gb_s"] * 1e9
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series: dict = {}
    for shape in report["shapes"]:
        for row in shape["rows"]:
            if "ms" not in row or not row.get("timing_meaningful", True):
                continue
            series.setdefault(f"{row['path']} ({row['impl']})", []).append((row["bytes"], row["ms"]))
    if not series:
        raise ValueError("report: no timed rows to plot")
    lo = min(b for pts in series.values() for b, _ in pts)
    hi = max(b for pts in series.values() for b, _ in pts)
    xs = [lo / 1.5, hi * 1.5]
    ax.plot([x / 1e6 for x in xs], [1e3 * x / bandwidth for x in xs], "--", color="tab:red",
            label=f"memory roof ({bandwidth / 1e9:.1f} GB/s measured)")
    for (label, pts), marker in zip(sorted(series.items()), "osD^v<>p*h"):
        ax.plot([b / 1e6 for b, _ in pts], [ms for _, ms in pts], marker, ls="none", label=label, alpha=0.8)
    _log(ax, x_base=10)
    ax.set_xlabel("bytes a call must move (MB: K/V read + q + out)")
    ax.set_ylabel("ms per call (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    c = report.get("config", {})
    return _finish(fig, path, f"Attention kernels vs roofline ({c.get('dtype', '')}, head_dim {c.get('head_dim')}; "
                              f"{_env_line(report)})")


def plot_int4(report: dict, path: Optional[str] = None):
    """int4 weight-only matmul: ms per call vs rows M, dense float and each int4 impl, each
    under its own roof (weights + activations over the measured bandwidth, or flops over
    the measured GEMM rate, whichever is longer)."""
    plt = _pyplot()
    k, n = report["k"], report["n"]
    itemsize = 2 if report.get("dtype") == "bfloat16" else 4
    bandwidth, peak = report["memory_bandwidth_gb_s"] * 1e9, report["dense_peak_tflops"] * 1e12
    series: dict = {}
    weights: dict = {}
    for row in report["rows"]:
        label = "dense (xla)" if row["op"] == "dense" else f"int4 ({row['impl']})"
        series.setdefault(label, []).append((row["m"], 1e3 * row["seconds"]))
        weights[row["op"]] = row["weight_bytes"]
    if not series:
        raise ValueError("report: no rows to plot")
    ms = sorted({m for pts in series.values() for m, _ in pts})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for op, color in (("dense", "tab:red"), ("int4", "tab:green")):
        if op in weights:
            roof = [1e3 * max((weights[op] + m * (k + n) * itemsize) / bandwidth, 2 * m * k * n / peak) for m in ms]
            ax.plot(ms, roof, "--", color=color, label=f"{op} roof ({weights[op] / 1e6:.1f} MB of weights)")
    for (label, pts), marker in zip(sorted(series.items()), "osD^"):
        pts = sorted(pts)
        ax.plot([m for m, _ in pts], [t for _, t in pts], marker + "-", label=label)
    _pow2_axes(ax, ms, "rows M (tokens)", "ms per matmul (median)")
    return _finish(fig, path, f"int4 matmul K={k} N={n} group {report.get('group_size')} "
                              f"{report.get('dtype', '')} ({_env_line(report)})")


def plot_server_overhead(report: dict, path: Optional[str] = None):
    """In-process session vs `jaxinfer serve`: full-load tokens/s and low-load TTFT (median)."""
    plt = _pyplot()
    c, low = report["comparison"], report["low_load"]
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6))
    paths = ("session", "server")
    for ax, values, ylabel, title in (
            (axes[0], [c["session_total_tokens_per_s"], c["server_total_tokens_per_s"]], "tokens / s",
             "full load: prompt + output tokens/s"),
            (axes[1], [low["session"]["ttft"]["median_ms"], low["server"]["ttft"]["median_ms"]], "ms",
             "low load: TTFT median")):
        values = [math.nan if v is None else v for v in values]
        bars = ax.bar(paths, values, color=["tab:blue", "tab:orange"])
        for bar, v in zip(bars, values):
            if math.isfinite(v):
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    w = report.get("workload", {})
    return _finish(fig, path, f"Server overhead: {report.get('model', '')}, {w.get('num_prompts')} prompts x "
                              f"({w.get('input_len')} + {w.get('output_len')}) tokens ({_env_line(report)})")


_STARTUP_PHASES = (("import_s", "import", "tab:gray"), ("load_s", "load", "tab:blue"),
                   ("warmup_s", "warm-up", "tab:orange"), ("first_token_s", "first token", "tab:green"))


def plot_startup(report: dict, path: Optional[str] = None):
    """Seconds from process start to the first token, one stacked bar per run (cold, warm...)."""
    runs = report.get("runs") or []
    if not runs:
        raise ValueError("report: no runs to plot")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 1.8 + 0.5 * len(runs)))
    labels = [f"{r['kind']} #{r['run']}" for r in runs]
    for key, name, color in _STARTUP_PHASES:
        starts, widths = [], []
        for r in runs:
            before = [r[k] for k, _, _ in _STARTUP_PHASES[:[p[0] for p in _STARTUP_PHASES].index(key)]]
            start = max(before) if before else 0.0
            starts.append(start)
            widths.append(max(r[key] - start, 0.0))
        ax.barh(labels, widths, left=starts, color=color, label=name)
    for i, r in enumerate(runs):
        ax.annotate(f"{r['first_token_s']:.2f} s ({r['compiles_after_warmup']} compiles)", (r["first_token_s"], i),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the process was spawned")
    ax.set_xlim(0, max(r["first_token_s"] for r in runs) * 1.45)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 / len(runs)))
    model = os.path.basename(str(report.get("model", "")).rstrip("/"))
    return _finish(fig, path, f"Start to first token: {model}, {report.get('prompt_len')}-token prompt")
