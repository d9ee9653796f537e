"""Simulate an LLM serving cluster: Splitwise's split prompt / token instances vs colocated serving.

    python scripts/simulate_cluster.py --model llama-70b --workload coding --rates 5,20,40,80 \\
        --designs colocated-h100:4,colocated-a100:4,splitwise-hh:2:2,splitwise-aa:2:2,splitwise-ha:2:2 \\
        --output runs/cluster_sim/coding.json [--plot runs/cluster_sim/coding.png]

Splitwise (Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase
Splitting", ISCA 2024) observes that the prompt phase is compute bound and the token
phase memory bound, and runs them on different machines ("prompt" and "token"
instances, possibly of different hardware) with the KV cache shipped between them.
The baseline here is what this engine does: every instance serves both phases with
Sarathi-style chunked prefill (Agrawal et al., OSDI 2024). The event simulator and the
cost models are in cluster_sim_lib.py (its docstring has the design); this script
holds the flags, the sweep, the report and the two links to the real engine:

- `--measure FILE`: times steps of the engine (the bundled tiny-code model, on
  whatever backend JAX has) and writes them in the measurement format below;
  `--fit_from FILE` then fits a linear step-cost model to such a file and simulates
  with it instead of the roofline (every instance then costs what the measured
  machine costs; a design's hardware still sets memory, link and price).
- `--validate FILE` / `--validate_run FILE`: the simulator's prediction for one
  colocated instance against the engine serving the same requests at the same arrival
  times (throughput, mean TTFT, mean TPOT, relative errors). `--validate_run` measures
  first (steps, then two small Poisson workloads replayed through the engine against
  a virtual clock, compile steps charged as warm ones: see `_replay`), writes FILE.

Measurement format (JSON): {"points": [POINT, ...], "runs": [RUN, ...]} where a POINT is
one step, {"kind": "prefill", "tokens": n, "batch": b, "context": c, "seconds": s} (b
prompts' chunks of n tokens after c cached ones), {"kind": "decode", "batch": b,
"context": total context tokens of the b sequences, "seconds": s} or {"kind": "mixed",
"prefill_tokens", "prefill_attn" (query-key pairs), "decode_batch", "decode_context",
"seconds"}; and a RUN (only for --validate) is {"name", "requests": [{"arrival_s",
"prompt_len", "output_len"}], "measured": {"throughput_rps", "mean_ttft_s",
"mean_tpot_s"}, "engine": {"max_num_batched_tokens", "max_num_seqs",
"kv_capacity_tokens"}}.

Designs (--designs): `colocated-HW:N` (N instances of HW), `splitwise-XY:P:T` (P prompt
instances of X, T token instances of Y; X, Y in h = H100, a = A100: hh, aa, ha, ah) and
`splitwise-HWP-HWT:P:T` for any two entries of the hardware table (h100, a100, v5e, v6e).
Each instance is --devices_per_instance chips of its hardware.

SLO (Splitwise states its SLOs as multiples of a request's latency on an unloaded
machine): a request meets it when its TTFT <= --ttft_slo x its unloaded TTFT and its
TPOT <= --tpot_slo x its unloaded TPOT, both on one idle --slo_reference_hw instance;
the summary gives, per design, the highest swept rate at which at least --slo_target of
the requests meet it, and that rate per unit of cost.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster_sim_lib as lib  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "llama-70b", list(lib.MODELS), "Model shape of the roofline cost model.")
_DTYPE_BYTES = flags.DEFINE_integer("dtype_bytes", 2, "Bytes per weight and KV element.", lower_bound=1)
_DEVICES = flags.DEFINE_integer("devices_per_instance", 8, "Chips per instance (tensor parallel).", lower_bound=1)
_MFU = flags.DEFINE_float("mfu", 0.5, "Roofline: achieved fraction of peak FLOP/s.", lower_bound=1e-3, upper_bound=1)
_MBU = flags.DEFINE_float("mbu", 0.7, "Roofline: achieved fraction of peak HBM bandwidth.", lower_bound=1e-3,
                          upper_bound=1)
_OVERHEAD = flags.DEFINE_float("step_overhead_ms", 2.0, "Roofline: fixed milliseconds per step.", lower_bound=0)
_MEMORY_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "Share of device memory for weights + KV.",
                                      lower_bound=0.01, upper_bound=1)
_FIT_FROM = flags.DEFINE_string("fit_from", None, "Measured steps (JSON, see above): fit the cost model to them.")
_WORKLOAD = flags.DEFINE_enum("workload", "coding", sorted(lib.WORKLOADS) + ["fixed"], "Request length mix.")
_LENGTH_SCALE = flags.DEFINE_float("length_scale", 1.0, "Multiplies the preset lengths (e.g. 0.1 for tiny-code).",
                                   lower_bound=1e-3)
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "--workload fixed: prompt tokens.", lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 64, "--workload fixed: output tokens.", lower_bound=1)
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 1000, "Requests per simulated rate.", lower_bound=1)
_RATES = flags.DEFINE_list("rates", ["5", "10", "20", "40"], "Arrival rates to sweep (requests/s).")
_DESIGNS = flags.DEFINE_list("designs", ["colocated-h100:4", "splitwise-hh:2:2"], "Cluster designs (see above).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 256, "Running sequences per instance at most (vLLM's default).",
                                  lower_bound=1)
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", 512, "Colocated: Sarathi token budget per step.",
                                     lower_bound=1)
_PROMPT_BUDGET = flags.DEFINE_integer("prompt_token_budget", 2048, "Splitwise prompt instances: tokens per step.",
                                      lower_bound=1)
_LAYERWISE = flags.DEFINE_bool("layerwise_transfer", True, "Overlap the KV transfer with the prefill, per layer.")
_LINK = flags.DEFINE_float("link_gbytes_per_s", 0, "KV link GB/s per chip; 0 = the hardware table's.",
                           lower_bound=0)
_COSTS = flags.DEFINE_list("cost_per_hour", [], "Overrides of relative chip-hour prices, e.g. h100=2.5,a100=1.")
_TTFT_SLO = flags.DEFINE_float("ttft_slo", 5.0, "SLO: TTFT at most this x the unloaded TTFT.", lower_bound=1)
_TPOT_SLO = flags.DEFINE_float("tpot_slo", 2.0, "SLO: TPOT at most this x the unloaded TPOT.", lower_bound=1)
_SLO_HW = flags.DEFINE_enum("slo_reference_hw", "a100", list(lib.HARDWARE), "Unloaded reference instance.")
_SLO_TARGET = flags.DEFINE_float("slo_target", 0.9, "Share of requests that must meet the SLO.", lower_bound=0,
                                 upper_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_OUTPUT = flags.DEFINE_string("output", "runs/cluster_sim/sweep.json", "JSON report path ('' = none).")
_PLOT = flags.DEFINE_string("plot", None, "Also draw TTFT / TPOT / SLO vs rate here (PNG; needs matplotlib).")
_MEASURE = flags.DEFINE_string("measure", None, "Time the engine's steps (tiny-code) and write them here; no sweep.")
_VALIDATE = flags.DEFINE_string("validate", None, "Compare predictions with the measured runs of this JSON file.")
_CACHE = flags.DEFINE_string("compilation_cache_dir", "runs/cluster_sim/xla_cache",
                              "--measure / --validate_run: persistent compilation cache ('' = off).")
_VALIDATE_RUN = flags.DEFINE_string("validate_run", None, "Measure the engine, write this JSON file, validate.")


def parse_rates(values) -> list:
    try:
        rates = [float(v) for v in values]
    except ValueError:
        raise app.UsageError(f"--rates: expected numbers, got {','.join(values)}") from None
    if not rates or min(rates) <= 0:
        raise app.UsageError(f"--rates: expected positive requests/s, got {','.join(values)}")
    return sorted(rates)


def hardware_table(overrides=(), link_gbytes_per_s: float = 0) -> dict:
    """The hardware table with --cost_per_hour / --link_gbytes_per_s applied."""
    import dataclasses
    table = dict(lib.HARDWARE)
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in table:
            raise app.UsageError(f"--cost_per_hour: unknown hardware {name!r}; known: {sorted(table)}")
        try:
            table[name] = dataclasses.replace(table[name], cost_per_hour=float(value))
        except ValueError:
            raise app.UsageError(f"--cost_per_hour: {item!r} is not NAME=NUMBER") from None
    if link_gbytes_per_s:
        table = {k: dataclasses.replace(v, link_bandwidth=link_gbytes_per_s * 1e9) for k, v in table.items()}
    return table


_LETTERS = {"h": "h100", "a": "a100"}


def parse_design(text: str) -> tuple:
    """'colocated-h100:4' -> ('colocated', ['h100'], [4]); 'splitwise-ha:2:2' -> ('splitwise', ['h100', 'a100'],
    [2, 2]); 'splitwise-v6e-v5e:1:3' likewise. Raises app.UsageError naming the problem."""
    head, *counts = text.strip().lower().split(":")
    kind, _, hw = head.partition("-")
    try:
        numbers = [int(c) for c in counts]
    except ValueError:
        numbers = []
    if kind == "colocated":
        names = [hw]
    elif kind == "splitwise":
        names = hw.split("-") if "-" in hw else [_LETTERS.get(c, "?" + c) for c in hw]
    else:
        raise app.UsageError(f"--designs: {text!r} must start with 'colocated-' or 'splitwise-'")
    if len(names) != (1 if kind == "colocated" else 2) or len(numbers) != len(names) or min(numbers, default=0) < 1:
        raise app.UsageError(f"--designs: {text!r} is not colocated-HW:N or splitwise-XY:P:T / "
                             f"splitwise-HWP-HWT:P:T with counts >= 1")
    for name in names:
        if name not in lib.HARDWARE:
            raise app.UsageError(f"--designs: {text!r}: unknown hardware {name.lstrip('?')!r}; known: "
                                 f"{sorted(lib.HARDWARE)} (letters h, a)")
    return kind, names, numbers


class Builder:
    """Instance specs and designs from the flags' values (one place for the tests to call)."""

    def __init__(self, model: lib.ModelShape, table: dict, devices: int = 8, dtype_bytes: int = 2, mfu: float = 0.5,
                 mbu: float = 0.7, overhead_s: float = 0.002, memory_fraction: float = 0.9, max_batch: int = 256,
                 token_budget: int = 512, prompt_token_budget: int = 2048, layerwise: bool = True,
                 fitted: lib.CostModel = None):
        self.model, self.table, self.devices, self.dtype_bytes = model, table, devices, dtype_bytes
        self.mfu, self.mbu, self.overhead_s, self.memory_fraction = mfu, mbu, overhead_s, memory_fraction
        self.max_batch, self.token_budget, self.prompt_token_budget = max_batch, token_budget, prompt_token_budget
        self.layerwise, self.fitted = layerwise, fitted

    def cost(self, hw: str) -> lib.CostModel:
        return self.fitted or lib.RooflineCost(self.model, self.table[hw], self.devices, self.dtype_bytes, self.mfu,
                                               self.mbu, self.overhead_s)

    def spec(self, hw: str, budget: int) -> lib.InstanceSpec:
        h = self.table[hw]
        capacity = lib.kv_capacity_tokens(self.model, h, self.devices, self.dtype_bytes, self.memory_fraction)
        if capacity < 1:
            raise app.UsageError(f"{self.model.name} ({self.model.num_params * self.dtype_bytes / 1e9:.0f} GB of "
                                 f"weights) does not fit in {self.devices} x {h.name} "
                                 f"({h.memory_bytes * self.devices * self.memory_fraction / 1e9:.0f} GB usable); "
                                 f"raise --devices_per_instance")
        return lib.InstanceSpec(self.cost(hw), capacity, self.max_batch, budget, h.cost_per_hour * self.devices,
                                h.link_bandwidth * self.devices, name=hw)

    def design(self, text: str) -> lib.Design:
        kind, names, counts = parse_design(text)
        if kind == "colocated":
            return lib.Design(text, kind, (self.spec(names[0], self.token_budget),) * counts[0])
        return lib.Design(text, kind, (self.spec(names[0], self.prompt_token_budget),) * counts[0],
                          (self.spec(names[1], self.token_budget),) * counts[1],
                          self.model.kv_bytes_per_token(self.dtype_bytes), self.model.layers, self.layerwise)


