"""scripts/benchmark_server_overhead.py: the pure helpers (no model, no server)."""
from __future__ import annotations

import math
import os

import pytest

from script_loader import load_script



@pytest.fixture(scope="module")
def mod():
    return load_script("benchmark_server_overhead")


def test_prompts_exact_length_range_and_seeded(mod):
    prompts = mod.make_prompts(seed=3, num=5, input_len=17, vocab_size=50, bos_id=1)
    assert len(prompts) == 5
    for p in prompts:
        assert len(p) == 17 and p[0] == 1
        assert all(isinstance(t, int) and mod.FIRST_ID <= t < 50 for t in p[1:])
    assert prompts == mod.make_prompts(seed=3, num=5, input_len=17, vocab_size=50, bos_id=1)
    assert prompts != mod.make_prompts(seed=4, num=5, input_len=17, vocab_size=50, bos_id=1)
    no_bos = mod.make_prompts(seed=3, num=2, input_len=4, vocab_size=50, bos_id=None)
    assert all(len(p) == 4 and min(p) >= mod.FIRST_ID for p in no_bos)
    with pytest.raises(ValueError, match="vocab_size"):
        mod.make_prompts(seed=0, num=1, input_len=4, vocab_size=mod.FIRST_ID)


def test_throughput_and_tpot(mod):
    t = mod.throughput(num_prompt_tokens=300, num_output_tokens=100, seconds=2.0)
    assert t["total_tokens_per_s"] == 200.0 and t["output_tokens_per_s"] == 50.0
    assert mod.throughput(1, 1, 0.0)["total_tokens_per_s"] == 0.0
    assert mod.tpot(latency_s=1.0, ttft_s=0.1, num_tokens=10) == pytest.approx(0.1)
    assert mod.tpot(latency_s=1.0, ttft_s=0.1, num_tokens=1) is None


def test_latency_stats(mod):
    s = mod.latency_stats([0.001, 0.002, 0.006])
    assert s["median_ms"] == pytest.approx(2.0) and s["mean_ms"] == pytest.approx(3.0)
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(6.0)
    assert mod.latency_stats([])["median_ms"] is None


def test_compare_ratios_and_goal(mod):
    session = [mod.throughput(900, 100, s) for s in (1.0, 1.1, 5.0)]  # median 1.1 s: an outlier does not count
    server = [mod.throughput(900, 100, s) for s in (1.1, 1.2, 1.15)]
    c = mod.compare(session, server, [0.020, 0.022, 0.024], [0.023, 0.025, 0.030])
    assert c["ratio_total_tokens_per_s"] == pytest.approx(1.1 / 1.15)
    assert c["ratio_output_tokens_per_s"] == pytest.approx(1.1 / 1.15)
    assert c["throughput_overhead"] == pytest.approx(1 - 1.1 / 1.15)
    assert c["goal_throughput_met"]  # 4.3% < 5%
    assert c["ttft_median_diff_ms"] == pytest.approx(3.0)
    assert c["ttft_mean_diff_ms"] == pytest.approx(4.0)
    assert c["goal_ttft_met"]
    assert c["ttft_paired_median_diff_ms"] is None  # not given: the goal uses the difference of medians
    paired = mod.compare(session, server, [0.020, 0.022, 0.024], [0.023, 0.025, 0.030], [0.007, 0.006, 0.001])
    assert paired["ttft_paired_median_diff_ms"] == pytest.approx(6.0)
    assert paired["ttft_median_diff_ms"] == pytest.approx(3.0) and not paired["goal_ttft_met"]
    slow = mod.compare(session, [mod.throughput(900, 100, 2.0)], [0.02], [0.03])
    assert slow["throughput_overhead"] == pytest.approx(0.45)
    assert not slow["goal_throughput_met"] and not slow["goal_ttft_met"]


