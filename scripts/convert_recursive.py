"""Converts a Llama-family model folder into a (Relaxed) Recursive Transformer folder.

Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA" (arXiv 2410.20672). The L layers of the model become B shared layers
looped L / B times (§3.1, initialised by --init), and with --lora_rank r > 0 every loop
gets its own rank-r LoRA on each linear projection of each block layer, initialised from
the truncated SVD of (original weight - shared weight) (§3.2). No uptraining happens
here: the output is the paper's starting point, before its uptraining. The conversion
and the reference forward are in scripts/recursive_lib.py; the folder format and the
choices made are documented in docs/recursive.md.

Writes to --output_dir: config.json (the source config plus a "recursive" section),
model.safetensors (the shared block under the HF names of layers 0..B-1, LoRA tensors
`model.layers.{j}.<proj>.lora.{loop}.A|B`, per-loop norms
`model.layers.{j}.<norm>.loop.{loop}.weight`), the tokenizer files and
conversion_summary.json (parameter counts, LoRA reconstruction error and, with --eval,
held-out perplexity of the original model and of the converted one at every early exit).

With --eval the folder is loaded back from disk and scored with the reference forward on
the held-out stdlib windows of scripts/stdlib_corpus.py (the windows
scripts/eval_perplexity.py scores), so the numbers measure exactly what was written.

Usage:
  python scripts/convert_recursive.py --model tiny-code --num_blocks 2 --init average \
      --lora_rank 16 --output_dir /tmp/rrt --eval --max_tokens 4000
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recursive_lib  # noqa: E402

_MODEL = flags.DEFINE_string("model", "tiny-code",
                             "Model folder, or the name of a bundled model under jaxinfer/assets/.")
_NUM_BLOCKS = flags.DEFINE_integer("num_blocks", 2, "B: shared layers per loop (must divide the layer count).")
_INIT = flags.DEFINE_string("init", "average", f"Shared-block initialisation: one of {', '.join(recursive_lib.INITS)}.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "Rank of the per-loop LoRA (0 = pure Recursive Transformer).")
_NORMS = flags.DEFINE_string("norms", "auto", "Norm weights: per_loop, shared, or auto (per_loop when lora_rank > 0).")
_EXITS = flags.DEFINE_list("exit_after_loops", [], "Loop counts with early-exit logits (default: every loop count).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output folder (keep it out of the repository).")
_EVAL = flags.DEFINE_bool("eval", False, "Score held-out perplexity of the original and the converted model.")
_MAX_FILES = flags.DEFINE_integer("max_files", 0, "--eval: at most this many held-out files (0 = all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 4000, "--eval: at most this many predicted tokens (0 = all).")
_CONTEXT = flags.DEFINE_integer("context", 256, "--eval: tokens predicted per window.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "--eval: windows per forward pass.")
_EVAL_ORIGINAL = flags.DEFINE_bool("eval_original", True, "--eval: also score the original model.")


def convert_folder(model_dir: str, output_dir: str, num_blocks: int, init: str, lora_rank: int,
                   norms: str = "auto", exit_after_loops=()) -> dict:
    """Converts `model_dir` into `output_dir`; returns the summary (also written as JSON)."""
    from jaxinfer.models.checkpoint import load_model

    if not output_dir:
        raise ValueError("output_dir: required")
    config, params, hf_config = load_model(model_dir, "float32")
    spec = recursive_lib.RecursiveSpec(config.num_layers, num_blocks, init, lora_rank, norms,
                                       tuple(int(k) for k in exit_after_loops))
    start = time.perf_counter()
    rp = recursive_lib.convert(config, params, spec)
    seconds = time.perf_counter() - start
    names = recursive_lib.save_recursive(output_dir, hf_config, config, spec, rp, source_dir=model_dir)
    summary = {"model": os.path.abspath(model_dir), "output_dir": os.path.abspath(output_dir),
               "recursive": spec.section(), "parameters": recursive_lib.parameter_counts(config, spec, rp),
               "merged_weight_error": recursive_lib.reconstruction_error(config, params, spec, rp),
               "num_tensors": len(names), "num_lora_tensors": sum(".lora." in n for n in names),
               "convert_seconds": seconds}
    _write_summary(output_dir, summary)
    return summary


def evaluate(model_dir: str, output_dir: str, max_files: int = 0, max_tokens: int = 4000, context: int = 256,
             batch_size: int = 8, original: bool = True) -> dict:
    """Held-out perplexity of the original folder and of the converted folder at each exit."""
    from stdlib_corpus import heldout_token_ids, jaxinfer_nll_fn, make_windows, perplexity

    from jaxinfer.models.checkpoint import load_model

    docs = heldout_token_ids(model_dir, max_files or None, max_tokens or None)
    windows = make_windows(docs, context)
    result = {"context": context, "max_tokens": max_tokens, "files": len(docs)}
    if original:
        config, params, _ = load_model(model_dir, "float32")
        result["original"] = perplexity(jaxinfer_nll_fn(config, params), windows, batch_size)
    config, _, spec, rp = recursive_lib.load_recursive(output_dir)
    fns = recursive_lib.exit_nll_fns(config, spec, rp)
    result["exits"] = {str(k): perplexity(fn, windows, batch_size) for k, fn in fns.items()}
    return result


def _write_summary(output_dir: str, summary: dict) -> None:
    with open(os.path.join(output_dir, recursive_lib.SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)


def format_report(summary: dict) -> str:
    rec, counts = summary["recursive"], summary["parameters"]
    rows = [("model", summary["model"]), ("output", summary["output_dir"]),
            ("loops x shared layers", f"{rec['num_loops']} x {rec['num_blocks']}"),
            ("init (source layers)", f"{rec['init']} {rec['source_layers']}"),
            ("LoRA rank", rec["lora_rank"]), ("norms", rec["norms"]),
            ("params: original", f"{counts['original']:,}"),
            ("params: embedding + head", f"{counts['embedding_and_head']:,}"),
            ("params: shared block", f"{counts['shared_block']:,}"),
            ("params: per-loop norms", f"{counts['per_loop_vectors']:,}"),
            ("params: LoRA", f"{counts['lora']:,}"),
            ("params: total", f"{counts['total']:,} ({counts['total_over_original']:.1%} of the original)"),
            ("merged weight error", f"mean {summary['merged_weight_error']['mean']:.4f}, "
                                    f"max {summary['merged_weight_error']['max']:.4f}")]
    ev = summary.get("eval")
    if ev:
        if "original" in ev:
            original = ev["original"]
            rows.append(("perplexity: original", f"{original['perplexity']:.3f} ({original['tokens']} tokens)"))
        for k, r in ev["exits"].items():
            rows.append((f"perplexity: exit after {k} loop(s)", f"{r['perplexity']:.3f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
    del argv
    model_dir = recursive_lib.resolve_model_dir(_MODEL.value)
    summary = convert_folder(model_dir, _OUTPUT_DIR.value, _NUM_BLOCKS.value, _INIT.value, _LORA_RANK.value,
                             _NORMS.value, _EXITS.value)
    if _EVAL.value:
        summary["eval"] = evaluate(model_dir, _OUTPUT_DIR.value, _MAX_FILES.value, _MAX_TOKENS.value,
                                   _CONTEXT.value, _BATCH_SIZE.value, _EVAL_ORIGINAL.value)
        _write_summary(_OUTPUT_DIR.value, summary)
    print(format_report(summary))


if __name__ == "__main__":
    app.run(main)