def slo_limits(cost: lib.CostModel, requests, ttft_x: float, tpot_x: float) -> tuple:
    unloaded = [lib.unloaded_latency(cost, r) for r in requests]
    return [ttft_x * u[0] for u in unloaded], [tpot_x * u[1] for u in unloaded]


def run_sweep(builder: Builder, designs, rates, workload: dict, slo: dict) -> dict:
    """Every design at every rate on the same seeded workload shape; rows + per-design summary."""
    built = [builder.design(d) for d in designs]
    reference = builder.cost(slo["reference_hw"])
    rows = []
    for rate in rates:
        requests = lib.make_workload(rate=rate, **workload)
        ttft_limit, tpot_limit = slo_limits(reference, requests, slo["ttft_x"], slo["tpot_x"])
        for design in built:
            rows.append({"rate": rate, **lib.simulate(design, requests, ttft_limit, tpot_limit)})
    summary = []
    for design in built:
        mine = [r for r in rows if r["design"] == design.name]
        ok = [r for r in mine if r["slo_attainment"] >= slo["target"]]
        best = max(ok, key=lambda r: r["rate"]) if ok else None
        summary.append({"design": design.name, "cost_per_hour": design.cost_per_hour,
                        "max_rate_meeting_slo": best["rate"] if best else 0.0,
                        "rps_at_slo": best["throughput_rps"] if best else 0.0,
                        "rps_per_cost_at_slo": best["throughput_rps"] / design.cost_per_hour if best else 0.0,
                        "peak_rps": max(r["throughput_rps"] for r in mine)})
    return {"rows": rows, "summary": summary}


