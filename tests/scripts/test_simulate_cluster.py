"""scripts/simulate_cluster.py and cluster_sim_lib.py: the cost models, the fit, the
event simulator's invariants, Splitwise's interference effect and the CLI's errors.

Everything here is arithmetic and simulation (no engine run, no JAX compile): small
workloads, a few hundred requests at most, a few seconds in all.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from absl import app

import cluster_sim_lib as lib
from script_loader import load_script


@pytest.fixture(scope="module")
def mod():
    return load_script("simulate_cluster")


def _builder(mod, **kwargs):
    return mod.Builder(lib.MODELS["llama-70b"], dict(lib.HARDWARE), **kwargs)


def _run_main(mod, argv):
    """The script's main with its private flags parsed from argv."""
    fv = mod.test_flag_values
    fv.unparse_flags()
    fv(["simulate_cluster.py", *argv])
    try:
        mod.main([])
    finally:
        fv.unparse_flags()


# ------------------------------------------------------------------ cost models


def test_model_shapes_match_known_parameter_counts():
    assert lib.MODELS["llama-70b"].num_params == pytest.approx(70.55e9, rel=0.01)
    assert lib.MODELS["llama-8b"].num_params == pytest.approx(8.03e9, rel=0.01)
    tiny = lib.MODELS["tiny-code"]  # 6 x (attention 196608 + MLP 589824 + norms 512) + tied embedding + norm
    assert tiny.num_params == 6 * (256 * 64 * 12 + 3 * 256 * 768 + 512) + 4096 * 256 + 256
    assert tiny.kv_bytes_per_token(4) == 2 * 6 * 2 * 64 * 4


def test_roofline_arithmetic_on_a_known_case():
    """One H100, llama-8b: decode of one sequence is bandwidth bound (weights / (BW x MBU)),
    a 4096-token prefill compute bound (2 x matmul params x tokens + attention / (peak x MFU))."""
    m, h = lib.MODELS["llama-8b"], lib.HARDWARE["h100"]
    cost = lib.RooflineCost(m, h, devices=1, dtype_bytes=2, mfu=0.5, mbu=0.8, overhead_s=0.001)
    weights = m.num_params * 2
    kv = m.kv_bytes_per_token(2) * 100
    assert cost.decode_step_time(1, 100) == pytest.approx((weights + kv) / (3.35e12 * 0.8) + 0.001)
    flops = 2 * m.matmul_params * 4096 + 4 * m.layers * m.heads * m.head_dim * 4096 * 4097 / 2
    assert cost.prefill_time(4096, 1) == pytest.approx(flops / (989e12 * 0.5) + 0.001)
    # 8 chips: 8x the roofs, the same overhead
    cost8 = lib.RooflineCost(m, h, devices=8, dtype_bytes=2, mfu=0.5, mbu=0.8, overhead_s=0.001)
    assert cost8.prefill_time(4096) - 0.001 == pytest.approx((cost.prefill_time(4096) - 0.001) / 8)


def test_costs_grow_with_work():
    for hw in lib.HARDWARE.values():
        cost = lib.RooflineCost(lib.MODELS["llama-70b"], hw)
        prefill = [cost.prefill_time(n) for n in (1, 64, 512, 2048, 8192)]
        decode = [cost.decode_step_time(b, b * 1000) for b in (1, 8, 64, 256, 1024)]
        context = [cost.decode_step_time(16, c) for c in (0, 1000, 100000, 1000000)]
        for series in (prefill, decode, context):
            assert all(a <= b for a, b in zip(series, series[1:])) and series[-1] > series[0]
    h100, a100 = (lib.RooflineCost(lib.MODELS["llama-70b"], lib.HARDWARE[k]) for k in ("h100", "a100"))
    assert h100.prefill_time(1500) < a100.prefill_time(1500) and h100.decode_step_time(8, 8000) < \
        a100.decode_step_time(8, 8000)


