"""The `jaxinfer` command line (absl).

    jaxinfer generate --prompt "def fib(n):" [--model PATH|NAME] [--max_tokens N] [--temperature T]
    jaxinfer generate --prompt "def fib(n):" --quantization int4 [--quant_group_size 128]

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
_QUANTIZATION = flags.DEFINE_enum("quantization", None, ["int4", "int4-gptq"],
                                  "Quantize the linear layers to int4 at load: round to nearest (int4) or GPTQ "
                                  "calibrated on built-in Python stdlib text (int4-gptq).")
_QUANT_GROUP_SIZE = flags.DEFINE_integer("quant_group_size", 128,
                                         "Input rows per int4 scale; must divide every layer's input features.")

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
    quant_config = None
    if _QUANTIZATION.value is not None:
        from jaxinfer.quant import QuantConfig
        quant_config = QuantConfig(group_size=_QUANT_GROUP_SIZE.value)
    load_start = time.perf_counter()
    session = InferenceSession.from_pretrained(_MODEL.value, dtype=_DTYPE.value, quantization=_QUANTIZATION.value,
                                               quantization_config=quant_config)
    load_seconds = time.perf_counter() - load_start
    start = time.perf_counter()
    compile_at_first_token = None
    sys.stdout.write(_PROMPT.value)
    for piece in session.stream(_PROMPT.value, params):
        if compile_at_first_token is None:
            compile_at_first_token = session.metrics()["compile_seconds"]
        sys.stdout.write(piece)
        sys.stdout.flush()
    end = time.perf_counter()
    out = session.last_output
    metrics = session.metrics()
    num_generated = len(out.token_ids)
    ttft = out.time_to_first_token
    # Decode speed without the one-off compilations of decode shapes (reported apart).
    decode_compile = metrics["compile_seconds"] - (compile_at_first_token or 0.0)
    decode_seconds = end - (start + ttft) - decode_compile
    rate = (num_generated - 1) / decode_seconds if num_generated > 1 and decode_seconds > 0 else 0.0
    print()
    print(f"[jaxinfer] prompt tokens: {len(out.prompt_token_ids)} | generated tokens: {num_generated} "
          f"({out.finish_reason}) | time to first token: {ttft * 1000:.1f} ms | decode: {rate:.1f} tokens/s "
          f"| load: {load_seconds:.2f} s | compiles: {metrics['num_compiles']} "
          f"({metrics['compile_seconds']:.2f} s, not in decode tokens/s) "
          f"| weights: {metrics['weight_bytes'] / 1e6:.2f} MB")
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