def print_sweep(result: dict, target: float) -> None:
    print(f"{'rate':>6s} {'design':22s}{'req/s':>8s}{'tok/s':>9s}{'TTFT p50':>9s}{'p99':>8s}{'TPOT p50':>9s}"
          f"{'p99':>7s}{'e2e p99':>8s}{'SLO %':>7s}{'cost/h':>7s}{'rps/cost':>9s}")
    print(f"{'':29s}{'':17s}{'(ms)':>9s}{'(ms)':>8s}{'(ms)':>9s}{'(ms)':>7s}{'(s)':>8s}")
    for r in result["rows"]:
        print(f"{r['rate']:6g} {r['design']:22s}{r['throughput_rps']:8.2f}{r['throughput_tokens_per_s']:9.0f}"
              f"{1e3 * r['ttft_p50_s']:9.0f}{1e3 * r['ttft_p99_s']:8.0f}{1e3 * r['tpot_p50_s']:9.1f}"
              f"{1e3 * r['tpot_p99_s']:7.1f}{r['e2e_p99_s']:8.2f}{100 * r['slo_attainment']:7.1f}"
              f"{r['cost_per_hour']:7.1f}{r['rps_per_cost']:9.3f}")
    print(f"\nhighest swept rate with >= {100 * target:g}% of requests in SLO:")
    for s in result["summary"]:
        print(f"  {s['design']:22s} {s['max_rate_meeting_slo']:6g} req/s offered, {s['rps_at_slo']:7.2f} served, "
              f"{s['rps_per_cost_at_slo']:.3f} req/s per cost unit (cost {s['cost_per_hour']:.1f}/h); "
              f"peak {s['peak_rps']:.2f} req/s")


