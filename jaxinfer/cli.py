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

_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Persistent XLA compilation cache folder (default: $JAXINFER_COMPILATION_CACHE_DIR, else "
    "~/.cache/jaxinfer/xla); an empty string turns it off.")

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
    from jaxinfer.config import EngineConfig
    engine = EngineConfig(compilation_cache_dir=_COMPILATION_CACHE_DIR.value)
    load_start = time.perf_counter()
    session = InferenceSession.from_pretrained(_MODEL.value, dtype=_DTYPE.value, quantization=_QUANTIZATION.value,
                                               quantization_config=quant_config, engine=engine)
    load_seconds = time.perf_counter() - load_start
    with session:
        # Validated and queued before anything is printed: an error is not glued to the prompt.
        stream = session.stream(_PROMPT.value, params, output="deltas")
        sys.stdout.write(_PROMPT.value)
        for delta in stream:
            if delta.text:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        out = stream.output
        metrics = session.metrics()
    num_generated = out.num_generated_tokens
    ttft = out.time_to_first_token
    # Decode speed from the request's own timings, without the one-off compilations of
    # decode shapes (reported apart); independent of when text was released.
    decode_seconds = (num_generated - 1) * out.time_per_output_token - out.decode_compile_seconds
    rate = (num_generated - 1) / decode_seconds if num_generated > 1 and decode_seconds > 0 else 0.0
    rate_text = f"{rate:.1f} tokens/s" if num_generated > 1 else "n/a tokens/s (one token)"
    print()
    print(f"[jaxinfer] prompt tokens: {out.num_prompt_tokens} | generated tokens: {num_generated} "
          f"({out.finish_reason}) | time to first token: {ttft * 1000:.1f} ms | decode: {rate_text} "
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


def _adopt_flags_for_help() -> None:
    """Makes this module's flags key flags of the running program, so `--help` lists them.

    absl's --help shows the key flags of the main module, which it names by sys.argv[0]:
    for the `jaxinfer` console script (or `python -m jaxinfer.cli`) that is not this module.
    """
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run():
    """Console-script entry point."""
    _adopt_flags_for_help()
    app.run(main)


if __name__ == "__main__":
    run()
