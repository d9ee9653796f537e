"""Online serving benchmark: latency and throughput of a running server, as clients see them.

    python scripts/benchmark_serving.py --base_url http://127.0.0.1:8000 --num_prompts 200 \\
        --request_rate 8 --random_input_len 512 --random_output_len 128 --tokenizer tiny-code
    python scripts/benchmark_serving.py --backend jetstream --grpc_target 127.0.0.1:9000 --request_rate inf
    python scripts/benchmark_serving.py --dataset shared_prefix --shared_prefix_len 1024 --num_prefixes 4 \\
        --goodput "ttft:500 tpot:50" --max_concurrency 32 --result_json runs/bench/serving.json
    python scripts/benchmark_serving.py --request_rates 1,4,16,inf --plot runs/bench/serving.png ...
    python scripts/benchmark_serving.py --dataset mixed --random_input_len 32 --random_output_len 64 \
        --mixed_long_fraction 0.2 --mixed_long_input_len 768 --mixed_long_output_len 4 ...  # TPOT of decodes

Drives any server that speaks the OpenAI HTTP API (vLLM, `jaxinfer serve`; --backend
openai for /v1/completions, openai-chat for /v1/chat/completions) or JetStream's gRPC
Orchestrator API (--backend jetstream), so the same workload can be timed against each
and the numbers compared line by line: the printed table has the layout of vLLM's
"Serving Benchmark Result".

Every request streams. Per request: TTFT (send to the first non-empty content chunk),
the gaps between later chunks (ITL), TPOT = (end-to-end - TTFT) / (output tokens - 1),
end-to-end latency, and output tokens (usage.completion_tokens, asked for with
stream_options.include_usage; for JetStream the token ids received). Requests ask for
max_tokens = the workload's output length with ignore_eos (a vLLM extension; the jetstream
backend has only max_tokens), so output lengths do not depend on the model's text.

Requests are sent on a gamma arrival process (--request_rate, --burstiness; inf = all at
once), at most --max_concurrency in flight. Prompts are random text of the requested
token length: decoded from random token ids when --tokenizer names the server's model (a
folder or a bundled name), else common English words (about one token each). Input tokens
are the server's usage.prompt_tokens when it reports them, else the tokenizer count
(else the requested length). Goodput counts the requests that meet every --goodput SLO.
The JSON report holds the table's numbers, the flags, per-request arrays and the first
errors.

--request_rates R1,R2,... runs the same workload once per rate (the warm-up only before
the first); the JSON then holds {"runs": [one report per rate]}, and --plot FILE.png
draws the TTFT and TPOT percentiles against the rate (scripts/plotting.py; matplotlib).
"""
from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serving_bench_lib as lib  # noqa: E402

_BACKEND = flags.DEFINE_enum("backend", "openai", ["openai", "openai-chat", "jetstream"],
                             "openai: /v1/completions; openai-chat: /v1/chat/completions; jetstream: gRPC Decode.")
_BASE_URL = flags.DEFINE_string("base_url", "http://127.0.0.1:8000", "OpenAI server root (openai backends).")
_GRPC_TARGET = flags.DEFINE_string("grpc_target", "127.0.0.1:9000", "Orchestrator host:port (jetstream backend).")
_MODEL = flags.DEFINE_string("model", None, "Model name sent in the requests (default: the first of GET /v1/models).")
_API_KEY = flags.DEFINE_string("api_key", None, "Sent as 'Authorization: Bearer KEY' (openai backends).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 100, "Timed requests.", lower_bound=1)
_REQUEST_RATE = flags.DEFINE_float("request_rate", float("inf"), "Requests per second (inf = all at once).")
_BURSTINESS = flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the arrivals: 1 = Poisson, < 1 burstier, "
                                 "> 1 more regular (the mean rate is unchanged).")
