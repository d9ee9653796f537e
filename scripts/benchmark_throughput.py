"""Offline throughput: a batch of requests through the engine, against HF and the roofline.

    python scripts/benchmark_throughput.py [--preset 125m] [--num_requests 64]
        [--min_input_len 64 --max_input_len 256] [--output_len 64] [--shared_prefix_len 0]
        [--compare_shared_prefix_attention]

The shared-prefix workload (Hydragen's setting):

    python scripts/benchmark_throughput.py --shared_prefix_len 2048 --compare_shared_prefix_attention --skip_hf

runs the engine twice in the same process, with the shared-prefix attention path off
and on, and reports both and their ratio.

Throughput vs the number of requests, drawn against the compute roof:

    python scripts/benchmark_throughput.py --skip_hf --num_requests_sweep 1,4,16,64 --plot runs/bench/throughput.png

runs the first N prompts of the workload for each N (one session; each N warmed up,
then timed with the prefix cache reset) and reports them under "sweep".

The engine serves every request at once (continuous batching, chunked prefill, paged
KV). The same workload then runs through HF transformers `generate` in static batches
of --hf_batch_size (left padded, greedy, all output tokens forced). The compute roofline
is 2 x parameters FLOPs per token over the float32 GEMM rate measured in this run; "%
roofline" compares it with the tokens the model actually ran (prompt tokens served by
the prefix cache are not run).
Recursive models (docs/recursive.md): --depthwise_batching on|off|auto picks the
runner, --early_exit_threshold T sets every request's exit rule, and

    python scripts/benchmark_throughput.py --model tiny-code-recursive --prompts code --skip_hf \
        --compare_recursive --baseline_model tiny-code --early_exit_threshold 0.5

times, on one workload in one process: the recursive model with its loops back to back
(unrolled), with continuous depth-wise batching, with depth-wise batching and early exit
(the skipped loops' K/V computed, and copied from the exit state: early_exit_kv_fill), and
--baseline_model (the model it was converted from), with the ratios. --prompts code
takes the prompts from the held-out Python files of the model's data split (lengths
uniform in [--min_input_len, --max_input_len]).
Warm-up (compilation) runs the same workload once; the prefix cache is then reset so the
timed run recomputes every prompt (except a shared prefix, which the cache serves as it
would in production).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

_PRESET = flags.DEFINE_enum("preset", "125m", list(bench_common.MODEL_PRESETS), "Benchmark model shape.")
_MODEL = flags.DEFINE_string("model", None, "An HF folder to use instead of a random preset model.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/bench", "Where the random model is cached.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 64, "Requests in the workload (at least 1).", lower_bound=1)
_MIN_INPUT = flags.DEFINE_integer("min_input_len", 64, "Shortest prompt (uniform distribution; at least 1).",
                                  lower_bound=1)
_MAX_INPUT = flags.DEFINE_integer("max_input_len", 256, "Longest prompt (at least --min_input_len).", lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 64, "Generated tokens per request (at least 1).", lower_bound=1)
_SHARED_PREFIX = flags.DEFINE_integer("shared_prefix_len", 0, "Tokens of a prefix shared by every prompt.",
                                      lower_bound=0)
_MAX_BATCHED_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", 512, "Engine token budget per step.",
                                           lower_bound=1)
_MAX_SEQS = flags.DEFINE_integer("max_num_seqs", 64, "Engine running-sequence limit.", lower_bound=1)
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size.", lower_bound=1)
_HF_BATCH = flags.DEFINE_integer("hf_batch_size", 16, "HF static batch size.", lower_bound=1)
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Do not run the HF baseline.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "",
    "Persistent compilation cache folder; empty (the default) = off, so warm-up figures are cold compiles.")
_SHARED_ATTENTION = flags.DEFINE_bool("shared_prefix_attention", True,
                                      "Engine's shared-prefix (Hydragen) attention path, for the single run.")
_COMPARE_SHARED = flags.DEFINE_bool("compare_shared_prefix_attention", False,
                                    "Run the engine with the shared-prefix path off, then on; report the ratio.")
_ATTENTION_IMPL = flags.DEFINE_string("attention_impl", None, "EngineConfig.attention_impl (None = backend default).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_SPECULATIVE = flags.DEFINE_enum("speculative_method", None, ["ngram", "draft", "early_exit"],
                                 "Speculative decoding in jaxinfer's engine (default off); spec_* figures reported.")
_NUM_SPEC_TOKENS = flags.DEFINE_integer("num_speculative_tokens", 4, "Draft tokens per decode step at most.",
                                        lower_bound=1)
_DRAFT_MODEL = flags.DEFINE_string("draft_model", None, "Draft model folder (--speculative_method draft).")
_DRAFT_LOOPS = flags.DEFINE_integer("draft_loops", 1, "Loops of the recursive --model that draft (--speculative_method "
                                    "early_exit).", lower_bound=1)
_PROMPTS = flags.DEFINE_enum("prompts", "random", ["random", "code"],
                             "random ids, or the held-out Python files of the model's data split.")
_DEPTHWISE = flags.DEFINE_enum("depthwise_batching", "auto", ["auto", "on", "off"],
                               "Recursive models: continuous depth-wise batching (auto = on when possible).")
_EXIT = flags.DEFINE_float("early_exit_threshold", None, "Recursive models, depth-wise: exit confidence in [0, 1].")
_COMPARE_RECURSIVE = flags.DEFINE_bool("compare_recursive", False, "A recursive --model unrolled, depth-wise, "
                                       "depth-wise with early exit, and --baseline_model, in one run.")
_BASELINE = flags.DEFINE_string("baseline_model", None, "--compare_recursive: the model the recursive one came from.")
_JSON = flags.DEFINE_string("json_out", "runs/bench/throughput.json", "JSON report path.")
_SWEEP = flags.DEFINE_list("num_requests_sweep", [], "Also time the first N requests for each N (<= --num_requests).")
_PLOT = flags.DEFINE_string("plot", None, "Also draw throughput vs number of requests here (PNG; needs matplotlib).")
flags.register_multi_flags_validator(
    ["min_input_len", "max_input_len"], lambda f: f["max_input_len"] >= f["min_input_len"],
    message="--max_input_len must be at least --min_input_len")


def make_workload(seed, num, min_len, max_len, shared_prefix_len, vocab):
    import numpy as np
    rng = np.random.RandomState(seed)
    prefix = [1] + rng.randint(3, vocab, size=max(shared_prefix_len - 1, 0)).tolist() if shared_prefix_len else [1]
    return [prefix + rng.randint(3, vocab, size=int(rng.randint(min_len, max_len + 1))).tolist()
            for _ in range(num)]


def code_workload(path, seed, num, min_len, max_len):
    """Held-out code files of the model's data split, cut to lengths uniform in [min_len, max_len]."""
    import numpy as np
    import stdlib_corpus

    from jaxinfer.assets import resolve_model_path
    docs = [d for d in stdlib_corpus.heldout_token_ids(resolve_model_path(path)) if len(d) >= min_len]
    if not docs:
        raise app.UsageError(f"--prompts code: no held-out file has --min_input_len={min_len} tokens")
    rng = np.random.RandomState(seed)
    return [docs[i % len(docs)][:int(rng.randint(min_len, max_len + 1))] for i in range(num)]


