"""The serving core that the HTTP and gRPC front ends share (layer 6; no jax).

Path: client -> http_server.py / grpc_server.py -> **ServingEngine** -> AsyncEngine
(engine/async_engine.py: one loop thread owns the engine) -> engine. A front end only
parses its wire format; everything both must do the same way lives here:

- errors: `ServingError` subclasses carry the HTTP status, the gRPC status code name,
  the OpenAI error `type` and the offending `param`, so a bad field is a 400 /
  INVALID_ARGUMENT naming it on both wires;
- sampling defaults from the model folder's generation_config.json (explicit request
  fields override them: `sampling_params`);
- request limits, all checked before the engine sees the request (prompt tokens <=
  max_model_len - max_tokens, n x max_tokens <= max_generated_tokens_per_request, the
  number and length of stop strings, n; logit_bias entries in SamplingParams);
- admission control: at most `max_num_seqs + max_queued_requests` requests (samples)
  in the engine; beyond that `Overloaded` (429 / RESOURCE_EXHAUSTED) at once, and a
  full server refuses before reading or parsing the body (`check_capacity`). An
  admitted request is never dropped;
- logs: never the API key; prompt text only when `log_prompts` is set;
- the life cycle: starting -> ready (after the warm-up) -> draining (SIGTERM: new
  requests get `Unavailable`, 503 / UNAVAILABLE) -> stopped;
- `generate`: submit, stream the deltas of every sample, abort on cancellation or
  disconnect (the pages are freed within one engine step), record the metrics;
- `check_api_key`: constant-time comparison.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import time
import uuid
from typing import AsyncIterator, Optional, Sequence, Union

from jaxinfer.config import SamplingParams
from jaxinfer.engine.errors import EngineStopped, RequestFailed, SlowReader
from jaxinfer.engine.validation import NewRequest
from jaxinfer.types import StreamDelta

log = logging.getLogger("jaxinfer.serving")

class ServingError(Exception):
    """An error answered to the client; subclasses fix the status codes."""

    http_status = 500
    grpc_code = "INTERNAL"  # name of a grpc.StatusCode member
    error_type = "InternalServerError"

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    http_status, grpc_code, error_type = 400, "INVALID_ARGUMENT", "BadRequestError"


class Unauthorized(ServingError):
    http_status, grpc_code, error_type = 401, "UNAUTHENTICATED", "AuthenticationError"


class NotFound(ServingError):
    http_status, grpc_code, error_type = 404, "NOT_FOUND", "NotFoundError"


class Overloaded(ServingError):
    http_status, grpc_code, error_type = 429, "RESOURCE_EXHAUSTED", "RateLimitError"


class Unavailable(ServingError):
    http_status, grpc_code, error_type = 503, "UNAVAILABLE", "ServiceUnavailableError"


class RequestError(ServingError):
    """The engine failed this request (500 / INTERNAL); the server goes on serving others."""


def engine_error(error: BaseException, request_id: str) -> BaseException:
    """An error raised by one request's engine stream -> what its client gets.

    A request the engine failed alone (RequestFailed: a NaN / Inf in its logits) is a
    500 / INTERNAL with the engine's message (it names the request and the reason); an
    exception from the step the request was part of (the engine aborted that step's
    requests and goes on) is a 500 / INTERNAL naming the request and the exception's
    type, never its internals (those go to the log); a stopped engine is a 503. A
    ServingError or a cancellation is returned as it is.
    """
    if isinstance(error, ServingError) or not isinstance(error, Exception):
        return error
    if isinstance(error, RequestFailed):
        log.warning("request_id=%s failed: %s", request_id, error)
        return RequestError(str(error))
    if isinstance(error, EngineStopped):
        return Unavailable("the server is shutting down")
    if isinstance(error, SlowReader):
        return RequestError(f"request {request_id} was aborted: its reader fell too far behind")
    log.error("request_id=%s failed with its engine step", request_id, exc_info=error)
    return RequestError(f"request {request_id} failed: the engine step it was part of raised "
                        f"{type(error).__name__}; the server goes on serving other requests, retry it")


def invalid_from_value_error(error: ValueError, prefix: str = "") -> InvalidRequest:
    """A ValueError of the form "field: message" -> InvalidRequest naming the field."""
    message = str(error)
    field = message.split(":", 1)[0].strip() if ":" in message else None
    if field and (" " in field or len(field) > 64):  # not a field name
        field = None
    if field and prefix:
        field = f"{prefix}.{field}"
    return InvalidRequest(f"{prefix + '.' if prefix and field else ''}{message}", param=field)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """Limits and policies of `jaxinfer serve` (the flags of the same names)."""

    model_name: str = "tiny-code"  # the id clients pass as `model` and /v1/models lists
    api_key: Optional[str] = None  # required as a bearer token on every endpoint but health
    max_queued_requests: int = 256  # waiting requests beyond the running slots
    max_request_body_bytes: int = 4 << 20  # HTTP bodies / gRPC messages at most
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    # a streaming client that falls this many deltas behind is cut off
    max_buffered_deltas: int = 4096
    # n x max_tokens of one request at most (refused naming "n" or "max_tokens" before any work)
    max_generated_tokens_per_request: int = 1 << 16
    # write each request's prompt text in the log (off by default: prompts may be private)
    log_prompts: bool = False
    # programs compiled before ready (InferenceSession.warmup): "profile" = those earlier
    # servers of this model and setup compiled; "grid" = those plus every unmixed step
    # bucket up to warmup_context_tokens (None = max_model_len); "none" = neither
    warmup: str = "profile"
    warmup_context_tokens: Optional[int] = None

    def __post_init__(self):
        if self.warmup not in ("profile", "grid", "none"):
            raise ValueError(f"warmup: expected 'profile', 'grid' or 'none', got {self.warmup!r}")
        if self.warmup_context_tokens is not None and (
                isinstance(self.warmup_context_tokens, bool) or not isinstance(self.warmup_context_tokens, int)
                or self.warmup_context_tokens < 1):
            raise ValueError(f"warmup_context_tokens: must be a positive int or None, got "
                             f"{self.warmup_context_tokens!r}")
        if not isinstance(self.log_prompts, bool):
            raise ValueError(f"log_prompts: must be a bool, got {self.log_prompts!r}")
        for name in ("max_queued_requests", "max_request_body_bytes", "max_stop_strings",
                     "max_stop_string_chars", "max_buffered_deltas", "max_generated_tokens_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_queued_requests"
                                                                                  else 1):
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not (isinstance(self.drain_timeout_s, (int, float)) and self.drain_timeout_s >= 0):
            raise ValueError(f"drain_timeout_s: must be a number >= 0, got {self.drain_timeout_s!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key: must be a non-empty string or None")


@dataclasses.dataclass
class SampleResult:
    """What `ServingEngine.generate` yields: one sample's delta, tagged with its index."""

    index: int  # sample index within the request (0 .. n - 1)
    delta: StreamDelta


