"""Helpers of the servers' reliability tests: in-process servers, bounded waits, fuzz counts.

- `http_server(engine)`: the FastAPI app under uvicorn in a thread on a free 127.0.0.1 port.
- `GrpcServer(engine)`: the grpc.aio server on its own loop thread.
- `wait_idle(engine, free_pages)`: bounded wait until nothing is in flight and the pages are back.
- `run_property(name, strategy, check, max_examples)`: runs a hypothesis property
  (database=None, no deadline, derandomized) and, when $JAXINFER_FUZZ_REPORT names a
  file, merges {name: {"examples": n, "failures": m}} into it (real invocations counted).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import threading
import time

import grpc
import uvicorn
from hypothesis import HealthCheck, given, settings

from jaxinfer.serving.core import ServingConfig, ServingEngine
from jaxinfer.serving.grpc_server import create_grpc_server
from jaxinfer.serving.http_server import create_app
from jaxinfer.serving.metrics import ServingMetrics

FUZZ_REPORT_ENV = "JAXINFER_FUZZ_REPORT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_engine(session, warm: bool = True, **fields) -> ServingEngine:
    config = ServingConfig(**fields)
    engine = ServingEngine(session, config, metrics=ServingMetrics(config.model_name, session.async_engine.metrics))
    if warm:
        engine.warm_up()
    return engine


@contextlib.contextmanager
def http_server(engine: ServingEngine):
    """create_app(engine) under uvicorn in a thread; yields the base URL; always stopped."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn-reliability", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class GrpcServer:
    """create_grpc_server(engine) started on an event loop of its own thread."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine
        self.address = f"127.0.0.1:{free_port()}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-reliability", daemon=True)
        self.thread.start()
        self.server = self.run(self._start())
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=10)

    async def _start(self):
        server = create_grpc_server(self.engine, self.address)
        await server.start()
        return server

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> "GrpcServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pages_in_use(session) -> int:
    m = session.metrics()
    return m["num_total_pages"] - m["num_free_pages"]


def wait_idle(engine: ServingEngine, timeout: float = 60.0) -> None:
    """Waits (bounded) until nothing is in flight, no request is tracked and no page is in use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = engine.session.metrics()
        if engine.num_in_flight == 0 and m["num_running"] == 0 and m["num_waiting"] == 0 \
                and m["num_free_pages"] == m["num_total_pages"]:
            return
        time.sleep(0.02)
    m = engine.session.metrics()
    raise AssertionError(f"not idle after {timeout} s: in flight {engine.num_in_flight}, running {m['num_running']}, "
                         f"waiting {m['num_waiting']}, pages in use {m['num_total_pages'] - m['num_free_pages']}")


def record_fuzz(name: str, examples: int, failures: int) -> None:
    """Adds the counts to $JAXINFER_FUZZ_REPORT (a JSON object; created when missing), under a lock."""
    path = os.environ.get(FUZZ_REPORT_ENV)
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = {}
            if os.path.exists(path) and os.path.getsize(path):
                with open(path) as f:
                    data = json.load(f)
            entry = data.setdefault(name, {"examples": 0, "failures": 0})
            entry["examples"] += examples
            entry["failures"] += failures
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run_property(name: str, strategy, check, max_examples: int) -> int:
    """Runs `check(example)` over `max_examples` examples of `strategy`; returns the invocations."""
    counts = {"examples": 0, "failures": 0}

    @settings(database=None, deadline=None, derandomize=True, max_examples=max_examples, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(example):
        counts["examples"] += 1
        try:
            check(example)
        except BaseException:
            counts["failures"] += 1
            raise

    try:
        prop()
    finally:
        record_fuzz(name, counts["examples"], counts["failures"])
    return counts["examples"]
