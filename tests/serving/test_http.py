"""The OpenAI-compatible HTTP front end (jaxinfer/serving/http_server.py) over real sockets.

The app runs in-process under uvicorn on a free 127.0.0.1 port in a background thread;
the clients are the official `openai` package and raw httpx. One server (over the
shared bundled-model session) serves most of the module; the chat tests use a model
folder made here (tiny-code plus a chat template, its own session); the API-key,
cold-start and overload tests start small servers of their own over the shared session.

Compiles are slow on CPU, so the requests share few shapes: most use a 4-token prompt
(with BOS), prompt + max_tokens <= 16 (one KV page) and greedy decoding. References are
computed with the model's generation_config defaults (session.default_sampling_params),
as the server fills in the fields a request leaves out. Every wait is bounded in time.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import httpx
import openai
import pytest

from jaxinfer.config import EngineConfig, SamplingParams
from jaxinfer.serving import openai_protocol
from jaxinfer.serving.chat_template import ChatTemplate, find_template_source, load_chat_template
from jaxinfer.serving.core import ServingEngine
from reliability_support import http_server, make_engine

PROMPT = "def fib"  # 4 tokens with BOS, like the warm-up's prompt
HAS_N = "n" in SamplingParams.__dataclass_fields__
BODY_LIMIT = 16 << 10
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "{% if message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n' + message['content'] + eos_token }}\n"
    "{% else %}\n{{ raise_exception('Only system, user and assistant roles are supported, got ' + message['role']) }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>\\n' }}\n{% endif %}\n"
    "{% endfor %}")
CHAT = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "def fib"}]


def _client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)


def _wait_idle(engine: ServingEngine, free_pages: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.num_in_flight == 0 and engine.session.metrics()["num_free_pages"] == free_pages:
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle after {timeout} s: in flight {engine.num_in_flight}, free pages "
                         f"{engine.session.metrics()['num_free_pages']} (expected {free_pages})")


def _sample(engine: ServingEngine, name: str, **labels) -> float:
    value = engine.metrics.registry.get_sample_value(name, {"model_name": engine.config.model_name, **labels})
    return value or 0.0


def _events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE response (JSON decoded, "[DONE]" kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and "Traceback" not in body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture(scope="module")
def server(serving_session):
    engine = make_engine(serving_session, max_request_body_bytes=BODY_LIMIT)
    with http_server(engine) as base:
        yield engine, base


@pytest.fixture(scope="module")
def greedy(serving_session):
    # the model's generation_config defaults apply to requests that leave a field out
    return serving_session.generate([PROMPT], serving_session.default_sampling_params(max_tokens=8,
                                                                                      temperature=0))[0]


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A copy of tiny-code whose tokenizer_config.json has a chat template."""
    from jaxinfer.assets import resolve_model_path
    folder = str(tmp_path_factory.mktemp("chat_model") / "tiny-chat")
    shutil.copytree(resolve_model_path("tiny-code"), folder)
    config_file = os.path.join(folder, "tokenizer_config.json")
    with open(config_file) as f:
        config = json.load(f)
    config["chat_template"] = TEMPLATE
    with open(config_file, "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def chat_server(chat_folder):
    """The chat folder's own session, ServingEngine and server."""
    from jaxinfer import InferenceSession
    session = InferenceSession.from_pretrained(chat_folder, engine=EngineConfig(max_num_seqs=4, num_pages=64,
                                                                                compilation_cache_dir=""))
    # No warm-up: the chat prompts' shapes are not the warm-up's (compiles are slow).
    engine = make_engine(session, warm=False, model_name="tiny-chat")
    engine.state = "ready"
    try:
        with http_server(engine) as base:
            yield engine, base, chat_folder
    finally:
        session.close()


# ---------------------------------------------------------------------- completions


def test_completion_greedy_text_usage_and_request_id(server, greedy, caplog):
    engine, base = server
    out = _client(base).completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == "tiny-code"
    assert [c.index for c in out.choices] == [0]
    assert out.choices[0].text == greedy.text
    assert out.choices[0].finish_reason == ("stop" if greedy.finish_reason == "eos" else greedy.finish_reason)
    assert out.usage.prompt_tokens == len(greedy.prompt_token_ids) == 4
    assert out.usage.completion_tokens == len(greedy.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # token-id prompts (one, or a list of them) give the same text
    ids = list(greedy.prompt_token_ids)
    with caplog.at_level(logging.INFO, logger="jaxinfer.serving.http"):
        r = httpx.post(f"{base}/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0},
                       headers={"X-Request-Id": "test-id-123"}, timeout=600)
    assert r.status_code == 200 and r.headers["x-request-id"] == "test-id-123"
    assert r.json()["choices"][0]["text"] == greedy.text
    r = httpx.post(f"{base}/v1/completions", json={"prompt": [ids], "max_tokens": 8, "temperature": 0}, timeout=600)
    assert [c["text"] for c in r.json()["choices"]] == [greedy.text]
    line = next(rec.getMessage() for rec in caplog.records if "request_id=test-id-123" in rec.getMessage())
    assert "method=POST path=/v1/completions status=200" in line and "prompt_tokens=4" in line
    assert f"completion_tokens={len(greedy.token_ids)}" in line and "seconds=" in line
    assert httpx.get(f"{base}/v1/models").headers["x-request-id"]  # a fresh id when none is sent


def test_completion_stream_and_usage(server, greedy):
    engine, base = server
    chunks = list(_client(base).completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(greedy.token_ids)
    assert chunks[-1].usage.prompt_tokens == 4
    text_chunks = chunks[:-1]
    assert all(c.object == "text_completion" and c.choices[0].index == 0 for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == greedy.text
    assert text_chunks[-1].choices[0].finish_reason is not None
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    # the raw wire: event-stream, one `data:` per chunk, [DONE] last
    with httpx.stream("POST", f"{base}/v1/completions", timeout=600,
                      json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]" and all("usage" not in e or e["usage"] is None for e in events[:-1])


def test_completion_several_prompts_and_stop(server, serving_session, greedy):
    engine, base = server
    prompts = [PROMPT, "import os", "class A"]
    refs = serving_session.generate(prompts, serving_session.default_sampling_params(max_tokens=8, temperature=0))
    out = _client(base).completions.create(model="tiny-code", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.text for r in refs]
    assert out.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)
    assert out.usage.completion_tokens == sum(len(r.token_ids) for r in refs)
    # a stop string cuts the text before it
    stop = greedy.text.strip()[1:3]
    assert stop and stop in greedy.text
    cut = _client(base).completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy.text[:greedy.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.skipif(not HAS_N, reason="SamplingParams has no n yet")
def test_completion_n_is_seeded_and_indexed(server):
    engine, base = server
    client = _client(base)

    def run():
        out = client.completions.create(model="tiny-code", prompt=[PROMPT, "import os"], n=3, max_tokens=6,
                                        temperature=1.0, seed=7, echo=True)
        return [(c.index, c.text) for c in out.choices], out.usage

    first, usage = run()
    # several prompts x n: a flat list, index = prompt index * n + sample index (echo shows the prompt)
    assert [i for i, _ in first] == list(range(6))
    assert all(text.startswith(PROMPT) for _, text in first[:3])
    assert all(text.startswith("import os") for _, text in first[3:])
    assert usage.prompt_tokens == 4 + 3 and usage.completion_tokens <= 6 * 6  # the prompt counts once
    assert run()[0] == first  # reproducible with the seed
    assert engine.num_in_flight == 0


def test_completion_logprobs_and_echo(server, greedy):
    engine, base = server
    client = _client(base)
    out = client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    n = len(greedy.token_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(tok in top and 2 <= len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # streaming: the same tokens, piece by piece
    chunks = list(client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0,
                                            logprobs=2, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    # echo: the prompt first; with logprobs, the prompt's tokens too (the first has none)
    echo = client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + greedy.text
    echo = client.completions.create(model="tiny-code", prompt=PROMPT, max_tokens=8, temperature=0, echo=True,
                                     logprobs=2)
    elp = echo.choices[0].logprobs
    assert echo.choices[0].text == PROMPT + greedy.text
    assert len(elp.tokens) == 4 + n and elp.tokens[4:] == lp.tokens
    assert elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in elp.token_logprobs[1:])
    r = httpx.post(f"{base}/v1/completions", timeout=30, json={"prompt": PROMPT, "echo": True, "logprobs": 1,
                                                              "stream": True})
    _error(r, 400, "echo")


def test_error_in_the_middle_of_a_stream(server, serving_session, monkeypatch):
    engine, base = server
    free = serving_session.metrics()["num_free_pages"]

    class Broken:  # the token texts of log-probs fail after the stream started
        special: set = set()

        def text(self, token_id):
            raise RuntimeError("boom")

    monkeypatch.setattr(openai_protocol, "TokenTexts", lambda tokenizer: Broken())
    with http_server(engine) as broken_base:  # a second app over the same engine, built with the broken texts
        with httpx.stream("POST", f"{broken_base}/v1/completions", timeout=600,
                          json={"prompt": PROMPT, "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                                "logprobs": 0, "stream": True}) as r:
            assert r.status_code == 200
            events = _events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == 500 and events[-2]["error"]["message"] == "internal server error"
    _wait_idle(engine, free)  # the request was aborted


# ---------------------------------------------------------------------- errors and limits


def test_validation_errors_name_the_field(server):
    engine, base = server
    url = f"{base}/v1/completions"

    def post(body, **kw):
        return httpx.post(url, content=body if isinstance(body, (str, bytes)) else json.dumps(body), timeout=30, **kw)

    _error(post({"prompt": PROMPT, "max_tokens": "8"}), 400, "max_tokens")
    _error(post({"prompt": PROMPT, "temperature": "hot"}), 400, "temperature")
    _error(post({"prompt": PROMPT, "stream": "yes"}), 400, "stream")
    _error(post({"prompt": PROMPT, "max_tokens": 0}), 400, "max_tokens")
    _error(post({"prompt": PROMPT, "top_p": 1.5}), 400, "top_p")
    _error(post({"prompt": PROMPT, "logit_bias": {"5": "x"}}), 400, "logit_bias.5")
    for field, value in (("top_k", -5), ("min_p", 2.0), ("seed", -1), ("stop_token_ids", [-1]), ("stop", [""]),
                         ("logprobs", 50), ("presence_penalty", 3.0), ("frequency_penalty", -3.0),
                         ("repetition_penalty", 0.0), ("min_tokens", 100), ("n", 0), ("logit_bias", {"x": 1}),
                         ("early_exit_threshold", 1.5), ("early_exit_threshold", 0.5)):  # 0.5: not a recursive model
        if field in SamplingParams.__dataclass_fields__:  # the vLLM / OpenAI fields pass through by name
            _error(post({"prompt": PROMPT, field: value}), 400, field)
    _error(post({"max_tokens": 4}), 400, "prompt")
    _error(post({"prompt": [PROMPT, [1, 2]]}), 400, "prompt")
    _error(post({"prompt": [1, 99999]}), 400, "prompt")
    _error(post({"prompt": PROMPT, "suffix": "x"}), 400, "suffix")
    _error(post({"prompt": PROMPT, "best_of": 2}), 400, "best_of")
    _error(post({"prompt": PROMPT, "stream_options": {"include_usage": True}}), 400, "stream_options")
    _error(post('{"prompt": "x", "temperature": NaN}'), 400, "temperature")
    _error(post('{"prompt": "x", "logit_bias": {"5": -Infinity}}'), 400, "logit_bias.5")
    _error(post('{"prompt": "x", "top_p": 1e999}'), 400, "top_p")
    _error(post('{"prompt": '), 400, "body")
    _error(post('[1, 2]'), 400, "body")
    _error(post(b'\xff\xfe'), 400, "body")
    # lengths: the prompt alone, and prompt + max_tokens, against max_model_len (1024)
    _error(post({"prompt": [1] * 1100}), 400, "prompt")
    _error(post({"prompt": PROMPT, "max_tokens": 1022}), 400, "max_tokens")
    # model, route, method
    assert _error(post({"prompt": PROMPT, "model": "gpt-4"}), 404, "model")["type"] == "NotFoundError"
    _error(httpx.get(f"{base}/v1/nothing"), 404)
    _error(httpx.get(url), 405)
    # chat on a model without a template
    err = _error(httpx.post(f"{base}/v1/chat/completions", json={"messages": CHAT}, timeout=30), 400, "messages")
    assert "chat template" in err["message"]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        _client(base).chat.completions.create(model="tiny-code", messages=CHAT, max_tokens=4)
    assert engine.num_in_flight == 0


def test_body_limit(server):
    engine, base = server
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)})
    _error(httpx.post(f"{base}/v1/completions", content=big, timeout=30), 413, "body")

    def chunks():  # no Content-Length: chunked transfer encoding
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096].encode()

    _error(httpx.post(f"{base}/v1/completions", content=chunks(), timeout=30), 413, "body")


def test_api_key(serving_session):
    engine = make_engine(serving_session, api_key="sekret")
    with http_server(engine) as base:
        assert httpx.get(f"{base}/health").status_code == 200  # no key needed
        for path in ("/v1/models", "/metrics", "/version"):
            _error(httpx.get(f"{base}{path}"), 401)
            _error(httpx.get(f"{base}{path}", headers={"Authorization": "Bearer wrong"}), 401)
            assert httpx.get(f"{base}{path}", headers={"Authorization": "Bearer sekret"}).status_code == 200
        _error(httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT}), 401, "authorization")
        with pytest.raises(openai.AuthenticationError):
            _client(base, "wrong").completions.create(model="tiny-code", prompt=PROMPT, max_tokens=2)
        out = _client(base, "sekret").completions.create(model="tiny-code", prompt=PROMPT, max_tokens=2,
                                                         temperature=0)
        assert out.usage.completion_tokens >= 1


def test_health_while_starting_and_draining(serving_session):
    engine = make_engine(serving_session, warm=False)
    with http_server(engine) as base:
        _error(httpx.get(f"{base}/health"), 503)
        _error(httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT}), 503)
        engine.state = "ready"  # as after a warm-up
        assert httpx.get(f"{base}/health").status_code == 200
        engine.begin_drain()
        _error(httpx.get(f"{base}/health"), 503)
        _error(httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT}), 503)
        assert 'reason="unavailable"' in httpx.get(f"{base}/metrics").text