class ServingEngine:
    """One model behind a server: an InferenceSession plus the serving policies.

    Args:
      session: the loaded InferenceSession (its AsyncEngine serves every request).
      config: ServingConfig.
      metrics: optional ServingMetrics (serving/metrics.py) to record into.
    """

    def __init__(self, session, config: ServingConfig, metrics=None):
        self.session = session
        self.config = config
        self.metrics = metrics
        self.tokenizer = session.tokenizer
        self.max_model_len = session.max_model_len
        self.defaults = dict(session.generation_defaults)
        self.capacity = session.engine.config.max_num_seqs + config.max_queued_requests
        session.async_engine.max_buffered_deltas = config.max_buffered_deltas
        self._lock = threading.Lock()
        self._in_flight = 0  # admitted samples not yet finished
        self._idle = threading.Condition(self._lock)
        self.state = "starting"  # starting -> ready -> draining -> stopped
        self.warmup_seconds: Optional[float] = None
        self.warmup_report: Optional[dict] = None  # InferenceSession.warmup's, when config.warmup != "none"
        self.started_at = time.time()

    # ------------------------------------------------------------------ life cycle

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    def warm_up(self) -> float:
        """Compiles the step programs of `config.warmup` (InferenceSession.warmup), then
        runs a short request (prefill + decode; greedy and the model's default sampling)
        through the whole path; returns seconds."""
        start = time.perf_counter()
        if self.config.warmup != "none":
            self.warmup_report = self.session.warmup(grid=self.config.warmup == "grid",
                                                     context_tokens=self.config.warmup_context_tokens)
        prompt = [self.tokenizer.bos_token_id or 0] if self.tokenizer is not None else [0]
        # The model's default sampling (what requests that leave the fields out use) and greedy.
        for params in (self.session.default_sampling_params(max_tokens=3, ignore_eos=True, seed=0),
                       SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)):
            self.session.generate([prompt + [0] * 3], params)
        self.session.reset_prefix_cache()
        self.warmup_seconds = time.perf_counter() - start
        self.state = "ready"
        return self.warmup_seconds

    def begin_drain(self) -> None:
        """Stops admitting; what is in flight keeps running."""
        with self._lock:
            if self.state in ("starting", "ready"):
                self.state = "draining"

    def wait_idle(self, timeout: float) -> bool:
        """Waits until nothing is in flight (True) or `timeout` seconds passed (False)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.5))
        return True

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    # ------------------------------------------------------------------ checks

    def check_api_key(self, presented: Optional[str]) -> None:
        """Raises Unauthorized unless `presented` (the bearer token) equals the key."""
        key = self.config.api_key
        if key is None:
            return
        if presented is None or not hmac.compare_digest(presented.encode("utf-8", "surrogatepass"),
                                                        key.encode("utf-8")):
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')",
                               param="authorization")

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.config.model_name:
            raise NotFound(f"model: the model {model!r} does not exist; this server serves "
                           f"{self.config.model_name!r}", param="model")

    def sampling_params(self, fields: dict) -> SamplingParams:
        """SamplingParams from the model's defaults overridden by the request's fields.

        Fields whose value is None are left to the defaults.
        Raises:
          InvalidRequest: naming the field.
        """
        merged = dict(self.defaults)
        merged.update({k: v for k, v in fields.items() if v is not None})
        stop = merged.get("stop")
        if isinstance(stop, (list, tuple)):
            if len(stop) > self.config.max_stop_strings:
                raise InvalidRequest(f"stop: at most {self.config.max_stop_strings} stop strings, got {len(stop)}",
                                     param="stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not isinstance(stop, (list, tuple)):
            raise InvalidRequest(f"stop: must be a string or a list of strings, got {type(stop).__name__}",
                                 param="stop")
        for s in stop or ():
            if isinstance(s, str) and len(s) > self.config.max_stop_string_chars:
                raise InvalidRequest(f"stop: stop strings may have at most {self.config.max_stop_string_chars} "
                                     f"characters, got {len(s)}", param="stop")
        try:
            params = SamplingParams(**merged)
        except ValueError as e:
            raise invalid_from_value_error(e) from None
        except TypeError as e:  # an unknown field
            raise InvalidRequest(str(e)) from None
        limits = getattr(self.session.engine, "limits", None)
        if params.early_exit_threshold is not None and not getattr(limits, "early_exit", False):
            raise InvalidRequest("early_exit_threshold: this model is not served depth-wise (a recursive model "
                                 "folder, depthwise_batching not off)", param="early_exit_threshold")
        return params

    def encode(self, prompt: Union[str, Sequence[int]], field: str = "prompt") -> list:
        """Text or token ids -> token ids (ids are range-checked by the engine)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest(f"{field}: this model has no tokenizer; send token ids", param=field)
            if not prompt:
                raise InvalidRequest(f"{field}: the prompt is empty", param=field)
            return list(self.tokenizer.encode(prompt))
        ids = list(prompt)
        if not ids:
            raise InvalidRequest(f"{field}: the prompt is empty", param=field)
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise InvalidRequest(f"{field}: token ids must be ints, got {t!r}", param=field)
            if not 0 <= t < self.session.model_config.vocab_size:
                raise InvalidRequest(f"{field}: token id {t} is outside the vocabulary "
                                     f"[0, {self.session.model_config.vocab_size})", param=field)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise InvalidRequest("tokens: this model has no tokenizer", param="tokens")
        try:
            return self.tokenizer.decode(list(ids))
        except ValueError as e:
            raise InvalidRequest(f"tokens: {e}", param="tokens") from None

    def check_length(self, prompt_ids: Sequence[int], params: SamplingParams, field: str = "prompt") -> None:
        """Prompt tokens + max_tokens must fit max_model_len (a 400 naming the field)."""
        limit = self.max_model_len
        if len(prompt_ids) >= limit:
            raise InvalidRequest(f"{field}: the prompt has {len(prompt_ids)} tokens; this model's maximum context "
                                 f"length is {limit} tokens", param=field)
        n = getattr(params, "n", 1)
        budget = self.config.max_generated_tokens_per_request
        if n * params.max_tokens > budget:
            field_name = "n" if n > 1 else "max_tokens"
            raise InvalidRequest(f"{field_name}: n x max_tokens = {n} x {params.max_tokens} is more than this "
                                 f"server's limit of {budget} generated tokens per request", param=field_name)
        if len(prompt_ids) + params.max_tokens > limit:
            raise InvalidRequest(f"max_tokens: {params.max_tokens} tokens requested, but the prompt has "
                                 f"{len(prompt_ids)} tokens and this model's maximum context length is {limit}; "
                                 f"ask for at most {limit - len(prompt_ids)}", param="max_tokens")

    # ------------------------------------------------------------------ requests

    def check_capacity(self) -> None:
        """Refuses at once (before the body is read or parsed) when not even one sample fits."""
        self._admit(1, reserve=False)

    def _admit(self, num: int, reserve: bool = True) -> None:
        with self._lock:
            if self.state != "ready":
                error = Unavailable("the server is shutting down" if self.state != "starting"
                                    else "the server is still warming up")
            elif self._in_flight + num > self.capacity:
                error = Overloaded(f"too many requests: {self._in_flight} in flight, room for {self.capacity} "
                                   f"(max_num_seqs + max_queued_requests); retry later")
            else:
                if reserve:
                    self._in_flight += num
                return
        # Counted here, once for both front ends (health checks that answer 503 are not refusals).
        if self.metrics is not None:
            self.metrics.observe_rejected(type(error).__name__.lower())
        raise error

    def _release(self, num: int) -> None:
        with self._idle:
            self._in_flight -= num
            self._idle.notify_all()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: Optional[str] = None,
               priority: int = 0, cache_salt: Optional[str] = None) -> "Submission":
        """Admits and queues one request (its `n` samples); raises ServingError subclasses."""
        self.check_length(prompt_ids, params)
        num = getattr(params, "n", 1)
        self._admit(num)
        request_id = request_id or uuid.uuid4().hex
        if self.config.log_prompts:  # only on request: prompts may be private
            text = self.tokenizer.decode(list(prompt_ids)) if self.tokenizer is not None else list(prompt_ids)
            log.info("request_id=%s prompt=%r", request_id, text)
        try:
            streams = self.session.async_engine.add_requests(
                [NewRequest(prompt_ids=tuple(prompt_ids), params=params, request_id=request_id,
                            priority=priority, cache_salt=cache_salt)])
        except ValueError as e:
            self._release(num)
            raise invalid_from_value_error(e) from None
        except BaseException:
            self._release(num)
            raise
        return Submission(self, request_id, list(prompt_ids), params, streams, num)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams, request_id: Optional[str] = None,
                       priority: int = 0, cache_salt: Optional[str] = None) -> AsyncIterator[SampleResult]:
        """Submits and yields SampleResults until every sample finished.

        Closing the iterator early (client gone, cancelled task) aborts every sample.
        """
        submission = self.submit(prompt_ids, params, request_id, priority, cache_salt)
        async for item in submission:
            yield item


