"""Fuzzing the gRPC services (hypothesis) while a needle request runs beside them.

A real grpc.aio server on 127.0.0.1 (free port) over the shared session; the clients are
the generated stubs, plus generic calls with identity serializers for raw bytes.
Properties:
- `jaxinfer.v1.Generate` and JetStream's `Decode` with random field values (huge and
  negative ints, NaN / Infinity doubles, junk strings, out-of-vocabulary ids): each call
  either completes or fails with INVALID_ARGUMENT / NOT_FOUND, a message and the
  trailing `error-param` naming the field; never INTERNAL / UNKNOWN, never a hang;
- Tokenize / Detokenize with random fields: likewise;
- raw bytes to every unary-request method: bytes that do not parse as the request
  message are INVALID_ARGUMENT naming `request` (grpc's own answer would be INTERNAL);
  bytes that happen to parse are answered as that message;
- a needle Generate (greedy) that runs in a loop beside the fuzzing gets the tokens of a
  clean run every time; afterwards nothing is in flight and no page is used.
(The request messages have no enum fields; unknown field numbers and wrong wire types
come with the raw bytes.)
"""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import strategies as st

from jaxinfer.serving.protos import jaxinfer_pb2 as pb
from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
from jaxinfer.serving.protos import jetstream_pb2 as js
from jaxinfer.serving.protos import jetstream_pb2_grpc as js_grpc
from reliability_support import GrpcServer, make_engine, run_property, wait_idle

PROMPT = "def fib"
NEEDLE = PROMPT  # + NEEDLE_TOKENS <= 16 tokens: one KV page, the programs the warm-up compiled
NEEDLE_TOKENS = 10
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
INT32 = st.one_of(st.integers(-2 ** 31, -1), st.integers(0, 3), st.integers(2 ** 20, 2 ** 31 - 1))
COUNT = st.one_of(st.integers(-2 ** 31, 0), st.integers(1, 2), st.integers(129, 2 ** 31 - 1))  # max_tokens, n
DOUBLE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e308]))
TEXT = st.one_of(st.text(max_size=24).filter(lambda s: not any(0xD800 <= ord(c) < 0xE000 for c in s)),
                 st.sampled_from(["", "\x00", "🙂" * 8, PROMPT, "tiny-code"]))
# method -> (request class, response streaming)
METHODS = {
    "/jaxinfer.v1.Generation/Generate": (pb.GenerateRequest, True),
    "/jaxinfer.v1.Generation/Tokenize": (pb.TokenizeRequest, False),
    "/jaxinfer.v1.Generation/Detokenize": (pb.DetokenizeRequest, False),
    "/jaxinfer.v1.Generation/ModelInfo": (pb.ModelInfoRequest, False),
    "/jetstream_proto.Orchestrator/Decode": (js.DecodeRequest, True),
    "/jetstream_proto.Orchestrator/HealthCheck": (js.HealthCheckRequest, False),
}


@st.composite
def generate_requests(draw):
    request = pb.GenerateRequest()
    kind = draw(st.sampled_from(["text", "ids", "none"]))
    if kind == "text":
        request.prompt_text = draw(TEXT)
    elif kind == "ids":
        request.prompt_token_ids.ids.extend(draw(st.lists(INT32, max_size=6)))
    if draw(st.booleans()):
        request.model = draw(TEXT)
    for name, strategy in (("max_tokens", COUNT), ("n", COUNT), ("top_k", INT32), ("min_tokens", INT32),
                           ("logprobs", INT32), ("priority", INT32),
                           ("seed", st.integers(-2 ** 63, 2 ** 63 - 1)),
                           ("temperature", DOUBLE), ("top_p", DOUBLE), ("min_p", DOUBLE),
                           ("presence_penalty", DOUBLE), ("frequency_penalty", DOUBLE),
                           ("repetition_penalty", DOUBLE), ("ignore_eos", st.booleans()),
                           ("prompt_logprobs", st.booleans()), ("cache_salt", TEXT)):
        if draw(st.integers(0, 3)) == 0:
            setattr(request, name, draw(strategy))
    if draw(st.integers(0, 3)) == 0:
        request.stop.extend(draw(st.lists(TEXT, max_size=20)))
    if draw(st.integers(0, 3)) == 0:
        request.stop_token_ids.extend(draw(st.lists(INT32, max_size=4)))
    if draw(st.integers(0, 3)) == 0:
        for k, v in draw(st.dictionaries(INT32, st.floats(allow_nan=True, width=32), max_size=4)).items():
            request.logit_bias[k] = v
    return request


