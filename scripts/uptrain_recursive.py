"""Uptrains a converted Relaxed Recursive Transformer (scripts/convert_recursive.py's folder).

Bae et al. 2024 (arXiv 2410.20672) continue training the converted model ("uptraining")
so that the shared block and the per-loop LoRA recover the original's quality, and train
every loop's exit at the same time (§4: the loss is taken after each loop, through the
shared final norm and LM head, so that an early exit is a usable model -- the premise of
early-exit decoding and of self-speculation). This script does that on the training
split of the folder's own data (data_split.json and tokenizer of the source model, e.g.
the bundled tiny-code: the Python standard library minus its held-out files):

  loss = mean over the exits k in --exit_losses of CE(logits after k loops, next token)

with AdamW, warmup + cosine decay, global-norm clipping, every parameter trained (the
shared block, the LoRA, the per-loop norms, the embedding and final norm); the loop is
scripts/train_lib.py's: orbax checkpoints in --work_dir (a killed run resumes), a JSONL
loss curve with each exit's loss per step, a progress bar, and the step count fitted to
--max_minutes from the measured speed. At the end the folder is written to --output_dir
in the same format (loadable by InferenceSession.from_pretrained), with
uptrain_summary.json: held-out perplexity at every exit before and after (the windows
scripts/eval_perplexity.py scores), steps, tokens and minutes.

Usage:
  python scripts/convert_recursive.py --model tiny-code --num_blocks 2 --init stepwise_ends \
      --lora_rank 16 --output_dir /tmp/rrt/b2
  python scripts/uptrain_recursive.py --model /tmp/rrt/b2 --output_dir /tmp/rrt/b2_uptrained \
      --max_minutes 30
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recursive_lib  # noqa: E402  (scripts/ sibling)
import stdlib_corpus  # noqa: E402
import train_lib  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Recursive folder written by scripts/convert_recursive.py.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the uptrained folder.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/uptrain-recursive",
                                "Token cache, checkpoints and loss log; resumed if present.")
_LOOP = train_lib.define_flags(max_minutes=30.0, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0,
                               eval_max_tokens=4000)
_EXIT_LOSSES = flags.DEFINE_list("exit_losses", [], "Loop counts whose exit is trained (default: every exit of "
                                                    "the folder's exit_after_loops).")

SUMMARY_FILE = "uptrain_summary.json"


def training_stream(model_dir: str, work_dir: str, max_train_files: int = 0) -> np.ndarray:
    """[BOS] ids [EOS] of every training file of model_dir's split, concatenated (cached in work_dir)."""
    path = os.path.join(work_dir, "train_tokens.npy")
    if os.path.exists(path):
        return np.load(path)
    split = stdlib_corpus.load_split(model_dir)
    files = split.train[:max_train_files] if max_train_files else split.train
    tokenizer = stdlib_corpus.Tokenizer(model_dir)
    texts = [t for t in (stdlib_corpus.read_text(os.path.join(split.root, f)) for f in files) if t is not None]
    stream = np.concatenate([np.asarray(tokenizer.document(ids), np.uint16) for ids in tokenizer.encode(texts)])
    np.save(path, stream)
    logging.info("data: %d training files, %d tokens", len(texts), stream.size)
    return stream


def make_loss(config, spec, exits):
    """loss_fn(rp, windows [batch, length + 1]) -> (mean CE over the exits, {"loss_exit_k": CE})."""
    forward = recursive_lib.make_forward(config, spec, exits)

    def loss_fn(rp, windows):
        logits = forward(rp, windows[:, :-1])
        targets = windows[:, 1:].reshape(-1)
        losses = {k: optax.softmax_cross_entropy_with_integer_labels(v, targets).mean() for k, v in logits.items()}
        return sum(losses.values()) / len(losses), {f"loss_exit_{k}": v for k, v in losses.items()}

    return loss_fn


