"""Fuzzing the HTTP server's JSON bodies (hypothesis) while a needle request runs beside them.

A real in-process server (uvicorn on 127.0.0.1, a free port) over the shared session;
raw bodies go through httpx (the `openai` client cannot send malformed JSON), the needle
through the `openai` client. Properties, for /v1/completions and /v1/chat/completions:
- a body with a wrong type, a missing field, a huge number, NaN / Infinity, nested junk,
  a duplicate key, bytes that are not JSON or not UTF-8, or arrays nested 10^5 deep is
  answered with a 4xx in OpenAI's error shape naming the field (`error.param`); nothing
  is ever a 5xx, a hang or a crash;
- a value of the wrong JSON type for a known field is a 400 naming that field;
- a needle (greedy, the same prompt) that runs in a loop beside the fuzzing gets the
  tokens of a clean run every time; afterwards nothing is in flight and no page is used.

Counts: JAXINFER_FUZZ_REPORT=path merges {property: {examples, failures}} into that file.
The default run tries a bounded number of examples; `-m slow` many more.
"""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from hypothesis import strategies as st

from reliability_support import http_server, make_engine, run_property, wait_idle

PROMPT = "def fib"  # 4 tokens with BOS, like the warm-up's prompt
NEEDLE = PROMPT  # + NEEDLE_TOKENS <= 16 tokens: one KV page, the programs the warm-up compiled
NEEDLE_TOKENS = 10

INT_FIELDS = ("max_tokens", "n", "seed", "top_k", "min_tokens", "priority")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
BOOL_FIELDS = ("stream", "echo", "ignore_eos")
STR_FIELDS = ("model", "user", "cache_salt")
OTHER_FIELDS = ("prompt", "messages", "stop", "stop_token_ids", "logit_bias", "logprobs", "stream_options",
                "top_logprobs", "max_completion_tokens", "best_of", "suffix", "chat_template_kwargs", "tools",
                "response_format", "x_unknown")
BASES = {
    "/v1/completions": {"model": "tiny-code", "prompt": PROMPT, "max_tokens": 1, "temperature": 0},
    "/v1/chat/completions": {"model": "tiny-code", "messages": [{"role": "user", "content": PROMPT}],
                             "max_tokens": 1, "temperature": 0},
}

# JSON leaves: huge and small ints, floats with NaN / Infinity (json.dumps writes the
# literals), junk strings (lone surrogates become \ud800 escapes), null, bools.
LEAVES = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 3), st.integers(min_value=2 ** 31), st.integers(max_value=-2 ** 31),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 5e-324, 0.5]),
    st.text(max_size=40), st.sampled_from(["", "\ud800", "\x00\x01", "🙂" * 10, "tiny-code", "1"]))
VALUES = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _wrong_type(field: str, value) -> bool:
    """True when `value` is of a JSON type the field can never take (strict parsing)."""
    if value is None:
        return False
    if field in INT_FIELDS:
        return not _is_int(value)
    if field in FLOAT_FIELDS:
        return not (isinstance(value, (int, float)) and not isinstance(value, bool))
    if field in BOOL_FIELDS:
        return not isinstance(value, bool)
    if field in STR_FIELDS:
        return not isinstance(value, str)
    return False


