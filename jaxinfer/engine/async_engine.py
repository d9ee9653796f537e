"""AsyncEngine: one loop thread owns the Engine; any thread (or asyncio task) is a client.

Threads and ownership. The Engine (engine.py) is synchronous and not thread-safe. An
AsyncEngine starts one background *loop thread* (with its first request) that is the
only thread ever calling into the Engine: it takes the commands other threads left in
the inbox (new requests, aborts, calls such as `metrics`), runs them, steps the engine
while it has unfinished requests, and hands each StreamDelta to the request's
RequestStream. It sleeps on a condition variable when there is nothing to do.

Client threads own nothing of the engine. `add_requests` validates the requests in the
caller's thread against the engine's immutable RequestLimits, so a bad request raises a
ValueError naming the field in the caller and nothing is queued, then leaves them in
the inbox and returns one RequestStream per request. A RequestStream is thread-safe:
iterate it (blocking) or `async for` it (asyncio) for StreamDeltas, or call
`result()` / `await aresult()` for the RequestOutput. `abort` may be called from any
thread; the stream then ends with finish_reason "abort". If a step raises, the
requests of that step are aborted (their pages freed) and their streams raise that
error to their readers; a request that fails alone (a NaN / Inf in its logits:
engine.NonFiniteOutput, or an error in its output processing) fails alone, its reader
getting that error; the loop keeps serving everything else. The loop thread never blocks on a
reader: a stream whose reader falls more than `max_buffered_deltas` deltas behind is
cut off (the request is aborted, the reader gets SlowReader).

`shutdown()` (also at interpreter exit) aborts what is in flight and joins the loop
thread; the readers of unfinished requests (also of requests that raced the
shutdown) get EngineStopped. Adding requests afterwards starts a new loop thread.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import itertools
import threading
import weakref
from typing import Callable, Optional, Sequence

from jaxinfer.engine.engine import Engine
from jaxinfer.engine.errors import EngineStopped, SlowReader, StepFailed  # noqa: F401 - re-exported
from jaxinfer.engine.validation import NewRequest, expand_samples, sample_ids, validate_requests
from jaxinfer.types import RequestOutput, StreamDelta

_WAIT_SLICE = 0.5  # seconds; waits wake this often so that Ctrl-C reaches the waiting thread


class RequestStream:
    """The deltas of one request, filled by the loop thread, read by any thread.

    One reader at a time: either iterate it (sync or async) or wait for `result()`.
    """

    def __init__(self, request_id: str, owner: "AsyncEngine", parent_id: Optional[str] = None):
        self.request_id = request_id
        self.parent_id = parent_id  # the prompt's id when it is one of its n samples (SamplingParams.n)
        self._owner = owner
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()  # StreamDelta or BaseException
        self._readers = 0  # threads waiting for any item (not just the last)
        self._async_waiters: list = []  # (event loop, future) pairs waiting for an item
        self._output: Optional[RequestOutput] = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._summary_only = False  # a result() reader: only the last delta is kept

    # ------------------------------------------------------------- loop thread side

    def _put(self, item) -> None:
        with self._cond:
            if self._done:
                return
            partial = not isinstance(item, BaseException) and not item.is_finished
            if partial and self._summary_only:
                return  # result() sums the deltas up in the RequestOutput
            if partial and len(self._items) >= self._owner.max_buffered_deltas:
                item = SlowReader(f"request {self.request_id!r}: the reader fell more than "
                                  f"{self._owner.max_buffered_deltas} deltas behind; the request was aborted")
                self._owner.abort(self.request_id)
            self._items.append(item)
            if isinstance(item, BaseException):
                self._error, self._done = item, True
            elif item.is_finished:
                self._output, self._done = item.output, True
            if self._done or self._readers:
                self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # the reader's event loop is closed
                pass

    # ------------------------------------------------------------- reader side

    @property
    def finished(self) -> bool:
        with self._cond:
            return self._done

    def _pop(self, timeout: Optional[float]):
        """The next item, or None after `timeout` seconds (None = wait as long as it takes)."""
        with self._cond:
            self._readers += 1
            try:
                remaining = timeout
                while not self._items:
                    wait = _WAIT_SLICE if remaining is None else min(_WAIT_SLICE, remaining)
                    if wait <= 0:
                        return None
                    self._cond.wait(wait)
                    if remaining is not None:
                        remaining -= wait
                return self._items.popleft()
            finally:
                self._readers -= 1

    def __iter__(self):
        """Yields StreamDeltas until the last one (finish_reason set); raises a step's error."""
        while True:
            item = self._pop(None)
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.is_finished:
                return

    async def __aiter__(self):
        """`async for delta in stream`: like iteration, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                item = self._items.popleft() if self._items else None
                if item is None:
                    future = loop.create_future()
                    self._async_waiters.append((loop, future))
            if item is None:
                await future
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.is_finished:
                return

    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        """Blocks until the request finishes and returns its RequestOutput.

        Raises:
          TimeoutError: not finished within `timeout` seconds (the request keeps running).
          the error of the step that failed the request, or EngineStopped.
        """
        with self._cond:
            self._summary_only = True
            if not self._done:
                self._items.clear()
            remaining = timeout
            while not self._done:
                wait = _WAIT_SLICE if remaining is None else min(_WAIT_SLICE, remaining)
                if wait <= 0:
                    raise TimeoutError(f"request {self.request_id!r} did not finish within {timeout} s")
                self._cond.wait(wait)
                if remaining is not None:
                    remaining -= wait
            self._items.clear()  # the deltas are summed up in the output
            if self._error is not None:
                raise self._error
            return self._output

    async def aresult(self) -> RequestOutput:
        """`await stream.aresult()`: the RequestOutput, without blocking the event loop."""
        output = None
        async for delta in self:
            output = delta.output
        return output

    def abort(self) -> None:
        """Stops the request (no-op once it finished); its stream ends with "abort"."""
        if not self.finished:
            self._owner.abort(self.request_id)


def _resolve(future) -> None:
    if not future.done():
        future.set_result(None)


class AsyncEngine:
    """Runs an Engine on its own loop thread; thread-safe front for it.

    Args:
      engine: the Engine to own. No other thread may call it after this.
    """

    def __init__(self, engine: Engine, max_buffered_deltas: int = 4096):
        self.engine = engine
        # a streaming reader this many deltas behind is cut off (the loop never blocks)
        self.max_buffered_deltas = max_buffered_deltas
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()  # commands for the loop thread
        self._streams: dict = {}  # request id -> RequestStream, until its last delta
        self._ids = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        _LIVE.add(self)

    # ------------------------------------------------------------------ clients

    def add_requests(self, requests: Sequence[NewRequest]) -> list:
        """Validates every request here, then queues them all; one RequestStream each.

        A request with params.n > 1 becomes its n samples (validation.expand_samples,
        ids "{request_id}-{i}"): n consecutive streams, each with `parent_id` set;
        `abort(request_id)` of the parent id aborts all its samples.

        Raises:
          ValueError: naming the field and the request's index; nothing is queued.
        """
        requests = validate_requests(list(requests), self.engine.limits)
        with self._cond:
            taken = set(self._streams) | {s.parent_id for s in self._streams.values() if s.parent_id is not None}
            given = {r.request_id for r in requests if r.request_id is not None}
            named = []
            for i, r in enumerate(requests):
                request_id, n = r.request_id, r.params.n
                while request_id is None or (r.request_id is None and (
                        request_id in taken or request_id in given
                        or any(c in taken for c in (sample_ids(request_id, n) if n > 1 else ())))):
                    request_id = f"a{next(self._ids)}"
                items = expand_samples(r, request_id) if n > 1 else [dataclasses.replace(r, request_id=request_id)]
                for item in ([dataclasses.replace(r, request_id=request_id)] if n > 1 else []) + items:
                    if item.request_id in taken:  # a sample's id, or the parent's (its abort handle)
                        raise ValueError(f"request_id[{i}]: {item.request_id!r} is already in use")
                    taken.add(item.request_id)
                named += items
            for r in named:
                self._streams[r.request_id] = RequestStream(r.request_id, self, r.parent_id)
            streams = [self._streams[r.request_id] for r in named]
            self._inbox.append(("add", named))
            self._ensure_thread()
            self._cond.notify_all()
        return streams

    def add_request(self, request: NewRequest) -> RequestStream:
        """Queues one request of one sample (n > 1: use add_requests, one stream per sample)."""
        if getattr(request.params, "n", 1) != 1:
            raise ValueError(f"params.n: add_request returns one stream; got n={request.params.n}, use add_requests")
        (stream,) = self.add_requests([request])
        return stream

    def abort(self, request_id: str) -> None:
        """Stops a request, or every sample of a parent id, from any thread (no-op for
        an unknown or finished id)."""
        with self._cond:
            ids = [request_id] if request_id in self._streams else [
                rid for rid, s in self._streams.items() if s.parent_id == request_id]
            if not ids:
                return
            self._inbox.extend(("abort", rid) for rid in ids)
            self._ensure_thread()
            self._cond.notify_all()

    def call(self, fn: Callable[[Engine], object], timeout: Optional[float] = None):
        """Runs `fn(engine)` on the loop thread between two steps and returns its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if threading.current_thread() is self._thread:
                return fn(self.engine)
            self._inbox.append(("call", (fn, future)))
            self._ensure_thread()
            self._cond.notify_all()
        return future.result(timeout)

    def metrics(self) -> dict:
        return self.call(lambda engine: engine.metrics())

    def reset_prefix_cache(self) -> None:
        self.call(lambda engine: engine.reset_prefix_cache())

    @property
    def is_running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def num_unfinished(self) -> int:
        with self._cond:
            return len(self._streams)

    def shutdown(self, timeout: Optional[float] = 30.0) -> None:
        """Aborts every request in flight and joins the loop thread."""
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._cond.notify_all()
        if thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ loop thread

    def _ensure_thread(self) -> None:  # with self._cond held
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jaxinfer-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not self._stopping and not engine.has_unfinished:
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            for kind, arg in commands:
                self._run_command(kind, arg)
            if stopping:
                self._stop()
                return
            if not engine.has_unfinished:
                continue
            try:
                deltas = engine.step()
            except StepFailed as e:  # the step's requests were aborted: their readers get the error
                for request_id in e.request_ids:
                    self._finish_stream(request_id, e.error)
                continue
            except Exception as e:  # noqa: BLE001 - unexpected: handed to every reader in flight
                self._fail_in_flight(e)
                continue
            for request_id, error in engine.take_errors().items():  # requests failed alone
                self._finish_stream(request_id, error)
            self._deliver(deltas)

    def _stop(self) -> None:
        """Ends the loop: aborts everything, also what clients queued meanwhile."""
        self._abort_engine_requests()
        with self._cond:  # from here on, a new request starts a new loop thread
            leftovers = list(self._inbox)
            self._inbox.clear()
            streams, self._streams = list(self._streams.values()), {}
            self._thread = None
        for kind, arg in leftovers:
            if kind == "call":  # still the owner: answer it
                self._run_command(kind, arg)
        for stream in streams:
            stream._put(EngineStopped("the engine was shut down before the request finished"))

    def _run_command(self, kind: str, arg) -> None:
        engine = self.engine
        if kind == "add":
            try:
                engine.add_requests(arg)
            except Exception as e:  # noqa: BLE001 - validated before; fail these requests only
                for r in arg:
                    self._finish_stream(r.request_id, e)
        elif kind == "abort":
            delta = engine.abort(arg)
            if delta is not None:
                self._deliver([delta])
        else:
            fn, future = arg
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(engine))
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    future.set_exception(e)

    def _deliver(self, deltas: Sequence[StreamDelta]) -> None:
        for delta in deltas:
            if delta.is_finished:
                self._finish_stream(delta.request_id, delta)
            else:
                with self._cond:
                    stream = self._streams.get(delta.request_id)
                if stream is not None:
                    stream._put(delta)

    def _finish_stream(self, request_id: str, item) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._put(item)

    def _abort_engine_requests(self) -> list:
        """Aborts (frees) every request the engine holds; returns their ids."""
        request_ids = list(self.engine.requests)
        for request_id in request_ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the pages are what matters; keep going
                pass
        return request_ids

    def _fail_in_flight(self, error: BaseException) -> None:
        """Ends the streams of the requests the engine held when a step failed.

        Requests still in the inbox (added during the failed step) are not touched:
        they run next.
        """
        for request_id in self._abort_engine_requests():
            self._finish_stream(request_id, error)


_LIVE: "weakref.WeakSet[AsyncEngine]" = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    for engine in list(_LIVE):
        engine.shutdown(timeout=5.0)