@st.composite
def decode_requests(draw):
    request = js.DecodeRequest(max_tokens=draw(COUNT), num_samples=draw(st.one_of(INT32, st.integers(0, 2))))
    kind = draw(st.sampled_from(["text", "ids", "none"]))
    if kind == "text":
        request.text_content.text = draw(TEXT)
    elif kind == "ids":
        request.token_content.token_ids.extend(draw(st.lists(INT32, max_size=6)))
    return request


def raw_messages():
    """(method, bytes): random bytes, valid messages with junk appended, wrong wire types."""
    methods = st.sampled_from(sorted(METHODS))
    junk = st.one_of(
        st.binary(max_size=48),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x52\x02\xff\xfe", b"\x0a\x02\xc3\x28", b"\x08",
                         b"\xff" * 12, b"\x50\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x0b\x0c"]))
    return st.tuples(methods, junk)


def _check_status(error: grpc.RpcError) -> None:
    code = error.code()
    assert code in ALLOWED, (code, error.details())
    assert error.details(), code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        params = [v for k, v in (error.trailing_metadata() or ()) if k == "error-param"]
        assert params and params[0], error.details()
        assert error.details().startswith(params[0].split("[")[0].split(".")[0]) or params[0] == "request" \
            or params[0] in error.details(), (params, error.details())


class Needle:
    """A greedy Generate in a loop (bounded) until stopped; records every output's tokens."""

    def __init__(self, channel):
        self.stub = pb_grpc.GenerationStub(channel)
        self.outputs: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def once(self) -> list:
        request = pb.GenerateRequest(prompt_text=NEEDLE, max_tokens=NEEDLE_TOKENS, temperature=0.0, ignore_eos=True)
        return [t for r in self.stub.Generate(request, timeout=120) if r.HasField("delta") for t in r.delta.token_ids]

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.outputs) < 2000:
            try:
                self.outputs.append(self.once())
            except grpc.RpcError as e:
                self.errors.append((e.code(), e.details()))

    def __enter__(self) -> "Needle":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(180)
        assert not self._thread.is_alive(), "the needle loop did not end"


def fuzz_grpc(channel, examples: int) -> None:
    generation = pb_grpc.GenerationStub(channel)
    orchestrator = js_grpc.OrchestratorStub(channel)

    def generate(request):
        try:
            responses = list(generation.Generate(request, timeout=120))
            assert responses and responses[-1].HasField("summary")
        except grpc.RpcError as e:
            _check_status(e)

    def decode(request):
        try:
            list(orchestrator.Decode(request, timeout=120))
        except grpc.RpcError as e:
            _check_status(e)

    def tokenize(case):
        text, ids, add = case
        try:
            generation.Tokenize(pb.TokenizeRequest(text=text, add_special_tokens=add), timeout=30)
        except grpc.RpcError as e:
            _check_status(e)
        try:
            generation.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=add), timeout=30)
        except grpc.RpcError as e:
            _check_status(e)

    def raw(case):
        method, data = case
        message, streaming = METHODS[method]
        try:
            message.FromString(data)
            parses = True
        except DecodeError:
            parses = False
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            method, request_serializer=None, response_deserializer=None)
        try:
            result = call(data, timeout=60)
            if streaming:
                list(result)
            assert parses, f"{method} accepted bytes that do not parse: {data!r}"
        except grpc.RpcError as e:
            _check_status(e)
            if not parses:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
                assert dict(e.trailing_metadata() or ()).get("error-param") == "request"

    run_property("grpc.generate_fields", generate_requests(), generate, examples)
    run_property("grpc.decode_fields", decode_requests(), decode, max(examples // 2, 1))
    run_property("grpc.tokenize_detokenize", st.tuples(TEXT, st.lists(INT32, max_size=6), st.booleans()), tokenize,
                 max(examples // 2, 1))
    run_property("grpc.raw_bytes", raw_messages(), raw, examples)


def _fuzz_with_needle(serving_session, examples: int) -> None:
    engine = make_engine(serving_session)
    with GrpcServer(engine) as server:
        needle = Needle(server.channel)
        expected = needle.once()
        assert len(expected) == NEEDLE_TOKENS
        with needle:
            fuzz_grpc(server.channel, examples)
        assert not needle.errors, needle.errors[:3]
        assert needle.outputs and all(o == expected for o in needle.outputs), needle.outputs[:3]
        assert js_grpc.OrchestratorStub(server.channel).HealthCheck(js.HealthCheckRequest(), timeout=10).is_live
    wait_idle(engine)


def test_fuzz_grpc_messages(serving_session):
    _fuzz_with_needle(serving_session, examples=30)


@pytest.mark.slow
def test_fuzz_grpc_messages_slow(serving_session):
    _fuzz_with_needle(serving_session, examples=4000)
