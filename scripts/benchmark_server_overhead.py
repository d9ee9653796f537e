"""What the HTTP server adds: one workload in-process and through `jaxinfer serve`.

    python scripts/benchmark_server_overhead.py [--model tiny-code] [--num_prompts 32] \\
        [--input_len 64] [--output_len 32] [--num_low_load 16] [--rounds 7] \\
        [--max_num_seqs 16] [--max_num_batched_tokens 256] [--num_pages N] \\
        [--result_json runs/serving/server_overhead.json]

Why: `jaxinfer serve` puts an OpenAI HTTP front end (uvicorn + FastAPI, an asyncio loop,
SSE/JSON per streamed chunk) between a client and the same AsyncEngine that
`InferenceSession` drives in-process. The goal this measures: the server adds under 5%
to throughput at full load and under 5 ms to the time to first token (TTFT) at low load.

The two paths, on the same engine settings (--model, --dtype, --page_size, --num_pages,
--max_num_batched_tokens, --max_num_seqs) and the same tokens:
- session: `InferenceSession` in this process. Full load = `session.generate(prompts)`;
  low load = `session.stream(prompt, output="deltas")`, TTFT = the caller's time to the
  first delta carrying token ids.
- server: `python -m jaxinfer.cli serve --grpc_port -1 ...` as a subprocess (its own
  GIL; on a 2-core machine the client and the server still compete for the CPUs).
  Streaming POST /v1/completions over one keep-alive httpx client; TTFT = time to the
  first SSE chunk with non-empty text. Full load = every request at once; the full-load
  run is also timed with `stream: false` (one JSON body per request, no per-token SSE),
  which splits the overhead into per-token streaming cost and the rest.

Prompts are token-id lists (BOS + uniform random ids, fixed seed; the OpenAI completions
API takes a list of ids as `prompt`), so both paths see identical tokens. Sampling is
greedy with ignore_eos and max_tokens = --output_len, on top of the model folder's
generation_config defaults on both paths (the server merges them into every request;
the session path uses `default_sampling_params`), so both run the same programs.

Warm-up: each path runs the full workload and two single requests untimed (other prompts
of the same shapes) until a pass compiles nothing (at most --max_warmup_passes). The
engine's step shapes depend on how requests arrive, so the server (requests trickle in
over milliseconds) can still meet a new shape later: every timed run and request reads
the compile counters before and after (engine counter in-process, the server's
`jaxinfer:num_compiles` metric), and those that compiled are left out of the figures
(the JSON says how many). Every timed run uses prompts neither engine has seen, so the
prefix cache serves nothing. The paths are timed interleaved (session, server, server
non-streaming; --rounds times; the low-load requests alternate one by one) so that
drifting load from other processes hits both alike; throughput is the median over
rounds. Both engines stay loaded throughout but sleep when idle. A compilation cache
folder (JAXINFER_COMPILATION_CACHE_DIR for the server) is shared so the server's warm-up
reuses the session's programs.

Attribution, to read where the server's time goes: CPU seconds of this process and of the
server process per full-load run (/proc; on 2 cores the client's SSE parsing competes
with the server); the server's own TTFT per low-load request (its
`time_to_first_token_seconds` histogram: from the submission to the engine until the
first delta reached the HTTP handler's loop), so client TTFT - server-internal TTFT is
the HTTP request and response path; and the round trip of `GET /live` (--num_pings), the
floor of any HTTP request through httpx, uvicorn and the asyncio loop.

Throughput counts prompt + output tokens (and output tokens alone) per second of the
run's wall time. The JSON report (--result_json) holds the flags, per-round and
per-request figures, compile counts, CPU seconds, the load averages before and after,
and whether the goal was met.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_MODEL = flags.DEFINE_string("model", "tiny-code", "Model folder or bundled name (both paths).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter/activation dtype.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 32, "Requests of the full-load run.", lower_bound=1)
_INPUT_LEN = flags.DEFINE_integer("input_len", 64, "Prompt tokens (BOS included).", lower_bound=2)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 32, "Output tokens per request (ignore_eos).", lower_bound=2)
_NUM_LOW_LOAD = flags.DEFINE_integer("num_low_load", 16, "Sequential single requests per path (TTFT).",
                                     lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 7, "Timed full-load runs per path (interleaved).", lower_bound=1)
_MAX_WARMUP = flags.DEFINE_integer("max_warmup_passes", 6, "Untimed passes at most, until one compiles nothing.",
                                   lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "KV page size.", lower_bound=1)
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages (default: the engine's, sized from 1 GiB).",
                                  lower_bound=1)
_MAX_BATCHED_TOKENS = flags.DEFINE_integer("max_num_batched_tokens", 256, "Engine token budget per step.",
                                           lower_bound=1)
_MAX_SEQS = flags.DEFINE_integer("max_num_seqs", 16, "Engine running-sequence limit.", lower_bound=1)
_NUM_PINGS = flags.DEFINE_integer("num_pings", 50, "GET /live round trips timed (the HTTP floor).", lower_bound=1)
_NONSTREAMING = flags.DEFINE_bool("nonstreaming", True, "Also time the full-load run with stream=false.")
_PORT = flags.DEFINE_integer("port", 0, "Server HTTP port (0 = a free one).", lower_bound=0)
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", "",
                                         "Compilation cache shared by both paths (empty = a fresh temp folder).")
_SERVER_TIMEOUT = flags.DEFINE_float("server_start_timeout_s", 600.0, "Seconds the server may take to be ready.")
_REQUEST_TIMEOUT = flags.DEFINE_float("timeout_s", 600.0, "Per-request limit, seconds.")
_SERVER_LOG = flags.DEFINE_string("server_log", "", "Write the server's output here (default: a temp file).")
_JSON = flags.DEFINE_string("result_json", "runs/serving/server_overhead.json", "JSON report path (empty = none).")
_PLOT = flags.DEFINE_string("plot", None, "Draw session vs server throughput and TTFT here (PNG; needs matplotlib).")

FIRST_ID = 3  # prompt ids from FIRST_ID up: 0-2 are <unk>/<s>/</s> in Llama-style vocabularies
GOAL_THROUGHPUT_OVERHEAD = 0.05  # the server may cost at most 5% of the in-process throughput
GOAL_TTFT_MS = 5.0  # ... and add at most 5 ms to the low-load TTFT

# --------------------------------------------------------------------------- pure helpers


def make_prompts(seed: int, num: int, input_len: int, vocab_size: int, bos_id: int | None = 1) -> list[list[int]]:
    """num token-id prompts of exactly input_len ids: BOS (if any) + uniform ids in [FIRST_ID, vocab_size)."""
    import numpy as np
    if vocab_size <= FIRST_ID:
        raise ValueError(f"vocab_size: must be > {FIRST_ID}, got {vocab_size}")
    rng = np.random.default_rng(seed)
    head = [] if bos_id is None else [int(bos_id)]
    return [head + rng.integers(FIRST_ID, vocab_size, size=input_len - len(head)).tolist() for _ in range(num)]


def throughput(num_prompt_tokens: int, num_output_tokens: int, seconds: float) -> dict:
    return {"seconds": seconds, "prompt_tokens": num_prompt_tokens, "output_tokens": num_output_tokens,
            "total_tokens_per_s": (num_prompt_tokens + num_output_tokens) / seconds if seconds > 0 else 0.0,
            "output_tokens_per_s": num_output_tokens / seconds if seconds > 0 else 0.0}


def latency_stats(values_s: list) -> dict:
    """median / mean / min / max in ms (None when empty)."""
    import numpy as np
    if not values_s:
        return {"median_ms": None, "mean_ms": None, "min_ms": None, "max_ms": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    return {"median_ms": float(np.median(ms)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "max_ms": float(ms.max())}


def tpot(latency_s: float, ttft_s: float, num_tokens: int) -> float | None:
    """Seconds per output token after the first (None for one token)."""
    return (latency_s - ttft_s) / (num_tokens - 1) if num_tokens > 1 else None


def median(values: list) -> float:
    import numpy as np
    return float(np.median(values))


def compare(session_runs: list, server_runs: list, session_ttfts_s: list, server_ttfts_s: list,
            paired_ttft_diffs_s: list | None = None) -> dict:
    """The ratios and differences the goal is stated in.

    Throughputs are the medians over the runs (dicts of `throughput`); the ratio is
    server / session of those medians; overhead = 1 - ratio. TTFT differences are
    server - session of the medians and of the means, in ms; with `paired_ttft_diffs_s`
    (server - session TTFT of the same prompt, sent one after the other) also their
    median, which the TTFT goal then uses: it is the added time per request, less
    exposed to load drifting between requests than a difference of two medians.
    """
    out = {}
    for key in ("total_tokens_per_s", "output_tokens_per_s"):
        a = median([r[key] for r in session_runs])
        b = median([r[key] for r in server_runs])
        out[f"session_{key}"], out[f"server_{key}"] = a, b
        out[f"ratio_{key}"] = b / a if a > 0 else float("nan")
    out["throughput_overhead"] = 1.0 - out["ratio_total_tokens_per_s"]
    s, v = latency_stats(session_ttfts_s), latency_stats(server_ttfts_s)
    out["ttft_median_diff_ms"] = v["median_ms"] - s["median_ms"]
    out["ttft_mean_diff_ms"] = v["mean_ms"] - s["mean_ms"]
    out["goal_throughput_met"] = out["throughput_overhead"] < GOAL_THROUGHPUT_OVERHEAD
    out["ttft_paired_median_diff_ms"] = latency_stats(paired_ttft_diffs_s or [])["median_ms"]
    ttft_added = out["ttft_paired_median_diff_ms"]
    out["goal_ttft_met"] = (out["ttft_median_diff_ms"] if ttft_added is None else ttft_added) < GOAL_TTFT_MS
    return out


def without_compiles(runs: list, key: str) -> tuple[list, int]:
    """(the runs during which nothing was compiled, how many were left out); all of them if every run compiled."""
    clean = [r for r in runs if not r.get(key)]
    return (clean, len(runs) - len(clean)) if clean else (list(runs), 0)


def parse_proc_stat_cpu(stat: str, clock_ticks: int) -> float:
    """user + system CPU seconds from the text of /proc/PID/stat (fields 14 and 15)."""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / clock_ticks


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads) of this process (pid None) or of another one (Linux)."""
    if pid is None:
        import resource
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_proc_stat_cpu(f.read(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def parse_prometheus_value(text: str, name: str) -> float | None:
    """The value of the first sample of metric `name` (also as `name_total`) in Prometheus text."""
    pattern = re.compile(r"^" + re.escape(name) + r"(?:_total)?(?:\{[^}]*\})?\s+(\S+)\s*$", re.MULTILINE)
    m = pattern.search(text)
    return float(m.group(1)) if m else None


def server_command(python: str, port: int, model: str, dtype: str, page_size: int, num_pages: int | None,
                   max_num_batched_tokens: int, max_num_seqs: int) -> list[str]:
    """argv of `jaxinfer serve` (HTTP only) with the benchmark's engine flags."""
    cmd = [python, "-m", "jaxinfer.cli", "serve", f"--port={port}", "--grpc_port=-1", "--host=127.0.0.1",
           f"--model={model}", f"--dtype={dtype}", f"--page_size={page_size}",
           f"--max_num_batched_tokens={max_num_batched_tokens}", f"--max_num_seqs={max_num_seqs}"]
    if num_pages is not None:
        cmd.append(f"--num_pages={num_pages}")
    return cmd


def completion_payload(model: str, prompt_ids: list, output_len: int, stream: bool) -> dict:
    """A greedy /v1/completions body with token ids as the prompt (fields as benchmark_serving sends)."""
    payload = {"model": model, "prompt": list(prompt_ids), "max_tokens": output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    return payload


def _cell(value, width: int, spec: str) -> str:
    text = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
    return text.rjust(width)


def format_table(report: dict) -> str:
    """The summary table: full-load throughput and low-load latency, session vs server."""
    c = report["comparison"]
    full = report["full_load"]
    low = report["low_load"]
    w = 34
    lines = [f"{'':{w}s}{'session':>11s}{'server':>11s}{'server/session':>16s}"]

    def row(label, a, b, rel, spec=".1f", rel_spec=".3f"):
        lines.append(f"{label:{w}s}{_cell(a, 11, spec)}{_cell(b, 11, spec)}{_cell(rel, 16, rel_spec)}")

    row("full load: total tok/s", c["session_total_tokens_per_s"], c["server_total_tokens_per_s"],
        c["ratio_total_tokens_per_s"])
    row("full load: output tok/s", c["session_output_tokens_per_s"], c["server_output_tokens_per_s"],
        c["ratio_output_tokens_per_s"])
    plain = without_compiles(full.get("server_nonstreaming") or [], "server_compiles")[0]
    if plain:
        total = median([r["total_tokens_per_s"] for r in plain])
        row("  server stream=false: total tok/s", None, total, total / c["session_total_tokens_per_s"])
    s, v = low["session"], low["server"]
    lines.append(f"{'':{w}s}{'':>11s}{'':>11s}{'server-session':>16s}")
    row("low load: TTFT median (ms)", s["ttft"]["median_ms"], v["ttft"]["median_ms"], c["ttft_median_diff_ms"],
        ".2f", "+.2f")
    row("low load: TTFT mean (ms)", s["ttft"]["mean_ms"], v["ttft"]["mean_ms"], c["ttft_mean_diff_ms"], ".2f",
        "+.2f")
    if c.get("ttft_paired_median_diff_ms") is not None:
        row("  paired per-request diff, median", None, None, c["ttft_paired_median_diff_ms"], ".2f", "+.2f")
    if v.get("server_internal_ttft"):
        inner = v["server_internal_ttft"]["median_ms"]
        row("  server-internal TTFT median (ms)", None, inner,
            None if inner is None or s["ttft"]["median_ms"] is None else inner - s["ttft"]["median_ms"], ".2f",
            "+.2f")
    ping = low.get("http_round_trip")
    if ping:
        row("  GET /live round trip median (ms)", None, ping["median_ms"], None, ".2f")
    for key, label in (("tpot", "low load: TPOT median (ms)"), ("e2e", "low load: e2e median (ms)")):
        a, b = s[key]["median_ms"], v[key]["median_ms"]
        row(label, a, b, None if a is None or b is None else b - a, ".2f", "+.2f")
    cpu = report.get("cpu_seconds_per_full_load_run")
    if cpu:
        parts = []
        for key, label in (("session", "session"), ("server", "server stream"),
                           ("server_nonstreaming", "server stream=false")):
            if key in cpu:
                c_ = cpu[key]
                text = f"{label}: this process {_cell(c_['this_process'], 0, '.2f')}"
                if key != "session":
                    text += f" + server {_cell(c_['server_process'], 0, '.2f')}"
                parts.append(text + f" in {_cell(c_['wall'], 0, '.2f')} s wall")
        lines.append("CPU s per full-load run (median): " + "; ".join(parts))
    paired = c.get("ttft_paired_median_diff_ms")
    added, how = (c["ttft_median_diff_ms"], "difference of medians") if paired is None else (paired, "paired median")
    goal = (f"goal (server < {GOAL_THROUGHPUT_OVERHEAD:.0%} throughput overhead, < {GOAL_TTFT_MS:g} ms TTFT): "
            f"throughput overhead {c['throughput_overhead']:+.1%} -> "
            f"{'met' if c['goal_throughput_met'] else 'NOT met'}; TTFT {added:+.2f} ms ({how}) -> "
            f"{'met' if c['goal_ttft_met'] else 'NOT met'}")
    lines.append(goal)
    return "\n".join(lines)


def load_averages() -> list | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- session path


class SessionPath:
    def __init__(self, session, params):
        self.session = session
        self.params = params

    def compiles(self) -> int:
        return int(self.session.metrics()["num_compiles"])

    def compile_seconds(self) -> float:
        return float(self.session.metrics()["compile_seconds"])

    def full_load(self, prompts) -> dict:
        start = time.perf_counter()
        outs = self.session.generate(prompts, self.params)
        seconds = time.perf_counter() - start
        return throughput(sum(map(len, prompts)), sum(len(o.token_ids) for o in outs), seconds)

    def single(self, prompt) -> dict:
        start = time.perf_counter()
        stream = self.session.stream(prompt, self.params, output="deltas")
        first = first_text = None
        num = 0
        for delta in stream:
            now = time.perf_counter()
            if delta.token_ids:
                num += len(delta.token_ids)
                if first is None:
                    first = now - start
            if delta.text and first_text is None:
                first_text = now - start
        latency = time.perf_counter() - start
        return {"ttft_s": first, "ttft_text_s": first_text, "latency_s": latency, "output_tokens": num,
                "text": stream.output.text if stream.output is not None else None}


# --------------------------------------------------------------------------- server path


class ServerPath:
    def __init__(self, base_url: str, model: str, output_len: int, connections: int, timeout_s: float,
                 pid: int | None = None):
        import httpx
        self.model = model
        self.pid = pid
        self.output_len = output_len
        self.timeout_s = timeout_s
        # Idle connections are dropped after 2 s, before uvicorn closes them (5 s): reusing one the
        # server is just closing fails with "Server disconnected without sending a response".
        self.client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s),
                                        limits=httpx.Limits(max_connections=connections,
                                                            max_keepalive_connections=connections,
                                                            keepalive_expiry=2.0))

    async def get(self, path: str):
        """GET (untimed bookkeeping), retried once over a fresh connection on a transport error."""
        import httpx
        try:
            return await self.client.get(path)
        except httpx.TransportError:
            return await self.client.get(path)

    async def close(self):
        await self.client.aclose()

    async def _metric(self, name: str) -> float | None:
        resp = await self.get("/metrics")
        resp.raise_for_status()
        return parse_prometheus_value(resp.text, name)

    async def compiles(self) -> int | None:
        value = await self._metric("jaxinfer:num_compiles")
        return None if value is None else int(value)

    async def counters(self) -> dict:
        """Engine compiles, TTFT / e2e histogram sums and counts (Prometheus), and the process's CPU seconds."""
        resp = await self.get("/metrics")
        resp.raise_for_status()
        text = resp.text
        compiles = parse_prometheus_value(text, "jaxinfer:num_compiles")
        out = {"server_compiles": None if compiles is None else int(compiles),
               "server_compile_s": parse_prometheus_value(text, "jaxinfer:compile_seconds"),
               "server_process_cpu_s": process_cpu_seconds(self.pid) if self.pid else None}
        for key, name in (("ttft", "jaxinfer:time_to_first_token_seconds"),
                          ("e2e", "jaxinfer:e2e_request_latency_seconds")):
            out[f"{key}_sum"] = parse_prometheus_value(text, name + "_sum")
            out[f"{key}_count"] = parse_prometheus_value(text, name + "_count")
        return out

    async def stream_one(self, prompt) -> dict:
        """One streamed completion: TTFT (first chunk with text), latency, tokens (usage), text."""
        start = time.perf_counter()
        first = None
        pieces = []
        usage = {}
        done = False
        payload = completion_payload(self.model, prompt, self.output_len, stream=True)
        async with self.client.stream("POST", "/v1/completions", json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {body[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RuntimeError(f"stream error: {chunk['error']}")
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        if first is None:
                            first = time.perf_counter() - start
                        pieces.append(choice["text"])
                usage = chunk.get("usage") or usage
        latency = time.perf_counter() - start
        if not done:
            raise RuntimeError("stream ended before 'data: [DONE]'")
        return {"ttft_s": latency if first is None else first, "latency_s": latency,
                "output_tokens": int(usage.get("completion_tokens", 0)), "text": "".join(pieces)}

    async def ping(self) -> float:
        """Seconds of one GET /live round trip (the floor of any request: httpx, HTTP, uvicorn, the loop)."""
        start = time.perf_counter()
        resp = await self.client.get("/live")
        seconds = time.perf_counter() - start
        resp.raise_for_status()
        return seconds

    async def plain_one(self, prompt) -> int:
        resp = await self.client.post("/v1/completions",
                                      json=completion_payload(self.model, prompt, self.output_len, stream=False))
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return int(resp.json()["usage"]["completion_tokens"])

    async def full_load(self, prompts, stream: bool = True) -> dict:
        start = time.perf_counter()
        if stream:
            results = await asyncio.gather(*(self.stream_one(p) for p in prompts))
            num_out = sum(r["output_tokens"] for r in results)
        else:
            num_out = sum(await asyncio.gather(*(self.plain_one(p) for p in prompts)))
        seconds = time.perf_counter() - start
        return throughput(sum(map(len, prompts)), num_out, seconds)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache_dir: str, log_path: str):
    """Starts `jaxinfer serve` and waits until /health answers 200; returns (process, base_url, seconds)."""
    import httpx
    port = _PORT.value or _free_port()
    cmd = server_command(sys.executable, port, _MODEL.value, _DTYPE.value, _PAGE_SIZE.value, _NUM_PAGES.value,
                         _MAX_BATCHED_TOKENS.value, _MAX_SEQS.value)
    env = {**os.environ, "JAXINFER_COMPILATION_CACHE_DIR": cache_dir}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log = open(log_path, "w")
    print("server:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + _SERVER_TIMEOUT.value
    while True:
        if proc.poll() is not None:
            with open(log_path) as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode} while starting:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return proc, url, time.perf_counter() - start
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(f"the server was not ready within {_SERVER_TIMEOUT.value} s (log: {log_path})")
        time.sleep(0.25)


def stop_server(proc) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


# --------------------------------------------------------------------------- the benchmark


def _delta(after: dict, before: dict) -> dict:
    return {k: (None if after.get(k) is None or before.get(k) is None else after[k] - before[k]) for k in after}


async def run_benchmark(session_path: SessionPath, server: ServerPath, vocab: int, bos) -> dict:
    n, in_len = _NUM_PROMPTS.value, _INPUT_LEN.value
    seed = _SEED.value
    # Seeds: warm-up passes 1000+, timed rounds 0.., low load 500..; no prompt is run twice on one engine.

    def prompts(s, num=n):
        return make_prompts(seed * 100_003 + s, num, in_len, vocab, bos)

    async def snapshot() -> dict:
        """Counters read between (never during) timed runs: compiles and CPU seconds of both processes."""
        return {"session_compiles": session_path.compiles(), "session_compile_s": session_path.compile_seconds(),
                "client_process_cpu_s": process_cpu_seconds(), **await server.counters()}

    async def timed(run) -> dict:
        before = await snapshot()
        result = run()
        if inspect.isawaitable(result):
            result = await result
        return {**result, **_delta(await snapshot(), before)}

    warmup = {"session": [], "server": []}
    for k in range(_MAX_WARMUP.value):
        before = session_path.compiles()
        session_path.full_load(prompts(1000 + k))
        for p in prompts(2000 + k, 2):
            session_path.single(p)
        added = session_path.compiles() - before
        warmup["session"].append(added)
        print(f"warm-up session pass {k + 1}: {added} compiles", flush=True)
        if added == 0:
            break
    for k in range(_MAX_WARMUP.value):
        before = await server.compiles()
        await server.full_load(prompts(1000 + k))
        if _NONSTREAMING.value:
            await server.full_load(prompts(3000 + k), stream=False)
        for p in prompts(2000 + k, 2):
            await server.stream_one(p)
        after = await server.compiles()
        added = None if before is None or after is None else after - before
        warmup["server"].append(added)
        print(f"warm-up server pass {k + 1}: {added} compiles", flush=True)
        if added == 0:
            break

    start = await snapshot()
    full = {"session": [], "server": [], "server_nonstreaming": []}
    for r in range(_ROUNDS.value):
        ps = prompts(r)
        full["session"].append(await timed(lambda: session_path.full_load(ps)))
        full["server"].append(await timed(lambda: server.full_load(ps)))
        if _NONSTREAMING.value:
            other = prompts(100 + r)
            full["server_nonstreaming"].append(await timed(lambda: server.full_load(other, stream=False)))
        runs = {k: v[-1] for k, v in full.items() if v}
        print(f"round {r + 1}: " + ", ".join(
            f"{k} {v['total_tokens_per_s']:.1f} tok/s "
            f"({v['session_compiles' if k == 'session' else 'server_compiles']} compiles)"
            for k, v in runs.items()) + f"; load {load_averages()}", flush=True)
    if not _NONSTREAMING.value:
        del full["server_nonstreaming"]

    low = {"session": [], "server": []}
    for i, p in enumerate(prompts(500, _NUM_LOW_LOAD.value)):
        # Alternate which path goes first, so neither always follows the other.
        order = ("session", "server") if i % 2 == 0 else ("server", "session")
        for path in order:
            if path == "session":
                low[path].append(await timed(lambda: session_path.single(p)))
            else:
                low[path].append(await timed(lambda: server.stream_one(p)))
    totals = _delta(await snapshot(), start)
    pings = [await server.ping() for _ in range(_NUM_PINGS.value)]

    expected = n * _OUTPUT_LEN.value
    for path, runs in full.items():
        for run in runs:
            if run["output_tokens"] != expected:
                print(f"WARNING: {path} produced {run['output_tokens']} output tokens, expected {expected}")
    same_text = sum(a["text"] == b["text"] for a, b in zip(low["session"], low["server"]))
    late_text = sum(1 for r in low["session"] if r["ttft_text_s"] is not None and r["ttft_text_s"] > r["ttft_s"])
    clean_full = {k: without_compiles(v, "session_compiles" if k == "session" else "server_compiles")
                  for k, v in full.items()}
    clean_low = {k: without_compiles(v, "session_compiles" if k == "session" else "server_compiles")
                 for k, v in low.items()}
    paired = [b["ttft_s"] - a["ttft_s"] for a, b in zip(low["session"], low["server"])
              if not a.get("session_compiles") and not b.get("server_compiles")]

    def low_summary(records, excluded):
        tpots = [tpot(r["latency_s"], r["ttft_s"], r["output_tokens"]) for r in records]
        out = {"ttft": latency_stats([r["ttft_s"] for r in records]),
               "tpot": latency_stats([t for t in tpots if t is not None]),
               "e2e": latency_stats([r["latency_s"] for r in records]), "excluded_for_compiles": excluded}
        if records and "ttft_count" in records[0]:
            # The server's own view (its Prometheus histograms, one request per record): from the
            # request's submission to the engine until the first delta reached the HTTP handler's loop.
            out["server_internal_ttft"] = latency_stats(
                [r["ttft_sum"] for r in records if r.get("ttft_count") == 1])
            out["server_internal_e2e"] = latency_stats([r["e2e_sum"] for r in records if r.get("e2e_count") == 1])
        return out

    def strip(records):
        return [{k: v for k, v in r.items() if k != "text"} for r in records]

    return {"warmup_compiles_per_pass": warmup,
            "compiles_in_timed_part": {"session": totals["session_compiles"], "server": totals["server_compiles"]},
            "compile_seconds_in_timed_part": {"session": totals["session_compile_s"],
                                              "server": totals["server_compile_s"]},
            "full_load": full,
            "full_load_excluded_for_compiles": {k: v[1] for k, v in clean_full.items()},
            "cpu_seconds_per_full_load_run": {
                k: {"this_process": median([r["client_process_cpu_s"] for r in v[0]]),
                    "server_process": None if v[0][0].get("server_process_cpu_s") is None
                    else median([r["server_process_cpu_s"] for r in v[0]]),
                    "wall": median([r["seconds"] for r in v[0]])} for k, v in clean_full.items()},
            "low_load": {"session": low_summary(clean_low["session"][0], clean_low["session"][1]),
                         "server": low_summary(clean_low["server"][0], clean_low["server"][1]),
                         "requests": {"session": strip(low["session"]), "server": strip(low["server"])},
                         "http_round_trip": latency_stats(pings), "identical_text": same_text,
                         "num_requests": len(low["session"]),
                         "session_first_text_later_than_first_token": late_text},
            "comparison": compare(clean_full["session"][0], clean_full["server"][0],
                                  [r["ttft_s"] for r in clean_low["session"][0]],
                                  [r["ttft_s"] for r in clean_low["server"][0]], paired)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import bench_common
    from jaxinfer import EngineConfig, InferenceSession
    for name in ("httpx", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)

    load_start = load_averages()
    temp = tempfile.mkdtemp(prefix="jaxinfer-overhead-")
    cache_dir = _COMPILATION_CACHE.value or os.path.join(temp, "xla")
    log_path = _SERVER_LOG.value or os.path.join(temp, "server.log")
    config = EngineConfig(page_size=_PAGE_SIZE.value, num_pages=_NUM_PAGES.value,
                          max_num_batched_tokens=_MAX_BATCHED_TOKENS.value, max_num_seqs=_MAX_SEQS.value,
                          compilation_cache_dir=cache_dir)
    session = InferenceSession.from_pretrained(_MODEL.value, dtype=_DTYPE.value, engine=config)
    if _INPUT_LEN.value + _OUTPUT_LEN.value > session.max_model_len:
        raise app.UsageError(f"--input_len + --output_len must be at most {session.max_model_len}")
    vocab = session.model_config.vocab_size
    if session.tokenizer is not None:
        vocab = min(vocab, session.tokenizer.vocab_size)
    bos = session.tokenizer.bos_token_id if session.tokenizer is not None else 1
    params = session.default_sampling_params(max_tokens=_OUTPUT_LEN.value, temperature=0.0, ignore_eos=True)
    session_path = SessionPath(session, params)

    proc = None
    try:
        proc, url, startup_s = start_server(cache_dir, log_path)
        print(f"server ready at {url} in {startup_s:.1f} s (log: {log_path})", flush=True)

        async def go():
            server = ServerPath(url, None, _OUTPUT_LEN.value, max(_NUM_PROMPTS.value, 1), _REQUEST_TIMEOUT.value,
                                proc.pid)
            try:
                models = (await server.get("/v1/models")).json()["data"]
                server.model = models[0]["id"]
                return await run_benchmark(session_path, server, vocab, bos)
            finally:
                await server.close()

        results = asyncio.run(go())
    finally:
        if proc is not None:
            code = stop_server(proc)
            print(f"server stopped (exit {code})")
        session.close()
        if not _COMPILATION_CACHE.value and not _SERVER_LOG.value:
            shutil.rmtree(temp, ignore_errors=True)

    report = {"env": bench_common.environment(), "model": _MODEL.value,
              "workload": {"num_prompts": _NUM_PROMPTS.value, "input_len": _INPUT_LEN.value,
                           "output_len": _OUTPUT_LEN.value, "num_low_load": _NUM_LOW_LOAD.value,
                           "rounds": _ROUNDS.value, "seed": _SEED.value, "sampling": repr(params)},
              "engine_config": {"dtype": _DTYPE.value, "page_size": _PAGE_SIZE.value, "num_pages": _NUM_PAGES.value,
                                "max_num_batched_tokens": _MAX_BATCHED_TOKENS.value,
                                "max_num_seqs": _MAX_SEQS.value},
              "server_startup_s": startup_s, "load_average_start": load_start, "load_average_end": load_averages(),
              **results}
    bench_common.write_json(_JSON.value, report)
    low = report["low_load"]
    low_excluded = {k: low[k]["excluded_for_compiles"] for k in ("session", "server")}
    print()
    print(f"{_MODEL.value}: {_NUM_PROMPTS.value} prompts x ({_INPUT_LEN.value} in + {_OUTPUT_LEN.value} out) "
          f"tokens at once, median of {_ROUNDS.value} rounds; {_NUM_LOW_LOAD.value} single requests one at a time; "
          f"runs / requests left out because they compiled: {results['full_load_excluded_for_compiles']} / "
          f"session {low_excluded['session']}, server {low_excluded['server']}")
    print(format_table(report))
    compiles, compile_s = results["compiles_in_timed_part"], results["compile_seconds_in_timed_part"]
    print(f"compiles in the timed part: session {compiles['session']} ({_cell(compile_s['session'], 0, '.2f')} s), "
          f"server {compiles['server']} ({_cell(compile_s['server'], 0, '.2f')} s); warm-up compiles per pass "
          f"{results['warmup_compiles_per_pass']}; identical low-load texts {low['identical_text']}/"
          f"{low['num_requests']}; load averages {load_start} -> {report['load_average_end']} "
          f"on {os.cpu_count()} CPUs")
    if compiles["session"] or compiles["server"]:
        print("WARNING: programs were compiled during the timed part (new step shapes); the runs and requests "
              "that compiled are left out of the figures above")
    if _PLOT.value:
        import plotting
        plotting.plot_server_overhead(report, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