def plot_sweep(result: dict, path: str, title: str) -> None:
    import plotting
    plt = plotting._pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name in dict.fromkeys(r["design"] for r in result["rows"]):
        mine = [r for r in result["rows"] if r["design"] == name]
        rates = [r["rate"] for r in mine]
        axes[0].plot(rates, [r["ttft_p99_s"] for r in mine], marker="o", label=name)
        axes[1].plot(rates, [1e3 * r["tpot_p99_s"] for r in mine], marker="o", label=name)
        axes[2].plot(rates, [100 * r["slo_attainment"] for r in mine], marker="o", label=name)
    for ax, label in zip(axes, ("TTFT p99 (s)", "TPOT p99 (ms)", "requests in SLO (%)")):
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    plotting._finish(fig, path, title)


def validate(data: dict, fitted: lib.CostModel) -> list:
    """Predicted vs measured for each run of `data` on one colocated instance of the fitted cost."""
    out = []
    for run in data.get("runs", []):
        requests = [lib.Request(i, float(r["arrival_s"]), int(r["prompt_len"]), int(r["output_len"]))
                    for i, r in enumerate(run["requests"])]
        eng = run["engine"]
        spec = lib.InstanceSpec(fitted, int(eng["kv_capacity_tokens"]), int(eng["max_num_seqs"]),
                                int(eng["max_num_batched_tokens"]), name="engine")
        sim = lib.simulate(lib.Design("colocated-engine:1", "colocated", (spec,)), requests)
        predicted = {"throughput_rps": sim["makespan_rps"], "mean_ttft_s": sim["ttft_mean_s"],
                     "mean_tpot_s": sim["tpot_mean_s"]}
        measured = run["measured"]
        rel = {k: (predicted[k] - measured[k]) / measured[k] for k in predicted if measured.get(k)}
        out.append({"name": run["name"], "predicted": predicted, "measured": measured, "relative_error": rel})
    if not out:
        raise app.UsageError("--validate: the file holds no 'runs'")
    return out


