"""The gRPC front end (jaxinfer/serving/grpc_server.py) over real sockets.

The server runs on its own asyncio loop in a background thread, on a free 127.0.0.1
port; the clients are the generated stubs on plain synchronous channels. One server
(a greedy-by-default ServingEngine) serves the module; the API-key and overload tests
start their own. Every wait is bounded in time.
"""
from __future__ import annotations

import logging
import socket
import time

import grpc
from reliability_support import GrpcServer
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from jaxinfer.config import SamplingParams
from jaxinfer.serving.core import InvalidRequest, ServingConfig, ServingEngine
from jaxinfer.serving.grpc_server import set_serving
from jaxinfer.serving.metrics import ServingMetrics
from jaxinfer.serving.protos import jaxinfer_pb2 as pb
from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
from jaxinfer.serving.protos import jetstream_pb2 as js
from jaxinfer.serving.protos import jetstream_pb2_grpc as js_grpc

# 4 tokens with BOS, like the warm-up's prompt, and prompt + max_tokens <= 16 (one KV
# page) in most tests: the programs the warm-up compiled serve them (compiles are slow).
PROMPT = "def fib"
LONG = 600  # max_tokens of requests meant to be cut off
HAS_N = "n" in SamplingParams.__dataclass_fields__


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The gRPC server on its own event-loop thread (shared with the reliability tests).
ServerThread = GrpcServer


def _engine(session, **fields) -> ServingEngine:
    config = ServingConfig(**fields)
    engine = ServingEngine(session, config, metrics=ServingMetrics(config.model_name, session.async_engine.metrics))
    engine.warm_up()
    return engine


@pytest.fixture(scope="module")
def server(serving_session):
    engine = _engine(serving_session)
    # As if the model's generation_config.json said greedy: Decode has no temperature field.
    engine.defaults["temperature"] = 0.0
    thread = ServerThread(engine)
    yield thread
    thread.close()