def test_fit_recovers_known_coefficients():
    coef = (0.004, 2e-5, 3e-9, 1.5e-4, 4e-8)
    truth = lib.LinearCost(coef)
    rng = np.random.default_rng(1)
    points = []
    for n in (16, 64, 128, 256, 512):
        points.append({"kind": "prefill", "tokens": n, "batch": 1, "context": 0,
                       "seconds": truth.prefill_time(n) * (1 + 0.001 * rng.standard_normal())})
    for b in (1, 4, 16, 64):
        for c in (64, 512):
            points.append({"kind": "decode", "batch": b, "context": b * c,
                           "seconds": truth.decode_step_time(b, b * c) * (1 + 0.001 * rng.standard_normal())})
    fitted, r2, rel = lib.fit_linear_cost(points)
    assert r2 > 0.999 and rel < 0.01
    np.testing.assert_allclose(fitted.coef, coef, rtol=0.1)
    mixed = lib.Step(256, lib.chunk_attn(256, 100), 8, 4000)
    assert fitted.step_time(mixed) == pytest.approx(truth.step_time(mixed), rel=0.02)
    with pytest.raises(ValueError, match="at least 5"):
        lib.fit_linear_cost(points[:3])
    with pytest.raises(ValueError, match="kind"):
        lib.fit_linear_cost(points + [{"kind": "other", "seconds": 1.0}])


# ------------------------------------------------------------------ workload and simulator


def test_workload_is_seeded_and_shaped():
    a = lib.make_workload("conversation", 5.0, 2000, seed=3)
    assert a == lib.make_workload("conversation", 5.0, 2000, seed=3)
    assert a != lib.make_workload("conversation", 5.0, 2000, seed=4)
    assert np.median([r.prompt_len for r in a]) == pytest.approx(1020, rel=0.1)
    assert np.median([r.output_len for r in a]) == pytest.approx(129, rel=0.1)
    assert (len(a) - 1) / (a[-1].arrival - a[0].arrival) == pytest.approx(5.0, rel=0.1)
    coding = lib.make_workload("coding", 1.0, 2000, length_scale=0.1, max_model_len=1024)
    assert np.median([r.prompt_len for r in coding]) == pytest.approx(150, rel=0.1)
    assert all(r.prompt_len + r.output_len <= 1024 and r.output_len >= 1 for r in coding)
    fixed = lib.make_workload("fixed", 1.0, 10, prompt_len=7, output_len=3)
    assert {(r.prompt_len, r.output_len) for r in fixed} == {(7, 3)}


def _sim(mod, design, kind, rate, n=300, seed=0, **builder):
    requests = lib.make_workload(kind, rate, n, seed=seed)
    return requests, lib.simulate(_builder(mod, **builder).design(design), requests)


@pytest.mark.parametrize("design", ["colocated-h100:2", "splitwise-ha:1:1"])
def test_simulator_invariants(mod, design):
    requests, low = _sim(mod, design, "conversation", 2.0)
    assert low["num_requests"] == len(requests)
    assert low["throughput_rps"] == pytest.approx(2.0, rel=0.15)  # below capacity: served = offered
    assert low["ttft_p99_s"] <= low["e2e_p99_s"] and low["ttft_p50_s"] <= low["e2e_p50_s"]
    assert 0 < low["tpot_p50_s"] <= low["tpot_p99_s"]
    # a unit of work alone: TTFT near the unloaded prefill of the median prompt
    _, high = _sim(mod, design, "conversation", 200.0)
    assert high["ttft_p50_s"] > 5 * low["ttft_p50_s"]  # past saturation the queue builds up
    assert high["throughput_rps"] < 200.0 * 0.8  # and the served rate stops following the offered one


def test_every_request_finishes_with_its_tokens(mod):
    """The event loop's bookkeeping: every request of a Splitwise run completes (through a
    prompt instance, a KV transfer and one of two token instances), and a one-token request
    ends on its prompt instance (TTFT = end-to-end)."""
    builder = _builder(mod)
    design = builder.design("splitwise-hh:1:2")
    requests = lib.make_workload("coding", 20.0, 200, seed=5)
    out = lib.simulate(design, requests)
    assert out["num_requests"] == 200 and out["ttft_mean_s"] > 0
    one = [lib.Request(0, 0.0, 100, 1)]  # a single-token request never reaches a token instance
    single = lib.simulate(design, one)
    assert single["ttft_p50_s"] == pytest.approx(single["e2e_p50_s"])


