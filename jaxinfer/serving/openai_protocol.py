"""The OpenAI-compatible wire shapes of the HTTP server (layer 6; no jax).

Requests are pydantic models in strict mode (a string is not a number, a float is not an
int, a bool is not an int); `parse` turns a validation failure into a 400 naming the
field (`messages[0].content`). Unknown fields are ignored, as OpenAI's SDKs send new
ones; fields we cannot honour are refused by name (`refuse_unsupported`).

Response pieces: finish reasons, usage, log-probs in the completions layout (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`: offsets into the choice's text, echoed
prompt included) and the chat layout (`content: [{token, logprob, bytes, top_logprobs}]`),
the choices of a finished request and the chunks of a streamed one.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from jaxinfer.serving.core import InvalidRequest

# A JSON value the client sent as NaN / Infinity (or a float that overflows).
_NON_FINITE = object()


# JSON nesting deeper than this is refused before parsing (no request needs more than a few
# levels; the parser would otherwise recurse until RecursionError).
MAX_JSON_DEPTH = 64


def _unique_keys(pairs: list) -> dict:
    """object_pairs_hook: a key given twice is an error (two parsers could read it differently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise InvalidRequest(f"{key}: the key appears more than once in a JSON object", param=str(key)[:64])
        out[key] = value
    return out


def _json_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(body: bytes) -> dict:
    """The request body as a JSON object; NaN / Infinity are refused naming their field,
    and so are keys given twice and nesting deeper than MAX_JSON_DEPTH."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"body: not valid UTF-8 ({e})", param="body") from None
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", param="body")
    try:
        data = json.loads(text, parse_constant=lambda _: _NON_FINITE, object_pairs_hook=_unique_keys,
                          parse_float=lambda s: float(s) if math.isfinite(float(s)) else _NON_FINITE)
    except (ValueError, RecursionError) as e:
        raise InvalidRequest(f"body: not valid JSON ({str(e)[:200]})", param="body") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"body: expected a JSON object, got {type(data).__name__}", param="body")
    path = _find_non_finite(data, "")
    if path is not None:
        raise InvalidRequest(f"{path}: must be a finite number (NaN and Infinity are not valid)", param=path)
    return data


def _find_non_finite(value, path: str) -> Optional[str]:
    if value is _NON_FINITE:
        return path or "body"
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = _find_non_finite(sub, sub_path)
        if found is not None:
            return found
    return None


def field_path(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse(model: type, data: dict):
    """`model.model_validate(data)`; a failure is an InvalidRequest naming the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        path = field_path(first.get("loc", ()))
        message = first.get("msg", "invalid value")
        if first.get("type") == "missing":
            message = "this field is required"
        raise InvalidRequest(f"{path}: {message}", param=path) from None


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


class StreamOptions(_Model):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM: usage in every chunk


class _GenerationRequest(_Model):
    """Fields /v1/completions and /v1/chat/completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Any = None  # str or list of str: SamplingParams checks it, naming "stop"
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    echo: Optional[bool] = False
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    early_exit_threshold: Optional[float] = None  # ours: recursive models served depth-wise
    priority: Optional[int] = 0
    cache_salt: Optional[str] = None

    def sampling_fields(self) -> dict:
        """The SamplingParams fields this request sets (None = the model's default)."""
        fields = {name: getattr(self, name) for name in (
            "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens")}
        if self.n is not None and self.n != 1:  # 1 is the default: not sent, so older SamplingParams work
            fields["n"] = self.n
        if self.logit_bias:  # {"token id": bias}: SamplingParams reads the string keys
            fields["logit_bias"] = self.logit_bias
        if self.early_exit_threshold is not None:  # not sent otherwise: older SamplingParams work
            fields["early_exit_threshold"] = self.early_exit_threshold
        return fields

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options: only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_GenerationRequest):
    prompt: Any = None  # str | list[str] | list[int] | list[list[int]]: checked by `prompts`
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None  # top-N per token (0 = the sampled token's only)
    suffix: Optional[str] = None  # refused when set
    best_of: Optional[int] = None  # only == n


class ChatCompletionRequest(_GenerationRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: Optional[bool] = True
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(_Model):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: Optional[bool] = True


class DetokenizeRequest(_Model):
    model: Optional[str] = None
    tokens: list[int]


# Fields we cannot honour: refused by name when they are set (not null / not their no-op).
_UNSUPPORTED = {
    "completions": ("suffix", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                    "structured_outputs", "response_format"),
    "chat": ("tools", "functions", "function_call", "audio", "prediction", "guided_json", "guided_regex",
             "guided_choice", "guided_grammar", "structured_outputs", "chat_template", "continue_final_message"),
}


def refuse_unsupported(data: dict, kind: str) -> None:
    """400 for a set field this server does not implement (rather than ignoring it silently)."""
    for name in _UNSUPPORTED[kind]:
        if data.get(name) not in (None, False, ""):
            raise InvalidRequest(f"{name}: not supported by this server", param=name)
    if kind == "chat":
        if data.get("tool_choice") not in (None, "none"):
            raise InvalidRequest("tool_choice: tools are not supported by this server", param="tool_choice")
        fmt = data.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise InvalidRequest("response_format: only {\"type\": \"text\"} is supported", param="response_format")
        modalities = data.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise InvalidRequest("modalities: only [\"text\"] is supported", param="modalities")


def prompts(value) -> list:
    """A completions `prompt` as a list of prompts, each a str or a list of token ids."""
    what = "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids"

    def is_ids(x):
        return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if value is None:
        raise InvalidRequest("prompt: this field is required", param="prompt")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(f"{what}, got {type(value).__name__}", param="prompt")
    if not value:
        raise InvalidRequest("prompt: the list is empty", param="prompt")
    if is_ids(value):
        return [value]
    if all(isinstance(x, str) for x in value) or all(is_ids(x) for x in value):
        return list(value)
    raise InvalidRequest(what, param="prompt")


def chat_messages(messages: list) -> list:
    """Messages for the template: content as a string (text parts joined by newlines)."""
    if not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}].role: must be a non-empty string", param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"{where}: only {{\"type\": \"text\", \"text\": ...}} parts are supported",
                                         param=where)
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content: must be a string or a list of text parts",
                                 param=f"messages[{i}].content")
        out.append({**message, "role": role, "content": content})
    return out


