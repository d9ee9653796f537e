"""The gRPC front end of `jaxinfer serve` (layer 6; talks to the ServingEngine only, no jax).

One grpc.aio server carries:
- `jetstream_proto.Orchestrator` (protos/jetstream.proto): JetStream's API, so its
  clients and benchmarks run unchanged. Decode streams, per message, the new text and
  token ids of each sample; every sampling parameter but max_tokens is the model's
  default (generation_config.json).
- `jaxinfer.v1.Generation` (protos/jaxinfer.proto): every sampling parameter, log-probs,
  finish reasons, usage; Tokenize, Detokenize, ModelInfo.
- `grpc.health.v1.Health`: SERVING once the engine is ready; `set_serving` flips it
  (the runner calls it when warm-up ends and when draining begins).
- server reflection, listing all of them (for grpcurl and friends).

Policies, the same as the HTTP front end's (serving/core.py does the work):
- the API key: when ServingConfig.api_key is set, every method but the two health
  checks needs metadata `authorization: Bearer <key>` (UNAUTHENTICATED otherwise);
- messages larger than ServingConfig.max_request_body_bytes are refused;
- every ServingError is answered with its status code (`err.grpc_code`) and a message
  naming the field, also named in the trailing metadata `error-param` (a request the
  engine failed, core.RequestError, is INTERNAL naming it and why); anything else is
  INTERNAL, logged here with its traceback but never sent;
- a client that cancels or whose deadline passes gets its request aborted: grpc.aio
  cancels the handler task, and the handler closes the request's stream, which aborts
  every sample and frees its KV pages within one engine step;
- one log line per call (logger "jaxinfer.serving.grpc"): method, request id (metadata
  `x-request-id` when sent, echoed in the initial metadata, or with an error in the trailing metadata), status, tokens, seconds.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
import weakref
from typing import Callable, Optional

import grpc
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxinfer.config import MAX_TOP_LOGPROBS, SamplingParams
from jaxinfer.serving.core import InvalidRequest, ServingEngine, ServingError, Unauthorized
from jaxinfer.serving.protos import jaxinfer_pb2 as pb
from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
from jaxinfer.serving.protos import jetstream_pb2 as js
from jaxinfer.serving.protos import jetstream_pb2_grpc as js_grpc

log = logging.getLogger("jaxinfer.serving.grpc")

ORCHESTRATOR = js.DESCRIPTOR.services_by_name["Orchestrator"].full_name  # jetstream_proto.Orchestrator
GENERATION = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # jaxinfer.v1.Generation
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name  # grpc.health.v1.Health
# Methods answered without the API key.
OPEN_METHODS = frozenset({f"/{HEALTH}/Check", f"/{HEALTH}/Watch", f"/{ORCHESTRATOR}/HealthCheck"})

_FINISH_REASONS = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "eos": pb.FINISH_REASON_EOS,
                   "abort": pb.FINISH_REASON_ABORT}
# GenerateRequest's optional scalars, named as SamplingParams' fields.
_SCALAR_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "ignore_eos", "logprobs",
                           "prompt_logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                           "min_tokens", "n")


# ---------------------------------------------------------------------- per-call helpers


def _metadata_value(metadata, key: str) -> Optional[str]:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k.lower() == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


def _bearer_token(metadata) -> Optional[str]:
    value = _metadata_value(metadata, "authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _log_call(method: str, request_id: str, status: str, tokens: int, seconds: float) -> None:
    level = logging.DEBUG if method == "HealthCheck" else logging.INFO  # probes would flood the log
    log.log(level, "grpc %s request_id=%s status=%s tokens=%d seconds=%.3f", method, request_id, status, tokens,
            seconds)


class _Call:
    """One RPC being served: its request id, and the figures of its log line."""

    def __init__(self, method: str, context):
        self.method = method
        self.context = context
        self.request_id = _metadata_value(context.invocation_metadata(), "x-request-id") or uuid.uuid4().hex
        self.start = time.perf_counter()
        self.tokens = 0  # generated tokens sent
        self._metadata_sent = False

    async def send_metadata(self) -> None:
        """The x-request-id echo, sent with the first response (a refused call sends none:
        its status and the id go out together as trailers, one write instead of two)."""
        if not self._metadata_sent:
            self._metadata_sent = True
            await self.context.send_initial_metadata((("x-request-id", self.request_id),))

    async def write(self, message) -> None:
        await self.send_metadata()
        await self.context.write(message)


async def _serve(engine: ServingEngine, method: str, context, body: Callable):
    """Runs `body(call)` with the error mapping, the request-id echo and the log line."""
    call = _Call(method, context)
    status, error = "OK", None
    try:
        result = await body(call)
        await call.send_metadata()
        return result
    except ServingError as e:
        status, error = e.grpc_code, e
    except grpc.aio.AbortError:  # the call was ended already
        status = "ABORTED"
        raise
    except asyncio.CancelledError:  # the client cancelled or its deadline passed
        remaining = context.time_remaining()  # the client's own deadline timer may fire a little earlier
        status = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0.5 else "CANCELLED"
        raise
    except Exception:  # noqa: BLE001 - logged here, never sent
        log.exception("grpc %s request_id=%s: unexpected error", method, call.request_id)
        status, error = "INTERNAL", ServingError(f"internal error (request id {call.request_id}); see the server log")
    finally:
        _log_call(method, call.request_id, status, call.tokens, time.perf_counter() - call.start)
    trailing = (("x-request-id", call.request_id),) + ((("error-param", error.param),) if error.param else ())
    await context.abort(grpc.StatusCode[error.grpc_code], error.message, trailing_metadata=trailing)


async def _stream(engine: ServingEngine, call: _Call, prompt_ids: list, params: SamplingParams,
                  emit: Callable, priority: int = 0, cache_salt: Optional[str] = None):
    """Submits the request and writes `emit(SampleResult)` messages (None = skip) as they come.

    However it ends (finished, error, cancellation by the client or its deadline), the
    request's stream is closed and unfinished samples are aborted, freeing their pages.
    Returns the Submission (its `outputs` hold each sample's RequestOutput).
    """
    submission = engine.submit(prompt_ids, params, request_id=uuid.uuid4().hex, priority=priority,
                               cache_salt=cache_salt)
    results = submission.__aiter__()  # no await between submit and the try: nothing can leak
    try:
        async for result in results:
            call.tokens += len(result.delta.token_ids)
            message = emit(result)
            if message is not None:
                await call.write(message)
    finally:
        await results.aclose()  # runs the submission's cleanup: abort, release the admission slot
        if any(o is None for o in submission.outputs):
            submission.abort()
    return submission


# ---------------------------------------------------------------------- JetStream


class OrchestratorServicer(js_grpc.OrchestratorServicer):
    """JetStream's Orchestrator over a ServingEngine."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine

    async def Decode(self, request, context):
        await _serve(self.engine, "Decode", context, lambda call: self._decode(call, request))

    async def _decode(self, call: _Call, request) -> None:
        engine = self.engine
        engine.check_capacity()  # a full server refuses before tokenizing
        kind = request.WhichOneof("content")
        if kind == "text_content":
            prompt_ids = engine.encode(request.text_content.text, "text_content.text")
        elif kind == "token_content":
            prompt_ids = engine.encode(list(request.token_content.token_ids), "token_content.token_ids")
        else:
            raise InvalidRequest("content: set text_content or token_content", param="content")
        if request.max_tokens <= 0:
            raise InvalidRequest(f"max_tokens: must be >= 1, got {request.max_tokens}", param="max_tokens")
        if request.num_samples < 0:
            raise InvalidRequest(f"num_samples: must be >= 0 (0 means 1), got {request.num_samples}",
                                 param="num_samples")
        num = request.num_samples or 1
        fields = {"max_tokens": request.max_tokens}
        if num != 1:
            if "n" not in SamplingParams.__dataclass_fields__:
                raise InvalidRequest("num_samples: this server generates one sample per request", param="num_samples")
            fields["n"] = num
        params = engine.sampling_params(fields)

        def emit(result):
            delta = result.delta
            if not delta.text and not delta.token_ids:
                return None
            samples = [js.DecodeResponse.StreamContent.Sample() for _ in range(num)]
            samples[result.index].text = delta.text
            samples[result.index].token_ids.extend(delta.token_ids)
            return js.DecodeResponse(stream_content=js.DecodeResponse.StreamContent(samples=samples))

        await _stream(engine, call, prompt_ids, params, emit)

    async def HealthCheck(self, request, context):
        async def body(call):
            return js.HealthCheckResponse(is_live=self.engine.is_ready)
        return await _serve(self.engine, "HealthCheck", context, body)


# ---------------------------------------------------------------------- jaxinfer.v1


def _sampling_fields(request) -> dict:
    """The SamplingParams fields a GenerateRequest sets (unset ones are left to the defaults)."""
    fields = {name: getattr(request, name) for name in _SCALAR_SAMPLING_FIELDS if request.HasField(name)}
    if request.stop:
        fields["stop"] = list(request.stop)
    if request.stop_token_ids:
        fields["stop_token_ids"] = list(request.stop_token_ids)
    if request.logit_bias:
        fields["logit_bias"] = dict(request.logit_bias)
    supported = SamplingParams.__dataclass_fields__
    for name in fields:
        if name not in supported:
            raise InvalidRequest(f"{name}: not supported by this server yet", param=name)
    return fields


def _top_logprobs(top) -> pb.TopLogprobs:
    items = top.items() if isinstance(top, dict) else top  # {id: log p} or ((id, log p), ...)
    ranked = sorted(items, key=lambda kv: -kv[1])
    return pb.TopLogprobs(entries=[pb.TokenLogprob(token_id=int(t), logprob=float(lp)) for t, lp in ranked])


def _sample_delta(result) -> Optional[pb.GenerateResponse]:
    d = result.delta
    if not d.text and not d.token_ids and d.finish_reason is None:
        return None
    delta = pb.SampleDelta(index=result.index, text=d.text, token_ids=list(d.token_ids),
                           finish_reason=_FINISH_REASONS.get(d.finish_reason, pb.FINISH_REASON_UNSPECIFIED))
    if d.logprobs:
        delta.logprobs.extend(float(x) for x in d.logprobs)
    if d.top_logprobs:
        delta.top_logprobs.extend(_top_logprobs(top) for top in d.top_logprobs)
    return pb.GenerateResponse(delta=delta)


class GenerationServicer(pb_grpc.GenerationServicer):
    """jaxinfer.v1.Generation over a ServingEngine."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine

    async def Generate(self, request, context):
        await _serve(self.engine, "Generate", context, lambda call: self._generate(call, request))

    async def _generate(self, call: _Call, request) -> None:
        engine = self.engine
        engine.check_capacity()  # a full server refuses before tokenizing
        engine.check_model(request.model or None)
        kind = request.WhichOneof("prompt")
        if kind == "prompt_text":
            prompt_ids = engine.encode(request.prompt_text, "prompt_text")
        elif kind == "prompt_token_ids":
            prompt_ids = engine.encode(list(request.prompt_token_ids.ids), "prompt_token_ids")
        else:
            raise InvalidRequest("prompt: set prompt_text or prompt_token_ids", param="prompt")
        params = engine.sampling_params(_sampling_fields(request))
        submission = await _stream(engine, call, prompt_ids, params, _sample_delta,
                                   priority=request.priority if request.HasField("priority") else 0,
                                   cache_salt=request.cache_salt if request.HasField("cache_salt") else None)
        outputs = [o for o in submission.outputs if o is not None]
        completion = sum(o.num_generated_tokens for o in outputs)
        first = submission.outputs[0] if submission.outputs else None  # sample 0 holds the prompt's cache hit
        summary = pb.Summary(usage=pb.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                                            total_tokens=len(prompt_ids) + completion,
                                            cached_tokens=first.num_cached_tokens if first is not None else 0),
                             request_id=call.request_id)
        if outputs and outputs[0].prompt_logprobs:
            summary.prompt_logprobs.extend(float(x) for x in outputs[0].prompt_logprobs if x is not None)
        await call.write(pb.GenerateResponse(summary=summary))

    def _tokenizer(self, field: str):
        if self.engine.tokenizer is None:
            raise InvalidRequest(f"{field}: this model has no tokenizer", param=field)
        return self.engine.tokenizer

    async def Tokenize(self, request, context):
        async def body(call):
            tokenizer = self._tokenizer("text")
            add = request.add_special_tokens if request.HasField("add_special_tokens") else True
            try:
                ids = list(tokenizer.encode(request.text, add_special_tokens=add))
            except ValueError as e:
                raise InvalidRequest(f"text: {e}", param="text") from None
            pieces = [p if p is not None else "" for p in tokenizer.convert_ids_to_tokens(ids)]
            return pb.TokenizeResponse(token_ids=ids, pieces=pieces)
        return await _serve(self.engine, "Tokenize", context, body)

    async def Detokenize(self, request, context):
        async def body(call):
            tokenizer = self._tokenizer("token_ids")
            vocab = self.engine.session.model_config.vocab_size
            for t in request.token_ids:
                if not 0 <= t < vocab:
                    raise InvalidRequest(f"token_ids: token id {t} is outside the vocabulary [0, {vocab})",
                                         param="token_ids")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            try:
                text = tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
            except ValueError as e:
                raise InvalidRequest(f"token_ids: {e}", param="token_ids") from None
            return pb.DetokenizeResponse(text=text)
        return await _serve(self.engine, "Detokenize", context, body)

    async def ModelInfo(self, request, context):
        async def body(call):
            engine = self.engine
            model_config = engine.session.model_config
            tokenizer = engine.tokenizer
            p = engine.sampling_params({})
            defaults = pb.SamplingDefaults(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                           top_p=p.top_p, min_p=p.min_p)
            if getattr(p, "repetition_penalty", None) is not None:
                defaults.repetition_penalty = p.repetition_penalty
            eos = (tokenizer.eos_token_ids if tokenizer is not None else ()) or model_config.eos_token_ids
            info = pb.ModelInfoResponse(model_name=engine.config.model_name, max_model_len=engine.max_model_len,
                                        vocab_size=model_config.vocab_size, eos_token_ids=list(eos),
                                        has_tokenizer=tokenizer is not None, defaults=defaults,
                                        max_top_logprobs=MAX_TOP_LOGPROBS, is_ready=engine.is_ready)
            if tokenizer is not None and tokenizer.bos_token_id is not None:
                info.bos_token_id = tokenizer.bos_token_id
            return info
        return await _serve(self.engine, "ModelInfo", context, body)


# ---------------------------------------------------------------------- the server


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every method but the health checks without `authorization: Bearer <key>`;
    a unary request that is not a valid message gets INVALID_ARGUMENT (not grpc's INTERNAL)."""

    def __init__(self, engine: ServingEngine):
        self.engine = engine

    async def intercept_service(self, continuation, details):
        handler = _strict_parsing(await continuation(details))
        if handler is None or self.engine.config.api_key is None or details.method in OPEN_METHODS:
            return handler
        metadata = details.invocation_metadata
        try:
            self.engine.check_api_key(_bearer_token(metadata))
        except Unauthorized as e:
            request_id = _metadata_value(metadata, "x-request-id") or uuid.uuid4().hex
            _log_call(details.method.rsplit("/", 1)[-1], request_id, e.grpc_code, 0, 0.0)
            return _refusing_handler(handler, grpc.StatusCode[e.grpc_code], e.message)
        return handler


def _strict_parsing(handler):
    """`handler` with the request parsed inside it: malformed bytes -> INVALID_ARGUMENT "request"."""
    if handler is None or handler.request_streaming or handler.request_deserializer is None:
        return handler
    parse = handler.request_deserializer
    behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary

    async def refuse(context, error: Exception) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request: not a valid protobuf message for this method ({type(error).__name__})",
                            trailing_metadata=(("error-param", "request"),))

    if handler.response_streaming and inspect.isasyncgenfunction(behavior):
        async def parsed(raw, context):
            try:
                request = parse(raw)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                await refuse(context, e)
            async for response in behavior(request, context):
                yield response
    else:
        async def parsed(raw, context):
            try:
                request = parse(raw)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                await refuse(context, e)
            return await behavior(request, context)

    make = grpc.unary_stream_rpc_method_handler if handler.response_streaming else grpc.unary_unary_rpc_method_handler
    return make(parsed, request_deserializer=None, response_serializer=handler.response_serializer)