def compare_recursive(path, prompts, output_len, engine_config) -> dict:
    """The recursive model unrolled / depth-wise / depth-wise + exit, and the baseline model."""
    import dataclasses
    runs = {"unrolled": run_engine(path, prompts, output_len, dataclasses.replace(
                engine_config, depthwise_batching=False, early_exit_threshold=None)),
            "depthwise": run_engine(path, prompts, output_len, dataclasses.replace(
                engine_config, depthwise_batching=True, early_exit_threshold=None))}
    if _EXIT.value is not None:
        for fill in ("compute", "copy"):
            runs[f"exit_{fill}"] = run_engine(path, prompts, output_len, dataclasses.replace(
                engine_config, depthwise_batching=True, early_exit_threshold=_EXIT.value, early_exit_kv_fill=fill))
    if _BASELINE.value:
        runs["baseline"] = run_engine(_BASELINE.value, prompts, output_len, dataclasses.replace(
            engine_config, depthwise_batching=None, early_exit_threshold=None))
    base = runs["unrolled"]["output_tokens_per_s"]
    print(f"\n{'':16s}{'out tok/s':>10s}{'vs unrolled':>12s}{'steps':>7s}{'loops/token':>12s}{'exits':>7s}"
          f"{'compiles':>9s}{'warm-up s':>10s}")
    for name, r in runs.items():
        print(f"{name:16s}{r['output_tokens_per_s']:10.1f}{r['output_tokens_per_s'] / base:12.2f}{r['num_steps']:7d}"
              f"{r.get('mean_loops_per_token', float('nan')):12.2f}{r.get('num_early_exits', 0):7d}"
              f"{r['num_compiles']:9d}{r['warmup_seconds']:10.1f}")
    return {"runs": runs, "speedup_vs_unrolled": {k: r["output_tokens_per_s"] / base for k, r in runs.items()}}