# ---------------------------------------------------------------------- responses

def finish_reason(reason: Optional[str]) -> Optional[str]:
    """The engine's reasons in OpenAI's words ("eos" -> "stop"; "length", "stop", "abort")."""
    return "stop" if reason == "eos" else reason


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: Optional[int] = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:  # OpenAI's field: prompt tokens served from the prefix cache
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def _cached_of(result) -> int:
    """A SampleResult's cached prompt tokens: on the first sample's last delta only."""
    output = result.delta.output if result.delta.is_finished else None
    return output.num_cached_tokens if output is not None and result.index == 0 else 0


def cached_tokens(outputs: dict) -> int:
    """Prompt tokens from the prefix cache over {(prompt index, sample index): RequestOutput},
    counted once per prompt (its first sample)."""
    return sum(out.num_cached_tokens for (_, index), out in outputs.items() if index == 0)


def finite(logprob: Optional[float]) -> Optional[float]:
    """JSON has no -inf: a token of probability 0 gets -9999.0."""
    if logprob is None:
        return None
    return logprob if math.isfinite(logprob) else -9999.0


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenTexts:
    """Per-token text (for log-probs), cached: the id decoded alone, special tokens kept."""

    def __init__(self, tokenizer, limit: int = 1 << 18):
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())  # not in a response's text
        self._cache: dict = {}
        self._limit = limit

    def text(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < self._limit:
                self._cache[token_id] = text
        return text

    def bytes(self, token_id: int) -> list:
        """The token's UTF-8 bytes; a byte-fallback piece (<0xE2>) is its one byte."""
        if self.tokenizer is not None:
            match = _BYTE_PIECE.match(self.tokenizer.id_to_piece(token_id) or "")
            if match:
                return [int(match.group(1), 16)]
        return list(self.text(token_id).encode("utf-8"))


class CompletionLogprobs:
    """Accumulates the completions log-prob layout of one choice; `text_offset` runs on."""

    def __init__(self, texts: TokenTexts, offset: int = 0):
        self.texts = texts
        self.offset = offset

    def add(self, token_ids, logprobs, top_logprobs=None, first_is_none: bool = False) -> dict:
        """One piece: {tokens, token_logprobs, top_logprobs, text_offset} for `token_ids`."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for k, token_id in enumerate(token_ids):
            token = self.texts.text(token_id)
            logprob = None if first_is_none and k == 0 else finite(logprobs[k] if logprobs else None)
            top = None
            if logprob is not None:
                top = {token: logprob}
                if top_logprobs:
                    for alt_id, alt in top_logprobs[k].items():
                        top.setdefault(self.texts.text(alt_id), finite(alt))
            out["tokens"].append(token)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            if token_id not in self.texts.special:
                self.offset += len(token)
        return out


def merge_completion_logprobs(a: Optional[dict], b: dict) -> dict:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(texts: TokenTexts, token_ids, logprobs, top_logprobs, num_top: int) -> list:
    """The chat layout: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    out = []
    for k, token_id in enumerate(token_ids):
        alts = []
        if num_top and top_logprobs:
            ranked = sorted(top_logprobs[k].items(), key=lambda kv: -kv[1])[:num_top]
            alts = [{"token": texts.text(i), "logprob": finite(lp), "bytes": texts.bytes(i)} for i, lp in ranked]
        out.append({"token": texts.text(token_id), "logprob": finite(logprobs[k] if logprobs else None),
                    "bytes": texts.bytes(token_id), "top_logprobs": alts})
    return out


# ---------------------------------------------------------------------- choices and chunks

def completion_choices(outputs: dict, num_prompts: int, n: int, echo: Optional[list], want_logprobs: bool,
                       texts: TokenTexts) -> list:
    """/v1/completions choices from {(prompt index, sample index): RequestOutput}: index = p * n + i."""
    choices = []
    for p in range(num_prompts):
        for i in range(n):
            out = outputs[(p, i)]
            logprobs = None
            if want_logprobs:
                acc = CompletionLogprobs(texts)
                if echo:  # the prompt's tokens first; the first one has no log p
                    prompt_lp = [None, *(out.prompt_logprobs or [None] * (len(out.prompt_token_ids) - 1))]
                    logprobs = acc.add(out.prompt_token_ids, prompt_lp, first_is_none=True)
                logprobs = merge_completion_logprobs(logprobs, acc.add(out.token_ids, out.logprobs, out.top_logprobs))
            choices.append({"index": p * n + i, "text": (echo[p] if echo else "") + out.text, "logprobs": logprobs,
                            "finish_reason": finish_reason(out.finish_reason)})
    return choices


async def completion_chunks(results, req, base: dict, n: int, echo: Optional[list], num_prompt_tokens: int,
                            texts: TokenTexts, state):
    """/v1/completions stream chunks from (prompt index, SampleResult) pairs; `state.completion_tokens` runs on."""
    num_tokens = cached = 0
    logprobs_of: dict = {}
    echoed: set = set()
    async for p, result in results:
        index, delta = p * n + result.index, result.delta
        num_tokens += len(delta.token_ids)
        cached += _cached_of(result)
        state.completion_tokens = num_tokens
        text = delta.text
        if echo and index not in echoed:
            echoed.add(index)
            text = echo[p] + text
        logprobs = None
        if req.logprobs is not None and delta.token_ids:
            acc = logprobs_of.setdefault(index, CompletionLogprobs(texts))
            logprobs = acc.add(delta.token_ids, delta.logprobs, delta.top_logprobs)
        if not (text or delta.is_finished or logprobs):
            continue
        chunk = {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                      "finish_reason": finish_reason(delta.finish_reason)}]}
        if req.continuous_usage:
            chunk["usage"] = usage(num_prompt_tokens, num_tokens)
        yield chunk
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(num_prompt_tokens, num_tokens, cached)}


