"""The reliability figures: fuzz counts, overload refusals, soak memory, as a Markdown table.

    python scripts/reliability_report.py [--soak_minutes 30] [--overload_rounds 20] [--server process] \\
        [--run_slow_tests] [--tests tests/serving/test_fuzz_http.py,...] \\
        [--fuzz_json runs/reliability/fuzz.json] [--output runs/reliability/report.md]

What it runs (each part can be skipped; a part that did not run shows "not run", never
a number):
1. fuzz and isolation counts: `pytest -m slow` over --tests with JAXINFER_FUZZ_REPORT set
   (--run_slow_tests; the default run's tests write the same file), then reads that JSON:
   {property: {"examples": n, "failures": m}} from the servers' fuzz tests
   (tests/serving/test_fuzz_*.py), {"tried", "failed_invocations"} from tests/fuzz,
   {"trials", "mismatches"} from the batch-invariance trials; a property with trials, or
   whose name holds "trial" or "invariance", counts as trials and mismatches.
2. overload: a server (--server process: `jaxinfer serve` as a subprocess, its counters
   read from /metrics, its memory from /proc; inprocess: ServerHandle in this process),
   HTTP + gRPC on free 127.0.0.1 ports, with room for max_num_seqs + max_queued_requests
   requests; each round sends 5x that many concurrent requests on each wire (after
   untimed rounds until one compiles nothing, at most 5); refused ones must be 429 /
   RESOURCE_EXHAUSTED, accepted ones must all complete with every token. Reports the
   p50 / p99 / max client-side latency of the refusals (from the request's write to the
   response's status line, on a minimal HTTP/1.1 client; the goal: p99 under 50 ms),
   lost requests (neither refused nor completed) and pages in use once idle.
3. soak (--soak_minutes, 0 = skip): steady mixed load (plain and streamed completions,
   n = 2, clients that leave mid-stream, gRPC Generate) against the same server; the
   warm-up lasts at least 20% of the time and until nothing compiled for 5% of it (at
   least 30 s; at most half the time); then the server's resident memory (VmRSS) is sampled every few
   seconds, its growth reported as a least-squares slope in MB per hour; XLA compiles
   after warm-up; pages in use at the end.

The table goes to stdout and to --output; the raw figures to --result_json.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Optional

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = ("tests/serving/test_fuzz_http.py", "tests/serving/test_fuzz_grpc.py",
                 "tests/serving/test_reliability_server.py", "tests/fuzz", "tests/reliability",
                 "tests/engine/test_batch_invariance_trials.py")

_MODEL = flags.DEFINE_string("model", "tiny-code", "Model folder or bundled name.")
_RUN_SLOW_TESTS = flags.DEFINE_bool("run_slow_tests", False, "Run `pytest -m slow` over --tests for the fuzz counts.")
_TESTS = flags.DEFINE_list("tests", list(DEFAULT_TESTS), "Test files / folders for --run_slow_tests (missing "
                           "ones are skipped).")
_FUZZ_JSON = flags.DEFINE_string("fuzz_json", "runs/reliability/fuzz.json", "The JAXINFER_FUZZ_REPORT file "
                                 "(read; written by --run_slow_tests, which empties it first).")
_OVERLOAD_ROUNDS = flags.DEFINE_integer("overload_rounds", 20, "Overload rounds per wire; 0 = skip.")
_MAX_NUM_SEQS = flags.DEFINE_integer("max_num_seqs", 4, "Running slots of the measured server.")
_MAX_QUEUED = flags.DEFINE_integer("max_queued_requests", 4, "Queued slots of the measured server.")
_SERVER = flags.DEFINE_enum("server", "process", ["process", "inprocess"], "Measure a `jaxinfer serve` "
                            "subprocess (its own GIL: what a client sees) or a server in this process.")
_SERVE_WARMUP = flags.DEFINE_enum("serve_warmup", "profile", ["profile", "grid", "none"],
                                  "--server process: the server's --warmup (profile: the programs earlier servers "
                                  "with this model and flags compiled, from the persistent compilation cache).")
_SOAK_MINUTES = flags.DEFINE_float("soak_minutes", 30.0, "Soak duration; 0 = skip.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the Markdown table here too.")
_RESULT_JSON = flags.DEFINE_string("result_json", None, "Write the raw figures here.")

PROMPT = "def fib"  # 4 tokens with BOS: with max_tokens <= 12 one KV page (the warm-up's programs)


# ---------------------------------------------------------------------- servers


def rss_mb(pid: int) -> float:
    """The resident memory (VmRSS) of process `pid` in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


