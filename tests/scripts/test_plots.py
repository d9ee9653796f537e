"""scripts/plotting.py: each benchmark's chart from a small report; the serving script's --plot end to end.

The reports are shaped like the scripts' JSON (the keys the plots read), with made-up
numbers: the benchmarks themselves are not re-run here. The serving script runs as a
subprocess against the fake OpenAI server of test_benchmark_serving.py (two rates).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

import plotting

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_PNG = b"\x89PNG\r\n\x1a\n"
_ENV = {"device": "TFRT_CPU_0", "jax": "0.10.2"}


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == _PNG and len(data) > 5000  # a real drawing, not an empty canvas


def test_latency_plot(tmp_path):
    sweep = [{"batch_size": b, "memory_roofline_ms": 2.0, "compute_roofline_ms": 0.3 * b,
              "decode_ms_per_token": 4.0 + 0.25 * b} for b in (1, 2, 4, 8, 16)]
    report = {"env": _ENV, "jaxinfer": {"decode_ms_per_token": 4.25, "num_params": 125e6},
              "memory_roofline_ms_per_token": 2.0, "compute_roofline_ms_per_token": 0.3,
              "hf": {"decode_ms_per_token": 9.0}, "batch_sweep": sweep}
    fig = plotting.plot_latency(report, str(tmp_path / "latency.png"))
    _check_png(tmp_path / "latency.png")
    (ax,) = fig.axes
    assert len(ax.lines) == 5  # two roofs, their max, jaxinfer, HF
    # a batch-1 report (no sweep) gives one point; --output_len 1 (no decode) is refused by name
    plotting.plot_latency({k: v for k, v in report.items() if k != "batch_sweep"}, str(tmp_path / "one.png"))
    _check_png(tmp_path / "one.png")
    with pytest.raises(ValueError, match="no decode"):
        plotting.plot_latency({**report, "batch_sweep": [{**sweep[0], "decode_ms_per_token": None}]})


def test_throughput_plot(tmp_path):
    sweep = [{"num_requests": n, "output_tokens_per_s": 30.0 * n ** 0.7, "computed_tokens_per_s": 200.0 * n ** 0.6}
             for n in (1, 4, 16, 64)]
    report = {"env": _ENV, "workload": {"num_requests": 64, "input_len": [64, 256], "output_len": 64},
              "compute_roofline_tokens_per_s": 9000.0, "jaxinfer": sweep[-1], "sweep": sweep}
    fig = plotting.plot_throughput(report, str(tmp_path / "throughput.png"))
    _check_png(tmp_path / "throughput.png")
    assert [tuple(line.get_xdata()) for line in fig.axes[0].lines[:2]] == [(1, 4, 16, 64)] * 2
    single = {**report, "sweep": [], "jaxinfer_shared_prefix_off": {"output_tokens_per_s": 100.0}}
    plotting.plot_throughput(single, str(tmp_path / "single.png"))
    _check_png(tmp_path / "single.png")


def test_serving_plot_orders_rates_and_handles_inf(tmp_path):
    def run(rate, scale):
        return {"request_rate": rate, "model": "m", "target": "http://x",
                **{f"p{p}_ttft_ms": scale * p for p in (50, 90, 99)},
                **{f"p{p}_tpot_ms": scale * p / 10 for p in (50, 90, 99)}}
    fig = plotting.plot_serving([run("4", 2.0), run("1", 1.0), run("inf", 5.0)], str(tmp_path / "serving.png"))
    _check_png(tmp_path / "serving.png")
    ttft = fig.axes[0]
    assert [t.get_text() for t in ttft.get_xticklabels()] == ["1", "4", "inf"]
    assert list(ttft.lines[0].get_ydata()) == [50.0, 100.0, 250.0]  # P50, sorted by rate
    with pytest.raises(ValueError, match="runs"):
        plotting.plot_serving([])


def test_kernels_plot_skips_interpret_and_failed_rows(tmp_path):
    rows = [{"path": "plain", "impl": "xla", "bytes": 4e6, "ms": 1.0, "timing_meaningful": True},
            {"path": "shared", "impl": "xla", "bytes": 1e6, "ms": 0.5, "timing_meaningful": True},
            {"path": "plain", "impl": "pallas(interp)", "bytes": 4e6, "ms": 90.0, "timing_meaningful": False},
            {"path": "peer", "impl": "jax", "error": "boom"}]
    report = {"env": _ENV, "memory_bandwidth_gb_s": 10.0, "config": {"dtype": "float32", "head_dim": 64},
              "shapes": [{"rows": rows}]}
    fig = plotting.plot_kernels(report, str(tmp_path / "kernels.png"))
    _check_png(tmp_path / "kernels.png")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels[1:] == ["plain (xla)", "shared (xla)"] and "memory roof" in labels[0]
    with pytest.raises(ValueError, match="no timed rows"):
        plotting.plot_kernels({**report, "shapes": [{"rows": rows[2:]}]})


def test_serving_script_plots_several_rates(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "_serving_tests", os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_benchmark_serving.py"))
    serving_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving_tests)
    import http.server
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), serving_tests._FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out, png = tmp_path / "runs.json", tmp_path / "serving.png"
    try:
        proc = subprocess.run(
            [sys.executable, os.path.join(_REPO, "scripts", "benchmark_serving.py"),
             "--base_url", f"http://127.0.0.1:{server.server_address[1]}", "--num_prompts", "4",
             "--random_input_len", "8", "--random_output_len", "4", "--request_rates", "100,inf",
             "--disable_tqdm", "--result_json", str(out), "--plot", str(png)],
            capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == ["100", "inf"] and all(r["completed"] == 4 for r in runs)
    _check_png(png)


def test_int4_plot(tmp_path):
    rows = []
    for m in (1, 16, 64):
        rows.append({"m": m, "op": "dense", "impl": "xla", "seconds": 1e-3 * (1 + m / 16), "weight_bytes": 64 << 20})
        rows.append({"m": m, "op": "int4", "impl": "xla", "seconds": 4e-4 * (1 + m / 8), "weight_bytes": 9 << 20})
    report = {"env": _ENV, "k": 4096, "n": 4096, "group_size": 128, "dtype": "float32",
              "memory_bandwidth_gb_s": 20.0, "dense_peak_tflops": 0.1, "rows": rows}
    fig = plotting.plot_int4(report, str(tmp_path / "int4.png"))
    _check_png(tmp_path / "int4.png")
    assert len(fig.axes[0].lines) == 4  # two roofs, two measured series
    assert list(fig.axes[0].lines[-1].get_xdata()) == [1, 16, 64]
    with pytest.raises(ValueError, match="no rows"):
        plotting.plot_int4({**report, "rows": []})


def test_server_overhead_plot(tmp_path):
    report = {"env": _ENV, "model": "tiny-code", "workload": {"num_prompts": 32, "input_len": 64, "output_len": 32},
              "comparison": {"session_total_tokens_per_s": 900.0, "server_total_tokens_per_s": 850.0},
              "low_load": {"session": {"ttft": {"median_ms": 20.0}}, "server": {"ttft": {"median_ms": None}}}}
    fig = plotting.plot_server_overhead(report, str(tmp_path / "overhead.png"))
    _check_png(tmp_path / "overhead.png")
    assert [b.get_height() for b in fig.axes[0].patches] == [900.0, 850.0]


def test_startup_plot(tmp_path):
    def run(i, kind, first):
        return {"run": i, "kind": kind, "import_s": 1.9, "load_s": 3.1, "warmup_s": 3.1 if kind == "cold" else 4.5,
                "first_token_s": first, "compiles_after_warmup": 2 if kind == "cold" else 0}
    report = {"model": "/tmp/jaxinfer-bench-125m", "prompt_len": 32,
              "runs": [run(0, "cold", 5.2), run(1, "warm", 4.6)]}
    fig = plotting.plot_startup(report, str(tmp_path / "startup.png"))
    _check_png(tmp_path / "startup.png")
    ax = fig.axes[0]
    assert len(ax.patches) == 8  # 4 phases x 2 runs
    assert abs(max(p.get_x() + p.get_width() for p in ax.patches) - 5.2) < 1e-9
    with pytest.raises(ValueError, match="no runs"):
        plotting.plot_startup({"runs": []})