# ---------------------------------------------------------------------- small endpoints


def test_tokenize_detokenize_models_version_metrics(server, serving_session):
    engine, base = server
    r = httpx.post(f"{base}/tokenize", json={"model": "tiny-code", "prompt": "def fib(n):"})
    body = r.json()
    assert r.status_code == 200 and body["tokens"] == serving_session.tokenizer.encode("def fib(n):")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    plain = httpx.post(f"{base}/tokenize", json={"prompt": "def fib(n):", "add_special_tokens": False}).json()
    assert plain["tokens"] == body["tokens"][1:]
    r = httpx.post(f"{base}/detokenize", json={"model": "tiny-code", "tokens": body["tokens"]})
    assert r.status_code == 200 and r.json() == {"prompt": "def fib(n):"}
    _error(httpx.post(f"{base}/detokenize", json={"tokens": [1, "a"]}), 400, "tokens[1]")
    _error(httpx.post(f"{base}/detokenize", json={"tokens": [10 ** 6]}), 400, "tokens")
    _error(httpx.post(f"{base}/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")
    _error(httpx.post(f"{base}/tokenize", json={"messages": CHAT}), 400, "messages")  # no template

    models = _client(base).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("tiny-code", "model", "jaxinfer")]
    assert httpx.get(f"{base}/v1/models").json()["data"][0]["max_model_len"] == 1024
    assert _client(base).models.retrieve("tiny-code").id == "tiny-code"
    _error(httpx.get(f"{base}/v1/models/other"), 404)
    assert httpx.get(f"{base}/health").status_code == 200
    from jaxinfer import __version__
    assert httpx.get(f"{base}/version").json() == {"version": __version__}

    _client(base).completions.create(model="tiny-code", prompt=PROMPT, max_tokens=2, temperature=0)
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "jaxinfer:num_requests_running" in r.text and "jaxinfer:time_to_first_token_seconds" in r.text