def _refusing_handler(handler, code: grpc.StatusCode, message: str):
    """A handler of `handler`'s kind that answers `code` without reading the request."""
    async def refuse(request_or_iterator, context):
        await context.abort(code, message)

    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                  handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class _Health(grpc_health.aio.HealthServicer):
    """grpc.health.v1 for the overall server ("") and each of our services."""

    SERVICES = ("", ORCHESTRATOR, GENERATION)

    def __init__(self, serving: bool):
        super().__init__()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        # Before the server runs nothing can watch, so the status map is set directly
        # (what HealthServicer.set does when no one watches; `set` needs the loop).
        for name in self.SERVICES:
            self._server_status[name] = status

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.SERVICES:
            await self.set(name, status)


_HEALTH: "weakref.WeakKeyDictionary[grpc.aio.Server, _Health]" = weakref.WeakKeyDictionary()
_PORTS: "weakref.WeakKeyDictionary[grpc.aio.Server, int]" = weakref.WeakKeyDictionary()


def create_grpc_server(engine: ServingEngine, address: str, *, server_credentials=None) -> grpc.aio.Server:
    """A grpc.aio server for `engine` with its port added and every service registered.

    Not started: the caller awaits `server.start()` in its asyncio loop (and later
    `server.stop(grace)`), and calls `set_serving` when the engine becomes ready or
    starts draining. Health reports SERVING from the start when `engine.is_ready`.

    Args:
      engine: the ServingEngine (shared with the HTTP front end).
      address: "host:port" to listen on.
      server_credentials: grpc.ServerCredentials for TLS; None = plaintext.
    Raises:
      RuntimeError: the address cannot be bound.
    """
    limit = engine.config.max_request_body_bytes
    server = grpc.aio.server(interceptors=[_ApiKeyInterceptor(engine)],
                             options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.so_reuseport", 0)])  # a taken port is an error, not shared
    js_grpc.add_OrchestratorServicer_to_server(OrchestratorServicer(engine), server)
    pb_grpc.add_GenerationServicer_to_server(GenerationServicer(engine), server)
    health = _Health(engine.is_ready)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((ORCHESTRATOR, GENERATION, HEALTH, reflection.SERVICE_NAME), server)
    if server_credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials)
    if not port:
        raise RuntimeError(f"address: cannot listen on {address!r}")
    _HEALTH[server] = health
    _PORTS[server] = port
    return server


def bound_port(server: grpc.aio.Server) -> int:
    """The port `server` (made by create_grpc_server) listens on (the real one for port 0)."""
    return _PORTS[server]


async def set_serving(server: grpc.aio.Server, serving: bool) -> None:
    """Sets grpc.health.v1's status of `server` (made by create_grpc_server): SERVING or NOT_SERVING.

    Await it on the server's event loop (from another thread:
    `asyncio.run_coroutine_threadsafe(set_serving(server, False), loop)`).
    """
    await _HEALTH[server].set_serving(serving)