def heldout_perplexities(model_dir: str, config, spec, rp, max_tokens: int, context: int, batch_size: int) -> dict:
    """{exit: held-out perplexity} over the first max_tokens predicted tokens of the held-out files."""
    docs = stdlib_corpus.heldout_token_ids(model_dir, max_tokens=max_tokens)
    windows = stdlib_corpus.make_windows(docs, context)
    fns = recursive_lib.exit_nll_fns(config, spec, jax.tree.map(np.asarray, rp))
    return {str(k): stdlib_corpus.perplexity(fn, windows, batch_size)["perplexity"] for k, fn in fns.items()}


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(train_lib.DropOrbaxInfo())
    if not _MODEL.value or not _OUTPUT_DIR.value:
        raise app.UsageError("--model and --output_dir are required")
    run_start = time.time()
    model_dir = recursive_lib.resolve_model_dir(_MODEL.value)
    config, hf_config, spec, rp = recursive_lib.load_recursive(model_dir)
    try:
        exits = tuple(sorted({int(k) for k in _EXIT_LOSSES.value})) or spec.exit_after_loops
    except ValueError:
        raise app.UsageError(f"--exit_losses: expected loop counts, got {_EXIT_LOSSES.value}") from None
    if exits[0] < 1 or exits[-1] > spec.num_loops:
        raise app.UsageError(f"--exit_losses: {list(exits)} must lie in 1..{spec.num_loops}")
    if _LOOP.seq_len.value > config.max_position_embeddings:
        raise app.UsageError(f"--seq_len: {_LOOP.seq_len.value} exceeds the model's {config.max_position_embeddings} "
                             f"positions")
    work_dir = _WORK_DIR.value
    os.makedirs(work_dir, exist_ok=True)
    settings = {"model": os.path.abspath(model_dir), "recursive": spec.section(), "exits": list(exits),
                **{name: getattr(_LOOP, name).value for name in (
                    "seq_len", "batch_size", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay",
                    "grad_clip", "seed", "max_train_files")}}
    try:
        train_lib.check_run_config(work_dir, settings)
    except ValueError as e:
        raise app.UsageError(str(e)) from None

    stream = training_stream(model_dir, work_dir, _LOOP.max_train_files.value)
    score = lambda folder, params: (heldout_perplexities(  # noqa: E731
        folder, config, spec, params, _LOOP.eval_max_tokens.value, _LOOP.seq_len.value, _LOOP.eval_batch_size.value)
        if _LOOP.eval_max_tokens.value else None)
    before = score(model_dir, rp)
    if before:
        logging.info("held-out perplexity before, per exit: %s", before)
    tx = train_lib.make_optimizer(_LOOP.grad_clip.value, _LOOP.weight_decay.value)
    start_params = jax.tree.map(jnp.asarray, rp)

    def fresh_state():
        return {"params": start_params, "opt_state": tx.init(start_params)}

    loss_fn = make_loss(config, spec, exits)
    params, meta = train_lib.run_loop(
        fresh_state=fresh_state, train_step=train_lib.make_step(loss_fn, tx), stream=stream,
        data_key=jax.random.fold_in(jax.random.key(_LOOP.seed.value), 1), work_dir=work_dir,
        batch_size=_LOOP.batch_size.value, seq_len=_LOOP.seq_len.value,
        schedule_for=lambda total: train_lib.lr_schedule(_LOOP.learning_rate.value, _LOOP.min_lr_ratio.value,
                                                         _LOOP.warmup_steps.value, total),
        warmup_steps=_LOOP.warmup_steps.value, max_minutes=_LOOP.max_minutes.value, max_steps=_LOOP.max_steps.value,
        calibration_steps=_LOOP.calibration_steps.value, checkpoint_minutes=_LOOP.checkpoint_minutes.value,
        desc="uptrain")
    params = jax.tree.map(np.asarray, jax.device_get(params))
    recursive_lib.save_recursive(_OUTPUT_DIR.value, hf_config, config, spec, params, source_dir=model_dir)
    after = score(_OUTPUT_DIR.value, params)
    last = train_lib.read_log(work_dir)[-50:]
    summary = {
        "model": os.path.abspath(model_dir), "output_dir": os.path.abspath(_OUTPUT_DIR.value),
        "recursive": spec.section(), "parameters": recursive_lib.parameter_counts(config, spec, params),
        "settings": settings, "steps": meta["step"], "planned_steps": meta["total_steps"],
        "tokens_seen": meta["tokens"], "epochs": meta["tokens"] / stream.size,
        "train_minutes": meta["elapsed_s"] / 60, "stopped_by_wall_clock_budget": meta["stopped_by_budget"],
        "final_train_loss_mean_last_50_steps": {k: float(np.mean([r[k] for r in last]))
                                                for k in last[-1] if k.startswith("loss")} if last else None,
        "heldout_perplexity": {"max_tokens": _LOOP.eval_max_tokens.value, "context": _LOOP.seq_len.value,
                               "before": before, "after": after},
        "wall_time_s": round(time.time() - run_start, 1),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} CPU cores)",
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__},
    }
    with open(os.path.join(_OUTPUT_DIR.value, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("steps", "tokens_seen", "train_minutes", "heldout_perplexity")},
                     indent=1))


if __name__ == "__main__":
    app.run(main)