# ---------------------------------------------------------------------- disconnects and overload


def test_client_disconnect_aborts_the_request(server, serving_session):
    engine, base = server
    free = serving_session.metrics()["num_free_pages"]
    aborted = _sample(engine, "jaxinfer:request_success_total", finished_reason="abort")
    with httpx.stream("POST", f"{base}/v1/completions", timeout=600,
                      json={"prompt": PROMPT, "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # leave after the first text
    _wait_idle(engine, free)
    # a plain (not streaming) request whose client gives up
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{base}/v1/completions", timeout=1.0,
                   json={"prompt": PROMPT, "max_tokens": 600, "temperature": 0, "ignore_eos": True})
    _wait_idle(engine, free)
    assert _sample(engine, "jaxinfer:request_success_total", finished_reason="abort") == aborted + 2


def test_overload_is_refused_fast_and_nothing_leaks(serving_session):
    engine = make_engine(serving_session, max_queued_requests=0)  # room for max_num_seqs = 8
    free = serving_session.metrics()["num_free_pages"]
    results: list = []
    start = threading.Barrier(16)

    def one(base):
        start.wait(30)
        t0 = time.monotonic()
        with httpx.stream("POST", f"{base}/v1/completions", timeout=600,
                          json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                                "stream": True, "stream_options": {"include_usage": True}}) as r:
            status, seconds = r.status_code, time.monotonic() - t0
            if status == 200:
                events = _events(r)
                results.append((status, seconds, events[-2]["usage"]["completion_tokens"], events[-1]))
            else:
                r.read()
                results.append((status, seconds, r.json()["error"]["type"], None))

    with http_server(engine) as base:
        threads = [threading.Thread(target=one, args=(base,)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    # a refusal means 8 were in flight, and those 8 were accepted
    assert len(accepted) + len(refused) == 16 and refused and len(accepted) >= 8
    assert all(r[2] == 12 and r[3] == "[DONE]" for r in accepted)
    assert all(r[2] == "RateLimitError" and r[1] < 10 for r in refused)
    assert _sample(engine, "jaxinfer:request_rejected_total", reason="overloaded") == len(refused)
    _wait_idle(engine, free)


# ---------------------------------------------------------------------- chat


def test_chat_template_renders_like_transformers(chat_folder, tmp_path):
    import transformers

    from jaxinfer.models.tokenizer import load_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(chat_folder)
    ours_tokenizer = load_tokenizer(chat_folder)
    template = load_chat_template(chat_folder)
    conversations = [CHAT, [{"role": "user", "content": "hi"}],
                     CHAT + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]]
    for messages in conversations:
        for add in (True, False):
            ours = template.render(messages, add_generation_prompt=add)
            assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours.startswith("<s><|system|>" if messages[0]["role"] == "system" else "<s><|user|>")
            # tokenized without adding a second BOS, as apply_chat_template(tokenize=True)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            assert ours_tokenizer.encode(ours, add_special_tokens=False) == ids and ids[:2] != [1, 1]
    # where templates come from: chat_template.jinja first, then a named list's "default"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert find_template_source(str(tmp_path)) == "D"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_chat_template(str(tmp_path)).render(CHAT) == "J2"
    assert ChatTemplate("{{ x | tojson }}").render([], x={"é": 1}) == '{"é": 1}'
    assert find_template_source(str(tmp_path / "missing")) is None


def test_chat_completions(chat_server):
    engine, base, folder = chat_server
    session = engine.session
    prompt_ids = session.tokenizer.encode(load_chat_template(folder).render(CHAT), add_special_tokens=False)
    ref = session.generate([prompt_ids], session.default_sampling_params(max_tokens=8, temperature=0))[0]
    client = _client(base)
    out = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.choices[0].logprobs is None
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == len(ref.token_ids)
    # the reference run cached the prompt's full pages (one token is always computed)
    cached = (len(prompt_ids) - 1) // session.engine.runner.page_size * session.engine.runner.page_size
    assert out.usage.prompt_tokens_details.cached_tokens == cached
    # content as text parts, max_completion_tokens
    parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": "def fib"}]}]
    out2 = client.chat.completions.create(model="tiny-chat", messages=parts, max_completion_tokens=8, temperature=0)
    assert out2.choices[0].message.content == ref.text
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == ref.text
    assert chunks[-2].choices[0].finish_reason is not None and chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    # echo continues the last assistant message
    partial = CHAT + [{"role": "assistant", "content": "Sure:"}]
    echo = httpx.post(f"{base}/v1/chat/completions", timeout=600, json={
        "messages": partial, "max_tokens": 2, "temperature": 0, "echo": True, "add_generation_prompt": False})
    assert echo.status_code == 200 and echo.json()["choices"][0]["message"]["content"].startswith("Sure:")
    r = httpx.post(f"{base}/tokenize", json={"model": "tiny-chat", "messages": CHAT})
    assert r.status_code == 200 and r.json()["tokens"] == prompt_ids

    # the sampled tokens' log-probs (top_logprobs=0 runs the programs already compiled; the
    # alternatives' layout is the same code as below, and completions test them end to end)
    out = client.chat.completions.create(model="tiny-chat", messages=CHAT, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=0)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(e.logprob <= 0 and isinstance(e.bytes, list) and e.top_logprobs == [] for e in content)
    assert "".join(e.token for e in content).startswith(out.choices[0].message.content)
    texts = openai_protocol.TokenTexts(engine.tokenizer)
    byte_id = engine.tokenizer.token_to_id("<0xC3>")
    entries = openai_protocol.chat_logprobs(texts, [292, byte_id], [-0.5, float("-inf")],
                                            [{292: -0.5, 297: -1.0, 3: -2.0}, {byte_id: -3.0, 292: -0.1}], 2)
    assert entries[0]["token"] == "def" and entries[0]["bytes"] == list(b"def")
    assert [(a["token"], a["logprob"]) for a in entries[0]["top_logprobs"]] == [("def", -0.5),
                                                                              (texts.text(297), -1.0)]
    assert entries[1]["bytes"] == [0xC3] and entries[1]["logprob"] == -9999.0
    assert entries[1]["top_logprobs"][0]["logprob"] == -0.1
    url = f"{base}/v1/chat/completions"
    _error(httpx.post(url, json={"messages": CHAT, "top_logprobs": 2}), 400, "top_logprobs")
    _error(httpx.post(url, json={"messages": CHAT, "logprobs": True, "top_logprobs": 21}), 400, "top_logprobs")
    _error(httpx.post(url, json={"messages": "hi"}), 400, "messages")
    _error(httpx.post(url, json={"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content")
    _error(httpx.post(url, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400,
           "messages[0].content[0]")
    err = _error(httpx.post(url, json={"messages": [{"role": "tool", "content": "x"}]}), 400, "messages")
    assert "Only system, user and assistant roles are supported" in err["message"]
    _error(httpx.post(url, json={"messages": CHAT, "tools": [{"type": "function"}]}), 400, "tools")
    _error(httpx.post(url, json={"messages": CHAT, "model": "tiny-code"}), 404, "model")
    _error(httpx.post(url, json={"messages": CHAT, "max_tokens": 2000}), 400, "max_tokens")
    assert engine.num_in_flight == 0


def test_speculative_server_streams_the_same_text_and_exports_spec_metrics(serving_session):
    """A server over a session with prompt-lookup speculation: the streamed text of a greedy
    request is the non-speculative session's, and /metrics has vLLM's spec_decode counters."""
    from jaxinfer import InferenceSession, SpeculativeConfig
    prompt = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n"
    expected = serving_session.generate([prompt], serving_session.default_sampling_params(max_tokens=12,
                                                                                            temperature=0))[0]
    session = InferenceSession.from_pretrained("tiny-code", engine=EngineConfig(
        max_num_seqs=4, num_pages=64, compilation_cache_dir="", speculative=SpeculativeConfig(method="ngram")))
    try:
        engine = make_engine(session, warm=False)
        engine.state = "ready"
        with http_server(engine) as base:
            chunks = _client(base).completions.create(model="tiny-code", prompt=prompt, max_tokens=12, temperature=0,
                                                      stream=True)
            assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
            text = httpx.get(f"{base}/metrics").text
        drafted = _sample(engine, "jaxinfer:spec_decode_num_draft_tokens_total")
        accepted = _sample(engine, "jaxinfer:spec_decode_num_accepted_tokens_total")
        assert drafted > 0 and 0 <= accepted <= drafted and "jaxinfer:spec_decode_num_drafts_total" in text
        assert sum(_sample(engine, "jaxinfer:spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
                   for i in range(4)) == accepted
    finally:
        session.close()