def run_engine(path, prompts, output_len, engine_config, session=None):
    """Warm-up, then a timed run of every prompt; `session` = reuse a loaded one."""
    from jaxinfer import InferenceSession, SamplingParams
    session = session or InferenceSession.from_pretrained(path, dtype="float32", engine=engine_config)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    session.reset_prefix_cache()  # a reused session: warm up on the cold-cache shapes the timed run will see
    start = time.perf_counter()
    session.generate(prompts, params)
    warmup_seconds = time.perf_counter() - start
    session.reset_prefix_cache()
    before = session.metrics()
    start = time.perf_counter()
    outs = session.generate(prompts, params)
    seconds = time.perf_counter() - start
    m = session.metrics()
    num_out = sum(len(o.token_ids) for o in outs)
    return {"seconds": seconds, "output_tokens": num_out, "output_tokens_per_s": num_out / seconds,
            "requests_per_s": len(prompts) / seconds,
            "total_tokens_per_s": (num_out + sum(map(len, prompts))) / seconds,
            # tokens the model actually ran (prompt tokens served by the prefix cache excluded)
            "computed_tokens_per_s": (m["num_batched_tokens"] - before["num_batched_tokens"]) / seconds,
            "warmup_seconds": warmup_seconds, "num_compiles": m["num_compiles"],
            "compiles_in_timed_run": m["num_compiles"] - before["num_compiles"],
            "num_steps": m["num_steps"] - before["num_steps"],
            "host_seconds": m["host_seconds"] - before["host_seconds"],
            "prefix_cache_hit_rate": m["prefix_cache_hit_rate"], "num_preemptions": m["num_preemptions"],
            "shared_prefix_steps": m["shared_prefix_steps"] - before["shared_prefix_steps"],
            "shared_prefix_tokens_saved": m["shared_prefix_tokens_saved"] - before["shared_prefix_tokens_saved"],
            "mean_ttft_s": sum(o.time_to_first_token for o in outs) / len(outs),
            "mean_tpot_ms": 1000 * sum(o.time_per_output_token for o in outs) / len(outs),
            # parameters each token runs through (a recursive model: every loop's, merged)
            "num_params": getattr(session.engine.runner, "params_per_token", None)
            or bench_common.num_params(session.engine.runner.params),
            **({k: m[k] - before[k] for k in ("depthwise_steps", "depthwise_rows", "depthwise_mixed_steps",
                                               "depthwise_fill_rows", "depthwise_copy_fill_rows", "num_early_exits")}
               if "depthwise_steps" in m else {}),
            **({"mean_loops_per_token": m["mean_loops_per_token"]} if "depthwise_steps" in m else {}),
            **({k: m[k] - before[k] for k in ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")}
               if session.engine.config.speculative is not None else {})}


def run_hf(path, prompts, output_len, batch_size):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                                        max_new_tokens=output_len)

    def batch_inputs(batch):
        width = max(map(len, batch))
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    with torch.no_grad():
        ids, mask = batch_inputs(prompts[:2])
        model.generate(ids, attention_mask=mask, generation_config=gen, max_new_tokens=2)  # warm-up
        start = time.perf_counter()
        num_out = 0
        for i in range(0, len(prompts), batch_size):
            ids, mask = batch_inputs(prompts[i:i + batch_size])
            out = model.generate(ids, attention_mask=mask, generation_config=gen)
            num_out += (out.shape[1] - ids.shape[1]) * out.shape[0]
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": num_out, "output_tokens_per_s": num_out / seconds,
            "requests_per_s": len(prompts) / seconds, "batch_size": batch_size}