class Submission:
    """The streams of one admitted request; async-iterate it for SampleResults."""

    def __init__(self, owner: ServingEngine, request_id: str, prompt_ids: list, params: SamplingParams,
                 streams: list, num: int):
        self.owner = owner
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.streams = streams
        self._num = num
        self._released = False
        self.outputs: list = [None] * len(streams)  # RequestOutput per sample, when finished
        self.arrival = time.perf_counter()

    def abort(self) -> None:
        for s in self.streams:
            s.abort()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.owner._release(self._num)

    async def __aiter__(self) -> AsyncIterator[SampleResult]:
        # Bounded: a client that stops reading stops the pumps, its RequestStreams fill up
        # and the engine cuts it off (AsyncEngine.max_buffered_deltas), never blocking.
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        metrics = self.owner.metrics

        async def pump(index: int, stream) -> None:
            last = time.perf_counter()
            first = True
            try:
                async for delta in stream:
                    now = time.perf_counter()
                    if metrics is not None and delta.token_ids:
                        if first:
                            metrics.observe_ttft(now - self.arrival)
                        else:
                            metrics.observe_itl((now - last) / len(delta.token_ids), len(delta.token_ids))
                        first = False
                        last = now
                    await queue.put(SampleResult(index, delta))
            except BaseException as e:  # noqa: BLE001 - handed to the reader
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise engine_error(item, self.request_id)
                if item.delta.is_finished:
                    self.outputs[item.index] = item.delta.output
                    if metrics is not None:
                        metrics.observe_finished(item.delta.output, time.perf_counter() - self.arrival)
                yield item
        finally:
            if remaining:
                self.abort()
            for t in tasks:
                t.cancel()
            self._release()
