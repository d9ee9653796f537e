"""Held-out perplexity of a model folder on the Python standard library.

Scores the held-out files of the model's data_split.json (written by
scripts/train_tiny.py; without it, the same deterministic split is recomputed from this
interpreter's stdlib). Each file is tokenized with the folder's tokenizer as a document
[BOS] ids [EOS], cut into non-overlapping windows of --context predicted tokens, and
run through jaxinfer's Transformer as a dense causal batch. Perplexity = exp(mean NLL
over every predicted token). The computation lives in scripts/stdlib_corpus.py
(`heldout_token_ids`, `make_windows`, `perplexity`), so tests can score the same
windows with HF transformers.

Usage:
  python scripts/eval_perplexity.py --model tiny-code
  python scripts/eval_perplexity.py --model /path/to/hf_folder --dtype bfloat16 --max_tokens 20000
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

from stdlib_corpus import heldout_token_ids, jaxinfer_nll_fn, make_windows, perplexity  # noqa: E402,F401

_MODEL = flags.DEFINE_string("model", "tiny-code",
                             "Model folder, or the name of a bundled model under jaxinfer/assets/.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and activation dtype.")
_MAX_FILES = flags.DEFINE_integer("max_files", 0, "Score at most this many held-out files (0 = all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Score at most this many tokens in total (0 = all).")
_CONTEXT = flags.DEFINE_integer("context", 256, "Window length: tokens predicted per window.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Windows per forward pass.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the results here as JSON.")


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


def evaluate(model_dir: str, dtype: str = "float32", max_files: int = 0, max_tokens: int = 0,
             context: int = 256, batch_size: int = 8) -> dict:
    """Held-out perplexity of `model_dir` scored by jaxinfer; the figures of the report."""
    from jaxinfer.models.checkpoint import load_model

    config, params, _ = load_model(model_dir, dtype)
    if context > config.max_position_embeddings:
        raise ValueError(f"context: {context} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    docs = heldout_token_ids(model_dir, max_files or None, max_tokens or None)
    windows = make_windows(docs, context)
    nll_fn = jaxinfer_nll_fn(config, params, dtype)
    perplexity(nll_fn, make_windows([docs[0][:2]], context), batch_size)  # compiles the one batch shape
    start = time.perf_counter()
    result = perplexity(nll_fn, windows, batch_size)
    seconds = time.perf_counter() - start
    return {"model": os.path.abspath(model_dir), "dtype": dtype, "files": len(docs), "context": context,
            "batch_size": batch_size, **result, "bits_per_token": result["mean_nll"] / 0.6931471805599453,
            "seconds": seconds, "tokens_per_s": result["tokens"] / seconds}


def main(argv):
    del argv
    import jax

    result = evaluate(resolve_model_dir(_MODEL.value), _DTYPE.value, _MAX_FILES.value, _MAX_TOKENS.value,
                      _CONTEXT.value, _BATCH_SIZE.value)
    result["device"] = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    result["versions"] = {"python": sys.version.split()[0], "jax": jax.__version__}
    rows = [("model", result["model"]), ("dtype", result["dtype"]), ("held-out files", result["files"]),
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