def print_validation(results: list) -> None:
    print(f"{'run':28s}{'metric':>26s}{'predicted':>12s}{'measured':>12s}{'rel. error':>12s}")
    for res in results:
        for k in res["relative_error"]:
            err = res["relative_error"][k]
            print(f"{res['name']:28s}{k:>26s}{res['predicted'][k]:12.4f}{res['measured'].get(k, float('nan')):12.4f}"
                  f"{100 * err:+11.1f}%")


def load_fit(path: str) -> tuple:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("points"), list):
        raise app.UsageError(f"--fit_from {path}: expected a JSON object with a 'points' list")
    try:
        cost, r2, rel = lib.fit_linear_cost(data["points"])
    except (KeyError, TypeError, ValueError) as e:
        raise app.UsageError(f"--fit_from {path}: {e}") from None
    print(f"fit of {len(data['points'])} steps: " + ", ".join(f"{k} {v:.3g}" for k, v in zip(lib.FEATURES, cost.coef))
          + f"; R^2 {r2:.3f}, rms relative error {100 * rel:.1f}%")
    return data, cost, {"coef": dict(zip(lib.FEATURES, cost.coef)), "r2": r2, "rms_rel_error": rel}


# ------------------------------------------------------------------ the engine's side


def _step_point(step_input, seconds: float) -> dict:
    """A measured step in the file format: a sequence fed one sampled token after
    position 0 is a decode, anything else a prefill chunk."""
    chunks, decodes = [], []
    for q in step_input.sequences:
        n = len(q.token_ids)
        (decodes if n == 1 and q.start_position > 0 and q.sample_offsets else chunks).append((n, q.start_position))
    if not decodes and len({c for c in chunks}) == 1:
        return {"kind": "prefill", "tokens": chunks[0][0], "batch": len(chunks), "context": chunks[0][1],
                "seconds": seconds}
    context = sum(c + 1 for _, c in decodes)
    if not chunks:
        return {"kind": "decode", "batch": len(decodes), "context": context, "seconds": seconds}
    return {"kind": "mixed", "prefill_tokens": sum(n for n, _ in chunks),
            "prefill_attn": sum(lib.chunk_attn(n, c) for n, c in chunks), "decode_batch": len(decodes),
            "decode_context": context, "seconds": seconds}


