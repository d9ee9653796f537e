"""Batch-1 latency: prefill time and decode ms/token, against the rooflines and HF.

    python scripts/benchmark_latency.py [--preset 125m] [--prompt_len 128] [--output_len 128]
    python scripts/benchmark_latency.py --quantization int4 --skip_hf --json_out runs/bench/latency_int4.json
    python scripts/benchmark_latency.py --skip_hf --batch_sizes 1,4,16 --plot runs/bench/latency.png

Decode of one sequence reads every weight once per token, so its floor is
weight bytes / memory bandwidth; the bandwidth is measured in the same run with a large
float32 GEMV. The compute roofline (2 x parameters FLOPs per token over the float32 GEMM
rate, also measured here) is printed too. HF transformers runs the same greedy
generation on the same weights for the ratio. With --quantization the linear layers are
int4 (round to nearest) and the memory roofline uses the int4 weight bytes.

--batch_sizes adds decode steps of several sequences at once (B copies of the prompt,
prefix caching off): the memory roof of a step stays the weight bytes / bandwidth, the
compute roof grows as B x 2 x parameters / GEMM rate; --plot draws ms per step against
both (scripts/plotting.py; needs matplotlib).

--speculative none,ngram,draft times batch-1 decoding once per speculation method
(EngineConfig.speculative; draft needs --draft_model) on the same prompts and reports
ms/token, the speed-up over "none", the acceptance rate and the mean tokens per verified
step (--batch_sizes 1,8: also output tokens/s of the first 8 prompts run together). --prompts code takes the prompts from the held-out Python files of the model's
data split (the first --prompt_len tokens of --num_prompts files: a code-completion
workload; needs the model's tokenizer, e.g. --model tiny-code):
    python scripts/benchmark_latency.py --model tiny-code --prompts code --skip_hf \
        --speculative none,ngram --prompt_len 256 --output_len 128

With --output_len 1 there is no decode step: the decode figures are reported as n/a
(null in the JSON). torch and transformers are needed only for the HF baseline;
--skip_hf runs without them.
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
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens (at least 1).", lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 128, "Generated tokens (at least 1; 1 = prefill only).",
                                   lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (median reported).", lower_bound=1)
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Do not run the HF baseline.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", "",
    "Persistent compilation cache folder; empty (the default) = off, so warm-up figures are cold compiles.")
_JSON = flags.DEFINE_string("json_out", "runs/bench/latency.json", "JSON report path.")
_QUANTIZATION = flags.DEFINE_enum("quantization", None, ["int4", "int4-gptq"], "Quantize jaxinfer's linear layers.")
_QUANT_GROUP_SIZE = flags.DEFINE_integer("quant_group_size", 128, "Input rows per int4 scale.", lower_bound=1)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", "1", "Decode batch sizes to time (1 = the batch-1 run only).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "jaxinfer's parameter and activation dtype (the HF baseline stays float32).")
_PLOT = flags.DEFINE_string("plot", None, "Also draw ms/token vs batch with the memory and compute roofs here (PNG).")
_SPECULATIVE = flags.DEFINE_list("speculative", [], "Speculation methods to compare at batch 1 (none, ngram, draft, "
                                                   "early_exit: --model must be a recursive folder).")
_NUM_SPEC_TOKENS = flags.DEFINE_integer("num_speculative_tokens", 4, "Draft tokens per step at most.", lower_bound=1)
_DRAFT_MODEL = flags.DEFINE_string("draft_model", None, "Draft model folder or bundled name (--speculative draft).")
_DRAFT_LOOPS = flags.DEFINE_integer("draft_loops", 1, "Loops of the recursive model that draft (--speculative "
                                    "early_exit).", lower_bound=1)
_DEPTHWISE = flags.DEFINE_enum("depthwise_batching", "off", ["auto", "on", "off"],
                               "A recursive --model: depth-wise batching (docs/recursive.md); off = its loops back "
                               "to back, the form speculation verifies with.")
_EXIT = flags.DEFINE_float("early_exit_threshold", None, "Depth-wise: every request's early-exit confidence.")
_PROMPTS = flags.DEFINE_enum("prompts", "random", ["random", "code"],
                             "random ids, or the held-out Python files of the model's data split (code completion).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompts of the --speculative comparison.", lower_bound=1)


def _jaxinfer(path, prompt, output_len, repeats, quantization=None, quant_group_size=128, batch_sizes=(1,)):
    import numpy as np

    from jaxinfer import EngineConfig, InferenceSession, SamplingParams
    from jaxinfer.models.transformer import param_shapes
    from jaxinfer.quant import QuantConfig
    start = time.perf_counter()
    quant_config = QuantConfig(group_size=quant_group_size) if quantization else None
    # No prefix caching: every repetition reuses the prompt and must prefill it in full.
    engine = EngineConfig(max_num_batched_tokens=max(512, len(prompt)), enable_prefix_caching=False,
                          compilation_cache_dir=_COMPILATION_CACHE.value, **_recursive_fields())
    session = InferenceSession.from_pretrained(path, dtype=_DTYPE.value, engine=engine,
                                               quantization=quantization, quantization_config=quant_config)
    load_seconds = time.perf_counter() - start
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    session.generate([prompt], params)  # warm-up: compiles prefill and decode shapes
    warmup_seconds = time.perf_counter() - start
    ttfts, tpots = [], []
    for _ in range(repeats):
        (out,) = session.generate([prompt], params)
        ttfts.append(out.time_to_first_token)
        tpots.append(out.time_per_output_token)
    # Decode steps of B sequences: B copies of the prompt (prefix caching is off).
    batch_ms = {}
    for batch in sorted(set(batch_sizes) - {1}):
        session.generate([prompt] * batch, params)  # warm-up: this batch's shapes
        batch_tpots = []
        for _ in range(repeats):
            batch_tpots += [o.time_per_output_token for o in session.generate([prompt] * batch, params)]
        batch_ms[batch] = 1000 * float(np.median(batch_tpots)) if output_len > 1 else None
    m = session.metrics()
    # Bytes one decode step reads: every weight, except that an untied input embedding
    # table is read one row per token (a tied one is read whole by the LM head).
    config = session.model_config
    embed_bytes = 0 if config.tie_word_embeddings else int(session.engine.runner.params["embed_tokens"].nbytes)
    # One output token is all prefill: there is no decode step to time.
    decode_ms = 1000 * float(np.median(tpots)) if output_len > 1 else None
    return {"load_seconds": load_seconds, "warmup_seconds": warmup_seconds, "prefill_seconds": float(np.median(ttfts)),
            "decode_ms_per_token": decode_ms, "num_compiles": m["num_compiles"],
            "host_ms_per_step": m["host_ms_per_step"], "weight_bytes": m["weight_bytes"],
            "decode_read_bytes": m["weight_bytes"] - embed_bytes + embed_bytes // max(config.vocab_size, 1),
            # logical parameters (an int4 tree packs two per byte): from the float shapes
            "num_params": bench_common.num_params(param_shapes(session.model_config)),
            "quantization": quantization, "quant_group_size": quant_group_size if quantization else None,
            "batch_decode_ms_per_token": batch_ms}


def _speculation(path, prompts, output_len, repeats, methods, batch_sizes=()):
    """Batch-1 decode of each prompt under each speculation method: ms/token and acceptance;
    then, per batch size B > 1, output tokens/s of the first B prompts run together."""
    import numpy as np

    from jaxinfer import EngineConfig, InferenceSession, SamplingParams, SpeculativeConfig
    rows = []
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for method in methods:
        spec = None if method == "none" else SpeculativeConfig(
            method=method, num_speculative_tokens=_NUM_SPEC_TOKENS.value,
            draft_model=_DRAFT_MODEL.value if method == "draft" else None, draft_loops=_DRAFT_LOOPS.value)
        engine = EngineConfig(max_num_batched_tokens=max(512, max(map(len, prompts))), enable_prefix_caching=False,
                              compilation_cache_dir=_COMPILATION_CACHE.value, speculative=spec,
                              **(_recursive_fields() if spec is None else {}))
        session = InferenceSession.from_pretrained(path, dtype=_DTYPE.value, engine=engine)
        for prompt in prompts:  # warm-up: every shape these prompts meet
            session.generate([prompt], params)
        before = session.metrics()
        tpots, outputs = [], []
        for _ in range(repeats):
            for prompt in prompts:
                (out,) = session.generate([prompt], params)
                tpots.append(out.time_per_output_token)
                outputs.append(out.token_ids)
        m = session.metrics()
        batch_rates = {}
        for batch in [b for b in batch_sizes if 1 < b <= len(prompts)]:
            session.generate(prompts[:batch], params)  # warm-up: this batch's shapes
            start = time.perf_counter()
            outs = session.generate(prompts[:batch], params)
            batch_rates[batch] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        drafted = m["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
        accepted = m["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
        verified = m["spec_num_drafts"] - before["spec_num_drafts"]
        rows.append({"method": method, "decode_ms_per_token": 1000 * float(np.median(tpots)),
                     "mean_decode_ms_per_token": 1000 * float(np.mean(tpots)),
                     "acceptance_rate": accepted / drafted if drafted else None,
                     "tokens_per_verify_step": 1 + accepted / verified if verified else None,
                     "compiles_after_warmup": m["num_compiles"] - before["num_compiles"],
                     "draft_seconds": m["spec_draft_seconds"] - before["spec_draft_seconds"],
                     "batch_output_tokens_per_s": batch_rates, "outputs": outputs})
        session.close()
    first_outputs = rows[0]["outputs"]
    for row in rows:
        row["speedup_vs_first"] = rows[0]["mean_decode_ms_per_token"] / row["mean_decode_ms_per_token"]
    for row in rows:
        row["same_tokens_as_first"] = row.pop("outputs") == first_outputs
    return rows


def _recursive_fields() -> dict:
    """EngineConfig fields of --depthwise_batching and --early_exit_threshold."""
    return {"depthwise_batching": {"auto": None, "on": True, "off": False}[_DEPTHWISE.value],
            "early_exit_threshold": _EXIT.value}


def _prompts(path, rng):
    """--num_prompts prompts of --prompt_len tokens: random ids, or held-out code files."""
    if _PROMPTS.value == "random":
        return [[1] + rng.randint(3, 1000, size=_PROMPT_LEN.value - 1).tolist() for _ in range(_NUM_PROMPTS.value)]
    import stdlib_corpus

    from jaxinfer.assets import resolve_model_path
    docs = stdlib_corpus.heldout_token_ids(resolve_model_path(path))
    long_docs = [d for d in docs if len(d) >= _PROMPT_LEN.value + _OUTPUT_LEN.value]
    if len(long_docs) < _NUM_PROMPTS.value:
        raise app.UsageError(f"--prompts code: only {len(long_docs)} held-out files have --prompt_len + --output_len "
                             f"tokens; ask for fewer or shorter")
    step = len(long_docs) // _NUM_PROMPTS.value
    return [d[:_PROMPT_LEN.value] for d in long_docs[::step][:_NUM_PROMPTS.value]]


def _hf(path, prompt, output_len, repeats):
    import numpy as np
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    gen = transformers.GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, generation_config=gen, max_new_tokens=n, attention_mask=torch.ones_like(ids))
        return time.perf_counter() - start

    run(4)
    prefill = float(np.median([run(1) for _ in range(repeats)]))
    if output_len == 1:
        return {"prefill_seconds": prefill, "decode_ms_per_token": None}
    total = float(np.median([run(output_len) for _ in range(repeats)]))
    return {"prefill_seconds": prefill, "decode_ms_per_token": 1000 * (total - prefill) / (output_len - 1)}


def _ratio(numerator, denominator):
    """numerator / denominator, or None when either is missing (no decode step was run)."""
    return None if numerator is None or denominator is None else numerator / denominator


def _fmt(value, width, spec):
    return f"{'n/a':>{width}s}" if value is None else f"{value:{width}{spec}}"


def main(argv):
    del argv
    import numpy as np
    path = _MODEL.value or bench_common.build_random_llama(
        _PRESET.value, os.path.join(_WORK_DIR.value, f"llama-{_PRESET.value}"))
    rng = np.random.RandomState(0)
    if _SPECULATIVE.value:
        return _speculation_main(path, _prompts(path, rng))
    prompt = [1] + rng.randint(3, 1000, size=_PROMPT_LEN.value - 1).tolist()

    bandwidth = bench_common.measure_memory_bandwidth()
    gemm = bench_common.measure_gemm_flops()
    try:
        batch_sizes = sorted({int(b) for b in _BATCH_SIZES.value} | {1})
    except ValueError:
        raise app.UsageError(f"--batch_sizes: expected integers, got {_BATCH_SIZES.value}") from None
    if batch_sizes[0] < 1:
        raise app.UsageError(f"--batch_sizes: sizes must be at least 1, got {_BATCH_SIZES.value}")
    ours = _jaxinfer(path, prompt, _OUTPUT_LEN.value, _REPEATS.value, _QUANTIZATION.value, _QUANT_GROUP_SIZE.value,
                     batch_sizes)
    weight_ms = 1000 * ours["weight_bytes"] / bandwidth
    read_ms = 1000 * ours["decode_read_bytes"] / bandwidth  # the bytes a decode step really reads
    compute_ms = 1000 * 2 * ours["num_params"] / gemm
    report = {
        "env": bench_common.environment(), "model": path, "prompt_len": _PROMPT_LEN.value,
        "output_len": _OUTPUT_LEN.value, "memory_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflop_s": gemm / 1e9,
        "jaxinfer": ours,
        "dtype": _DTYPE.value, "memory_roofline_ms_per_token": weight_ms,
        "compute_roofline_ms_per_token": compute_ms,
        "jaxinfer_pct_of_memory_roofline": _ratio(100 * weight_ms, ours["decode_ms_per_token"]),
        "read_roofline_ms_per_token": read_ms,
        "jaxinfer_pct_of_read_roofline": _ratio(100 * read_ms, ours["decode_ms_per_token"]),
        "prefill_compute_roofline_seconds": 2 * ours["num_params"] * _PROMPT_LEN.value / gemm,
        # per decode step of B sequences: weights read once; 2 x params FLOPs per sequence
        "batch_sweep": [{"batch_size": b, "memory_roofline_ms": weight_ms, "compute_roofline_ms": b * compute_ms,
                         "decode_ms_per_token": ours["decode_ms_per_token"] if b == 1
                         else ours["batch_decode_ms_per_token"][b]} for b in batch_sizes],
    }
    if not _SKIP_HF.value:
        hf = _hf(path, prompt, _OUTPUT_LEN.value, _REPEATS.value)
        report["hf"] = hf
        report["hf_pct_of_memory_roofline"] = _ratio(100 * weight_ms, hf["decode_ms_per_token"])
        report["decode_speedup_vs_hf"] = _ratio(hf["decode_ms_per_token"], ours["decode_ms_per_token"])
        report["prefill_speedup_vs_hf"] = hf["prefill_seconds"] / ours["prefill_seconds"]

    weights_kind = f"{_QUANTIZATION.value} (group {_QUANT_GROUP_SIZE.value})" if _QUANTIZATION.value else "float32"
    print(f"\nmodel {path}: {ours['num_params'] / 1e6:.1f}M params, {ours['weight_bytes'] / 1e6:.0f} MB of "
          f"{weights_kind} weights")
    print(f"measured memory bandwidth {bandwidth / 1e9:.1f} GB/s, float32 GEMM {gemm / 1e9:.1f} GFLOP/s")
    print(f"{'':24s}{'decode ms/tok':>14s}{'% mem roofline':>16s}{'prefill s':>11s}")
    print(f"{'roofline (memory)':24s}{weight_ms:14.2f}{100.0:16.1f}{report['prefill_compute_roofline_seconds']:11.3f}")
    print(f"{'roofline (bytes read)':24s}{read_ms:14.2f}{100.0:16.1f}   "
          f"(weights minus the untied input embedding table: {ours['decode_read_bytes'] / 1e6:.0f} MB)")
    print(f"{'roofline (compute)':24s}{compute_ms:14.2f}")
    print(f"{'jaxinfer':24s}{_fmt(ours['decode_ms_per_token'], 14, '.2f')}"
          f"{_fmt(report['jaxinfer_pct_of_memory_roofline'], 16, '.1f')}{ours['prefill_seconds']:11.3f}"
          f"   ({_fmt(report['jaxinfer_pct_of_read_roofline'], 0, '.1f')}% of the bytes-read roofline)")
    if "hf" in report:
        hf = report["hf"]
        print(f"{'HF transformers':24s}{_fmt(hf['decode_ms_per_token'], 14, '.2f')}"
              f"{_fmt(report['hf_pct_of_memory_roofline'], 16, '.1f')}{hf['prefill_seconds']:11.3f}")
        decode_speedup = report["decode_speedup_vs_hf"]
        print(f"decode speed-up vs HF: {'n/a' if decode_speedup is None else f'{decode_speedup:.2f}x'}, "
              f"prefill: {report['prefill_speedup_vs_hf']:.2f}x")
    if _OUTPUT_LEN.value == 1:
        print("decode: n/a (--output_len 1 generates only the prefill's token; no decode step ran)")
    print(f"compiles: {ours['num_compiles']}, warm-up {ours['warmup_seconds']:.1f} s, "
          f"host {ours['host_ms_per_step']:.2f} ms/step, compilation cache: {_COMPILATION_CACHE.value or 'off'}")
    if len(batch_sizes) > 1:
        print(f"{'batch':>6s}{'decode ms/step':>16s}{'memory roof':>13s}{'compute roof':>14s}")
        for row in report["batch_sweep"]:
            print(f"{row['batch_size']:6d}{_fmt(row['decode_ms_per_token'], 16, '.2f')}"
                  f"{row['memory_roofline_ms']:13.2f}{row['compute_roofline_ms']:14.2f}")
    bench_common.write_json(_JSON.value, report)
    if _PLOT.value:
        import plotting
        plotting.plot_latency(report, _PLOT.value)


def _speculation_main(path, prompts):
    methods = _SPECULATIVE.value
    bad = [m for m in methods if m not in ("none", "ngram", "draft", "early_exit")]
    if bad or len(set(methods)) != len(methods):
        raise app.UsageError(f"--speculative: distinct methods among none, ngram, draft, early_exit; got {methods}")
    if ("draft" in methods) != (_DRAFT_MODEL.value is not None):
        raise app.UsageError("--draft_model: needed with --speculative draft, and only then")
    try:
        batch_sizes = sorted({int(b) for b in _BATCH_SIZES.value})
    except ValueError:
        raise app.UsageError(f"--batch_sizes: expected integers, got {_BATCH_SIZES.value}") from None
    if any(b > len(prompts) for b in batch_sizes):
        raise app.UsageError(f"--batch_sizes: at most --num_prompts ({len(prompts)}) with --speculative")
    rows = _speculation(path, prompts, _OUTPUT_LEN.value, _REPEATS.value, methods, batch_sizes)
    print(f"\nbatch-1 decode, {len(prompts)} {_PROMPTS.value} prompts of {_PROMPT_LEN.value} tokens, "
          f"{_OUTPUT_LEN.value} greedy tokens, k = {_NUM_SPEC_TOKENS.value}, model {path}")
    print(f"{'method':8s}{'ms/token':>10s}{'mean':>8s}{'speed-up':>10s}{'accepted':>10s}{'tok/verify':>12s}"
          f"{'same tokens':>13s}")
    for r in rows:
        print(f"{r['method']:8s}{r['decode_ms_per_token']:10.2f}{r['mean_decode_ms_per_token']:8.2f}"
              f"{r['speedup_vs_first']:9.2f}x{_fmt(r['acceptance_rate'], 10, '.2f')}"
              f"{_fmt(r['tokens_per_verify_step'], 12, '.2f')}{str(r['same_tokens_as_first']):>13s}")
    print(f"speed-up: mean ms/token of {rows[0]['method']} over each method's")
    for batch in [b for b in batch_sizes if b > 1]:
        print(f"batch {batch}: output tokens/s " + ", ".join(
            f"{r['method']} {r['batch_output_tokens_per_s'][batch]:.0f}" for r in rows))
    bench_common.write_json(_JSON.value, {
        "env": bench_common.environment(), "model": path, "prompts": _PROMPTS.value, "num_prompts": len(prompts),
        "prompt_len": _PROMPT_LEN.value, "output_len": _OUTPUT_LEN.value,
        "num_speculative_tokens": _NUM_SPEC_TOKENS.value, "draft_model": _DRAFT_MODEL.value,
        "draft_loops": _DRAFT_LOOPS.value if "early_exit" in methods else None, "speculation": rows})


if __name__ == "__main__":
    app.run(main)