def test_parse_prometheus_value(mod):
    text = ('# HELP jaxinfer:num_compiles XLA programs compiled.\n'
            '# TYPE jaxinfer:num_compiles counter\n'
            'jaxinfer:num_compiles_total{model_name="tiny-code"} 17.0\n'
            'jaxinfer:num_compiles_created{model_name="tiny-code"} 1.7e+09\n'
            'jaxinfer:compile_seconds_total{model_name="tiny-code"} 3.5\n'
            'plain 2\n')
    assert mod.parse_prometheus_value(text, "jaxinfer:num_compiles") == 17.0
    assert mod.parse_prometheus_value(text, "jaxinfer:compile_seconds") == 3.5
    assert mod.parse_prometheus_value(text, "plain") == 2.0
    assert mod.parse_prometheus_value(text, "jaxinfer:missing") is None


def test_server_command_and_payload(mod):
    cmd = mod.server_command("py", 8123, "tiny-code", "float32", 16, None, 256, 16)
    assert cmd[:4] == ["py", "-m", "jaxinfer.cli", "serve"]
    assert {"--port=8123", "--grpc_port=-1", "--model=tiny-code", "--max_num_batched_tokens=256",
            "--max_num_seqs=16", "--page_size=16", "--dtype=float32"} <= set(cmd)
    assert not any(a.startswith("--num_pages") for a in cmd)
    assert "--num_pages=64" in mod.server_command("py", 1, "m", "float32", 16, 64, 256, 16)
    streamed = mod.completion_payload("m", [1, 5, 7], 8, stream=True)
    assert streamed["prompt"] == [1, 5, 7] and streamed["max_tokens"] == 8
    assert streamed["temperature"] == 0.0 and streamed["ignore_eos"] is True
    assert streamed["stream"] is True and streamed["stream_options"] == {"include_usage": True}
    plain = mod.completion_payload("m", [1], 8, stream=False)
    assert plain["stream"] is False and "stream_options" not in plain


def test_format_table(mod):
    session = [mod.throughput(900, 100, 1.0)]
    server = [mod.throughput(900, 100, 1.25)]
    stats = {"ttft": mod.latency_stats([0.02]), "tpot": mod.latency_stats([0.005]),
             "e2e": mod.latency_stats([0.2])}
    server_stats = {"ttft": mod.latency_stats([0.03]), "tpot": mod.latency_stats([]),
                    "e2e": mod.latency_stats([0.25])}
    report = {"comparison": mod.compare(session, server, [0.02], [0.03], [0.012]),
              "full_load": {"session": session, "server": server,
                            "server_nonstreaming": [mod.throughput(900, 100, 1.1)]},
              "low_load": {"session": stats, "server": server_stats}}
    table = mod.format_table(report)
    assert "1000.0" in table and "800.0" in table and "0.800" in table
    assert "+10.00" in table  # TTFT difference of the medians, ms
    assert "+12.00" in table and "paired median" in table  # the per-request difference the goal uses
    assert "n/a" in table  # the empty TPOT
    assert "NOT met" in table and "-20.0%" not in table and "+20.0%" in table
    assert not math.isnan(report["comparison"]["ratio_total_tokens_per_s"])


def test_without_compiles(mod):
    runs = [{"x": 1, "c": 0}, {"x": 2, "c": 3}, {"x": 3, "c": None}]
    clean, left_out = mod.without_compiles(runs, "c")
    assert [r["x"] for r in clean] == [1, 3] and left_out == 1
    every = [{"x": 1, "c": 1}, {"x": 2, "c": 2}]
    assert mod.without_compiles(every, "c") == (every, 0)  # nothing to choose: all kept, none counted out
    assert mod.without_compiles([], "c") == ([], 0)


def test_parse_proc_stat_cpu(mod):
    # pid (comm with spaces and a ')' ) state ppid ... utime(14)=250 stime(15)=50
    stat = "1234 (py thon) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 100 0 0"
    assert mod.parse_proc_stat_cpu(stat, clock_ticks=100) == pytest.approx(3.0)
    assert mod.process_cpu_seconds() > 0
    assert mod.process_cpu_seconds(os.getpid()) is None or mod.process_cpu_seconds(os.getpid()) >= 0