def main(argv):
    del argv
    from jaxinfer import EngineConfig
    path = _MODEL.value or bench_common.build_random_llama(
        _PRESET.value, os.path.join(_WORK_DIR.value, f"llama-{_PRESET.value}"))
    vocab = min(1000, bench_common.MODEL_PRESETS[_PRESET.value]["vocab_size"])
    args = (_NUM_REQUESTS.value, _MIN_INPUT.value, _MAX_INPUT.value, _SHARED_PREFIX.value, vocab)
    prompts = (make_workload(_SEED.value, *args) if _PROMPTS.value == "random" else
               code_workload(path, _SEED.value, _NUM_REQUESTS.value, _MIN_INPUT.value, _MAX_INPUT.value))
    try:
        counts = sorted({int(n) for n in _SWEEP.value})
    except ValueError:
        raise app.UsageError(f"--num_requests_sweep: expected integers, got {_SWEEP.value}") from None
    if counts and not 1 <= counts[0] <= counts[-1] <= len(prompts):
        raise app.UsageError(f"--num_requests_sweep: counts must lie in [1, --num_requests={len(prompts)}]")
    gemm = bench_common.measure_gemm_flops()
    speculative = None
    if _SPECULATIVE.value:
        from jaxinfer import SpeculativeConfig
        try:
            speculative = SpeculativeConfig(method=_SPECULATIVE.value, num_speculative_tokens=_NUM_SPEC_TOKENS.value,
                                            draft_model=_DRAFT_MODEL.value, draft_loops=_DRAFT_LOOPS.value)
        except ValueError as e:
            raise app.UsageError(str(e)) from None

    def engine_config(shared):
        return EngineConfig(page_size=_PAGE_SIZE.value, max_num_batched_tokens=_MAX_BATCHED_TOKENS.value,
                            max_num_seqs=_MAX_SEQS.value, shared_prefix_attention=shared,
                            attention_impl=_ATTENTION_IMPL.value, compilation_cache_dir=_COMPILATION_CACHE.value,
                            speculative=speculative, early_exit_threshold=_EXIT.value,
                            depthwise_batching={"auto": None, "on": True, "off": False}[_DEPTHWISE.value])

    if _COMPARE_RECURSIVE.value:
        report = {"env": bench_common.environment(), "model": path, "prompts": _PROMPTS.value,
                  "workload": {"num_requests": _NUM_REQUESTS.value, "input_len": [_MIN_INPUT.value, _MAX_INPUT.value],
                               "output_len": _OUTPUT_LEN.value}, "early_exit_threshold": _EXIT.value,
                  "baseline_model": _BASELINE.value,
                  **compare_recursive(path, prompts, _OUTPUT_LEN.value, engine_config(_SHARED_ATTENTION.value))}
        bench_common.write_json(_JSON.value, report)
        return

    plain = None
    if _COMPARE_SHARED.value:
        plain = run_engine(path, prompts, _OUTPUT_LEN.value, engine_config(False))
        ours = run_engine(path, prompts, _OUTPUT_LEN.value, engine_config(True))
    else:
        ours = run_engine(path, prompts, _OUTPUT_LEN.value, engine_config(_SHARED_ATTENTION.value))
    sweep = []
    if counts:
        from jaxinfer import InferenceSession
        with InferenceSession.from_pretrained(path, dtype="float32",
                                              engine=engine_config(_SHARED_ATTENTION.value)) as session:
            for n in counts:
                sweep.append({"num_requests": n, **run_engine(path, prompts[:n], _OUTPUT_LEN.value, None, session)})
    # Every token (prompt and output) costs 2 x params FLOPs in the weight matmuls.
    roofline_total_tokens_per_s = gemm / (2 * ours["num_params"])
    report = {"env": bench_common.environment(), "model": path,
              "workload": {"num_requests": _NUM_REQUESTS.value, "input_len": [_MIN_INPUT.value, _MAX_INPUT.value],
                           "output_len": _OUTPUT_LEN.value, "shared_prefix_len": _SHARED_PREFIX.value},
              "engine_config": {"page_size": _PAGE_SIZE.value, "max_num_batched_tokens": _MAX_BATCHED_TOKENS.value,
                                "max_num_seqs": _MAX_SEQS.value, "attention_impl": _ATTENTION_IMPL.value,
                                "shared_prefix_attention": True if plain else _SHARED_ATTENTION.value},
              "gemm_gflop_s": gemm / 1e9, "compute_roofline_tokens_per_s": roofline_total_tokens_per_s,
              "jaxinfer": ours,
              "jaxinfer_pct_of_compute_roofline": 100 * ours["computed_tokens_per_s"] / roofline_total_tokens_per_s,
              "sweep": sweep}
    if plain is not None:
        report["jaxinfer_shared_prefix_off"] = plain
        report["shared_prefix_off_pct_of_compute_roofline"] = \
            100 * plain["computed_tokens_per_s"] / roofline_total_tokens_per_s
        report["shared_prefix_speedup"] = ours["output_tokens_per_s"] / plain["output_tokens_per_s"]
    if not _SKIP_HF.value:
        hf = run_hf(path, prompts, _OUTPUT_LEN.value, _HF_BATCH.value)
        report["hf"] = hf
        report["speedup_vs_hf"] = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]

    print(f"\n{_NUM_REQUESTS.value} requests, input {_MIN_INPUT.value}-{_MAX_INPUT.value} tokens "
          f"(+{_SHARED_PREFIX.value} shared), output {_OUTPUT_LEN.value}; float32 GEMM {gemm / 1e9:.1f} GFLOP/s "
          f"-> compute roofline {roofline_total_tokens_per_s:.0f} tokens/s (prompt + output)")
    print(f"{'':18s}{'out tok/s':>10s}{'req/s':>8s}{'total tok/s':>12s}{'% roofline':>11s}{'seconds':>9s}")
    if plain is not None:
        print(f"{'jaxinfer, prefix off':18s}{plain['output_tokens_per_s']:10.1f}{plain['requests_per_s']:8.2f}"
              f"{plain['total_tokens_per_s']:12.1f}{report['shared_prefix_off_pct_of_compute_roofline']:11.1f}"
              f"{plain['seconds']:9.1f}")
    label = "jaxinfer, prefix on" if plain is not None else "jaxinfer"
    print(f"{label:18s}{ours['output_tokens_per_s']:10.1f}{ours['requests_per_s']:8.2f}"
          f"{ours['total_tokens_per_s']:12.1f}{report['jaxinfer_pct_of_compute_roofline']:11.1f}"
          f"{ours['seconds']:9.1f}")
    if plain is not None:
        print(f"shared-prefix attention: {report['shared_prefix_speedup']:.2f}x output tokens/s "
              f"({ours['shared_prefix_steps']} of {ours['num_steps']} steps used it, "
              f"{ours['shared_prefix_tokens_saved']} prefix KV tokens not re-read per layer); compiles off/on "
              f"{plain['num_compiles']}/{ours['num_compiles']}, warm-up {plain['warmup_seconds']:.1f}/"
              f"{ours['warmup_seconds']:.1f} s")
    if "hf" in report:
        hf = report["hf"]
        print(f"{'HF static b=' + str(hf['batch_size']):18s}{hf['output_tokens_per_s']:10.1f}"
              f"{hf['requests_per_s']:8.2f}{'':12s}{'':11s}{hf['seconds']:9.1f}")
        print(f"speed-up vs HF: {report['speedup_vs_hf']:.2f}x")
    print(f"compiles: {ours['num_compiles']} ({ours['compiles_in_timed_run']} in the timed run), warm-up "
          f"{ours['warmup_seconds']:.1f} s, steps {ours['num_steps']}, host {ours['host_seconds']:.2f} s, "
          f"prefix-cache hit rate {ours['prefix_cache_hit_rate']:.2f}, "
          f"compilation cache: {_COMPILATION_CACHE.value or 'off'}")
    if speculative is not None:
        print(f"speculation ({speculative.method}, k = {speculative.num_speculative_tokens}): "
              f"{ours['spec_num_accepted_tokens']} of {ours['spec_num_draft_tokens']} draft tokens accepted in "
              f"{ours['spec_num_drafts']} verified sequences")
    if sweep:
        print(f"{'requests':>9s}{'out tok/s':>11s}{'computed tok/s':>16s}{'% roofline':>11s}{'seconds':>9s}")
        for row in sweep:
            print(f"{row['num_requests']:9d}{row['output_tokens_per_s']:11.1f}{row['computed_tokens_per_s']:16.1f}"
                  f"{100 * row['computed_tokens_per_s'] / roofline_total_tokens_per_s:11.1f}{row['seconds']:9.2f}")
    bench_common.write_json(_JSON.value, report)
    if _PLOT.value:
        import plotting
        plotting.plot_throughput(report, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