_MAX_CONCURRENCY = flags.DEFINE_integer("max_concurrency", None, "Most requests in flight (default: unbounded).",
                                        lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the workload and the arrivals.")
_DATASET = flags.DEFINE_enum("dataset", "random", ["random", "shared_prefix", "json", "mixed"], "Workload.")
_LONG_FRACTION = flags.DEFINE_float("mixed_long_fraction", 0.2, "mixed: share of long-prompt requests.")
_LONG_INPUT = flags.DEFINE_integer("mixed_long_input_len", 1024, "mixed: tokens of a long prompt.", lower_bound=1)
_LONG_OUTPUT = flags.DEFINE_integer("mixed_long_output_len", 8, "mixed: output tokens of a long-prompt request.",
                                    lower_bound=1)
_INPUT_LEN = flags.DEFINE_integer("random_input_len", 1024, "Prompt tokens (random; the suffix for shared_prefix).",
                                  lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("random_output_len", 128, "Output tokens (random, shared_prefix).", lower_bound=1)
_RANGE_RATIO = flags.DEFINE_float("random_range_ratio", 0.0,
                                  "Lengths uniform in [len (1 - r), len (1 + r)]; 0 = fixed.", lower_bound=0.0)
_PREFIX_LEN = flags.DEFINE_integer("shared_prefix_len", 256, "Tokens of each shared prefix.", lower_bound=1)
_NUM_PREFIXES = flags.DEFINE_integer("num_prefixes", 1, "Distinct prefixes (prompt i uses prefix i mod N).",
                                     lower_bound=1)
_DATASET_PATH = flags.DEFINE_string("dataset_path", None, 'JSON list of {"prompt": str, "output_len": int}.')
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Model folder or bundled name whose tokenizer builds and "
                                 "counts the prompts (default: a word list, lengths approximate).")
_GOODPUT = flags.DEFINE_multi_string("goodput", [], "SLOs in ms, e.g. 'ttft:500 tpot:50 e2el:2000' (spaces, "
                                     "commas or repeated flags); goodput = requests meeting all of them per second.")
_PERCENTILES = flags.DEFINE_string("percentiles", "50,90,99", "Latency percentiles to report (P99 always).")
_RESULT_JSON = flags.DEFINE_string("result_json", None, "Write the JSON report here.")
_WARMUP = flags.DEFINE_integer("warmup_requests", 0, "Requests sent (all at once) before timing; not counted.",
                               lower_bound=0)
_TIMEOUT = flags.DEFINE_float("timeout_s", 600.0, "Per-request limit, seconds.", lower_bound=0.001)
_DISABLE_TQDM = flags.DEFINE_bool("disable_tqdm", False, "No progress bar.")
_REQUEST_RATES = flags.DEFINE_list("request_rates", [], "Several rates, one run each (overrides --request_rate).")
_PLOT = flags.DEFINE_string("plot", None, "Draw TTFT / TPOT percentiles vs request rate here (PNG; needs matplotlib).")

_NUM_ERRORS_KEPT = 10


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from jaxinfer.assets import resolve_model_path
    from jaxinfer.models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(resolve_model_path(name))
    if tokenizer is None:
        raise app.UsageError(f"--tokenizer {name}: the folder has no tokenizer.json or tokenizer.model")
    return tokenizer


def build_workload(maker: lib.PromptMaker, num_prompts: int, seed: int) -> list[lib.RequestInput]:
    if _DATASET.value == "json":
        if not _DATASET_PATH.value:
            raise app.UsageError("--dataset json needs --dataset_path")
        return lib.json_workload(maker, _DATASET_PATH.value, num_prompts)
    if _DATASET.value == "shared_prefix":
        return lib.shared_prefix_workload(maker, num_prompts, _PREFIX_LEN.value, _NUM_PREFIXES.value,
                                          _INPUT_LEN.value, _OUTPUT_LEN.value, _RANGE_RATIO.value, seed)
    if _DATASET.value == "mixed":
        return lib.mixed_workload(maker, num_prompts, _INPUT_LEN.value, _OUTPUT_LEN.value, _LONG_FRACTION.value,
                                  _LONG_INPUT.value, _LONG_OUTPUT.value, seed)
    return lib.random_workload(maker, num_prompts, _INPUT_LEN.value, _OUTPUT_LEN.value, _RANGE_RATIO.value, seed)


def _decode_heavy_tpot(requests, results) -> dict:
    """--dataset mixed: TPOT percentiles (ms) of the decode-heavy requests alone (the ones
    whose inter-token gaps a long prefill beside them stretches)."""
    import numpy as np
    tpots = [lib.tpot(r) * 1000 for q, r in zip(requests, results)
             if r.success and r.output_tokens > 1 and q.output_len == _OUTPUT_LEN.value]
    if not tpots:
        return {}
    return {"decode_heavy_requests": len(tpots), "decode_heavy_mean_tpot_ms": float(np.mean(tpots)),
            "decode_heavy_p50_tpot_ms": float(np.percentile(tpots, 50)),
            "decode_heavy_p99_tpot_ms": float(np.percentile(tpots, 99))}


async def _openai_sender(connections: int):
    """(send function, model name, closer) for the OpenAI backends over one httpx client."""
    import httpx
    headers = {"Authorization": f"Bearer {_API_KEY.value}"} if _API_KEY.value else None
    client = httpx.AsyncClient(base_url=_BASE_URL.value.rstrip("/"), headers=headers,
                               timeout=httpx.Timeout(_TIMEOUT.value),
                               limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                                                   # below uvicorn's 5 s keep-alive: never reuse a
                                                   # connection the server is closing
                                                   keepalive_expiry=2.0))
    model = _MODEL.value
    if not model:
        try:
            resp = await client.get("/v1/models")
            resp.raise_for_status()
            data = resp.json().get("data") or []
        except (httpx.HTTPError, ValueError) as e:
            await client.aclose()
            raise SystemExit(f"GET {_BASE_URL.value}/v1/models failed ({type(e).__name__}: {e}); "
                             "is the server up? (--model skips this request)") from e
        if not data:
            await client.aclose()
            raise SystemExit(f"GET {_BASE_URL.value}/v1/models lists no model; pass --model")
        model = data[0]["id"]
    chat = _BACKEND.value == "openai-chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def send(req):
        return lib.openai_request(client, path, model, req, chat=chat)
    return send, model, client.aclose


