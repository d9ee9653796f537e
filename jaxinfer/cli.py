"""The `jaxinfer` command line (absl).

    jaxinfer generate --prompt "def fib(n):" [--model PATH|NAME] [--max_tokens N] [--temperature T]

Streams the completion to stdout, then prints a one-line summary: prompt tokens,
generated tokens, time to first token and decode tokens/s. Without --model the bundled
default model is used.
"""
from __future__ import annotations

import sys
import time

from absl import app, flags

from jaxinfer.assets import DEFAULT_MODEL

_MODEL = flags.DEFINE_string("model", DEFAULT_MODEL, "Model folder (HF or converted) or a bundled name.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p in (0, 1].")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Min-p in [0, 1].")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter/activation dtype.")

_COMMANDS = ("generate",)


def _sampling_params():
    from jaxinfer.config import SamplingParams
    return SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                          top_p=_TOP_P.value, min_p=_MIN_P.value, seed=_SEED.value, stop=tuple(_STOP.value))


def generate() -> int:
    from jaxinfer.session import InferenceSession
    if not _PROMPT.value:
        raise app.UsageError("--prompt is required and must not be empty")
    try:
        params = _sampling_params()
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    load_start = time.perf_counter()
    session = InferenceSession.from_pretrained(_MODEL.value, dtype=_DTYPE.value)
    load_seconds = time.perf_counter() - load_start
    start = time.perf_counter()
    first = None
    sys.stdout.write(_PROMPT.value)
    for piece in session.stream(_PROMPT.value, params):
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    out = session.last_output
    num_generated = len(out.token_ids)
    ttft = out.time_to_first_token
    decode_seconds = end - (start + ttft)
    rate = (num_generated - 1) / decode_seconds if num_generated > 1 and decode_seconds > 0 else 0.0
    metrics = session.metrics()
    print()
    print(f"[jaxinfer] prompt tokens: {len(out.prompt_token_ids)} | generated tokens: {num_generated} "
          f"({out.finish_reason}) | time to first token: {ttft * 1000:.1f} ms | decode: {rate:.1f} tokens/s "
          f"| load: {load_seconds:.2f} s | compiles: {metrics['num_compiles']} "
          f"({metrics['compile_seconds']:.2f} s)")
    return 0


def main(argv):
    if len(argv) < 2 or argv[1] not in _COMMANDS:
        raise app.UsageError(f"usage: jaxinfer {{{'|'.join(_COMMANDS)}}} [flags]; got {argv[1:]}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments: {argv[2:]}")
    try:
        return generate()
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxinfer: error: {e}", file=sys.stderr)
        return 2


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