def _check_error(r: httpx.Response, field: str = None) -> dict:
    """A 4xx in OpenAI's error shape naming a field (`field`, or its sub-path, when given)."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == r.status_code
    assert isinstance(error["param"], str) and error["param"], error
    if field is not None:
        assert error["param"] == field or error["param"].startswith((field + ".", field + "[")), (field, error)
    return error


def _check_any(r: httpx.Response) -> None:
    """Never a 5xx; a 200 is a well-formed answer, anything else an error naming a field."""
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code == 200:
        body = r.text
        assert body.startswith("data: ") or "choices" in r.json(), body[:300]
    else:
        _check_error(r)


def _post(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def _mutations():
    """(path, field, value or DELETE): one field of a valid body set to junk or removed."""
    fields = st.sampled_from(INT_FIELDS + FLOAT_FIELDS + BOOL_FIELDS + STR_FIELDS + OTHER_FIELDS)
    # Deleting an optional field only brings its default back: deletions are of the
    # required fields and of a few whose default is another program (temperature).
    deletable = st.sampled_from(["prompt", "messages", "model", "temperature", "stream"])
    return st.one_of(st.tuples(st.sampled_from(sorted(BASES)), fields, VALUES),
                     st.tuples(st.sampled_from(sorted(BASES)), deletable, st.just("<delete>")))


def _raw_bodies():
    """Bytes that are not a JSON object: random bytes, invalid UTF-8, truncated JSON, literals."""
    return st.one_of(
        st.binary(max_size=64),
        st.binary(min_size=1, max_size=16).map(lambda b: b'{"prompt": "' + b"\xff\xfe" + b + b'"}'),
        st.sampled_from([b"", b"null", b"[]", b"42", b'"x"', b"{", b'{"prompt": ', b"NaN", b"\xef\xbb\xbf{}",
                         b'{"prompt": "a", "max_tokens": 1e999}', b'{"prompt": "\\ud800", "max_tokens": -Infinity}']),
        st.text(max_size=32).map(lambda t: t.encode("utf-8", "surrogatepass")))


def _duplicate_keys():
    keys = st.sampled_from(["prompt", "max_tokens", "temperature", "model", "messages", "stream"])
    return st.tuples(st.sampled_from(sorted(BASES)), keys, VALUES, VALUES)


def _deep():
    return st.tuples(st.sampled_from(sorted(BASES)), st.sampled_from(["prompt", "messages", "stop", "logit_bias"]),
                     st.integers(65, 100_000), st.sampled_from("[{"))


class Needle:
    """Runs the needle request in a loop (bounded) until stopped; records every output."""

    def __init__(self, base: str, expected: str):
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        self.expected = expected
        self.outputs: list = []
        self.errors: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.outputs) < 2000:
            try:
                out = self.client.completions.create(model="tiny-code", prompt=NEEDLE, max_tokens=NEEDLE_TOKENS,
                                                     temperature=0, extra_body={"ignore_eos": True})
                self.outputs.append(out.choices[0].text)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))

    def __enter__(self) -> "Needle":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(180)
        assert not self._thread.is_alive(), "the needle loop did not end"


def fuzz_http(base: str, examples: int) -> None:
    """Every property against the server at `base` (examples per property)."""
    with httpx.Client(base_url=base, timeout=60) as client:
        def mutated(case):
            path, field, value = case
            body = dict(BASES[path])
            if value == "<delete>":
                body.pop(field, None)
            else:
                body[field] = value
            r = _post(client, path, json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"))
            _check_any(r)
            if value != "<delete>" and _wrong_type(field, value):
                _check_error(r, field)
            if value == "<delete>" and field in ("prompt", "messages") and field in BASES[path]:
                _check_error(r, field)

        def raw(content):
            for path in BASES:
                r = _post(client, path, content)
                _check_error(r)

        def duplicated(case):
            path, key, first, second = case
            body = json.dumps(BASES[path])[:-1]
            first, second = json.dumps(first, allow_nan=True), json.dumps(second, allow_nan=True)
            text = f'{body}, "{key}": {first}, "{key}": {second}}}'
            _check_error(_post(client, path, text.encode("utf-8", "surrogatepass")))

        def deep(case):
            path, field, depth, bracket = case
            close = "]" if bracket == "[" else "}"
            inner = ('{"a":' * depth + "1" + "}" * depth) if bracket == "{" else ("[" * depth + close * depth)
            body = json.dumps({**BASES[path], field: 0}).replace(f'"{field}": 0', f'"{field}": {inner}')
            _check_error(_post(client, path, body.encode()))

        run_property("http.mutated_field", _mutations(), mutated, examples)
        run_property("http.raw_bytes", _raw_bodies(), raw, max(examples // 2, 1))
        run_property("http.duplicate_keys", _duplicate_keys(), duplicated, max(examples // 2, 1))
        run_property("http.deep_nesting", _deep(), deep, max(examples // 4, 1))


def _fuzz_with_needle(serving_session, examples: int) -> None:
    engine = make_engine(serving_session)
    with http_server(engine) as base:
        clean = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        expected = clean.completions.create(model="tiny-code", prompt=NEEDLE, max_tokens=NEEDLE_TOKENS,
                                            temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        with Needle(base, expected) as needle:
            fuzz_http(base, examples)
        assert not needle.errors, needle.errors[:3]
        assert needle.outputs and all(o == expected for o in needle.outputs), (expected, set(needle.outputs))
        r = httpx.get(base + "/health", timeout=10)
        assert r.status_code == 200  # still serving
    wait_idle(engine)


def test_fuzz_http_bodies(serving_session):
    _fuzz_with_needle(serving_session, examples=40)


@pytest.mark.slow
def test_fuzz_http_bodies_slow(serving_session):
    _fuzz_with_needle(serving_session, examples=4000)
