"""scripts/benchmark_serving.py: arrivals, workloads, clients, metrics and the table.

The pure parts are tested on hand-made inputs with known answers; the clients against
httpx's mock transport and a fake gRPC stub; the script itself, as a subprocess, against
a small fake OpenAI server in this process; and, once `jaxinfer serve` exists, against
the real server over HTTP and gRPC.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import serving_bench_lib as lib

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPT = os.path.join(_REPO, "scripts", "benchmark_serving.py")


# --------------------------------------------------------------------------- arrivals


def test_gamma_arrivals_mean_and_burstiness():
    rate, n = 10.0, 40_000
    variances = {}
    for burstiness in (0.25, 1.0, 4.0):
        gaps = lib.arrival_intervals(n, rate, burstiness, seed=1)
        assert gaps.shape == (n,) and (gaps >= 0).all()
        assert abs(gaps.mean() - 1 / rate) < 0.03 / rate  # the mean is 1/rate whatever the shape
        variances[burstiness] = gaps.var()
        # Gamma(k, 1/(rate k)) has variance 1/(rate^2 k).
        assert variances[burstiness] == pytest.approx(1 / (rate ** 2 * burstiness), rel=0.1)
    assert variances[0.25] > variances[1.0] > variances[4.0]
    np.testing.assert_array_equal(lib.arrival_intervals(5, rate, seed=3), lib.arrival_intervals(5, rate, seed=3))


def test_arrival_times():
    times = lib.arrival_times(100, 50.0, seed=0)
    assert times[0] == 0 and (np.diff(times) >= 0).all()
    assert lib.arrival_times(0, 1.0).size == 0
    np.testing.assert_array_equal(lib.arrival_times(4, float("inf")), np.zeros(4))
    for rate, burstiness in ((0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            lib.arrival_intervals(3, rate, burstiness)


# --------------------------------------------------------------------------- metrics


def _records():
    ok = lib.RequestResult
    return [
        ok(True, prompt_len=10, output_tokens=5, ttft=0.1, itl=[0.05] * 4, latency=0.3),  # tpot 0.05
        ok(True, prompt_len=20, output_tokens=3, ttft=0.3, itl=[0.1, 0.1], latency=0.5),  # tpot 0.1
        ok(True, prompt_len=30, output_tokens=1, ttft=0.2, itl=[], latency=0.2),  # no tpot
        ok(False, prompt_len=40, error="HTTP 500: boom"),
    ]


def test_metrics_on_known_records():
    m = lib.compute_metrics(_records(), 2.0, percentiles=[50, 90])
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["percentiles"] == [50, 90, 99]
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["median_ttft_ms"] == pytest.approx(200)
    assert m["p99_ttft_ms"] == pytest.approx(298)  # linear between 200 and 300
    assert m["p50_ttft_ms"] == pytest.approx(200) and m["p90_ttft_ms"] == pytest.approx(280)
    assert m["mean_tpot_ms"] == pytest.approx(75) and m["median_tpot_ms"] == pytest.approx(75)
    assert m["mean_itl_ms"] == pytest.approx(400 / 6) and m["median_itl_ms"] == pytest.approx(50)
    assert m["mean_e2el_ms"] == pytest.approx(1000 / 3) and m["median_e2el_ms"] == pytest.approx(300)
    assert m["std_e2el_ms"] == pytest.approx(np.std([300, 500, 200]))
    assert "request_goodput" not in m


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 250}, 2),  # 100 and 200 ms pass, 300 fails
    ({"tpot": 60}, 2),  # 50 ms and the single-token request (no decode) pass
    ({"ttft": 150, "e2el": 400}, 1),
    ({"e2el": 1000}, 3),  # the failed request never counts
])
def test_goodput(slos, good):
    m = lib.compute_metrics(_records(), 2.0, slos=slos)
    assert m["good_requests"] == good
    assert m["request_goodput"] == pytest.approx(good / 2.0)
    assert m["goodput_slos_ms"] == slos


def test_metrics_without_successes():
    m = lib.compute_metrics([lib.RequestResult(False, prompt_len=5, error="x")], 1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["total_input_tokens"] == 0
    assert m["mean_ttft_ms"] is None and m["p99_itl_ms"] is None
    assert "Mean TTFT (ms):                          n/a" in lib.format_table(m).splitlines()


def test_parse_flags_values():
    assert lib.parse_percentiles("99, 50,90") == [50, 90, 99]
    assert lib.parse_percentiles("99.9") == [99.9]
    with pytest.raises(ValueError):
        lib.parse_percentiles("101")
    assert lib.parse_goodput(["ttft:500 tpot:50", "e2el:2000"]) == {"ttft": 500, "tpot": 50, "e2el": 2000}
    assert lib.parse_goodput(["ttft:1.5,tpot:2"]) == {"ttft": 1.5, "tpot": 2}
    assert lib.parse_goodput([]) == {}
    for bad in ("ttft", "itl:5", "ttft:0", "ttft:x"):
        with pytest.raises(ValueError):
            lib.parse_goodput([bad])


def test_table_text():
    m = lib.compute_metrics(_records(), 2.0, percentiles=[50, 90], slos={"ttft": 250})
    lines = lib.format_table(m, max_concurrency=4).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    for line in ("Successful requests:                     3", "Failed requests:                         1",
                 "Maximum request concurrency:             4", "Benchmark duration (s):                  2.00",
                 "Total input tokens:                      60", "Total generated tokens:                  9",
                 "Request throughput (req/s):              1.50", "Request goodput (req/s):                 1.00",
                 "Output token throughput (tok/s):         4.50", "Total Token throughput (tok/s):          34.50",
                 "---------------Time to First Token----------------",
                 "Mean TTFT (ms):                          200.00", "Median TTFT (ms):                        200.00",
                 "P50 TTFT (ms):                           200.00", "P90 TTFT (ms):                           280.00",
                 "P99 TTFT (ms):                           298.00",
                 "-----Time per Output Token (excl. 1st token)------", "Mean TPOT (ms):                          75.00",
                 "---------------Inter-token Latency----------------", "Median ITL (ms):                         50.00",
                 "----------------End-to-end Latency----------------", "Median E2EL (ms):                        300.00"):
        assert line in lines, line
    # Sections in order, the goodput line only with SLOs, unbounded concurrency spelled out.
    assert [l for l in lines if l.startswith("---")][-1].strip("-") == "End-to-end Latency"
    plain = lib.format_table(lib.compute_metrics(_records(), 2.0)).splitlines()
    assert not any(l.startswith("Request goodput") for l in plain)
    assert "Maximum request concurrency:             unbounded" in plain
    assert not any(l.startswith("P50 ") for l in plain) and any(l.startswith("P99 E2EL") for l in plain)


# --------------------------------------------------------------------------- workloads


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from jaxinfer.assets import resolve_model_path
    from jaxinfer.models.tokenizer import load_tokenizer
    return load_tokenizer(resolve_model_path("tiny-code"))


def test_random_workload_hits_lengths_with_tokenizer(tiny_tokenizer):
    maker = lib.PromptMaker(tiny_tokenizer)
    for input_len in (4, 16, 200):
        reqs = lib.random_workload(maker, 20, input_len, 8, seed=input_len)
        assert [len(tiny_tokenizer.encode(r.prompt)) for r in reqs] == [input_len] * 20  # BOS included
        assert [r.prompt_len for r in reqs] == [input_len] * 20 and {r.output_len for r in reqs} == {8}
    reqs = lib.random_workload(maker, 50, 64, 32, range_ratio=0.5, seed=0)
    assert all(r.prompt_len == len(tiny_tokenizer.encode(r.prompt)) for r in reqs)
    assert all(32 <= r.prompt_len <= 96 and 16 <= r.output_len <= 48 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 10
    assert [r.prompt for r in lib.random_workload(maker, 3, 16, 8, seed=5)] == [
        r.prompt for r in lib.random_workload(maker, 3, 16, 8, seed=5)]


def test_shared_prefix_workload_with_tokenizer(tiny_tokenizer):
    maker = lib.PromptMaker(tiny_tokenizer)
    reqs = lib.shared_prefix_workload(maker, 6, 32, 2, 16, 8, seed=0)
    rng = np.random.default_rng(0)
    prefixes = [maker.text(rng, 32) for _ in range(2)]  # the same draws as the workload's
    for i, r in enumerate(reqs):
        assert r.prompt.startswith(prefixes[i % 2] + " ")
        assert r.prompt_len == len(tiny_tokenizer.encode(r.prompt))
        assert r.prompt_len == 48
    assert prefixes[0] != prefixes[1]


def test_word_workloads_without_tokenizer(tmp_path):
    maker = lib.PromptMaker()
    reqs = lib.random_workload(maker, 10, 30, 5, range_ratio=0.2, seed=0)
    assert all(len(r.prompt.split()) == r.prompt_len and 24 <= r.prompt_len <= 36 for r in reqs)
    assert all(set(r.prompt.split()) <= set(lib.WORDS) for r in reqs)
    reqs = lib.shared_prefix_workload(maker, 4, 10, 1, 5, 3)
    assert [r.prompt_len for r in reqs] == [15] * 4 and len({r.prompt.split()[:10].__repr__() for r in reqs}) == 1
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a b c", "output_len": 4}, {"prompt": "d", "output_len": 2}]))
    reqs = lib.json_workload(maker, str(path), 3)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [("a b c", 3, 4), ("d", 1, 2), ("a b c", 3, 4)]
    path.write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(ValueError, match="output_len"):
        lib.json_workload(maker, str(path), 1)


# --------------------------------------------------------------------------- clients


def _sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def _openai_result(body: bytes, status: int = 200, chat: bool = False, seen=None):
    import httpx

    def handler(request):
        if seen is not None:
            seen.append((request.url.path, json.loads(request.content)))
        return httpx.Response(status, content=body, headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://x") as client:
            path = "/v1/chat/completions" if chat else "/v1/completions"
            return await lib.openai_request(client, path, "m", lib.RequestInput("hi there", 7, 3), chat=chat)
    return asyncio.run(go())


def test_openai_client_parses_the_stream():
    seen = []
    body = _sse({"choices": [{"text": ""}]}, {"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}]},
                {"choices": [{"text": "c"}]}, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}},
                b"[DONE]")
    r = _openai_result(b": keep-alive\n\n" + body, seen=seen)
    assert r.success and not r.error
    assert (r.prompt_len, r.output_tokens, len(r.itl)) == (9, 3, 2)
    assert 0 <= r.ttft <= r.latency
    path, payload = seen[0]
    assert path == "/v1/completions"
    assert payload["prompt"] == "hi there" and payload["max_tokens"] == 3 and payload["ignore_eos"] is True
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    # Chat: content arrives in deltas; no usage -> the chunk count, the workload's prompt length.
    seen = []
    r = _openai_result(_sse({"choices": [{"delta": {"role": "assistant"}}]},
                            {"choices": [{"delta": {"content": "x"}}]}, {"choices": [{"delta": {"content": "y"}}]},
                            b"[DONE]"), chat=True, seen=seen)
    assert r.success and (r.prompt_len, r.output_tokens, len(r.itl)) == (7, 2, 1)
    assert seen[0][0] == "/v1/chat/completions" and seen[0][1]["messages"] == [{"role": "user", "content": "hi there"}]


def test_openai_client_failures():
    r = _openai_result(b'{"error": "no such model"}', status=404)
    assert not r.success and r.error.startswith("HTTP 404") and "no such model" in r.error and r.prompt_len == 7
    r = _openai_result(_sse({"choices": [{"text": "a"}]}))
    assert not r.success and "[DONE]" in r.error
    r = _openai_result(_sse({"error": {"message": "engine died"}}, b"[DONE]"))
    assert not r.success and "engine died" in r.error


class _FakeRpcError(Exception):
    def code(self):
        return types.SimpleNamespace(name="UNAVAILABLE")

    def details(self):
        return "connection refused"


def _fake_pb2():
    made = []

    def decode_request(**fields):
        made.append(fields)
        return fields
    return types.SimpleNamespace(DecodeRequest=decode_request), made


def _response(*samples):
    return types.SimpleNamespace(stream_content=types.SimpleNamespace(
        samples=[types.SimpleNamespace(text=t, token_ids=ids) for t, ids in samples]))


class _FakeStub:
    def __init__(self, responses, error=None):
        self.responses, self.error = responses, error

    async def _stream(self):
        for resp in self.responses:
            await asyncio.sleep(0.001)
            yield resp
        if self.error:
            raise self.error

    def Decode(self, request, timeout=None):  # noqa: N802 - the gRPC method's name
        self.request, self.timeout = request, timeout
        return self._stream()


def test_jetstream_client():
    pb2, made = _fake_pb2()
    stub = _FakeStub([_response(), _response(("a", [5])), _response(("bc", [6, 7])), _response(("", [8]))])
    r = asyncio.run(lib.jetstream_request(stub, pb2, lib.RequestInput("p", 4, 4), timeout_s=3.0))
    assert r.success and (r.prompt_len, r.output_tokens, len(r.itl)) == (4, 4, 2)
    assert made == [{"max_tokens": 4, "text_content": {"text": "p"}, "num_samples": 1}] and stub.timeout == 3.0
    r = asyncio.run(lib.jetstream_request(_FakeStub([_response(("a", [5]))], _FakeRpcError()), pb2,
                                          lib.RequestInput("p", 4, 4)))
    assert not r.success and r.error == "gRPC UNAVAILABLE: connection refused"


def test_run_requests_paces_bounds_and_records_failures():
    in_flight, peak, starts = [0], [0], {}

    async def send(req):
        starts[req.prompt] = time.perf_counter()
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.02)
        in_flight[0] -= 1
        if req.prompt == "raise":
            raise RuntimeError("bad")
        if req.prompt == "slow":
            await asyncio.sleep(1)
        return lib.RequestResult(True, req.prompt_len, 1, 0.01, [], 0.02)

    reqs = [lib.RequestInput(str(i), 1, 1) for i in range(6)]
    results, duration = asyncio.run(lib.run_requests(reqs, send, max_concurrency=2))
    assert peak[0] == 2 and all(r.success for r in results) and duration >= 0.055
    peak[0] = 0
    t0 = time.perf_counter()
    results, _ = asyncio.run(lib.run_requests(reqs[:3], send, times=[0.0, 0.05, 0.1]))
    assert [starts[str(i)] - t0 >= 0.05 * i - 0.005 for i in range(3)] == [True] * 3
    reqs = [lib.RequestInput("raise", 3, 1), lib.RequestInput("slow", 4, 1), lib.RequestInput("0", 5, 1)]
    results, _ = asyncio.run(lib.run_requests(reqs, send, timeout_s=0.2))
    assert [r.success for r in results] == [False, False, True]
    assert results[0].error == "RuntimeError: bad" and results[1].error == "timed out after 0.2 s"
    assert [r.prompt_len for r in results] == [3, 4, 5]


# --------------------------------------------------------------------------- the script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """/v1/models and streamed /v1/completions: one chunk per token, 2 ms apart."""

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    posts, lock = 0, threading.Lock()  # a "compile" per 4 completions, on /metrics as jaxinfer's counter

    def do_GET(self):  # noqa: N802
        if self.path == "/metrics":
            with _FakeOpenAI.lock:
                self._send(f"jaxinfer:num_compiles_total {_FakeOpenAI.posts // 4}.0\n".encode(), "text/plain")
            return
        self._send(json.dumps({"object": "list", "data": [{"id": "fake-model"}]}).encode(), "application/json")

    def do_POST(self):  # noqa: N802
        with _FakeOpenAI.lock:
            _FakeOpenAI.posts += 1
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert req["model"] == "fake-model" and req["stream"] and req["ignore_eos"]
        n = req["max_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for i in range(n):
            time.sleep(0.002)
            self.wfile.write(_sse({"choices": [{"index": 0, "text": f" t{i}"}]}))
            self.wfile.flush()
        usage = {"prompt_tokens": len(req["prompt"].split()) + 1, "completion_tokens": n}
        self.wfile.write(_sse({"choices": [], "usage": usage}, b"[DONE]"))
        self.close_connection = True


def test_script_against_fake_openai_server(tmp_path):
    _FakeOpenAI.posts = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "result.json"
    try:
        proc = subprocess.run(
            [sys.executable, _SCRIPT, "--base_url", f"http://127.0.0.1:{server.server_address[1]}",
             "--num_prompts", "6", "--random_input_len", "12", "--random_output_len", "5", "--request_rate", "200",
             "--max_concurrency", "3", "--goodput", "ttft:10000 e2el:10000", "--warmup_requests", "2",
             "--disable_tqdm", "--result_json", str(out)], capture_output=True, text=True, timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warm-up: 2 requests" in proc.stdout
    assert "Successful requests:                     6" in proc.stdout
    assert "Request goodput (req/s):" in proc.stdout and "Maximum request concurrency:             3" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"] == "fake-model" and report["backend"] == "openai"
    assert (report["completed"], report["failed"], report["good_requests"]) == (6, 0, 6)
    assert report["total_input_tokens"] == 6 * 13 and report["total_output_tokens"] == 30  # from usage
    assert report["output_lens"] == [5] * 6 and all(len(itl) == 4 for itl in report["itls_s"])
    assert report["flags"]["num_prompts"] == 6 and report["flags"]["goodput"] == ["ttft:10000 e2el:10000"]
    assert 0 < report["mean_ttft_ms"] < report["mean_e2el_ms"] and report["mean_tpot_ms"] > 1.5
    assert report["errors"] == []
    # 2 warm-up + 6 timed completions: the counter went 0 -> 2 during the timed run
    assert report["server_compiles"] == 2 and "WARNING: the server compiled 2 step program(s)" in proc.stdout


def test_script_reports_failed_requests(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, _SCRIPT, "--base_url", f"http://127.0.0.1:{_free_port()}", "--model", "m",
         "--num_prompts", "3", "--random_input_len", "4", "--disable_tqdm", "--result_json", str(out)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Failed requests:                         3" in proc.stdout
    report = json.loads(out.read_text())
    assert report["completed"] == 0 and len(report["errors"]) == 3 and "Connect" in report["errors"][0]["error"]




def test_jetstream_client_against_fake_orchestrator():
    """Real gRPC and the generated stubs, in process (the script's own jetstream path runs in the live test)."""
    from concurrent import futures

    import grpc

    from jaxinfer.serving.protos import jetstream_pb2 as pb2
    from jaxinfer.serving.protos import jetstream_pb2_grpc as pb2_grpc

    seen = []

    class Orchestrator(pb2_grpc.OrchestratorServicer):
        def Decode(self, request, context):  # noqa: N802
            seen.append(request)
            if request.text_content.text == "":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
            yield pb2.DecodeResponse(initial_content=pb2.DecodeResponse.InitialContent())
            for i in range(request.max_tokens):
                time.sleep(0.002)
                sample = pb2.DecodeResponse.StreamContent.Sample(text=f" t{i}", token_ids=[100 + i])
                yield pb2.DecodeResponse(stream_content=pb2.DecodeResponse.StreamContent(samples=[sample]))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb2_grpc.add_OrchestratorServicer_to_server(Orchestrator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    reqs = lib.random_workload(lib.PromptMaker(), 5, 10, 4) + [lib.RequestInput("", 1, 2)]

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.OrchestratorStub(channel)
            return await lib.run_requests(reqs, lambda req: lib.jetstream_request(stub, pb2, req, 10.0))
    try:
        results, duration = asyncio.run(go())
    finally:
        server.stop(None)
    assert [r.success for r in results] == [True] * 5 + [False]
    assert results[-1].error == "gRPC INVALID_ARGUMENT: empty prompt"
    assert all(r.output_tokens == 4 and len(r.itl) == 3 and 0 < r.ttft < r.latency for r in results[:5])
    m = lib.compute_metrics(results, duration)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (5, 1, 50, 20)
    assert sorted((r.max_tokens, r.num_samples, r.WhichOneof("content")) for r in seen) == (
        [(2, 1, "text_content")] + [(4, 1, "text_content")] * 5)


# --------------------------------------------------------------------------- live server


def _wait_healthy(url: str, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    import httpx
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server not healthy after {limit_s} s")


# ~3 minutes on 2 cores (a server process compiling every batch shape the benchmark
# reaches), so it runs with `-m slow`; tests/serving covers the server with real clients.
@pytest.mark.slow
def test_against_live_server(tmp_path):
    port, grpc_port = _free_port(), _free_port()
    log = open(tmp_path / "server.log", "w")
    # Small engine buckets: fewer programs to compile on a CPU.
    server = subprocess.Popen([sys.executable, "-m", "jaxinfer.cli", "serve", "--port", str(port),
                               "--grpc_port", str(grpc_port), "--host", "127.0.0.1", "--max_num_seqs", "8",
                               "--num_pages", "128", "--max_num_batched_tokens", "128"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=_REPO,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", JAXINFER_COMPILATION_CACHE_DIR=""))
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, server)
        for backend, target in (("openai", ["--base_url", base_url]),
                                ("jetstream", ["--grpc_target", f"127.0.0.1:{grpc_port}"])):
            out = tmp_path / f"{backend}.json"
            proc = subprocess.run(
                [sys.executable, _SCRIPT, "--backend", backend, *target, "--tokenizer", "tiny-code",
                 "--num_prompts", "8", "--random_input_len", "16", "--random_output_len", "8",
                 "--request_rate", "inf", "--warmup_requests", "1", "--timeout_s", "120", "--disable_tqdm",
                 "--result_json", str(out)], capture_output=True, text=True, timeout=300, cwd=_REPO)
            assert proc.returncode == 0, f"{backend}: {proc.stderr[-3000:]}"
            assert "Successful requests:                     8" in proc.stdout, proc.stdout
            report = json.loads(out.read_text())
            assert (report["completed"], report["failed"]) == (8, 0), report["errors"]
            assert 8 * 14 <= report["total_input_tokens"] <= 8 * 18, backend
            if backend == "openai":  # ignore_eos: every request runs to max_tokens
                assert report["total_output_tokens"] == 64
                assert isinstance(report["server_compiles"], int) and report["server_compiles"] >= 0
            else:
                assert 8 <= report["total_output_tokens"] <= 64
                assert report["server_compiles"] is None  # gRPC only: no /metrics to read
            assert 0 < report["mean_ttft_ms"] <= report["mean_e2el_ms"] < 120_000
            assert report["request_throughput"] > 0 and report["output_throughput"] > 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