def test_layerwise_transfer_hides_most_of_the_kv_copy(mod):
    slow_link = dict(lib.HARDWARE)
    import dataclasses
    slow_link = {k: dataclasses.replace(v, link_bandwidth=2e9) for k, v in slow_link.items()}
    requests = lib.make_workload("fixed", 0.5, 20, prompt_len=4000, output_len=20)
    results = {}
    for layerwise in (False, True):
        builder = mod.Builder(lib.MODELS["llama-70b"], slow_link, layerwise=layerwise)
        results[layerwise] = lib.simulate(builder.design("splitwise-hh:1:1"), requests)
    # serial: 4000 x 327,680 B / 16 GB/s = 82 ms between the first and second token
    assert results[False]["tpot_mean_s"] > results[True]["tpot_mean_s"] + 0.05 / 19


def test_splitwise_removes_decode_interference(mod):
    """Prompt-heavy traffic: a colocated instance's decodes share steps with prompt chunks
    (Sarathi's budget keeps them short, not free); Splitwise's token instances never run a
    prompt, so the tail TPOT is lower at the same instance count."""
    requests = lib.make_workload("coding", 30.0, 400, seed=2)
    builder = _builder(mod)
    colocated = lib.simulate(builder.design("colocated-h100:4"), requests)
    split = lib.simulate(builder.design("splitwise-hh:3:1"), requests)
    assert split["tpot_p99_s"] < 0.9 * colocated["tpot_p99_s"]


def test_seeded_runs_are_deterministic(mod):
    a = _sim(mod, "splitwise-hh:1:1", "coding", 10.0, n=150, seed=9)[1]
    b = _sim(mod, "splitwise-hh:1:1", "coding", 10.0, n=150, seed=9)[1]
    assert a == b


def test_kv_capacity_limits_and_errors(mod):
    m = lib.MODELS["llama-70b"]
    assert lib.kv_capacity_tokens(m, lib.HARDWARE["v5e"], 8, 2) == 0  # 141 GB of weights, 115 GB usable
    with pytest.raises(app.UsageError, match="does not fit"):
        _builder(mod).design("colocated-v5e:2")
    assert _builder(mod, devices=16).design("colocated-v5e:2").instances[0].kv_capacity_tokens > 0
    tiny = lib.InstanceSpec(lib.RooflineCost(m, lib.HARDWARE["h100"]), kv_capacity_tokens=500)
    with pytest.raises(ValueError, match="exceed every instance's KV capacity"):
        lib.simulate(lib.Design("x", "colocated", (tiny,)), [lib.Request(0, 0.0, 400, 200)])


