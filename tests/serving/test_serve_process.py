"""`jaxinfer serve` as a real process: readiness, SIGTERM drain, TLS and API keys.

Each test starts the CLI on free 127.0.0.1 ports, waits (bounded) for its "ready" line,
talks to it with the real clients (the `openai` package, generated gRPC stubs,
grpc.health.v1) and always terminates it.
"""
from __future__ import annotations

import contextlib
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


def test_tls_api_key_then_sigterm_drain(tmp_path):
    """One server process (each start costs a model load and a warm-up): TLS and the API
    key on both ports, then SIGTERM during two streams: they finish, new requests get
    503, the process exits 0."""
    cert, key = _self_signed(tmp_path)
    with serve("--tls_cert", cert, "--tls_key", key, "--api_key", "s3cret", "--drain_timeout_s", "60") as p:
        base = f"https://127.0.0.1:{p.port}"
        context = ssl.create_default_context(cafile=cert)
        with httpx.Client(verify=context, timeout=30) as http:
            assert http.get(base + "/health").status_code == 200  # health needs no key
            assert http.get(base + "/live").status_code == 200
            assert http.get(base + "/v1/models").status_code == 401
            assert http.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0,
                               http_client=httpx.Client(verify=context, timeout=120))
        out = client.completions.create(model="tiny-code", prompt="def add(a, b):", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
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
            replies = list(stub.Decode(request, timeout=60, metadata=(("authorization", "Bearer s3cret"),)))
            tokens = [t for r in replies for s in r.stream_content.samples for t in s.token_ids]
            assert len(tokens) == 3

        # SIGTERM while two streams run.
        results: dict = {}
        started = [threading.Event(), threading.Event()]

        def run(i: int) -> None:
            stream = client.completions.create(model="tiny-code", prompt="def add(a, b):", max_tokens=40,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            texts, reasons = [], []
            for chunk in stream:
                started[i].set()
                for c in chunk.choices:
                    texts.append(c.text)
                    reasons.append(c.finish_reason)
            results[i] = ("".join(texts), [r for r in reasons if r])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for event in started:  # both streams produced their first chunk: they are in flight
            assert event.wait(120)
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(base + "/v1/completions", json={"model": "tiny-code", "prompt": "x", "max_tokens": 2},
                             headers={"Authorization": "Bearer s3cret"}, verify=context, timeout=10)
        assert refused.status_code == 503, refused.text
        for t in threads:
            t.join(120)
        assert p.proc.wait(60) == 0, "".join(p.stderr)
    for i in range(2):
        text, reasons = results[i]
        assert reasons == ["length"] and text, results
    assert any("drain" in line for line in p.stderr)
