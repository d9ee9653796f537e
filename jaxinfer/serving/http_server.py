"""The OpenAI-compatible HTTP front end of `jaxinfer serve` (layer 6; no jax).

    app = create_app(serving_engine)      # a FastAPI app; serve it with uvicorn

Path: client -> **this app** (parse, validate, format) -> ServingEngine (serving/core.py:
defaults, limits, admission, abort) -> AsyncEngine -> engine. The app only speaks the
wire format; every policy both front ends share lives in the serving core.

Endpoints (shaped as vLLM's OpenAI-compatible server):
- `POST /v1/completions`, `POST /v1/chat/completions` (plain JSON or `stream: true`
  server-sent events ending with `data: [DONE]`);
- `GET /v1/models`, `GET /v1/models/{id}`, `POST /tokenize`, `POST /detokenize`;
- `GET /health` (readiness: 200 when ready, 503 while starting or draining; no API
  key), `GET /live` (liveness: 200 from the moment the port answers, also while
  warming up and draining; no API key),
  `GET /version`, `GET /metrics` (Prometheus text).

Errors are `{"error": {"message", "type", "param", "code"}}` with the HTTP status of the
ServingError (400 naming the field, 401, 404, 413, 429, 503; 500 for a request the engine
failed, naming it and why, and for anything unexpected: logged, never a traceback). An error in
the middle of a stream is sent as one `data: {"error": ...}` event before `[DONE]`.

Every request gets an id (the client's `X-Request-Id`, else a fresh one), echoed in the
`X-Request-Id` response header and written in its log line (logger
"jaxinfer.serving.http": method, path, status, request id, tokens, seconds).

A client that goes away (mid-stream or while waiting for a plain response) aborts its
requests: their pages are freed within one engine step.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import re
import sys
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxinfer.config import MAX_TOP_LOGPROBS
from jaxinfer.serving import openai_protocol as proto
from jaxinfer.serving.chat_template import ChatTemplateError, load_chat_template
from jaxinfer.serving.core import InvalidRequest, NotFound, ServingEngine, ServingError, Unavailable
from jaxinfer.serving.metrics import CONTENT_TYPE

log = logging.getLogger("jaxinfer.serving.http")

_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_TASKS: set = set()  # strong references to the pump tasks while they run


class PayloadTooLarge(InvalidRequest):
    http_status = 413


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


def version() -> str:
    """The package's version (read from the loaded package: this layer may not import the facade)."""
    package_version = getattr(sys.modules.get("jaxinfer"), "__version__", None)
    if package_version:
        return package_version
    try:
        return importlib.metadata.version("jaxinfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def error_body(error: ServingError) -> dict:
    return {"error": {"message": error.message, "type": error.error_type, "param": error.param,
                      "code": error.http_status}}


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.http_status)


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n\n"


def _bearer(request: Request) -> Optional[str]:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    try:  # headers arrive as latin-1 text: a key sent as UTF-8 bytes is read back as such
        return token.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return token


def _spawn(coro) -> asyncio.Task:
    task = asyncio.ensure_future(coro)
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
    return task


class _FanIn:
    """The SampleResults of one request's submissions (one per prompt) as (prompt index, result).

    Each submission is read by its own task until its stream ends. `close()` is
    synchronous (it runs in cancelled scopes): it aborts every submission; the tasks
    then read the streams' final "abort" deltas and release the admission slots.
    """

    def __init__(self, submissions: list):
        self.submissions = submissions
        self._queue: asyncio.Queue = asyncio.Queue()
        for i, submission in enumerate(submissions):
            _spawn(self._pump(i, submission))

    async def _pump(self, index: int, submission) -> None:
        try:
            async for result in submission:
                self._queue.put_nowait((index, result))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait((index, e))
        finally:
            self._queue.put_nowait((index, None))

    async def __aiter__(self):
        remaining = len(self.submissions)
        while remaining:
            index, item = await self._queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def close(self) -> None:
        for submission in self.submissions:
            submission.abort()