def test_sweep_and_cli(mod, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    _run_main(mod, ["--model", "llama-8b", "--workload", "conversation", "--rates", "2,50", "--num_requests", "100",
                    "--designs", "colocated-a100:2,splitwise-ha:1:1", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "splitwise-ha:1:1" in printed and "highest swept rate" in printed
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 4 and {s["design"] for s in report["summary"]} == {"colocated-a100:2",
                                                                                     "splitwise-ha:1:1"}
    assert report["summary"][0]["cost_per_hour"] == pytest.approx(2 * 8 * 1.0)
    assert report["summary"][1]["cost_per_hour"] == pytest.approx(8 * 2.16 + 8 * 1.0)
    assert all(0 <= r["slo_attainment"] <= 1 for r in report["rows"])


@pytest.mark.parametrize("argv, message", [
    (["--rates", "1,x"], "--rates: expected numbers"),
    (["--rates", "0"], "positive"),
    (["--designs", "colocated-h200:2"], "unknown hardware 'h200'"),
    (["--designs", "splitwise-hx:1:1"], "unknown hardware 'x'"),
    (["--designs", "splitwise-hh:2"], "splitwise-XY:P:T"),
    (["--designs", "colocated-h100:0"], "counts >= 1"),
    (["--designs", "disagg-h100:1"], "must start with"),
    (["--cost_per_hour", "h100=abc"], "NAME=NUMBER"),
    (["--cost_per_hour", "tpu=1"], "unknown hardware 'tpu'"),
])
def test_bad_flags_give_clear_errors(mod, tmp_path, argv, message):
    with pytest.raises(app.UsageError, match=message):
        _run_main(mod, ["--num_requests", "10", "--output", "", *argv])


def test_fit_from_and_validate_files(mod, tmp_path, capsys):
    truth = lib.LinearCost((0.002, 1e-4, 1e-8, 2e-4, 1e-7))
    points = [{"kind": "prefill", "tokens": n, "batch": 1, "context": 0, "seconds": truth.prefill_time(n)}
              for n in (16, 64, 256, 512)]
    points += [{"kind": "decode", "batch": b, "context": 100 * b, "seconds": truth.decode_step_time(b, 100 * b)}
               for b in (1, 8, 32)]
    requests = [{"arrival_s": 0.1 * i, "prompt_len": 100, "output_len": 10} for i in range(20)]
    run = {"name": "fake", "requests": requests, "engine": {"max_num_batched_tokens": 512, "max_num_seqs": 64,
                                                            "kv_capacity_tokens": 65536},
           "measured": {"throughput_rps": 9.0, "mean_ttft_s": 0.01, "mean_tpot_s": 0.003}}
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"points": points, "runs": [run]}))
    _run_main(mod, ["--validate", str(path), "--output", str(tmp_path / "v.json")])
    printed = capsys.readouterr().out
    assert "R^2 1.000" in printed and "mean_tpot_s" in printed
    result = json.loads((tmp_path / "v.json").read_text())["validation"][0]
    # an idle-ish instance: a request's decodes mostly run alone, TPOT ~ one decode step
    assert result["predicted"]["mean_tpot_s"] == pytest.approx(truth.decode_step_time(1, 105), rel=0.3)
    assert set(result["relative_error"]) == {"throughput_rps", "mean_ttft_s", "mean_tpot_s"}
    # the fitted model also drives a sweep
    _run_main(mod, ["--fit_from", str(path), "--model", "tiny-code", "--dtype_bytes", "4", "--devices_per_instance",
                    "1", "--workload", "conversation", "--length_scale", "0.1", "--rates", "5", "--num_requests", "50",
                    "--designs", "colocated-v5e:1", "--slo_reference_hw", "v5e", "--output", ""])
    assert "cost model: fit of" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": points[:2]}))
    with pytest.raises(app.UsageError, match="at least 5"):
        _run_main(mod, ["--fit_from", str(bad), "--output", ""])


def test_engine_steps_become_measurement_points(mod):
    """--measure's classification of a runner StepInput: one sampled token after position 0
    is a decode (context = its position + 1), anything else a prefill chunk."""
    def seq(n, start, sample=True):
        return SimpleNamespace(token_ids=(5,) * n, start_position=start, sample_offsets=(n - 1,) if sample else ())

    prefill = mod._step_point(SimpleNamespace(sequences=(seq(64, 0), seq(64, 0))), 0.01)
    assert prefill == {"kind": "prefill", "tokens": 64, "batch": 2, "context": 0, "seconds": 0.01}
    decode = mod._step_point(SimpleNamespace(sequences=(seq(1, 99), seq(1, 9))), 0.002)
    assert decode == {"kind": "decode", "batch": 2, "context": 110, "seconds": 0.002}
    mixed = mod._step_point(SimpleNamespace(sequences=(seq(1, 99), seq(100, 28, sample=False))), 0.02)
    assert mixed["kind"] == "mixed" and mixed["decode_batch"] == 1 and mixed["decode_context"] == 100
    assert mixed["prefill_tokens"] == 100 and mixed["prefill_attn"] == lib.chunk_attn(100, 28)
    for point in (prefill, decode, mixed):  # each reads back as the Step it came from
        assert lib.point_step(point).prefill_tokens + lib.point_step(point).decode_batch > 0
