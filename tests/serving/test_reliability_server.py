"""Overload, soak and security of the servers (in-process, real sockets on 127.0.0.1).

- Overload: 5x more concurrent clients than the server holds (max_num_seqs +
  max_queued_requests) on HTTP and on gRPC: refusals are 429 / RESOURCE_EXHAUSTED and
  fast, every accepted request completes with all its tokens, none is lost, no page is
  left in use (scripts/reliability_report.py measures the same with more rounds).
- Soak (slow): steady mixed load for 30 minutes (JAXINFER_SOAK_MINUTES): no errors, no compile after warm-up,
  no page leaked, resident memory growth reported in MB per hour.
- Tenant isolation of the prefix cache: across `cache_salt`s a repeated prompt gets no
  prefix-cache hit (the engine's hit counter does not move), within a salt it does; the
  time to first token of a cross-salt repeat is reported beside the cold and warm ones.
- API keys: hmac.compare_digest on every presented key; wrong length, unicode, empty
  and unpaired-surrogate keys are refused without an error; neither the key nor the
  prompt appears in the log unless `log_prompts` is set.
- Engine failures: a request whose logits go NaN / Inf, or whose step raises, gets a 500
  / INTERNAL naming it and the reason; the server goes on serving the same prompt.
- Resource limits before any work: body bytes (413), prompt tokens, n x max_tokens, the
  number and length of stop strings, logit_bias entries: a 400 / 413 (INVALID_ARGUMENT
  on gRPC) naming the limit's field, and the engine never sees the request.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import os
import random
import statistics
import time

import grpc
import httpx
import openai
import pytest

from jaxinfer.runtime.faults import FaultInjector
from jaxinfer.serving import core
from jaxinfer.serving.core import Unauthorized
from jaxinfer.serving.protos import jaxinfer_pb2 as pb
from jaxinfer.serving.protos import jaxinfer_pb2_grpc as pb_grpc
from reliability_support import GrpcServer, http_server, make_engine, wait_idle
from script_loader import load_script

reliability_report = load_script("reliability_report")

PROMPT = "def fib"


# ---------------------------------------------------------------------- overload and soak


def test_overload_five_times_capacity(serving_session):
    target = reliability_report.InProcessTarget(serving_session, max_queued_requests=2)
    try:
        out = reliability_report.measure_overload(target, rounds=1, max_tokens=6)
    finally:
        target.stop()
    print("overload:", json.dumps(out))
    assert out["capacity"] == 10 and out["clients"] == 50
    assert out["idle"] and out["pages_leaked"] == 0
    for wire in ("http", "grpc"):
        w = out[wire]
        assert w["lost"] == 0 and not w["errors"], w
        assert w["completed"] + w["refused"] == w["requests"] == 50, w
        assert w["refused"] > 0 and w["completed"] >= 10, w
        assert w["refusal_ms_p99"] < 500, w  # the goal is 50 ms; CI machines are shared
    assert out["rejected_metric"] == out["http"]["refused"] + out["grpc"]["refused"]


@pytest.mark.slow
def test_soak(serving_session):
    """The issue's soak: 30 minutes (JAXINFER_SOAK_MINUTES to change it) of mixed load.

    The warm-up lasts at least a quarter of the run and until nothing compiled for 5% of
    it (a 6-minute run with a 30 s quiet window still met new batch shapes after it).
    """
    minutes = float(os.environ.get("JAXINFER_SOAK_MINUTES", "30"))
    target = reliability_report.InProcessTarget(serving_session, max_queued_requests=4)
    try:
        out = reliability_report.run_soak(target, minutes=minutes, sample_s=2.0, warmup_fraction=0.25)
    finally:
        target.stop()
    print("soak:", json.dumps(out))
    assert out["requests"] > 0 and out["errors"] == 0, out
    assert out["idle"] and out["pages_leaked"] == 0, out
    assert out["compiles_after_warmup"] == 0, out
    assert out["mb_per_hour"] is not None and out["mb_per_hour"] < 1000, out  # a gross leak only: minutes are noisy


# ---------------------------------------------------------------------- tenant isolation


def _ttft(client: httpx.Client, ids: list, salt: str) -> float:
    """Seconds to the first streamed chunk with text of a 1-token completion of `ids`."""
    t0 = time.perf_counter()
    with client.stream("POST", "/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0,
                                                         "ignore_eos": True, "stream": True,
                                                         "cache_salt": salt}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise AssertionError("no chunk")


def _isolation_trials(serving_session, trials: int, prompt_len: int = 200) -> dict:
    engine = make_engine(serving_session)
    vocab = serving_session.model_config.vocab_size
    rng = random.Random(0)
    times = {"cold": [], "cross_salt": [], "same_salt": []}
    hits = {"cold": [], "cross_salt": [], "same_salt": []}
    with http_server(engine) as base, httpx.Client(base_url=base, timeout=120) as client:
        for trial in range(trials + 1):  # trial 0 compiles the shapes: not counted
            ids = [rng.randrange(3, vocab) for _ in range(prompt_len)]  # a prompt no one sent before
            for kind, salt in (("cold", f"tenant-a-{trial}"), ("cross_salt", f"tenant-b-{trial}"),
                               ("same_salt", f"tenant-a-{trial}")):
                before = serving_session.metrics()["prefix_cache_hits"]
                seconds = _ttft(client, ids, salt)
                wait_idle(engine)
                if trial:
                    times[kind].append(seconds)
                    hits[kind].append(serving_session.metrics()["prefix_cache_hits"] - before)
    return {"times": times, "hits": hits}


def _report_isolation(out: dict) -> dict:
    from scipy.stats import mannwhitneyu
    t = out["times"]
    figures = {kind: 1000 * statistics.median(v) for kind, v in t.items()}
    figures["p_cold_vs_cross"] = float(mannwhitneyu(t["cold"], t["cross_salt"]).pvalue)
    figures["p_cold_vs_same"] = float(mannwhitneyu(t["cold"], t["same_salt"]).pvalue)
    print("isolation TTFT medians (ms) and Mann-Whitney p-values:", json.dumps(figures))
    return figures


def test_cache_salt_isolates_tenants(serving_session):
    out = _isolation_trials(serving_session, trials=6)
    _report_isolation(out)
    assert all(h == 0 for h in out["hits"]["cold"]), out["hits"]
    assert all(h == 0 for h in out["hits"]["cross_salt"]), out["hits"]  # no hit across salts
    assert all(h >= 192 for h in out["hits"]["same_salt"]), out["hits"]  # 12 full pages hit within a salt


@pytest.mark.slow
def test_cache_salt_timing_is_indistinguishable(serving_session):
    out = _isolation_trials(serving_session, trials=60)
    figures = _report_isolation(out)
    assert all(h == 0 for h in out["hits"]["cross_salt"])
    # A cached prefix is visible in the timing within a salt, not across salts.
    assert figures["p_cold_vs_same"] < 0.01, figures
    assert figures["p_cold_vs_cross"] > 0.001, figures


def test_cached_prompt_tokens_are_reported_per_request_and_per_tenant(serving_session):
    """usage.prompt_tokens_details.cached_tokens (OpenAI's field; Usage.cached_tokens on
    gRPC): 0 for a new prompt and for the same prompt under another cache_salt; the full
    pages of the prompt (at least one token is always computed) for a repeat within the
    salt, plain and streamed."""
    engine = make_engine(serving_session)
    page = serving_session.engine.runner.page_size
    rng = random.Random(11)
    ids = [rng.randrange(3, serving_session.model_config.vocab_size) for _ in range(2 * page + 5)]
    with http_server(engine) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

        def cached(salt, **kw):
            r = client.completions.create(model="tiny-code", prompt=ids, max_tokens=1, temperature=0,
                                          extra_body={"cache_salt": salt, "ignore_eos": True}, **kw)
            if kw.get("stream"):
                r = [c for c in r if c.usage is not None][-1]
            return r.usage.prompt_tokens_details.cached_tokens

        assert cached("tenant-a") == 0
        assert cached("tenant-a") == 2 * page
        assert cached("tenant-b") == 0
        assert cached("tenant-b", stream=True, stream_options={"include_usage": True}) == 2 * page
    with GrpcServer(engine) as server:  # jaxinfer.v1: Usage.cached_tokens of the Summary
        stub = pb_grpc.GenerationStub(server.channel)

        def grpc_cached(salt):
            replies = list(stub.Generate(pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=ids), max_tokens=1,
                                                            temperature=0.0, ignore_eos=True, cache_salt=salt),
                                         timeout=60))
            return replies[-1].summary.usage.cached_tokens

        assert grpc_cached("tenant-c") == 0
        assert grpc_cached("tenant-c") == 2 * page
        assert grpc_cached("tenant-a") == 2 * page
    wait_idle(engine)


# ---------------------------------------------------------------------- API keys and logs


def test_api_key_comparison(serving_session, monkeypatch):
    engine = make_engine(serving_session, warm=False, api_key="s3cret-ключ-🔑")
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(core.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    engine.check_api_key("s3cret-ключ-🔑")
    for wrong in ("", "s", "s3cret", "s3cret-ключ-🔑x", "s3cret-ключ-🔐", "S3CRET-ключ-🔑", "\ud800", "\x00" * 64,
                  "a" * 10_000, " s3cret-ключ-🔑"):
        with pytest.raises(Unauthorized) as info:
            engine.check_api_key(wrong)
        assert info.value.param == "authorization" and "s3cret" not in info.value.message
    with pytest.raises(Unauthorized):
        engine.check_api_key(None)
    assert len(calls) == 11  # every presented key went through the constant-time comparison
    with http_server(engine) as base:
        for header in (b"Bearer wrong", b"Bearer  x", b"Basic s3cret", b"Bearer \xff\xfe", b"Bearer s3cret-\xd0"):
            r = httpx.get(base + "/v1/models", headers={"Authorization": header}, timeout=10)
            assert r.status_code == 401 and r.json()["error"]["param"] == "authorization", r.text
        ok = httpx.get(base + "/v1/models", timeout=10,
                       headers={"Authorization": "Bearer s3cret-ключ-🔑".encode("utf-8")})
        assert ok.status_code == 200, ok.text  # a non-ASCII key is sent (and compared) as UTF-8 bytes


@pytest.mark.parametrize("log_prompts", [False, True])
def test_no_key_or_prompt_in_logs_unless_asked(serving_session, caplog, log_prompts):
    key, prompt = "k3y-Zq8vRw2", "def secret_zebra_7"
    engine = make_engine(serving_session, api_key=key, log_prompts=log_prompts)
    caplog.set_level(logging.DEBUG)
    with http_server(engine) as base:
        r = httpx.post(base + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
        assert httpx.post(base + "/v1/completions", headers={"Authorization": "Bearer nope-" + key[:4]}, timeout=60,
                          json={"prompt": prompt, "max_tokens": 2}).status_code == 401
    with GrpcServer(engine) as server:
        list(pb_grpc.GenerationStub(server.channel).Generate(
            pb.GenerateRequest(prompt_text=prompt, max_tokens=2, temperature=0.0), timeout=60,
            metadata=(("authorization", f"Bearer {key}"),)))
    text = "\n".join(f"{r.name} {r.getMessage()}" for r in caplog.records)
    assert "request_id=" in text  # the request lines are there
    assert key not in text and key[:6] not in text
    assert ("secret_zebra" in text) == log_prompts, text[-2000:]


# ---------------------------------------------------------------------- resource limits


LIMITS = dict(max_request_body_bytes=16 << 10, max_stop_strings=4, max_stop_string_chars=32,
              max_generated_tokens_per_request=64)


def _http_limit_cases(vocab: int):
    long_prompt = [5] * 1100  # > max_model_len (1024)
    return [
        ({"prompt": "x" * (20 << 10), "max_tokens": 1}, 413, "body"),
        ({"prompt": long_prompt, "max_tokens": 1}, 400, "prompt"),
        ({"prompt": PROMPT, "max_tokens": 65}, 400, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 16, "n": 8}, 400, "n"),
        ({"prompt": PROMPT, "max_tokens": 2, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": PROMPT, "max_tokens": 2, "stop": "y" * 33}, 400, "stop"),
        ({"prompt": PROMPT, "max_tokens": 2, "logit_bias": {str(i): 1.0 for i in range(301)}}, 400, "logit_bias"),
        ({"prompt": [vocab + 5], "max_tokens": 2}, 400, "prompt"),
    ]


def test_resource_limits_refused_before_any_work(serving_session, monkeypatch):
    engine = make_engine(serving_session, **LIMITS)
    seen = []
    real_add = serving_session.async_engine.add_requests
    monkeypatch.setattr(serving_session.async_engine, "add_requests", lambda reqs: seen.append(reqs) or real_add(reqs))
    steps = serving_session.metrics()["num_steps"]
    vocab = serving_session.model_config.vocab_size
    with http_server(engine) as base, httpx.Client(base_url=base, timeout=60) as client:
        for body, status, field in _http_limit_cases(vocab):
            for path in ("/v1/completions",):
                r = client.post(path, json=body)
                assert r.status_code == status, (body.keys(), r.text[:300])
                assert r.json()["error"]["param"] == field, r.text[:300]
        # a body without Content-Length (chunked) is cut off at the limit too
        r = client.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * (20 << 10), b'"}']),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    with GrpcServer(engine) as server:
        stub = pb_grpc.GenerationStub(server.channel)
        cases = [
            (pb.GenerateRequest(prompt_text="x" * (20 << 10), max_tokens=1), grpc.StatusCode.RESOURCE_EXHAUSTED, None),
            (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[5] * 1100), max_tokens=1),
             grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
            (pb.GenerateRequest(prompt_text=PROMPT, max_tokens=16, n=8), grpc.StatusCode.INVALID_ARGUMENT, "n"),
            (pb.GenerateRequest(prompt_text=PROMPT, max_tokens=2, stop=["a"] * 5), grpc.StatusCode.INVALID_ARGUMENT,
             "stop"),
            (pb.GenerateRequest(prompt_text=PROMPT, max_tokens=2, logit_bias={i: 1.0 for i in range(301)}),
             grpc.StatusCode.INVALID_ARGUMENT, "logit_bias"),
        ]
        for request, code, field in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=30))
            assert info.value.code() == code, info.value.details()
            if field is not None:
                assert dict(info.value.trailing_metadata())["error-param"] == field, info.value.details()
    assert seen == [] and engine.num_in_flight == 0
    assert serving_session.metrics()["num_steps"] == steps  # the engine never ran a step for them


# ---------------------------------------------------------------------- engine failures


class _NextRequests(dict):
    """FaultInjector.nonfinite that poisons the next requests scheduled, whatever their ids
    (the HTTP server names engine requests itself), one value each."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def __contains__(self, request_id):
        return bool(self.values)

    def pop(self, request_id, *default):
        return self.values.pop(0)