async def _jetstream_sender():
    import grpc

    from jaxinfer.serving.protos import jetstream_pb2, jetstream_pb2_grpc
    channel = grpc.aio.insecure_channel(_GRPC_TARGET.value)
    stub = jetstream_pb2_grpc.OrchestratorStub(channel)

    def send(req):
        return lib.jetstream_request(stub, jetstream_pb2, req, _TIMEOUT.value)
    return send, _MODEL.value, channel.close


async def benchmark(requests, warmups, rate: float) -> dict:
    from tqdm import tqdm
    concurrency = _MAX_CONCURRENCY.value or max(len(requests), len(warmups), 1)
    if _BACKEND.value == "jetstream":
        send, model, close = await _jetstream_sender()
    else:
        send, model, close = await _openai_sender(concurrency)
    try:
        if warmups:
            results, seconds = await lib.run_requests(warmups, send, max_concurrency=_MAX_CONCURRENCY.value,
                                                      timeout_s=_TIMEOUT.value)
            failed = [r.error for r in results if not r.success]
            print(f"warm-up: {len(warmups)} requests in {seconds:.2f} s, {len(failed)} failed"
                  + (f" (first: {failed[0]})" if failed else ""))
        times = lib.arrival_times(len(requests), rate, _BURSTINESS.value, _SEED.value)
        compiles_before = await _server_compiles()
        with tqdm(total=len(requests), disable=_DISABLE_TQDM.value) as bar:
            results, duration = await lib.run_requests(requests, send, times, _MAX_CONCURRENCY.value,
                                                       _TIMEOUT.value, bar)
        compiles_after = await _server_compiles()
    finally:
        await close()
    compiles = None if compiles_before is None or compiles_after is None else compiles_after - compiles_before
    return {"model": model, "results": results, "duration": duration, "server_compiles": compiles}