class InProcessTarget:
    """A warmed-up ServerHandle (HTTP + gRPC on free 127.0.0.1 ports) over `session`, in this process."""

    def __init__(self, session, **serving_fields):
        from jaxinfer.serving.core import ServingConfig, ServingEngine
        from jaxinfer.serving.metrics import ServingMetrics
        from jaxinfer.serving.server import Listen, ServerHandle
        config = ServingConfig(**serving_fields)
        self.session = session
        self.engine = ServingEngine(session, config,
                                    metrics=ServingMetrics(config.model_name, session.async_engine.metrics))
        self.handle = ServerHandle(self.engine, Listen(host="127.0.0.1", port=0, grpc_port=0)).start()
        self.http_url, self.grpc_target, self.capacity = self.handle.http_url, self.handle.grpc_target, \
            self.engine.capacity

    def idle(self) -> bool:
        m = self.session.metrics()
        return self.engine.num_in_flight == 0 and m["num_running"] == 0 and m["num_waiting"] == 0 \
            and m["num_free_pages"] == m["num_total_pages"]

    def pages_in_use(self) -> int:
        m = self.session.metrics()
        return m["num_total_pages"] - m["num_free_pages"]

    def rejected(self) -> float:
        return self.engine.metrics.registry.get_sample_value(
            "jaxinfer:request_rejected_total", {"model_name": self.engine.config.model_name,
                                                "reason": "overloaded"}) or 0.0

    def compiles(self) -> int:
        return self.session.metrics()["num_compiles"]

    def rss_mb(self) -> float:
        return rss_mb(os.getpid())

    def stop(self) -> None:
        self.handle.stop()


