"""The parts of scripts/benchmark_serving.py that define no absl flags, so tests import them.

- Arrivals: request send times from a gamma process (Poisson when the shape is 1).
- Workloads: random, shared-prefix and JSON prompts of controlled token lengths.
- Clients: one streamed request to an OpenAI HTTP server (completions or chat) or to a
  JetStream gRPC Orchestrator, timed per chunk, and the runner that paces and bounds
  them. Nothing here retries: a failed request is recorded with its error text.
- Metrics: throughput, goodput and latency statistics from the per-request records, and
  the "Serving Benchmark Result" table.

Times are seconds in the records and milliseconds in the metrics and the table.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import time
from typing import Awaitable, Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class RequestInput:
    prompt: str
    prompt_len: int  # tokenizer count (special tokens included), else the requested length
    output_len: int


@dataclasses.dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0  # usage.prompt_tokens when the server reports it, else RequestInput.prompt_len
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first non-empty content chunk
    itl: list = dataclasses.field(default_factory=list)  # seconds between later content chunks
    latency: float = 0.0  # seconds from send to the end of the stream
    error: str = ""


# --------------------------------------------------------------------------- arrivals


def arrival_intervals(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """n gaps (s) between sends, drawn from Gamma(shape=burstiness, scale=1/(rate*burstiness)).

    The mean gap is 1/rate whatever the burstiness; the variance is 1/(rate^2 burstiness):
    burstiness 1 is a Poisson process, below 1 burstier, above 1 more regular. An infinite
    rate sends everything at once (all gaps 0).
    """
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    return np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send time (s from the start) of each of n requests; the first is sent at 0."""
    if n == 0:
        return np.zeros(0)
    times = np.cumsum(arrival_intervals(n, rate, burstiness, seed))
    return times - times[0]


# --------------------------------------------------------------------------- workloads

# Common English words; with a leading space each is one token in most BPE vocabularies,
# so a prompt of n of them is about n tokens when no tokenizer is given.
WORDS = tuple("""
the of and to in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if more no out so what up its said
about into than them can only other time new some could these two may first then do any like my now
over such our man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still own
see men work long get here between both life being under never day same another know while last might
us great old year off come since against go came right used take three small place put end does home
part high large hand turn real set word page point grew city play land house line water light name open
tree sea kind near build self earth father head stand few story saw far left late run keep eye
""".split())


def sample_lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> list[int]:
    """n lengths uniform in [mean (1 - r), mean (1 + r)] (integers, at least 1)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n).tolist()


def _plain(text: str) -> bool:
    return bool(text.strip()) and text.isprintable() and "\ufffd" not in text


class PromptMaker:
    """Random text of a given token length: from a tokenizer's vocabulary, else from WORDS."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            # Ids that decode to visible text on their own: no special tokens, no lone bytes of a
            # multi-byte character (they decode to U+FFFD, which re-encodes as 3 byte tokens),
            # no bare whitespace (stripped at the ends of a prompt), no control characters.
            self._candidates = np.array([i for i in range(tokenizer.vocab_size) if i not in special
                                         and _plain(tokenizer.decode([i]))])
            if self._candidates.size == 0:
                raise ValueError(f"tokenizer {tokenizer.path}: no id decodes to plain text")
            # Tokens the server adds around a prompt (BOS, maybe EOS).
            self._num_special = len(tokenizer.encode("a")) - len(tokenizer.encode("a", add_special_tokens=False))

    def count(self, text: str, add_special_tokens: bool = True) -> int:
        """The prompt's token count by the tokenizer, else its word count."""
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def text(self, rng: np.random.Generator, n: int, prefix: str = "") -> str:
        """A whole prompt of n tokens (the special tokens a server adds included), or, after
        a prefix, text that makes prefix + " " + text n tokens longer than the prefix.

        Random token ids do not survive decode + encode unchanged (and merge with their
        neighbours), so the text is re-encoded in place, then its ids cut or topped up
        until the count is right (a few rounds; the last text is kept if it never settles).
        """
        if self.tokenizer is None:
            return " ".join(rng.choice(WORDS, size=n).tolist())
        encode = self.tokenizer.encode
        head = prefix + " " if prefix else ""
        base = len(encode(prefix, add_special_tokens=False)) if prefix else 0
        target = n if prefix else max(1, n - self._num_special)
        ids = rng.choice(self._candidates, size=target).tolist()
        text = ""
        for _ in range(16):
            text = self.tokenizer.decode(ids)
            got = len(encode(head + text, add_special_tokens=False)) - base
            if got == target:
                break
            ids = encode(text, add_special_tokens=False)
            ids = ids[:max(1, len(ids) - (got - target))] if got > target else ids + rng.choice(
                self._candidates, size=target - got).tolist()
        return text