async def _server_compiles():
    """A jaxinfer server's `jaxinfer:num_compiles_total` (programs compiled by traffic, not
    by its warm-up) from GET /metrics; None for other servers, the jetstream backend, or
    when it cannot be read."""
    if _BACKEND.value == "jetstream":
        return None
    import httpx
    headers = {"Authorization": f"Bearer {_API_KEY.value}"} if _API_KEY.value else {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(_BASE_URL.value.rstrip("/") + "/metrics", headers=headers)).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("jaxinfer:num_compiles_total"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _report(model, requests, results, metrics, rate: float) -> dict:
    errors = [{"index": i, "error": r.error} for i, r in enumerate(results) if not r.success][:_NUM_ERRORS_KEPT]
    values = {h.name: h.value for h in globals().values() if isinstance(h, flags.FlagHolder)}
    values["api_key"] = "<set>" if values["api_key"] else None  # no secret in a result file
    values["request_rate"] = str(values["request_rate"])  # inf is not JSON
    metrics = {**metrics, "request_rate": f"{rate:g}"}  # the rate of this run ("inf": all at once)
    if _DATASET.value == "mixed":
        metrics.update(_decode_heavy_tpot(requests, results))
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "backend": _BACKEND.value,
            "target": _GRPC_TARGET.value if _BACKEND.value == "jetstream" else _BASE_URL.value, "model": model,
            "flags": values, **metrics,
            "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "requested_output_lens": [q.output_len for q in requests], "success": [r.success for r in results],
            "ttfts_s": [r.ttft for r in results], "itls_s": [r.itl for r in results],
            "e2els_s": [r.latency for r in results], "errors": errors}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        percentiles = lib.parse_percentiles(_PERCENTILES.value)
        slos = lib.parse_goodput(_GOODPUT.value)
        try:
            rates = [float(r) for r in _REQUEST_RATES.value] or [_REQUEST_RATE.value]
        except ValueError:
            raise ValueError(f"--request_rates: expected numbers or inf, got {_REQUEST_RATES.value}") from None
        for rate in rates:
            lib.arrival_intervals(0, rate, _BURSTINESS.value)  # validates rate and burstiness
        maker = lib.PromptMaker(_load_tokenizer(_TOKENIZER.value))
        requests = build_workload(maker, _NUM_PROMPTS.value, _SEED.value)
        # Warm-up prompts come from another seed: they must not leave the timed prompts in a prefix cache.
        warmups = build_workload(maker, _WARMUP.value, _SEED.value + 1) if _WARMUP.value else []
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    for name in ("httpx", "httpcore"):  # one INFO line per request otherwise (absl shows INFO)
        logging.getLogger(name).setLevel(logging.WARNING)
    reports = []
    for i, rate in enumerate(rates):
        if len(rates) > 1:
            print(f"request rate {rate:g} req/s")
        run = asyncio.run(benchmark(requests, warmups if i == 0 else [], rate))
        metrics = lib.compute_metrics(run["results"], run["duration"], percentiles, slos)
        print(lib.format_table(metrics, _MAX_CONCURRENCY.value))
        if _DATASET.value == "mixed":
            heavy = _decode_heavy_tpot(requests, run["results"])
            if heavy:
                print(f"decode-heavy requests ({heavy['decode_heavy_requests']}): TPOT mean "
                      f"{heavy['decode_heavy_mean_tpot_ms']:.2f} ms, p50 {heavy['decode_heavy_p50_tpot_ms']:.2f} ms, "
                      f"p99 {heavy['decode_heavy_p99_tpot_ms']:.2f} ms")
        errors = [r.error for r in run["results"] if not r.success]
        if errors:
            print(f"{len(errors)} requests failed; first error: {errors[0]}")
        compiles = run["server_compiles"]
        if compiles:
            print(f"WARNING: the server compiled {compiles} step program(s) during the timed run (batch shapes "
                  f"its warm-up did not cover); their stalls are in the latencies above")
        elif compiles == 0:
            print("server compiles during the timed run: 0")
        reports.append({**_report(run["model"], requests, run["results"], metrics, rate),
                        "server_compiles": compiles})
    if _RESULT_JSON.value:
        path = _RESULT_JSON.value
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(reports[0] if len(reports) == 1 else {"runs": reports}, f, indent=2)
        print(f"wrote {path}")
    if _PLOT.value:
        import plotting
        plotting.plot_serving(reports, _PLOT.value, percentiles)


if __name__ == "__main__":
    app.run(main)