class ProcessTarget:
    """`jaxinfer serve` as a subprocess on free 127.0.0.1 ports (the figures a client sees:
    the server has its own process and GIL); its counters are read from /metrics."""

    def __init__(self, model: str, *, max_num_seqs: int, max_queued_requests: int, num_pages: int = 256,
                 ready_timeout: float = 600.0, warmup: str = "profile"):
        import socket
        ports = []
        for _ in range(2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                ports.append(sock.getsockname()[1])
        self.num_pages = num_pages
        self.capacity = max_num_seqs + max_queued_requests
        self.http_url, self.grpc_target = f"http://127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"
        cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(ports[0]), "--grpc_port", str(ports[1]), "--max_num_seqs", str(max_num_seqs),
               "--max_queued_requests", str(max_queued_requests), "--num_pages", str(num_pages),
               "--max_num_batched_tokens", "128", "--warmup", warmup]
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=ROOT))
        deadline = time.monotonic() + ready_timeout
        for line in self.proc.stdout:  # the ready line
            if "ready" in line:
                break
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError("jaxinfer serve did not become ready")

    def _metrics(self) -> dict:
        import httpx
        out = {}
        for line in httpx.get(self.http_url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("jaxinfer:"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def _value(self, prefix: str, metrics: Optional[dict] = None) -> float:
        metrics = metrics if metrics is not None else self._metrics()
        return sum(v for k, v in metrics.items() if k.split("{")[0] == prefix and
                   ("reason=" not in k or 'reason="overloaded"' in k))

    def idle(self) -> bool:
        m = self._metrics()
        return self._value("jaxinfer:num_requests_running", m) == 0 and \
            self._value("jaxinfer:num_requests_waiting", m) == 0 and self._value("jaxinfer:kv_cache_usage_perc", m) == 0

    def pages_in_use(self) -> int:
        return round(self._value("jaxinfer:kv_cache_usage_perc") * self.num_pages)

    def rejected(self) -> float:
        return self._value("jaxinfer:request_rejected_total")

    def compiles(self) -> int:
        return int(self._value("jaxinfer:num_compiles_total"))

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def wait_idle(target, timeout: float = 120.0) -> bool:
    """Bounded wait until nothing is in flight or tracked and no page is in use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.idle():
            return True
        time.sleep(0.05)
    return False


def percentile(values: list, q: float) -> Optional[float]:
    """The q-th percentile (nearest rank) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


# ---------------------------------------------------------------------- overload


async def _http_post(host: str, port: int, payload: bytes, opened: asyncio.Event) -> tuple:
    """One POST /v1/completions on its own connection (a minimal HTTP/1.1 client: httpx's
    async client costs more CPU per request than the server's refusal, and would be what
    is measured). Returns (status, seconds from the request's write to its status line, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await opened.wait()  # every client connected: the requests leave together
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        t0 = time.perf_counter()
        writer.write(head + payload)
        await writer.drain()
        status_line = await reader.readline()
        seconds = time.perf_counter() - t0
        length = None
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        body = await (reader.readexactly(length) if length is not None else reader.read())
        return int(status_line.split()[1]), seconds, body
    finally:
        writer.close()


async def _http_round(base: str, clients: int, max_tokens: int) -> list:
    host, port = base.rsplit("//", 1)[1].rsplit(":", 1)
    payload = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                          "ignore_eos": True}).encode()
    opened = asyncio.Event()

    async def one():
        try:
            status, seconds, body = await asyncio.wait_for(_http_post(host, int(port), payload, opened), 300)
        except Exception as e:  # noqa: BLE001 - counted as lost
            return ("error", 0.0, repr(e))
        if status == 200:
            done = json.loads(body)["usage"]["completion_tokens"] == max_tokens
            return ("completed" if done else "short", seconds, None)
        if status == 429 and json.loads(body)["error"]["type"] == "RateLimitError":
            return ("refused", seconds, None)
        return ("error", seconds, f"{status} {body[:200]!r}")

    tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
    await asyncio.sleep(0.2)  # let every connection open
    opened.set()
    return await asyncio.gather(*tasks)


async def _grpc_round(target: str, clients: int, max_tokens: int) -> list:
    import grpc

    from jaxinfer.serving.protos import jaxinfer_pb2 as pb
    from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.GenerationStub(channel)
        request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def one():
            t0 = time.perf_counter()
            tokens = 0
            try:
                async for response in stub.Generate(request, timeout=300):
                    if response.HasField("summary"):
                        tokens = response.summary.usage.completion_tokens
            except grpc.aio.AioRpcError as e:
                seconds = time.perf_counter() - t0
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    return ("refused", seconds, None)
                return ("error", seconds, f"{e.code()} {e.details()}")
            return ("completed" if tokens == max_tokens else "short", time.perf_counter() - t0, None)

        return await asyncio.gather(*(one() for _ in range(clients)))


def measure_overload(target, *, rounds: int, factor: int = 5, max_tokens: int = 12,
                     max_warm_rounds: int = 5) -> dict:
    """`rounds` rounds per wire of factor x capacity concurrent requests; see the module doc."""
    capacity = target.capacity
    clients = factor * capacity
    results = {"http": [], "grpc": []}
    # Untimed rounds per wire first, until one compiles nothing (at most max_warm_rounds):
    # they compile the batch shapes a full server reaches (arrivals differ per round).
    for warm_rounds in range(1, max_warm_rounds + 1):
        compiles = target.compiles()
        asyncio.run(_http_round(target.http_url, clients, max_tokens))
        asyncio.run(_grpc_round(target.grpc_target, clients, max_tokens))
        wait_idle(target)
        if target.compiles() == compiles:
            break
    rejected_before, compiles_before = target.rejected(), target.compiles()
    for _ in range(rounds):
        results["http"] += asyncio.run(_http_round(target.http_url, clients, max_tokens))
        results["grpc"] += asyncio.run(_grpc_round(target.grpc_target, clients, max_tokens))
    idle = wait_idle(target)
    leaked = target.pages_in_use()
    rejected_metric = target.rejected() - rejected_before
    # A batch shape first met during the timed rounds compiles while clients wait: its
    # Python tracing holds the GIL, and the refusals queue behind it.
    out = {"capacity": capacity, "clients": clients, "rounds": rounds, "warm_rounds": warm_rounds,
           "max_tokens": max_tokens, "idle": idle,
           "pages_leaked": leaked, "rejected_metric": rejected_metric,
           "compiles_during_rounds": target.compiles() - compiles_before}
    for wire, rows in results.items():
        refused = [s for kind, s, _ in rows if kind == "refused"]
        out[wire] = {
            "requests": len(rows),
            "completed": sum(kind == "completed" for kind, _, _ in rows),
            "refused": len(refused),
            "lost": sum(kind in ("error", "short") for kind, _, _ in rows),
            "errors": [e for kind, _, e in rows if kind == "error"][:5],
            "refusal_ms_p50": None if not refused else 1000 * statistics.median(refused),
            "refusal_ms_p99": None if not refused else 1000 * percentile(refused, 99),
            "refusal_ms_max": None if not refused else 1000 * max(refused),
        }
    every = [s for rows in results.values() for kind, s, _ in rows if kind == "refused"]
    out["refusal_ms_p99"] = None if not every else 1000 * percentile(every, 99)
    out["lost"] = out["http"]["lost"] + out["grpc"]["lost"]
    return out


# ---------------------------------------------------------------------- soak


def _soak_client(target, stop: threading.Event, seed: int, counts: dict, lock: threading.Lock) -> None:
    import grpc
    import httpx

    from jaxinfer.serving.protos import jaxinfer_pb2 as pb
    from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
    rng = random.Random(seed)
    channel = grpc.insecure_channel(target.grpc_target)
    stub = pb_grpc.GenerationStub(channel)
    with httpx.Client(base_url=target.http_url, timeout=300) as client:
        while not stop.is_set():
            kind = rng.choice(["plain", "stream", "n2", "leave", "grpc"])
            max_tokens = rng.randint(2, 12)
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.8]),
                    "seed": rng.randrange(1 << 30), "ignore_eos": True}
            ok = True
            try:
                if kind == "plain":
                    ok = client.post("/v1/completions", json=body).status_code in (200, 429)
                elif kind == "n2":
                    ok = client.post("/v1/completions", json={**body, "n": 2}).status_code in (200, 429)
                elif kind in ("stream", "leave"):
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        ok = r.status_code in (200, 429)
                        for line in r.iter_lines():
                            if kind == "leave" and line.startswith("data: {"):
                                break  # the client goes away mid-stream
                else:
                    request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=max_tokens, temperature=0.0)
                    list(stub.Generate(request, timeout=300))
            except grpc.RpcError as e:
                ok = e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            except Exception:  # noqa: BLE001 - counted
                ok = False
            with lock:
                counts["requests"] += 1
                counts["errors"] += not ok
    channel.close()


def run_soak(target, *, minutes: float, clients: int = 4, sample_s: float = 5.0,
             warmup_fraction: float = 0.2, quiet_s: Optional[float] = None) -> dict:
    """Steady mixed load for `minutes`; memory slope after warm-up, compiles, pages leaked.

    quiet_s: the warm-up ends once nothing compiled for this long (default: 5% of the
    run, at least 30 s: rare batch shapes of the mixed load keep turning up for minutes).
    """
    stop = threading.Event()
    counts, lock = {"requests": 0, "errors": 0}, threading.Lock()
    threads = [threading.Thread(target=_soak_client, args=(target, stop, i, counts, lock), daemon=True)
               for i in range(clients)]
    start = time.monotonic()
    duration = minutes * 60.0
    quiet_s = max(30.0, 0.05 * duration) if quiet_s is None else quiet_s
    # Warm-up: at least warmup_fraction of the time, and until nothing compiled for
    # `quiet_s` (the mixed load meets new batch shapes for a while), at most half the time.
    earliest, latest = start + warmup_fraction * duration, start + 0.5 * duration
    samples, compiles_at_warm, warm_at = [], None, None
    last_compiles, last_change = target.compiles(), start
    try:
        for t in threads:
            t.start()
        while time.monotonic() - start < duration:
            time.sleep(min(sample_s, max(0.0, duration - (time.monotonic() - start))))
            now = time.monotonic()
            if warm_at is None:
                compiles = target.compiles()
                if compiles != last_compiles:
                    last_compiles, last_change = compiles, now
                if (now >= earliest and now - last_change >= quiet_s) or now >= latest:
                    warm_at, compiles_at_warm = now - start, compiles
            if warm_at is not None:
                samples.append((now - start, target.rss_mb()))
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    idle = wait_idle(target)
    leaked = target.pages_in_use()
    compiles_end = target.compiles()
    slope = None
    if len(samples) >= 3:
        xs, ys = [s[0] for s in samples], [s[1] for s in samples]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = 3600.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None
    return {"minutes": minutes, "warmup_s": warm_at, "clients": clients, "requests": counts["requests"],
            "errors": counts["errors"],
            "rss_mb_first": samples[0][1] if samples else None, "rss_mb_last": samples[-1][1] if samples else None,
            "mb_per_hour": slope, "num_samples": len(samples), "compiles_after_warmup":
            None if compiles_at_warm is None else compiles_end - compiles_at_warm, "idle": idle, "pages_leaked": leaked}


# ---------------------------------------------------------------------- fuzz counts and the table


def run_slow_tests(tests: list, fuzz_json: str) -> int:
    """`pytest -m slow` over the existing `tests` with JAXINFER_FUZZ_REPORT=fuzz_json; its exit status."""
    present = [t for t in tests if os.path.exists(os.path.join(ROOT, t))]
    if not present:
        return -1
    os.makedirs(os.path.dirname(os.path.abspath(fuzz_json)), exist_ok=True)
    if os.path.exists(fuzz_json):
        os.remove(fuzz_json)
    env = dict(os.environ, JAXINFER_FUZZ_REPORT=os.path.abspath(fuzz_json), JAX_PLATFORMS=os.environ.get(
        "JAX_PLATFORMS", "cpu"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-m", "slow", *present]
    return subprocess.call(cmd, cwd=ROOT, env=env)


def read_fuzz(path: Optional[str]) -> Optional[dict]:
    """The fuzz JSON as {name: {"examples", "failures", "trials": bool}}, or None when there is none.

    Three spellings are read, as the writers use them: {"examples", "failures"} (the
    servers' fuzz tests), {"tried", "failed_invocations"} (tests/fuzz) and {"trials",
    "mismatches"} (isolation trials). A name holding "trial" or "invariance" is a trial row.
    """
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            continue
        for count, bad in (("examples", "failures"), ("tried", "failed_invocations"), ("trials", "mismatches")):
            if count in entry:
                out[name] = {"examples": int(entry[count]), "failures": int(entry.get(bad, 0)),
                             "trials": count == "trials" or "trial" in name or "invariance" in name}
                break
    return out


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "not run"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def build_table(fuzz: Optional[dict], overload: Optional[dict], soak: Optional[dict]) -> str:
    """The Markdown report: a summary table, then one row per fuzz property."""
    def is_trial(name):
        return fuzz[name].get("trials", "trial" in name or "invariance" in name)

    cases = failures = trials = mismatches = None
    if fuzz is not None:
        cases = sum(int(v["examples"]) for k, v in fuzz.items() if not is_trial(k))
        failures = sum(int(v.get("failures", 0)) for k, v in fuzz.items() if not is_trial(k))
        trial_rows = [v for k, v in fuzz.items() if is_trial(k)]
        if trial_rows:
            trials = sum(int(v["examples"]) for v in trial_rows)
            mismatches = sum(int(v.get("failures", 0)) for v in trial_rows)
    leaked = None
    parts = [x["pages_leaked"] for x in (overload, soak) if x is not None]
    if parts:
        leaked = sum(parts)
    rows = [
        ("Fuzz cases tried", _fmt(cases)),
        ("Fuzz failures", _fmt(failures)),
        ("Isolation trials", _fmt(trials)),
        ("Isolation mismatches", _fmt(mismatches)),
        ("p99 rejection latency (overload, 5x capacity)",
         _fmt(None if overload is None else overload["refusal_ms_p99"], " ms")),
        ("Requests lost under overload", _fmt(None if overload is None else overload["lost"])),
        ("Pages leaked (idle after overload / soak)", _fmt(leaked)),
        ("Memory growth after warm-up", _fmt(None if soak is None else soak["mb_per_hour"], " MB/hour", 2)),
        ("Compiles after warm-up (soak)", _fmt(None if soak is None else soak["compiles_after_warmup"])),
    ]
    lines = ["| Figure | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    if overload is not None:
        lines += ["", f"Overload: capacity {overload['capacity']}, {overload['clients']} concurrent clients, "
                  f"{overload['rounds']} round(s) per wire, {overload.get('compiles_during_rounds', '?')} compile(s) during "
                  f"the timed rounds.", "",
                  "| Wire | Requests | Completed | Refused | Lost | Refusal p50 | Refusal p99 | Refusal max |",
                  "|---|---|---|---|---|---|---|---|"]
        for wire in ("http", "grpc"):
            w = overload[wire]
            lines.append(f"| {wire} | {w['requests']} | {w['completed']} | {w['refused']} | {w['lost']} | "
                         f"{_fmt(w['refusal_ms_p50'], ' ms')} | {_fmt(w['refusal_ms_p99'], ' ms')} | "
                         f"{_fmt(w['refusal_ms_max'], ' ms')} |")
    if soak is not None:
        lines += ["", f"Soak: {soak['minutes']:g} min, {soak['clients']} clients, {soak['requests']} requests "
                  f"({soak['errors']} errors), warm-up {_fmt(soak.get('warmup_s'), ' s', 0)}, server RSS "
                  f"{_fmt(soak['rss_mb_first'], ' MB')} -> "
                  f"{_fmt(soak['rss_mb_last'], ' MB')} over {soak['num_samples']} samples after warm-up."]
    if fuzz:
        lines += ["", "| Property | Cases | Failures |", "|---|---|---|"]
        lines += [f"| {k} | {v['examples']} | {v.get('failures', 0)} |" for k, v in sorted(fuzz.items())]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    import logging
    for name in ("jaxinfer.serving", "httpx"):  # one line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    tests_status = None
    if _RUN_SLOW_TESTS.value:
        tests_status = run_slow_tests(_TESTS.value, _FUZZ_JSON.value)
        print(f"[reliability] pytest -m slow exit status: {tests_status}", flush=True)
    fuzz = read_fuzz(_FUZZ_JSON.value)
    overload = soak = None
    if _OVERLOAD_ROUNDS.value > 0 or _SOAK_MINUTES.value > 0:
        session = None
        if _SERVER.value == "process":
            target = ProcessTarget(_MODEL.value, max_num_seqs=_MAX_NUM_SEQS.value,
                                   max_queued_requests=_MAX_QUEUED.value, warmup=_SERVE_WARMUP.value)
        else:
            from jaxinfer import EngineConfig, InferenceSession
            session = InferenceSession.from_pretrained(_MODEL.value, engine=EngineConfig(
                max_num_seqs=_MAX_NUM_SEQS.value, max_num_batched_tokens=128, num_pages=256))
            target = InProcessTarget(session, max_queued_requests=_MAX_QUEUED.value)
        try:
            if _OVERLOAD_ROUNDS.value > 0:
                overload = measure_overload(target, rounds=_OVERLOAD_ROUNDS.value)
                print(f"[reliability] overload: {json.dumps(overload)}", flush=True)
            if _SOAK_MINUTES.value > 0:
                soak = run_soak(target, minutes=_SOAK_MINUTES.value)
                print(f"[reliability] soak: {json.dumps(soak)}", flush=True)
        finally:
            target.stop()
            if session is not None:
                session.close()
    table = build_table(fuzz, overload, soak)
    header = f"Reliability report, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
    print(header + table)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            f.write(header + table)
    if _RESULT_JSON.value:
        os.makedirs(os.path.dirname(os.path.abspath(_RESULT_JSON.value)), exist_ok=True)
        with open(_RESULT_JSON.value, "w") as f:
            json.dump({"tests_exit_status": tests_status, "fuzz": fuzz, "overload": overload, "soak": soak}, f,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