def random_workload(maker: PromptMaker, num_prompts: int, input_len: int, output_len: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list[RequestInput]:
    rng = np.random.default_rng(seed)
    in_lens = sample_lengths(rng, input_len, range_ratio, num_prompts)
    out_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    out = []
    for n, m in zip(in_lens, out_lens):
        prompt = maker.text(rng, n)
        out.append(RequestInput(prompt, maker.count(prompt) if maker.tokenizer else n, m))
    return out


def mixed_workload(maker: PromptMaker, num_prompts: int, input_len: int, output_len: int, long_fraction: float,
                   long_input_len: int, long_output_len: int, seed: int = 0) -> list[RequestInput]:
    """Decode-heavy requests (input_len prompt, output_len tokens) with a share
    `long_fraction` of long-prompt ones (long_input_len, long_output_len) among them, in
    random order: the workload where a long prefill computed beside decodes stalls them
    (Splitwise's interference)."""
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"long_fraction: must be in [0, 1], got {long_fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for is_long in rng.random(num_prompts) < long_fraction:
        n, m = (long_input_len, long_output_len) if is_long else (input_len, output_len)
        prompt = maker.text(rng, n)
        out.append(RequestInput(prompt, maker.count(prompt) if maker.tokenizer else n, m))
    return out


def shared_prefix_workload(maker: PromptMaker, num_prompts: int, prefix_len: int, num_prefixes: int,
                           suffix_len: int, output_len: int, range_ratio: float = 0.0,
                           seed: int = 0) -> list[RequestInput]:
    """Prompt i = prefix (i mod num_prefixes) of prefix_len tokens + its own random suffix."""
    if num_prefixes < 1:
        raise ValueError(f"num_prefixes must be >= 1, got {num_prefixes}")
    rng = np.random.default_rng(seed)
    prefixes = [maker.text(rng, prefix_len) for _ in range(num_prefixes)]
    suffix_lens = sample_lengths(rng, suffix_len, range_ratio, num_prompts)
    out_lens = sample_lengths(rng, output_len, range_ratio, num_prompts)
    out = []
    for i, (n, m) in enumerate(zip(suffix_lens, out_lens)):
        prefix = prefixes[i % num_prefixes]
        prompt = prefix + " " + maker.text(rng, n, prefix=prefix)
        out.append(RequestInput(prompt, maker.count(prompt) if maker.tokenizer else prefix_len + n, m))
    return out


def json_workload(maker: PromptMaker, path: str, num_prompts: int) -> list[RequestInput]:
    """num_prompts entries of a JSON list of {"prompt": str, "output_len": int} (cycled if short)."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'prompt', 'output_len'}} objects")
    out = []
    for i in range(num_prompts):
        e = entries[i % len(entries)]
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str) or not isinstance(e.get("output_len"), int):
            raise ValueError(f"{path}: entry {i % len(entries)} is not {{'prompt': str, 'output_len': int}}: {e!r}")
        out.append(RequestInput(e["prompt"], maker.count(e["prompt"]), e["output_len"]))
    return out


# --------------------------------------------------------------------------- clients


def _failure(req: RequestInput, error: str) -> RequestResult:
    return RequestResult(success=False, prompt_len=req.prompt_len, error=error)


class _ChunkClock:
    """TTFT and inter-chunk gaps of one streamed request."""

    def __init__(self):
        self.start = time.perf_counter()
        self.last = None
        self.ttft = None
        self.itl = []
        self.chunks = 0

    def content(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now
        self.chunks += 1

    def result(self, req: RequestInput, output_tokens: int, prompt_len: int | None = None) -> RequestResult:
        latency = time.perf_counter() - self.start
        # A stream without any content chunk (an empty completion): its first token is its end.
        return RequestResult(success=True, prompt_len=prompt_len or req.prompt_len, output_tokens=output_tokens,
                             ttft=latency if self.ttft is None else self.ttft, itl=self.itl, latency=latency)


def openai_payload(model: str, req: RequestInput, chat: bool) -> dict:
    payload = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    return payload


async def openai_request(client, url: str, model: str, req: RequestInput, chat: bool = False,
                         headers: dict | None = None) -> RequestResult:
    """One streamed POST to {base}/v1/completions or /v1/chat/completions (client: httpx.AsyncClient)."""
    clock = _ChunkClock()
    usage = {}
    done = False
    async with client.stream("POST", url, json=openai_payload(model, req, chat), headers=headers) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            return _failure(req, f"HTTP {resp.status_code}: {body[:300]}")
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": comments", event names
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                return _failure(req, f"stream error: {json.dumps(chunk['error'])[:300]}")
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                if text:
                    clock.content()
                    break
            usage = chunk.get("usage") or usage
    if not done:
        return _failure(req, "stream ended before 'data: [DONE]'")
    # Without usage the chunk count stands in for the token count (a chunk may hold several).
    return clock.result(req, usage.get("completion_tokens") or clock.chunks, usage.get("prompt_tokens"))


def jetstream_decode_request(pb2, req: RequestInput):
    fields = {"max_tokens": req.output_len, "text_content": {"text": req.prompt}}
    descriptor = getattr(pb2.DecodeRequest, "DESCRIPTOR", None)
    if descriptor is None or "num_samples" in descriptor.fields_by_name:
        fields["num_samples"] = 1
    return pb2.DecodeRequest(**fields)


async def jetstream_request(stub, pb2, req: RequestInput, timeout_s: float | None = None) -> RequestResult:
    """One Orchestrator.Decode stream; output tokens = the token_ids received."""
    clock = _ChunkClock()
    tokens = 0
    try:
        async for resp in stub.Decode(jetstream_decode_request(pb2, req), timeout=timeout_s):
            samples = resp.stream_content.samples  # empty for initial_content
            if samples and (samples[0].text or samples[0].token_ids):
                tokens += len(samples[0].token_ids)
                clock.content()
    except Exception as e:  # noqa: BLE001 - grpc.aio.AioRpcError and friends
        if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):
            return _failure(req, f"gRPC {e.code().name}: {e.details()}")
        raise
    return clock.result(req, tokens)


async def run_requests(requests: Sequence[RequestInput], send: Callable[[RequestInput], Awaitable[RequestResult]],
                       times: Sequence[float] | None = None, max_concurrency: int | None = None,
                       timeout_s: float | None = None, progress=None) -> tuple[list[RequestResult], float]:
    """Sends request i at times[i] s after the start (at most max_concurrency in flight).

    Returns the results in request order and the seconds from the start to the last end.
    A request that raises or runs past timeout_s is a failure carrying the error text.
    """
    times = np.zeros(len(requests)) if times is None else times
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    start = time.perf_counter()

    async def one(i: int, req: RequestInput) -> RequestResult:
        delay = start + float(times[i]) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            try:
                result = await asyncio.wait_for(send(req), timeout_s)
            except asyncio.TimeoutError:
                result = _failure(req, f"timed out after {timeout_s} s")
            except Exception as e:  # noqa: BLE001 - recorded, not raised: one bad request is a data point
                result = _failure(req, f"{type(e).__name__}: {e}")
        if progress is not None:
            progress.update(1)
        return result

    results = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return list(results), time.perf_counter() - start


# --------------------------------------------------------------------------- metrics

SLO_KEYS = ("ttft", "tpot", "e2el")
METRICS = (("ttft", "TTFT", "Time to First Token"), ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
           ("itl", "ITL", "Inter-token Latency"), ("e2el", "E2EL", "End-to-end Latency"))


def parse_percentiles(spec: str) -> list[float]:
    values = sorted({float(p) for p in re.split(r"[,\s]+", spec.strip()) if p})
    if any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"percentiles must be in [0, 100], got {spec!r}")
    return values


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """["ttft:500 tpot:50", "e2el:2000"] (spaces, commas or repeats) -> {"ttft": 500.0, ...} (ms)."""
    slos = {}
    for item in (s for spec in specs for s in re.split(r"[,\s]+", spec.strip()) if s):
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"goodput SLO {item!r}: expected KEY:MS with KEY one of {', '.join(SLO_KEYS)}")
        slos[key] = float(value)
        if slos[key] <= 0:
            raise ValueError(f"goodput SLO {item!r}: the limit must be > 0 ms")
    return slos


def tpot(r: RequestResult) -> float:
    """Seconds per output token after the first; 0 for a single-token output (no decode)."""
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    ms = {"ttft": r.ttft * 1000, "tpot": tpot(r) * 1000, "e2el": r.latency * 1000}
    return r.success and all(ms[k] <= limit for k, limit in slos.items())


def _label(p: float) -> str:
    return f"p{p:g}"


def _stats(name: str, values_s: list[float], percentiles: Sequence[float]) -> dict:
    """mean/median/std/pN of the values in ms; None for every one when there are no values."""
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    empty = ms.size == 0
    out = {f"mean_{name}_ms": None if empty else float(ms.mean()),
           f"median_{name}_ms": None if empty else float(np.median(ms)),
           f"std_{name}_ms": None if empty else float(ms.std())}
    for p in percentiles:
        out[f"{_label(p)}_{name}_ms"] = None if empty else float(np.percentile(ms, p))
    return out


def compute_metrics(results: Sequence[RequestResult], duration_s: float, percentiles: Sequence[float] = (99,),
                    slos: dict[str, float] | None = None) -> dict:
    """Totals, throughputs (per second of duration_s), goodput and latency statistics.

    Only successful requests count. TPOT is over requests with more than one output token;
    ITL pools every request's gaps. P99 is always reported, besides the given percentiles.
    """
    ok = [r for r in results if r.success]
    percentiles = sorted(set(percentiles) | {99.0})
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    m = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": per_s(len(ok)), "output_throughput": per_s(total_out),
         "total_token_throughput": per_s(total_in + total_out), "percentiles": percentiles}
    if slos:
        m["goodput_slos_ms"] = dict(slos)
        m["good_requests"] = sum(meets_slos(r, slos) for r in ok)
        m["request_goodput"] = per_s(m["good_requests"])
    m.update(_stats("ttft", [r.ttft for r in ok], percentiles))
    m.update(_stats("tpot", [tpot(r) for r in ok if r.output_tokens > 1], percentiles))
    m.update(_stats("itl", [gap for r in ok for gap in r.itl], percentiles))
    m.update(_stats("e2el", [r.latency for r in ok], percentiles))
    return m


def format_table(m: dict, max_concurrency: int | None = None) -> str:
    width = 50

    def row(label, value):
        if value is None:
            text = "n/a"
        elif isinstance(value, float):
            text = f"{value:.2f}"
        else:
            text = str(value)
        return f"{label:<40} {text}"

    lines = [f"{' Serving Benchmark Result ':=^{width}}",
             row("Successful requests:", m["completed"]),
             row("Failed requests:", m["failed"]),
             row("Maximum request concurrency:", "unbounded" if max_concurrency is None else max_concurrency),
             row("Benchmark duration (s):", float(m["duration_s"])),
             row("Total input tokens:", m["total_input_tokens"]),
             row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"])]
    if "request_goodput" in m:
        lines.append(row("Request goodput (req/s):", m["request_goodput"]))
    lines += [row("Output token throughput (tok/s):", m["output_throughput"]),
              row("Total Token throughput (tok/s):", m["total_token_throughput"])]
    for key, short, title in METRICS:
        lines.append(f"{title:-^{width}}")
        lines.append(row(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        lines.append(row(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        for p in m["percentiles"]:
            lines.append(row(f"P{p:g} {short} (ms):", m[f"{_label(p)}_{key}_ms"]))
    lines.append("=" * width)
    return "\n".join(lines)