def _wait_idle(engine: ServingEngine, free_pages: int, timeout: float = 60.0) -> None:
    """Waits (bounded) until nothing is in flight and `free_pages` pages are free again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_in_flight == 0 and engine.session.metrics()["num_free_pages"] == free_pages:
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle after {timeout} s: in flight {engine.num_in_flight}, free pages "
                         f"{engine.session.metrics()['num_free_pages']} (expected {free_pages})")


def _free_pages(engine: ServingEngine) -> int:
    return engine.session.metrics()["num_free_pages"]


def _expected(server, max_tokens: int):
    params = SamplingParams(**{**server.engine.defaults, "max_tokens": max_tokens})
    (out,) = server.engine.session.generate([PROMPT], params)
    return out


def _decode(server, request, timeout: float = 60.0):
    """(per-sample text, per-sample token ids, messages) of a Decode stream."""
    texts, ids, messages = {}, {}, 0
    for response in js_grpc.OrchestratorStub(server.channel).Decode(request, timeout=timeout):
        messages += 1
        assert response.WhichOneof("content") == "stream_content"
        for i, sample in enumerate(response.stream_content.samples):
            texts[i] = texts.get(i, "") + sample.text
            ids.setdefault(i, []).extend(sample.token_ids)
    return texts, ids, messages


# ---------------------------------------------------------------------- JetStream


def test_decode_text_content_equals_session_generate(server):
    expected = _expected(server, 12)
    request = js.DecodeRequest(max_tokens=12, text_content=js.DecodeRequest.TextContent(text=PROMPT))
    texts, ids, messages = _decode(server, request)
    assert texts == {0: expected.text} and ids == {0: expected.token_ids}
    assert messages >= 2  # streamed, not one message at the end


def test_decode_token_content(server):
    expected = _expected(server, 8)
    prompt_ids = server.engine.tokenizer.encode(PROMPT)
    request = js.DecodeRequest(max_tokens=8, token_content=js.DecodeRequest.TokenContent(token_ids=prompt_ids),
                               metadata=js.DecodeRequest.Metadata(start_time=time.time()))
    texts, ids, _ = _decode(server, request)
    assert ids == {0: expected.token_ids} and texts == {0: expected.text}


@pytest.mark.skipif(not HAS_N, reason="SamplingParams has no `n` yet")
def test_decode_num_samples(server):
    expected = _expected(server, 6)
    request = js.DecodeRequest(max_tokens=6, num_samples=2, text_content=js.DecodeRequest.TextContent(text=PROMPT))
    texts, ids, _ = _decode(server, request)
    assert texts == {0: expected.text, 1: expected.text}  # greedy: both samples alike
    assert ids == {0: expected.token_ids, 1: expected.token_ids}


def test_decode_rejects_bad_max_tokens_and_missing_content(server):
    stub = js_grpc.OrchestratorStub(server.channel)
    for request, field in ((js.DecodeRequest(max_tokens=0, text_content=js.DecodeRequest.TextContent(text="x")),
                            "max_tokens"),
                           (js.DecodeRequest(max_tokens=4), "content")):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Decode(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"{field}:")


def test_jetstream_health_check(server):
    assert js_grpc.OrchestratorStub(server.channel).HealthCheck(js.HealthCheckRequest(), timeout=10).is_live


# ---------------------------------------------------------------------- cancellation


def _long_request(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_text=PROMPT, max_tokens=LONG, ignore_eos=True, temperature=0.0, **fields)


def test_cancel_mid_stream_frees_pages(server):
    free = _free_pages(server.engine)
    call = pb_grpc.GenerationStub(server.channel).Generate(_long_request(), timeout=60)
    first = next(call)
    assert first.WhichOneof("kind") == "delta"
    assert server.engine.num_in_flight == 1
    call.cancel()
    _wait_idle(server.engine, free)


def test_deadline_exceeded_frees_pages(server):
    free = _free_pages(server.engine)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        for _ in pb_grpc.GenerationStub(server.channel).Generate(_long_request(), timeout=0.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 10
    _wait_idle(server.engine, free)


# ---------------------------------------------------------------------- health, reflection


def test_grpc_health_check_and_set_serving(server):
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "jaxinfer.v1.Generation", "jetstream_proto.Orchestrator"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    server.run(set_serving(server.server, False))
    try:
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.run(set_serving(server.server, True))
    assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (response,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
    names = {s.name for s in response.list_services_response.service}
    assert {"jetstream_proto.Orchestrator", "jaxinfer.v1.Generation", "grpc.health.v1.Health"} <= names
    # The descriptors are served too (what grpcurl needs to describe a method).
    (response,) = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="jaxinfer.v1.Generation")]), timeout=10))
    assert response.file_descriptor_response.file_descriptor_proto


# ---------------------------------------------------------------------- jaxinfer.v1


def test_generate_logprobs_finish_reason_and_usage(server, caplog):
    stub = pb_grpc.GenerationStub(server.channel)
    prompt_ids = server.engine.tokenizer.encode(PROMPT)
    request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2,
                                 prompt_logprobs=True)
    with caplog.at_level(logging.INFO, logger="jaxinfer.serving.grpc"):
        call = stub.Generate(request, timeout=60, metadata=(("x-request-id", "req-42"),))
        responses = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "req-42"
    deltas = [r.delta for r in responses[:-1]]
    assert all(r.WhichOneof("kind") == "delta" for r in responses[:-1])
    token_ids = [t for d in deltas for t in d.token_ids]
    assert len(token_ids) == 5 and {d.index for d in deltas} == {0}
    assert [len(d.logprobs) for d in deltas] == [len(d.token_ids) for d in deltas]
    tops = [t for d in deltas for t in d.top_logprobs]
    assert len(tops) == 5 and all(len(t.entries) == 2 for t in tops)
    for top, lp, tok in zip(tops, [x for d in deltas for x in d.logprobs], token_ids):
        assert top.entries[0].logprob >= top.entries[1].logprob
        assert top.entries[0].token_id == tok and top.entries[0].logprob == pytest.approx(lp, abs=1e-4)  # greedy
    assert [d.finish_reason for d in deltas][-1] == pb.FINISH_REASON_LENGTH
    assert all(d.finish_reason == pb.FINISH_REASON_UNSPECIFIED for d in deltas[:-1])
    summary = responses[-1].summary
    assert (summary.usage.prompt_tokens, summary.usage.completion_tokens, summary.usage.total_tokens) == \
        (len(prompt_ids), 5, len(prompt_ids) + 5)
    assert len(summary.prompt_logprobs) == len(prompt_ids) - 1 and summary.request_id == "req-42"
    assert "".join(d.text for d in deltas) == _expected(server, 5).text
    lines = [r.getMessage() for r in caplog.records if "req-42" in r.getMessage()]
    assert len(lines) == 1 and "Generate" in lines[0] and "status=OK" in lines[0] and "tokens=5" in lines[0]


def test_generate_stop_token_finish_reason(server):
    first = _expected(server, 3).token_ids
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=server.engine.tokenizer.encode(PROMPT)),
                                 max_tokens=10, temperature=0.0, stop_token_ids=[first[1]])
    responses = list(pb_grpc.GenerationStub(server.channel).Generate(request, timeout=60))
    deltas = [r.delta for r in responses if r.WhichOneof("kind") == "delta"]
    assert [t for d in deltas for t in d.token_ids] == first[:first.index(first[1]) + 1]
    assert deltas[-1].finish_reason == pb.FINISH_REASON_STOP


def test_tokenize_detokenize_round_trip(server):
    stub = pb_grpc.GenerationStub(server.channel)
    tokens = stub.Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=10)
    assert list(tokens.token_ids) == server.engine.tokenizer.encode(PROMPT)
    assert len(tokens.pieces) == len(tokens.token_ids)
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=tokens.token_ids), timeout=10).text == PROMPT
    plain = stub.Tokenize(pb.TokenizeRequest(text=PROMPT, add_special_tokens=False), timeout=10)
    assert len(plain.token_ids) <= len(tokens.token_ids)


def test_model_info(server):
    info = pb_grpc.GenerationStub(server.channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
    session = server.engine.session
    assert info.model_name == "tiny-code" and info.vocab_size == session.model_config.vocab_size
    assert info.max_model_len == session.max_model_len and info.has_tokenizer and info.is_ready
    assert info.defaults.temperature == 0.0 and info.defaults.max_tokens == SamplingParams().max_tokens
    assert list(info.eos_token_ids) and info.max_top_logprobs >= 1


@pytest.mark.parametrize("fields, field", [
    ({"prompt_text": PROMPT, "max_tokens": -1}, "max_tokens"),
    ({"prompt_text": PROMPT, "top_p": 2.0}, "top_p"),
    ({"prompt_token_ids": pb.TokenIds(ids=[1, 10**6])}, "prompt_token_ids"),
    ({"prompt_text": ""}, "prompt_text"),
    ({}, "prompt"),
    ({"prompt_text": PROMPT, "model": "other"}, "model"),
], ids=["max_tokens", "top_p", "token_id", "empty_prompt", "no_prompt", "model"])
def test_generate_invalid_argument_names_the_field(server, fields, field):
    with pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GenerationStub(server.channel).Generate(pb.GenerateRequest(**fields), timeout=10,
                                                             metadata=(("x-request-id", f"bad-{field}"),)))
    code = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.code() == code
    assert info.value.details().startswith(f"{field}:"), info.value.details()
    trailing = dict(info.value.trailing_metadata())
    assert trailing.get("error-param") == field and trailing.get("x-request-id") == f"bad-{field}"
    assert server.engine.num_in_flight == 0


_NEW_FIELDS = {"presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.5, "min_tokens": 2,
               "n": 2, "seed": 7, "top_k": 5, "top_p": 0.5, "min_p": 0.125, "ignore_eos": True}


@pytest.mark.skipif(any(f not in SamplingParams.__dataclass_fields__ for f in _NEW_FIELDS),
                    reason="SamplingParams lacks some of the fields")
def test_generate_passes_every_sampling_field_through(server, monkeypatch):
    """Each GenerateRequest field reaches SamplingParams (captured before anything runs)."""
    captured = []
    original = server.engine.sampling_params

    def spy(fields):
        captured.append(original(fields))
        raise InvalidRequest("captured: stop here", param="captured")
    monkeypatch.setattr(server.engine, "sampling_params", spy)
    request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=9, stop=["xy", "z"], stop_token_ids=[3, 4],
                                 logprobs=0, prompt_logprobs=True, logit_bias={5: -100.0, 6: 2.5}, priority=3,
                                 cache_salt="s", **_NEW_FIELDS)
    with pytest.raises(grpc.RpcError):
        list(pb_grpc.GenerationStub(server.channel).Generate(request, timeout=10))
    (params,) = captured
    for name, value in {**_NEW_FIELDS, "max_tokens": 9, "stop": ("xy", "z"), "stop_token_ids": (3, 4),
                        "prompt_logprobs": True}.items():
        assert getattr(params, name) == value, name
    assert params.want_logprobs and params.num_top_logprobs == 0
    assert dict(params.logit_bias) == {5: -100.0, 6: 2.5}
    assert params.temperature == 0.0  # unset: the server's default


@pytest.mark.parametrize("fields, field", [({"repetition_penalty": 0.0}, "repetition_penalty"),
                                           ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
                                           ({"n": 0}, "n")])
def test_generate_rejects_bad_new_fields(server, fields, field):
    if field not in SamplingParams.__dataclass_fields__:
        pytest.skip(f"SamplingParams has no {field}")
    with pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GenerationStub(server.channel).Generate(pb.GenerateRequest(prompt_text=PROMPT, **fields),
                                                             timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()


def test_detokenize_rejects_ids_outside_the_vocabulary(server):
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.GenerationStub(server.channel).Detokenize(pb.DetokenizeRequest(token_ids=[-1]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("token_ids:")


def test_unexpected_error_is_internal_without_details(server, monkeypatch, caplog):
    def boom(fields):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(server.engine, "sampling_params", boom)
    with caplog.at_level(logging.INFO, logger="jaxinfer.serving.grpc"), pytest.raises(grpc.RpcError) as info:
        list(pb_grpc.GenerationStub(server.channel).Generate(pb.GenerateRequest(prompt_text=PROMPT), timeout=10))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)  # logged here


# ---------------------------------------------------------------------- own servers


def test_api_key_and_message_size(make_serving_engine):
    thread = ServerThread(make_serving_engine(api_key="sekrit", max_request_body_bytes=4096))
    try:
        stub = pb_grpc.GenerationStub(thread.channel)
        request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=2, temperature=0.0)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "sekrit"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reflection = reflection_pb2_grpc.ServerReflectionStub(thread.channel)
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        key = (("authorization", "Bearer sekrit"),)
        assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=key).model_name == "tiny-code"
        with pytest.raises(grpc.RpcError) as info:  # larger than max_request_body_bytes
            stub.Tokenize(pb.TokenizeRequest(text="x" * 5000), timeout=10, metadata=key)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        responses = list(stub.Generate(request, timeout=30, metadata=key))
        assert responses[-1].summary.usage.prompt_tokens > 0
        # Health checks need no key.
        health = health_pb2_grpc.HealthStub(thread.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert js_grpc.OrchestratorStub(thread.channel).HealthCheck(js.HealthCheckRequest(), timeout=10).is_live
    finally:
        thread.close()


def test_overload_is_resource_exhausted(make_serving_engine):
    engine = make_serving_engine(max_queued_requests=0)
    free = _free_pages(engine)
    thread = ServerThread(engine)
    calls = []
    try:
        stub = pb_grpc.GenerationStub(thread.channel)
        slots = engine.capacity
        assert slots == 8
        calls = [stub.Generate(_long_request(), timeout=60) for _ in range(slots)]
        deadline = time.monotonic() + 30
        while engine.num_in_flight < slots and time.monotonic() < deadline:  # all admitted
            time.sleep(0.01)
        assert engine.num_in_flight == slots
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(_long_request(), timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert engine.num_in_flight == slots
    finally:
        for call in calls:
            call.cancel()
        thread.close()
    _wait_idle(engine, free)
    assert engine.metrics.registry.get_sample_value(
        "jaxinfer:request_rejected_total", {"model_name": "tiny-code", "reason": "overloaded"}) == 1


def test_draining_is_unavailable(make_serving_engine):
    engine = make_serving_engine()
    thread = ServerThread(engine)
    try:
        engine.begin_drain()
        thread.run(set_serving(thread.server, False))
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.GenerationStub(thread.channel).Generate(pb.GenerateRequest(prompt_text=PROMPT), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not js_grpc.OrchestratorStub(thread.channel).HealthCheck(js.HealthCheckRequest(), timeout=10).is_live
        assert health_pb2_grpc.HealthStub(thread.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status \
            == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        thread.close()