def measure_engine(with_runs: bool, seed: int = 0, budget_s: float = 120.0, cache_dir: str = "") -> dict:
    """Steps of the engine serving tiny-code, timed whole (scheduling, runner, outputs):
    single prompts of several sizes, then batches of decodes at two contexts (with the
    mixed prefill steps that precede them); steps that compiled are dropped. Bounded by
    `budget_s` (~2 min on 2 busy CPU cores), plus ~1 min for `with_runs`: two small
    Poisson workloads replayed through the engine (`_replay`)."""
    import time

    import numpy as np
    from jaxinfer import EngineConfig, InferenceSession, SamplingParams

    config = EngineConfig(max_num_batched_tokens=512, max_num_seqs=64, compilation_cache_dir=cache_dir)
    session = InferenceSession.from_pretrained("tiny-code", engine=config)
    engine, runner, points, last = session.engine, session.engine.runner, [], {}
    execute, step = runner.execute, engine.step

    def timed_execute(step_input):  # both wrappers run on the engine's loop thread
        out = execute(step_input)
        last.update(input=step_input, compiled=out.stats.is_compile)
        return out

    def timed_step(record=True):
        last.clear()
        start = time.perf_counter()
        deltas = step()
        last["seconds"] = time.perf_counter() - start
        if record and "input" in last and not last["compiled"]:
            points.append(_step_point(last["input"], last["seconds"]))
        return deltas

    runner.execute, engine.step = timed_execute, timed_step
    rng = np.random.default_rng(seed)
    prompt = lambda n: rng.integers(3, 4000, size=n).tolist()  # noqa: E731 - random: no prefix-cache hits
    started = time.perf_counter()
    for n in (16, 32, 64, 128, 256, 384, 512):
        for _ in range(4):
            session.generate([prompt(n)], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    for batch in (1, 4, 16, 48):
        for context in (64, 320):
            if time.perf_counter() - started < budget_s:
                session.generate([prompt(context) for _ in range(batch)],
                                 SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    data = {"model": "tiny-code", "engine": {"max_num_batched_tokens": 512, "max_num_seqs": 64},
            "measure_seconds": time.perf_counter() - started, "points": points, "runs": []}
    print(f"measured {len(points)} steps in {data['measure_seconds']:.0f} s")
    capacity = runner.num_pages * runner.page_size
    for name, kind, rate in (("conversation x0.2 @ 6/s", "conversation", 6.0), ("coding x0.2 @ 4/s", "coding", 4.0)):
        if not with_runs:
            break
        requests = lib.make_workload(kind, rate, 40, seed, 0.2, max_model_len=session.max_model_len)
        for _ in ("warm-up", "timed"):
            prompts = {r.rid: prompt(r.prompt_len) for r in requests}
            measured = session.async_engine.call(lambda e: _replay(e, requests, prompts, timed_step, last, points))
        data["runs"].append({"name": name, "engine": {**data["engine"], "kv_capacity_tokens": capacity},
                             "requests": [{"arrival_s": r.arrival, "prompt_len": r.prompt_len,
                                           "output_len": r.output_len} for r in requests], "measured": measured})
        print(f"{name}: {measured}")
    runner.execute, engine.step = execute, step
    session.close()
    return data


def _replay(engine, requests, prompts, timed_step, last, points) -> dict:
    """Serves `requests` on the engine (on its loop thread) against a virtual clock: a
    request joins at the first step boundary after its arrival, each step advances the
    clock by its measured wall time, and idle time jumps to the next arrival. A step
    that compiled (a shape new to the process: on CPU ~2 s, which would otherwise
    dominate a short run) is charged the median of the 5 warm measured steps nearest
    to it in (prefill tokens, decodes) instead. Returns the measured figures."""
    import numpy as np
    from jaxinfer import SamplingParams

    warm = [(lib.point_step(p), p["seconds"]) for p in points]
    pending, clock, ids, first, final, compiles, steps = list(requests), requests[0].arrival, {}, {}, {}, 0, 0
    while pending or engine.has_unfinished:
        while pending and pending[0].arrival <= clock:
            r = pending.pop(0)
            ids[engine.add_request(prompts[r.rid], SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                                  ignore_eos=True))] = r
        if not engine.has_unfinished:
            clock = pending[0].arrival
            continue
        deltas, steps = timed_step(record=False), steps + 1
        seconds = last.get("seconds", 0.0)
        if last.get("compiled"):
            s = lib.point_step(_step_point(last["input"], 0.0))
            near = sorted(warm, key=lambda w: abs(w[0].prefill_tokens - s.prefill_tokens) / 512
                          + abs(w[0].decode_batch - s.decode_batch) / 64)[:5]
            seconds, compiles = float(np.median([w[1] for w in near])), compiles + 1
        clock += seconds
        for d in deltas:
            if d.token_ids:
                first.setdefault(d.request_id, clock)
            if d.finish_reason:
                final[d.request_id] = clock
    ttft = [first[i] - r.arrival for i, r in ids.items()]
    tpot = [(final[i] - first[i]) / (r.output_len - 1) for i, r in ids.items() if r.output_len > 1]
    return {"throughput_rps": len(ids) / (max(final.values()) - requests[0].arrival),
            "mean_ttft_s": float(np.mean(ttft)), "mean_tpot_s": float(np.mean(tpot)) if tpot else 0.0,
            "steps": steps, "compiled_steps_charged": compiles}


def main(argv):
    del argv
    import bench_common
    if _MEASURE.value or _VALIDATE_RUN.value:
        data = measure_engine(bool(_VALIDATE_RUN.value), _SEED.value, cache_dir=_CACHE.value)
        for path in dict.fromkeys(p for p in (_MEASURE.value, _VALIDATE_RUN.value) if p):
            bench_common.write_json(path, data)
        if _MEASURE.value and not _VALIDATE_RUN.value:
            return
    validate_path = _VALIDATE_RUN.value or _VALIDATE.value
    if validate_path:
        data, fitted, fit = load_fit(_FIT_FROM.value or validate_path)
        if _FIT_FROM.value:
            with open(validate_path) as f:
                data = json.load(f)
        results = validate(data, fitted)
        print_validation(results)
        if _OUTPUT.value:
            bench_common.write_json(_OUTPUT.value, {"env": bench_common.environment(), "fit": fit,
                                                    "validation": results})
        return
    fitted, fit = None, None
    if _FIT_FROM.value:
        _, fitted, fit = load_fit(_FIT_FROM.value)
    model = lib.MODELS[_MODEL.value]
    builder = Builder(model, hardware_table(_COSTS.value, _LINK.value), _DEVICES.value, _DTYPE_BYTES.value,
                      _MFU.value, _MBU.value, _OVERHEAD.value / 1e3, _MEMORY_FRACTION.value, _MAX_BATCH.value,
                      _TOKEN_BUDGET.value, _PROMPT_BUDGET.value, _LAYERWISE.value, fitted)
    workload = {"kind": _WORKLOAD.value, "num_requests": _NUM_REQUESTS.value, "seed": _SEED.value,
                "length_scale": _LENGTH_SCALE.value, "prompt_len": _PROMPT_LEN.value, "output_len": _OUTPUT_LEN.value,
                "max_model_len": model.max_model_len}
    slo = {"ttft_x": _TTFT_SLO.value, "tpot_x": _TPOT_SLO.value, "reference_hw": _SLO_HW.value,
           "target": _SLO_TARGET.value}
    try:
        result = run_sweep(builder, _DESIGNS.value, parse_rates(_RATES.value), workload, slo)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(f"{model.name} ({model.num_params / 1e9:.2f} B params), {_DEVICES.value} chips per instance, "
          f"cost model: {'fit of ' + _FIT_FROM.value if fitted else 'roofline'}; workload {_WORKLOAD.value} x "
          f"{_LENGTH_SCALE.value:g}, {_NUM_REQUESTS.value} requests per rate; SLO TTFT {_TTFT_SLO.value:g}x, "
          f"TPOT {_TPOT_SLO.value:g}x unloaded on {_SLO_HW.value}")
    print_sweep(result, _SLO_TARGET.value)
    report = {"env": bench_common.environment() if _OUTPUT.value else {}, "model": model.name, "workload": workload,
              "slo": slo,
              "cost_model": fit or {"roofline": {"mfu": _MFU.value, "mbu": _MBU.value,
                                                 "step_overhead_ms": _OVERHEAD.value}},
              "flags": {"designs": _DESIGNS.value, "devices_per_instance": _DEVICES.value,
                        "max_batch": _MAX_BATCH.value, "token_budget": _TOKEN_BUDGET.value,
                        "prompt_token_budget": _PROMPT_BUDGET.value, "layerwise_transfer": _LAYERWISE.value},
              **result}
    bench_common.write_json(_OUTPUT.value, report)
    if _PLOT.value:
        plot_sweep(result, _PLOT.value, f"{model.name}, {_WORKLOAD.value} workload")


if __name__ == "__main__":
    app.run(main)
