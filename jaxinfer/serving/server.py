"""Runs the HTTP and gRPC front ends of one ServingEngine in one asyncio loop.

Life cycle (what `jaxinfer serve` does):
1. both ports are bound and answer at once: liveness from the start (`/health` says 503
   "starting" and gRPC health NOT_SERVING until ready);
2. the warm-up compiles the step programs of a short request on a worker thread (the
   loop keeps answering); its duration is logged; then the engine is *ready*
   (`/health` 200, gRPC SERVING) and the addresses are printed;
3. SIGTERM or SIGINT: the engine stops admitting (new requests get 503 / UNAVAILABLE),
   health turns NOT_SERVING, in-flight requests finish for up to `drain_timeout_s`,
   then both servers stop, the engine's loop thread is shut down (aborting anything
   left, its pages freed) and `serve` returns 0. A second signal during the drain
   stops at once.

`ServerHandle` does the same in a background thread for tests and notebooks.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from typing import Callable, Optional

from jaxinfer.serving.core import ServingEngine

log = logging.getLogger("jaxinfer.serving")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Listen:
    """Where to serve: host, HTTP port, gRPC port (None = no gRPC), optional TLS files."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: Optional[int] = 9000
    tls_cert: Optional[str] = None  # PEM certificate chain (both ports use TLS when set)
    tls_key: Optional[str] = None  # PEM private key

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert / tls_key: give both or neither")
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < 65536):
                raise ValueError(f"{name}: must be a port number in [0, 65535], got {value!r}")


def _uvicorn_server(engine: ServingEngine, listen: Listen):
    import uvicorn

    from jaxinfer.serving.http_server import create_app

    class _Server(uvicorn.Server):
        # Signals are ours (drain first); uvicorn must not install its own handlers.
        def capture_signals(self):
            return contextlib.nullcontext()

    config = uvicorn.Config(create_app(engine), host=listen.host, port=listen.port, log_level="warning",
                            access_log=False, ssl_certfile=listen.tls_cert, ssl_keyfile=listen.tls_key,
                            timeout_graceful_shutdown=5, lifespan="off")
    return _Server(config)


def _grpc_server(engine: ServingEngine, listen: Listen):
    import grpc

    from jaxinfer.serving import grpc_server
    credentials = None
    if listen.tls_cert is not None:
        with open(listen.tls_key, "rb") as f:
            key = f.read()
        with open(listen.tls_cert, "rb") as f:
            cert = f.read()
        credentials = grpc.ssl_server_credentials([(key, cert)])
    return grpc_server.create_grpc_server(engine, f"{listen.host}:{listen.grpc_port}",
                                          server_credentials=credentials)


class Runner:
    """The servers of one engine inside the running asyncio loop."""

    def __init__(self, engine: ServingEngine, listen: Listen, *, warm_up: bool = True,
                 on_ready: Optional[Callable[["Runner"], None]] = None):
        self.engine = engine
        self.listen = listen
        self.warm_up = warm_up
        self.on_ready = on_ready
        self.http = None
        self.grpc = None
        self.http_port: Optional[int] = None
        self.grpc_port: Optional[int] = None
        self._stop: Optional[asyncio.Event] = None
        self._signals = 0

    def request_stop(self) -> None:
        """Starts the drain (thread-safe once the loop runs); a second call stops at once."""
        self._signals += 1
        self.engine.begin_drain()
        self._set_health(False)
        if self._stop is not None:
            self._stop.set()

    def _set_health(self, serving: bool) -> None:
        """Sets gRPC health (call on the loop: it schedules the update there)."""
        if self.grpc is not None:
            from jaxinfer.serving import grpc_server
            asyncio.ensure_future(grpc_server.set_serving(self.grpc, serving))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
                loop.add_signal_handler(sig, self._on_signal, sig)
        self.http = _uvicorn_server(self.engine, self.listen)
        http_task = asyncio.ensure_future(self.http.serve())
        if self.listen.grpc_port is not None:
            from jaxinfer.serving import grpc_server
            self.grpc = _grpc_server(self.engine, self.listen)
            await grpc_server.set_serving(self.grpc, self.engine.is_ready)
            await self.grpc.start()
            self.grpc_port = grpc_server.bound_port(self.grpc)
        while not self.http.started:
            if http_task.done():
                http_task.result()  # e.g. the port is taken: raise it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.02)
        self.http_port = self.http.servers[0].sockets[0].getsockname()[1]
        log.info("listening: http=%s:%s grpc=%s (not ready until the warm-up finished)", self.listen.host,
                 self.http_port, self.grpc_port)
        try:
            if self.warm_up and not self._stop.is_set():
                seconds = await loop.run_in_executor(None, self.engine.warm_up)
                log.info("warm-up compiled the step programs in %.2f s; ready", seconds)
            elif not self.warm_up:
                self.engine.state = "ready"
            if not self._stop.is_set():
                self._set_health(True)
                if self.on_ready is not None:
                    self.on_ready(self)
            await self._stop.wait()
            await self._drain()
        finally:
            self.http.should_exit = True
            if self.grpc is not None:
                await self.grpc.stop(grace=1.0)
            await http_task
            self.engine.state = "stopped"
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                    loop.remove_signal_handler(sig)

    def _on_signal(self, sig) -> None:
        log.info("received %s: draining (a second signal stops at once)", signal.Signals(sig).name)
        self.request_stop()

    async def _drain(self) -> None:
        timeout = self.engine.config.drain_timeout_s
        start = time.monotonic()
        log.info("draining: %d request(s) in flight, up to %.1f s", self.engine.num_in_flight, timeout)
        while self.engine.num_in_flight and time.monotonic() - start < timeout and self._signals < 2:
            await asyncio.sleep(0.05)
        left = self.engine.num_in_flight
        if left:
            log.warning("drain ended with %d request(s) still in flight; aborting them", left)
        else:
            log.info("drained in %.2f s", time.monotonic() - start)


def serve(engine: ServingEngine, listen: Listen, *, on_ready=None) -> int:
    """Serves until SIGTERM / SIGINT; returns the exit status (0 after a clean drain)."""
    runner = Runner(engine, listen, on_ready=on_ready)
    asyncio.run(runner.run())
    engine.session.close()
    return 0


class ServerHandle:
    """Both servers in a background thread (tests, notebooks): `start()`, `stop()`."""

    def __init__(self, engine: ServingEngine, listen: Listen, warm_up: bool = True):
        self.runner = Runner(engine, listen, warm_up=warm_up)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="jaxinfer-serve", daemon=True)
        self.runner.on_ready = lambda runner: self._ready.set()

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.runner.run())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
        finally:
            self._ready.set()
            self._loop.close()

    def start(self, timeout: float = 300.0) -> "ServerHandle":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server was not ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def http_url(self) -> str:
        scheme = "https" if self.runner.listen.tls_cert else "http"
        return f"{scheme}://{self.runner.listen.host}:{self.runner.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.runner.listen.host}:{self.runner.grpc_port}"

    def stop(self, timeout: float = 60.0) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.runner.request_stop)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerHandle":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