class _EventStream(StreamingResponse):
    """A StreamingResponse that aborts its requests however it ends (also when the client
    left before the body generator ever ran, so its own `finally` never does)."""

    def __init__(self, content, fan: _FanIn, **kwargs):
        super().__init__(content, **kwargs)
        self._fan = fan

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._fan.close()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _RequestLog:
    """ASGI middleware: the request id (X-Request-Id in and out) and one log line per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = [500]
        start = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                   (b"x-request-id", request_id.encode("latin-1"))]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            level = logging.DEBUG if path in ("/health", "/live", "/metrics") else logging.INFO
            log.log(level, "method=%s path=%s status=%s request_id=%s prompt_tokens=%s completion_tokens=%s "
                    "outcome=%s seconds=%.3f", scope.get("method"), path, status[0], request_id,
                    state.get("prompt_tokens", 0), state.get("completion_tokens", 0), state.get("outcome", "done"),
                    time.perf_counter() - start)


class _Server:
    """The endpoints over one ServingEngine."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine
        self.name = engine.config.model_name
        self.texts = proto.TokenTexts(engine.tokenizer)
        self.template, self.template_error = None, None
        try:
            self.template = load_chat_template(getattr(engine.session, "model_path", None))
        except (OSError, ValueError) as e:
            self.template_error = str(e)
            log.warning("the chat template cannot be used: %s", e)

    # ------------------------------------------------------------------ plumbing

    def route(self, handler, auth: bool = True):
        async def endpoint(request: Request):
            try:
                if auth:
                    self.engine.check_api_key(_bearer(request))
                return await handler(request)
            except ServingError as e:
                request.state.outcome = "refused"
                return error_response(e)
            except (_ClientGone, ClientDisconnect):
                request.state.outcome = "disconnected"
                return Response(status_code=499)
            except Exception:
                log.exception("request_id=%s unexpected error", request.state.request_id)
                request.state.outcome = "error"
                return error_response(ServingError("internal server error"))
        endpoint.__name__ = handler.__name__
        return endpoint

    async def read_json(self, request: Request) -> dict:
        limit = self.engine.config.max_request_body_bytes
        too_large = PayloadTooLarge(f"body: the request body is larger than {limit} bytes", param="body")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise InvalidRequest("body: invalid Content-Length header", param="body")
            if int(length) > limit:
                raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return proto.loads(bytes(body))

    def submit(self, prompt_ids: list, params, request_id: str, req) -> _FanIn:
        """Admits every prompt (all or none) and returns their results' fan-in."""
        submissions = []
        try:
            for i, ids in enumerate(prompt_ids):
                submissions.append(self.engine.submit(ids, params, request_id=f"{request_id}-{i}",
                                                      priority=req.priority or 0, cache_salt=req.cache_salt))
        except BaseException:
            _FanIn(submissions).close()  # the admitted ones: aborted, read to their end, released
            raise
        return _FanIn(submissions)

    async def collect(self, request: Request, fan: _FanIn) -> dict:
        """{(prompt index, sample index): RequestOutput}; aborts when the client goes away."""
        async def run():
            outputs = {}
            async for p, result in fan:
                if result.delta.is_finished:
                    outputs[(p, result.index)] = result.delta.output
            return outputs

        job, watch = asyncio.ensure_future(run()), asyncio.ensure_future(_until_disconnect(request))
        try:
            done, _ = await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not job.done():  # the client left (or this handler was cancelled)
                fan.close()
                job.cancel()
            watch.cancel()
        if job not in done:
            raise _ClientGone()
        return job.result()

    def stream(self, request: Request, fan: _FanIn, chunks, prompt_tokens: int) -> StreamingResponse:
        """Server-sent events of `chunks` (an async generator of dicts), errors as events, then [DONE]."""
        state = request.state

        async def events():
            state.prompt_tokens = prompt_tokens
            try:
                async for chunk in chunks:
                    yield _sse(chunk)
            except ServingError as e:
                state.outcome = "error"
                yield _sse(error_body(e))
            except Exception:  # noqa: BLE001 - the client gets a generic error event
                log.exception("request_id=%s unexpected error while streaming", state.request_id)
                state.outcome = "error"
                yield _sse(error_body(ServingError("internal server error")))
            except BaseException:  # cancelled: the client went away
                state.outcome = "disconnected"
                raise
            finally:
                fan.close()
            yield "data: [DONE]\n\n"

        return _EventStream(events(), fan, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def parse_generation(self, data: dict, model: type, kind: str):
        proto.refuse_unsupported(data, kind)
        req = proto.parse(model, data)
        self.engine.check_model(req.model)
        req.check_stream_options()
        return req

    # ------------------------------------------------------------------ completions

    async def completions(self, request: Request):
        self.engine.check_capacity()  # a full server refuses before reading the body
        req = self.parse_generation(await self.read_json(request), proto.CompletionRequest, "completions")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise InvalidRequest("best_of: only best_of equal to n is supported", param="best_of")
        if req.stream and req.echo and req.logprobs is not None:
            raise InvalidRequest("echo: echo with logprobs is not supported when streaming", param="echo")
        fields = req.sampling_fields()
        if req.logprobs is not None:
            fields["logprobs"] = req.logprobs
            fields["prompt_logprobs"] = bool(req.echo)
        params = self.engine.sampling_params(fields)
        prompt_list = proto.prompts(req.prompt)
        prompt_ids = [self.engine.encode(p, "prompt") for p in prompt_list]
        for ids in prompt_ids:
            self.engine.check_length(ids, params)
        n = getattr(params, "n", 1)
        echo = [p if isinstance(p, str) else self.engine.decode(ids) for p, ids in zip(prompt_list, prompt_ids)] \
            if req.echo else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        fan = self.submit(prompt_ids, params, rid, req)
        num_prompt_tokens = sum(len(ids) for ids in prompt_ids)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.name}
        if req.stream:
            chunks = proto.completion_chunks(fan, req, base, n, echo, num_prompt_tokens, self.texts, request.state)
            return self.stream(request, fan, chunks, num_prompt_tokens)
        outputs = await self.collect(request, fan)
        choices = proto.completion_choices(outputs, len(prompt_ids), n, echo, req.logprobs is not None, self.texts)
        num_completion_tokens = sum(len(out.token_ids) for out in outputs.values())
        request.state.prompt_tokens, request.state.completion_tokens = num_prompt_tokens, num_completion_tokens
        usage = proto.usage(num_prompt_tokens, num_completion_tokens, proto.cached_tokens(outputs))
        return JSONResponse({**base, "choices": choices, "usage": usage})

    # ------------------------------------------------------------------ chat

    def chat_text(self, messages: list, add_generation_prompt: bool, template_kwargs: Optional[dict]) -> str:
        if self.template is None:
            why = self.template_error or ("it has no chat template (tokenizer_config.json 'chat_template' or "
                                          "chat_template.jinja)")
            raise InvalidRequest(f"messages: the model {self.name!r} cannot serve chat requests: {why}; use "
                                 f"/v1/completions with a prompt instead", param="messages")
        if self.engine.tokenizer is None:
            raise InvalidRequest("messages: this model has no tokenizer", param="messages")
        try:
            return self.template.render(proto.chat_messages(messages), add_generation_prompt=add_generation_prompt,
                                        **(template_kwargs or {}))
        except ChatTemplateError as e:
            raise InvalidRequest(f"messages: {e}", param="messages") from None

    async def chat(self, request: Request):
        self.engine.check_capacity()  # a full server refuses before reading the body
        req = self.parse_generation(await self.read_json(request), proto.ChatCompletionRequest, "chat")
        text = self.chat_text(req.messages, req.add_generation_prompt is not False, req.chat_template_kwargs)
        prompt_ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
        if not prompt_ids:
            raise InvalidRequest("messages: the rendered prompt is empty", param="messages")
        fields = req.sampling_fields()
        if req.max_completion_tokens is not None:
            fields["max_tokens"] = req.max_completion_tokens
        if fields["max_tokens"] is None:  # as vLLM: the rest of the context
            fields["max_tokens"] = max(1, self.engine.max_model_len - len(prompt_ids))
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs: requires logprobs to be true", param="top_logprobs")
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs: must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        if req.logprobs:
            fields["logprobs"] = req.top_logprobs or True
        params = self.engine.sampling_params(fields)
        self.engine.check_length(prompt_ids, params, field="messages")
        n = getattr(params, "n", 1)
        last = req.messages[-1]
        prefix = last["content"] if req.echo and last.get("role") == "assistant" and isinstance(
            last.get("content"), str) else ""
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        fan = self.submit([prompt_ids], params, rid, req)
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.name}
        num_top = req.top_logprobs or 0
        if req.stream:
            base["object"] = "chat.completion.chunk"
            chunks = proto.chat_chunks(fan, req, base, n, prefix, len(prompt_ids), num_top, self.texts,
                                       request.state)
            return self.stream(request, fan, chunks, len(prompt_ids))
        outputs = await self.collect(request, fan)
        choices = proto.chat_choices(outputs, n, prefix, req.logprobs, num_top, self.texts)
        num_completion_tokens = sum(len(out.token_ids) for out in outputs.values())
        request.state.prompt_tokens, request.state.completion_tokens = len(prompt_ids), num_completion_tokens
        usage = proto.usage(len(prompt_ids), num_completion_tokens, proto.cached_tokens(outputs))
        return JSONResponse({**base, "choices": choices, "usage": usage})

    # ------------------------------------------------------------------ small endpoints

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": int(self.engine.started_at), "owned_by": "jaxinfer",
                "root": getattr(self.engine.session, "model_path", None) or self.name, "parent": None,
                "max_model_len": self.engine.max_model_len}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request):
        self.engine.check_model(request.path_params["model_id"])
        return JSONResponse(self.model_card())

    async def tokenize(self, request: Request):
        req = proto.parse(proto.TokenizeRequest, await self.read_json(request))
        self.engine.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("prompt: give either a prompt or messages", param="prompt")
        if self.engine.tokenizer is None:
            raise InvalidRequest("prompt: this model has no tokenizer", param="prompt")
        if req.messages is not None:
            text = self.chat_text(req.messages, req.add_generation_prompt is not False, None)
            ids = self.engine.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        else:
            ids = self.engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request):
        req = proto.parse(proto.DetokenizeRequest, await self.read_json(request))
        self.engine.check_model(req.model)
        if req.tokens:
            self.engine.encode(req.tokens, "tokens")  # range check
        return JSONResponse({"prompt": self.engine.decode(req.tokens)})

    async def health(self, request: Request):
        if self.engine.is_ready:
            return Response(status_code=200)
        raise Unavailable("the server is still warming up" if self.engine.state == "starting"
                          else f"the server is {self.engine.state}")

    async def live(self, request: Request):
        return Response(status_code=200)

    async def version(self, request: Request):
        return JSONResponse({"version": version()})

    async def metrics(self, request: Request):
        if self.engine.metrics is None:
            raise NotFound("metrics are not enabled on this server")
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE)


def create_app(engine: ServingEngine) -> FastAPI:
    """The FastAPI app serving `engine` (OpenAI-compatible; see the module docstring)."""
    server = _Server(engine)
    app = FastAPI(title="jaxinfer", version=version(), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    for path, handler, methods, auth in (
            ("/v1/completions", server.completions, ["POST"], True),
            ("/v1/chat/completions", server.chat, ["POST"], True),
            ("/v1/models", server.models, ["GET"], True),
            ("/v1/models/{model_id:path}", server.model, ["GET"], True),
            ("/tokenize", server.tokenize, ["POST"], True),
            ("/detokenize", server.detokenize, ["POST"], True),
            ("/health", server.health, ["GET"], False),
            ("/live", server.live, ["GET"], False),
            ("/version", server.version, ["GET"], True),
            ("/metrics", server.metrics, ["GET"], True)):
        app.add_api_route(path, server.route(handler, auth=auth), methods=methods, include_in_schema=False)

    async def http_error(request: Request, exc: StarletteHTTPException):
        error = ServingError(str(exc.detail))
        error.http_status = exc.status_code
        error.error_type = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code,
                                                                                   "BadRequestError")
        return error_response(error)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(_RequestLog)
    return app
