"""`jaxinfer serve` as a real process: readiness, TLS and API keys, SIGKILL and restart, SIGTERM drain.

Each test starts the CLI on free 127.0.0.1 ports, waits (bounded) for its "ready" line,
talks to it with the real clients (the `openai` package, generated gRPC stubs,
grpc.health.v1) and always terminates it.
"""
from __future__ import annotations

import contextlib
import json
import datetime
import os
import signal
import ssl
import subprocess
import sys
import threading
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxinfer.serving.protos import jaxinfer_pb2 as pb
from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 240


class ServeProcess:
    def __init__(self, *args: str):
        self.port, self.grpc_port = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAXINFER_COMPILATION_CACHE_DIR="")
        cmd = [sys.executable, "-m", "jaxinfer.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--grpc_port", str(self.grpc_port), "--max_num_seqs", "4", "--num_pages", "128",
               "--max_num_batched_tokens", "64", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stdout: list = []
        self.stderr: list = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _read(self, pipe, lines, watch_ready) -> None:
        for line in pipe:
            lines.append(line)
            if watch_ready and "ready" in line:
                self._ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not become ready (rc={self.proc.poll()}):\n{''.join(self.stderr)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@contextlib.contextmanager
def serve(*args: str, **kwargs):
    p = ServeProcess(*args, **kwargs)
    try:
        p.wait_ready()
        yield p
    finally:
        p.close()


KEY = "rk-Vq93LmZt"
SECRET_PROMPT = "def zebra_quokka_42(x):"  # must never appear in the logs
PROMPT = "def fib(n):"
DRAIN_TOKENS = 96  # the two queued streams wait for a slot: the drain lasts 2 x 96 steps at least
# --max_num_seqs 4 (ServeProcess) + 4 queued = room for 8
ARGS = ("--api_key", KEY, "--max_queued_requests", "4", "--drain_timeout_s", "120")
AUTH = {"Authorization": f"Bearer {KEY}"}


def _stream(base: str, verify, max_tokens: int, accepted: threading.Event, out: dict, key) -> None:
    """A streamed completion of SECRET_PROMPT; `accepted` is set on its answer; out[key] =
    (status, text, finish reasons, completion tokens from the usage chunk or the error)."""
    body = {"prompt": SECRET_PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    texts, reasons, tokens, status = [], [], None, None
    try:
        with httpx.stream("POST", base + "/v1/completions", headers=AUTH, json=body, timeout=300,
                          verify=verify if verify is not None else True) as r:
            status = r.status_code
            accepted.set()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                for c in chunk.get("choices", ()):
                    texts.append(c["text"])
                    reasons.append(c["finish_reason"])
                if chunk.get("usage") and not chunk.get("choices"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        tokens = repr(e)
    finally:
        accepted.set()
    out[key] = (status, "".join(texts), [r for r in reasons if r], tokens)


def _grpc_stream(target: str, max_tokens: int, accepted: threading.Event, out: dict, key) -> None:
    """A gRPC Generate of SECRET_PROMPT; `accepted` is set on its first delta; out[key] =
    (status name, tokens streamed, usage.completion_tokens)."""
    request = pb.GenerateRequest(prompt_text=SECRET_PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tokens, usage, code = 0, None, "OK"
    with grpc.insecure_channel(target) as channel:
        try:
            for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=300,
                                                                     metadata=(("authorization", f"Bearer {KEY}"),)):
                if response.HasField("delta"):
                    accepted.set()
                    tokens += len(response.delta.token_ids)
                else:
                    usage = response.summary.usage.completion_tokens
        except grpc.RpcError as e:
            code = e.code().name
        finally:
            accepted.set()
    out[key] = (code, tokens, usage)


def _no_secrets(p: "ServeProcess") -> None:
    logs = "".join(p.stdout) + "".join(p.stderr)
    assert "request_id=" in logs  # the per-request log lines are there
    assert KEY not in logs and SECRET_PROMPT not in logs and "zebra_quokka" not in logs


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_tls_api_key_sigkill_restart_sigterm_drain(tmp_path):
    """Two server processes (each start costs a model load and a warm-up). The first: TLS
    and the API key on both ports, then SIGKILL under load. The second, on fresh ports:
    ready, the same greedy text as the first gave, then SIGTERM with exactly its room in
    flight (HTTP and gRPC streams): all complete (0 lost), new requests get 503 /
    UNAVAILABLE, exit status 0. Neither process ever logs the key or a prompt."""
    cert, key = _self_signed(tmp_path)
    with serve("--tls_cert", cert, "--tls_key", key, *ARGS) as p:
        base = f"https://127.0.0.1:{p.port}"
        context = ssl.create_default_context(cafile=cert)
        with httpx.Client(verify=context, timeout=30) as http:
            assert http.get(base + "/health").status_code == 200  # health needs no key
            assert http.get(base + "/live").status_code == 200
            assert http.get(base + "/v1/models").status_code == 401
            assert http.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0,
                               http_client=httpx.Client(verify=context, timeout=120))
        reply = client.completions.create(model="tiny-code", prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        with pytest.raises(httpx.TransportError):  # plain HTTP is not answered on a TLS port
            httpx.get(f"http://127.0.0.1:{p.port}/health", timeout=10)

        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        with grpc.secure_channel(f"127.0.0.1:{p.grpc_port}", credentials,
                                 options=(("grpc.ssl_target_name_override", "localhost"),)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            from jaxinfer.serving.protos import jetstream_pb2, jetstream_pb2_grpc
            stub = jetstream_pb2_grpc.OrchestratorStub(channel)
            request = jetstream_pb2.DecodeRequest(max_tokens=3, text_content=jetstream_pb2.DecodeRequest.TextContent(
                text="def add(a, b):"))
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Decode(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            replies = list(stub.Decode(request, timeout=60, metadata=(("authorization", f"Bearer {KEY}"),)))
            tokens = [t for r in replies for s in r.stream_content.samples for t in s.token_ids]
            assert len(tokens) == 3

        before = client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text

        # SIGKILL while six streams run.
        out = {}
        events = [threading.Event() for _ in range(6)]
        threads = [threading.Thread(target=_stream, args=(base, context, 200, events[i], out, i), daemon=True)
                   for i in range(6)]
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in events)
        time.sleep(0.5)  # tokens are flowing
        p.proc.send_signal(signal.SIGKILL)
        assert p.proc.wait(30) == -signal.SIGKILL
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)  # the clients saw the connection end: no hang
        assert all(v[3] != 200 for v in out.values())  # none finished: the kill came mid-stream
    _no_secrets(p)

    with serve(*ARGS) as second:
        base = f"http://127.0.0.1:{second.port}"
        r = httpx.post(base + "/v1/completions", headers=AUTH, timeout=120,
                       json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == before, (r.text, before)

        # SIGTERM with exactly the server's room in flight: 2 gRPC streams (started first,
        # running once they stream), then 6 HTTP streams (admitted once they answer 200).
        out = {}
        events = [threading.Event() for _ in range(8)]
        target = f"127.0.0.1:{second.grpc_port}"
        threads = [threading.Thread(target=_grpc_stream, args=(target, DRAIN_TOKENS, events[i], out, i), daemon=True)
                   for i in (6, 7)]
        threads += [threading.Thread(target=_stream, args=(base, None, DRAIN_TOKENS, events[i], out, i), daemon=True)
                    for i in range(6)]
        for t in threads[:2]:
            t.start()
        assert events[6].wait(120) and events[7].wait(120)
        for t in threads[2:]:
            t.start()
        assert all(e.wait(120) for e in events)
        second.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health", timeout=10).status_code == 200:
            assert time.monotonic() < deadline, "SIGTERM did not start the drain"
            time.sleep(0.02)
        refused = httpx.post(base + "/v1/completions", headers=AUTH, timeout=30,
                             json={"prompt": PROMPT, "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(prompt_text=PROMPT, max_tokens=2),
                                                          timeout=30, metadata=(("authorization", f"Bearer {KEY}"),)))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(240)
        assert not any(t.is_alive() for t in threads)
        assert second.proc.wait(120) == 0, "".join(second.stderr)[-3000:]
    lost = [out[i] for i in range(6)
            if not (out[i][0] == 200 and out[i][2] == ["length"] and out[i][3] == DRAIN_TOKENS and out[i][1])]
    lost += [out[i] for i in (6, 7) if out[i] != ("OK", DRAIN_TOKENS, DRAIN_TOKENS)]
    assert not lost, lost  # every accepted request completed
    _no_secrets(second)
    assert any("drained" in line for line in second.stderr)


@pytest.mark.slow  # a second server process (~30 s); the engine is tested in tests/engine/test_splitwise.py
def test_splitwise_server_streams_the_colocated_tokens(monkeypatch, serving_session):
    """`jaxinfer serve --disaggregation splitwise` on two fake CPU devices: a streamed greedy
    completion (openai client) is the colocated session's text, and /metrics counts the copies."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    expected = serving_session.generate([PROMPT], serving_session.default_sampling_params(max_tokens=12,
                                                                                        temperature=0))[0]
    with serve("--disaggregation", "splitwise", "--warmup", "none") as p:
        base = f"http://127.0.0.1:{p.port}"
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)
        chunks = client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=12, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
        text = httpx.get(f"{base}/metrics", timeout=30).text
        transfers = [line for line in text.splitlines() if line.startswith("jaxinfer:kv_transfers_total")]
        assert transfers and float(transfers[0].rsplit(" ", 1)[1]) >= 1.0, transfers  # its warm-up requests too