def chat_choices(outputs: dict, n: int, prefix: str, want_logprobs: bool, num_top: int, texts: TokenTexts) -> list:
    choices = []
    for i in range(n):
        out = outputs[(0, i)]
        logprobs = {"content": chat_logprobs(texts, out.token_ids, out.logprobs, out.top_logprobs, num_top)} \
            if want_logprobs else None
        choices.append({"index": i, "message": {"role": "assistant", "content": prefix + out.text},
                        "logprobs": logprobs, "finish_reason": finish_reason(out.finish_reason)})
    return choices


async def chat_chunks(results, req, base: dict, n: int, prefix: str, num_prompt_tokens: int, num_top: int,
                      texts: TokenTexts, state):
    """/v1/chat/completions stream chunks: {role} first per choice, then {content} deltas, finish reasons."""
    def chunk(index, delta, logprobs=None, reason=None):
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
        if prefix:
            yield chunk(i, {"content": prefix})
    num_tokens = cached = 0
    async for _, result in results:
        delta = result.delta
        num_tokens += len(delta.token_ids)
        cached += _cached_of(result)
        state.completion_tokens = num_tokens
        logprobs = None
        if req.logprobs and delta.token_ids:
            logprobs = {"content": chat_logprobs(texts, delta.token_ids, delta.logprobs, delta.top_logprobs,
                                                 num_top)}
        if not (delta.text or delta.is_finished or logprobs):
            continue
        out = chunk(result.index, {"content": delta.text} if delta.text or not delta.is_finished else {}, logprobs,
                    finish_reason(delta.finish_reason))
        if req.continuous_usage:
            out["usage"] = usage(num_prompt_tokens, num_tokens)
        yield out
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(num_prompt_tokens, num_tokens, cached)}
