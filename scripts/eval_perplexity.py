"""Held-out perplexity of a model folder on the Python standard library.

Scores the held-out files of the model's data_split.json (written by
scripts/train_tiny.py; without it, the same deterministic split is recomputed from this
interpreter's stdlib). Each file is tokenized with the folder's tokenizer as a document
[BOS] ids [EOS], cut into non-overlapping windows of --context predicted tokens, and
run through jaxinfer's Transformer as a dense causal batch. Perplexity = exp(mean NLL
over every predicted token). The computation lives in scripts/stdlib_corpus.py
(`heldout_token_ids`, `make_windows`, `perplexity`), so tests can score the same
windows with HF transformers.

With --kv_cache_dtype the windows run through the paged KV cache instead (each window
one prefill row, K/V written into pages, int8 / fp8 quantized or float, and read back
by ragged paged attention): `--kv_cache_dtype auto` and `--kv_cache_dtype int8` on the
same windows measure what quantizing the KV cache costs.

With --quantization the linear layers are quantized to int4 first (jaxinfer.quant:
round to nearest, or GPTQ calibrated on the built-in calibration text, which takes
only files of the folder's data_split.json "train" list); the quantized parameters
run through the same Transformer (its Linear layers call the int4 op).

Usage:
  python scripts/eval_perplexity.py --model tiny-code
  python scripts/eval_perplexity.py --model /path/to/hf_folder --dtype bfloat16 --max_tokens 20000
  python scripts/eval_perplexity.py --model tiny-code --quantization int4-gptq --quant_group_size 64
  python scripts/eval_perplexity.py --model tiny-code --kv_cache_dtype int8
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stdlib_corpus import (heldout_token_ids, jaxinfer_nll_fn, jaxinfer_paged_nll_fn, make_windows,  # noqa: E402,F401
                           perplexity)

_MODEL = flags.DEFINE_string("model", "tiny-code",
                             "Model folder, or the name of a bundled model under jaxinfer/assets/.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and activation dtype.")
_MAX_FILES = flags.DEFINE_integer("max_files", 0, "Score at most this many held-out files (0 = all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens in total (0 = all).")
_CONTEXT = flags.DEFINE_integer("context", 256, "Window length: tokens predicted per window.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")
_QUANTIZATION = flags.DEFINE_enum("quantization", None, ["int4", "int4-gptq"],
                                  "Quantize the linear layers to int4 (round to nearest or GPTQ) before scoring.")
_QUANT_GROUP_SIZE = flags.DEFINE_integer("quant_group_size", 128, "Input rows per int4 scale.")
_QUANT_SYMMETRIC = flags.DEFINE_bool("quant_symmetric", True, "Symmetric int4 (zero point 8); else min/max.")
_QUANT_ACT_ORDER = flags.DEFINE_bool("quant_act_order", False, "GPTQ: quantize rows by decreasing Hessian diagonal.")
_KV_CACHE_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype", None, ["auto", "int8", "fp8"],
    "Score through the paged KV cache, as the engine runs prompts (K/V written to pages and read back by "
    "paged attention), stored in this format ('auto' = the activation dtype). Unset: a dense batch, no cache.")


def resolve_model_dir(name: str) -> str:
    """A folder path as given, else `name` as a bundled model under jaxinfer/assets/."""
    if os.path.isdir(name):
        return name
    spec = importlib.util.find_spec("jaxinfer")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        bundled = os.path.join(list(spec.submodule_search_locations)[0], "assets", name)
        if os.path.isdir(bundled):
            return bundled
    raise FileNotFoundError(f"--model {name!r}: no such folder, and no bundled model of that name in "
                            f"jaxinfer/assets/ (train it with scripts/train_tiny.py)")


def quantize_params(model_dir: str, config, params, quantization: str, quant_config, dtype: str):
    """int4 parameters of a float model (GPTQ calibrates on the built-in text); returns (params, seconds)."""
    from jaxinfer import quant

    start = time.perf_counter()
    params = quant.quantize_pretrained(config, params, quantization, quant_config, model_dir=model_dir, dtype=dtype)
    return params, time.perf_counter() - start


def evaluate(model_dir: str, dtype: str = "float32", max_files: int = 0, max_tokens: int = 0,
             context: int = 256, batch_size: int = 8, quantization=None, quant_config=None,
             kv_cache_dtype=None) -> dict:
    """Held-out perplexity of `model_dir` scored by jaxinfer; the figures of the report.

    `quantization` ("int4" / "int4-gptq") with a jaxinfer.quant.QuantConfig scores the
    int4 model instead. `kv_cache_dtype` ("auto" / "int8" / "fp8") scores through the
    paged KV cache in that format instead of a dense batch.
    """
    from jaxinfer.models.checkpoint import load_model

    config, params, _ = load_model(model_dir, "float32" if quantization else dtype)
    quant_seconds = 0.0
    if quantization:
        params, quant_seconds = quantize_params(model_dir, config, params, quantization, quant_config, dtype)
    if context > config.max_position_embeddings:
        raise ValueError(f"context: {context} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    docs = heldout_token_ids(model_dir, max_files or None, max_tokens or None)
    windows = make_windows(docs, context)
    nll_fn = (jaxinfer_nll_fn(config, params, dtype) if kv_cache_dtype is None
              else jaxinfer_paged_nll_fn(config, params, dtype, kv_cache_dtype))
    perplexity(nll_fn, make_windows([docs[0][:2]], context), batch_size)  # compiles the one batch shape
    start = time.perf_counter()
    result = perplexity(nll_fn, windows, batch_size)
    seconds = time.perf_counter() - start
    import jax
    weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
    quant_info = None
    if quantization:
        quant_info = {"method": quantization, "group_size": quant_config.group_size,
                      "symmetric": quant_config.symmetric, "act_order": quant_config.act_order,
                      "seconds": quant_seconds}
    return {"model": os.path.abspath(model_dir), "dtype": dtype, "quantization": quant_info,
            "kv_cache_dtype": kv_cache_dtype, "files": len(docs),
            "context": context, "batch_size": batch_size, **result,
            "bits_per_token": result["mean_nll"] / 0.6931471805599453, "weight_bytes": weight_bytes,
            "seconds": seconds, "tokens_per_s": result["tokens"] / seconds}


def main(argv):
    del argv
    import jax

    quant_config = None
    if _QUANTIZATION.value:
        from jaxinfer.quant import QuantConfig
        quant_config = QuantConfig(group_size=_QUANT_GROUP_SIZE.value, symmetric=_QUANT_SYMMETRIC.value,
                                   act_order=_QUANT_ACT_ORDER.value)
    result = evaluate(resolve_model_dir(_MODEL.value), _DTYPE.value, _MAX_FILES.value, _MAX_TOKENS.value,
                      _CONTEXT.value, _BATCH_SIZE.value, _QUANTIZATION.value, quant_config, _KV_CACHE_DTYPE.value)
    result["device"] = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    result["versions"] = {"python": sys.version.split()[0], "jax": jax.__version__}
    quant_info = result["quantization"]
    quant_row = "none (float weights)" if quant_info is None else (
        f"{quant_info['method']}, group {quant_info['group_size']}, "
        f"{'symmetric' if quant_info['symmetric'] else 'asymmetric'}"
        f"{', act order' if quant_info['act_order'] else ''} ({quant_info['seconds']:.1f} s)")
    kv_row = "none (dense batch)" if result["kv_cache_dtype"] is None else f"paged, {result['kv_cache_dtype']}"
    rows = [("model", result["model"]), ("dtype", result["dtype"]), ("quantization", quant_row), ("KV cache", kv_row),
            ("weight bytes", f"{result['weight_bytes']:,}"), ("held-out files", result["files"]),
            ("tokens scored", result["tokens"]), ("windows x context", f"{result['windows']} x {result['context']}"),
            ("mean NLL (nats/token)", f"{result['mean_nll']:.4f}"), ("bits/token", f"{result['bits_per_token']:.4f}"),
            ("perplexity", f"{result['perplexity']:.3f}"),
            ("scoring time", f"{result['seconds']:.1f} s ({result['tokens_per_s']:.0f} tokens/s, {result['device']})")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