def test_a_failed_request_reaches_its_client_and_the_server_goes_on(serving_session):
    """A request whose logits go NaN (injected in the real compiled step) gets a 500 naming
    it and the reason, plain or streamed (an error event, then [DONE]); a step that raises
    is INTERNAL on gRPC; the same prompt before and after gets the same text."""
    runner = serving_session.engine.runner
    engine = make_engine(serving_session)
    body = {"model": "tiny-code", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    try:
        with http_server(engine) as base, httpx.Client(base_url=base, timeout=120) as client:
            clean = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            runner.fault_injector = FaultInjector(nonfinite=_NextRequests([math.nan, math.inf]))
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 500, r.text
            error = r.json()["error"]
            assert error["type"] == "InternalServerError"
            assert r.json()["error"]["message"].startswith("request 'cmpl-") and "non-finite" in error["message"], error
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and "non-finite" in json.loads(events[-2])["error"]["message"], events
            assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == clean
        with GrpcServer(engine) as server:
            stub = pb_grpc.GenerationStub(server.channel)
            request = pb.GenerateRequest(prompt_text=PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True)
            before = "".join(r.delta.text for r in stub.Generate(request, timeout=60))
            runner.fault_injector = FaultInjector(fail_executes={0})  # the next step raises
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Generate(request, timeout=60))
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "engine step" in info.value.details() and "InjectedFault" in info.value.details()
            assert "".join(r.delta.text for r in stub.Generate(request, timeout=60)) == before
    finally:
        runner.fault_injector = None
    wait_idle(engine)
    assert serving_session.metrics()["num_requests_failed"] >= 3
