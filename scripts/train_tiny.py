"""Trains `tiny-code`, the bundled default model: a small Llama on the Python standard library.

Phases (each logged; all state lives in --work_dir, so a killed run resumes):
  1. split: the stdlib's *.py files into train / held-out (scripts/stdlib_corpus.py).
  2. tokenizer: a byte-fallback BPE sentencepiece model trained on the training files,
     checked to round-trip every file of the corpus exactly.
  3. tokenize: every training document as [BOS] ids [EOS], concatenated.
  4. train: AdamW (warmup + cosine decay, global-norm clipping) on random windows of
     that stream, float32, one jitted step; orbax checkpoints every --checkpoint_minutes
     and at the end. With --max_steps 0 the step count is fitted to --max_minutes from
     the speed of the first --calibration_steps steps; the wall-clock budget also stops
     training early (cleanly, with a checkpoint) if the machine gets slower later.
  5. export: an ordinary HF folder in --output_dir (config.json, model.safetensors,
     tokenizer.model, tokenizer_config.json, generation_config.json, data_split.json,
     training_summary.json) and its held-out perplexity, computed from the exported files.

Usage:
  python scripts/train_tiny.py                      # the bundled model (about 45 min on 2 cores)
  python scripts/train_tiny.py --max_minutes 1 --max_train_files 100 --vocab_size 1024 \
      --work_dir /tmp/tiny-work --output_dir /tmp/tiny-code   # smoke run
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
import time

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stdlib_corpus  # noqa: E402  (scripts/ sibling)
import train_lib  # noqa: E402  (scripts/ sibling)
from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.models import checkpoint  # noqa: E402
from jaxinfer.models.transformer import AttentionMetadata, Transformer, init_params  # noqa: E402

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "jaxinfer/assets/tiny-code", "Exported HF model folder.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs/tiny-code",
                                "Tokenizer, token cache, checkpoints and loss log; resumed if present.")
_LOOP = train_lib.define_flags(max_minutes=40.0, learning_rate=2e-3, warmup_steps=40, weight_decay=0.1,
                               eval_max_tokens=100_000)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Sentencepiece vocabulary size.")
_HIDDEN_SIZE = flags.DEFINE_integer("hidden_size", 256, "Model width D.")
_INTERMEDIATE_SIZE = flags.DEFINE_integer("intermediate_size", 768, "SwiGLU width F.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 6, "Decoder layers.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads (head_dim = hidden_size / num_heads).")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "KV heads (GQA when < num_heads).")
_TIE_EMBEDDINGS = flags.DEFINE_bool("tie_embeddings", True, "Share the embedding and the LM head.")
_MAX_POSITIONS = flags.DEFINE_integer("max_position_embeddings", 1024, "Positions the exported config allows.")
_SAVE_DTYPE = flags.DEFINE_enum("save_dtype", "auto", ["auto", "float32", "bfloat16"],
                                "Exported weight dtype; auto = float32 unless that exceeds --max_export_mb.")
_MAX_EXPORT_MB = flags.DEFINE_float("max_export_mb", 25.0, "Size limit of model.safetensors for auto.")

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that must not change when a run resumes (saved as run_config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_embeddings: bool
    max_position_embeddings: int
    seq_len: int  # tokens per training window
    batch_size: int  # windows per step
    learning_rate: float  # peak
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    seed: int
    max_train_files: int  # 0 = all

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds max_position_embeddings "
                             f"({self.max_position_embeddings})")
        for name in ("vocab_size", "seq_len", "batch_size", "warmup_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")

    def model_config(self) -> ModelConfig:
        return ModelConfig(family="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           head_dim=self.hidden_size // self.num_heads,
                           max_position_embeddings=self.max_position_embeddings,
                           tie_word_embeddings=self.tie_embeddings, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))


def config_from_flags() -> TrainConfig:
    return TrainConfig(vocab_size=_VOCAB_SIZE.value, hidden_size=_HIDDEN_SIZE.value,
                       intermediate_size=_INTERMEDIATE_SIZE.value, num_layers=_NUM_LAYERS.value,
                       num_heads=_NUM_HEADS.value, num_kv_heads=_NUM_KV_HEADS.value,
                       tie_embeddings=_TIE_EMBEDDINGS.value, max_position_embeddings=_MAX_POSITIONS.value,
                       **{name: getattr(_LOOP, name).value for name in (
                           "seq_len", "batch_size", "learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay",
                           "grad_clip", "seed", "max_train_files")})


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of LlamaForCausalLM for `cfg` (read back by jaxinfer's registry too)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0], "dtype": dtype,
    }


# ---------------------------------------------------------------------------- data

def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A sentencepiece BPE model (serialized) that round-trips Python source exactly.

    NOTE: identity normalization, no dummy prefix and no whitespace collapsing keep
    every space; whitespace-only pieces let a run of indentation be one token. The
    trainer reads lines, so "\\n" is a user-defined symbol (always its own token) and
    anything unseen (tabs, "\\r", rare characters) falls back to byte tokens.
    """
    import sentencepiece as spm
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_by_whitespace=True, allow_whitespace_only_pieces=True,
        split_digits=False, user_defined_symbols=["\n"], character_coverage=0.9999,
        max_sentencepiece_length=16, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        input_sentence_size=0, num_threads=os.cpu_count() or 1, minloglevel=2)
    return model.getvalue()


def prepare_data(cfg: TrainConfig, work_dir: str) -> tuple[stdlib_corpus.DataSplit, np.ndarray, dict]:
    """Split, tokenizer and training token stream (cached in work_dir)."""
    split_path = os.path.join(work_dir, stdlib_corpus.SPLIT_FILE)
    tok_path = os.path.join(work_dir, TOKENIZER_FILE)
    stream_path = os.path.join(work_dir, "train_tokens.npy")
    stats_path = os.path.join(work_dir, "data_stats.json")
    if os.path.exists(split_path) and os.path.exists(stream_path) and os.path.exists(stats_path):
        logging.info("data: reusing %s", work_dir)
        with open(stats_path) as f:
            stats = json.load(f)
        return stdlib_corpus.load_split(work_dir), np.load(stream_path), stats

    start = time.time()
    full = stdlib_corpus.compute_split()
    train_files = full.train[:cfg.max_train_files] if cfg.max_train_files else full.train
    split = dataclasses.replace(full, train=train_files)
    read = lambda rel: stdlib_corpus.read_text(os.path.join(split.root, rel))  # noqa: E731
    train_texts = [read(f) for f in split.train]
    heldout_texts = [read(f) for f in split.heldout]
    logging.info("split: %d train files (%.1f MB), %d held out (%.2f MB)", len(train_texts),
                 sum(map(len, train_texts)) / 1e6, len(heldout_texts), sum(map(len, heldout_texts)) / 1e6)

    with open(tok_path, "wb") as f:
        f.write(train_tokenizer(train_texts, cfg.vocab_size))
    tokenizer = stdlib_corpus.Tokenizer(work_dir)
    logging.info("tokenizer: trained in %.1fs", time.time() - start)

    train_ids = tokenizer.encode(train_texts)
    heldout_ids = tokenizer.encode(heldout_texts)
    bad = [name for name, text, ids in zip(split.train + split.heldout, train_texts + heldout_texts,
                                           train_ids + heldout_ids) if tokenizer.decode(ids) != text]
    if bad:
        raise RuntimeError(f"tokenizer does not round-trip {len(bad)} file(s), e.g. {bad[:3]}")
    stream = np.concatenate([np.asarray(tokenizer.document(ids), np.uint16) for ids in train_ids])
    num_chars = sum(map(len, train_texts))
    stats = {"train_files": len(train_texts), "heldout_files": len(heldout_texts), "train_chars": num_chars,
             "train_tokens": int(stream.size), "chars_per_token": num_chars / max(1, stream.size - 2 * len(train_ids)),
             "round_trip_files_checked": len(train_texts) + len(heldout_texts), "round_trip_failures": 0}
    logging.info("tokenize: %d training tokens (%.2f chars/token); round trip exact on all %d files; %.1fs",
                 stream.size, stats["chars_per_token"], stats["round_trip_files_checked"], time.time() - start)
    np.save(stream_path, stream)
    with open(stats_path, "w") as f:
        json.dump(stats, f, indent=2)
    # Written last: its presence marks the data phase complete.
    stdlib_corpus.save_split(split_path, split)
    return split, stream, stats


def make_train_step(model: Transformer, tx: optax.GradientTransformation, batch: int, length: int):
    positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)  # [B * L]
    metadata = AttentionMetadata.dense(batch, length)

    def loss_fn(params, windows):
        inputs = windows[:, :-1].reshape(-1)  # [B * L]
        targets = windows[:, 1:].reshape(-1)  # [B * L]
        logits, _ = model.apply({"params": params}, inputs, positions, None, metadata)  # [B * L, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(), {}

    return train_lib.make_step(loss_fn, tx)


def train(cfg: TrainConfig, stream: np.ndarray, work_dir: str) -> tuple[dict, dict]:
    """Runs (or resumes) the training loop (scripts/train_lib.py). Returns (params, meta)."""
    model_cfg = cfg.model_config()
    tx = train_lib.make_optimizer(cfg.grad_clip, cfg.weight_decay)
    root_key = jax.random.key(cfg.seed)
    init_key, data_key = jax.random.fold_in(root_key, 0), jax.random.fold_in(root_key, 1)

    def fresh_state():
        params = init_params(model_cfg, init_key)
        return {"params": params, "opt_state": tx.init(params)}

    logging.info("model: %s, %.2fM parameters", model_cfg,
                 sum(x.size for x in jax.tree.leaves(jax.eval_shape(fresh_state)["params"])) / 1e6)
    return train_lib.run_loop(
        fresh_state=fresh_state, train_step=make_train_step(Transformer(model_cfg), tx, cfg.batch_size, cfg.seq_len),
        stream=stream, data_key=data_key, work_dir=work_dir, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
        schedule_for=lambda total: train_lib.lr_schedule(cfg.learning_rate, cfg.min_lr_ratio, cfg.warmup_steps, total),
        warmup_steps=cfg.warmup_steps, max_minutes=_LOOP.max_minutes.value, max_steps=_LOOP.max_steps.value,
        calibration_steps=_LOOP.calibration_steps.value, checkpoint_minutes=_LOOP.checkpoint_minutes.value)


# ---------------------------------------------------------------------------- export

def export(cfg: TrainConfig, params: dict, work_dir: str, output_dir: str) -> str:
    """Writes the HF folder; returns the weight dtype used."""
    model_cfg = cfg.model_config()
    num_params = sum(x.size for x in jax.tree.leaves(params))
    save_dtype = _SAVE_DTYPE.value
    if save_dtype == "auto":
        save_dtype = "float32" if num_params * 4 <= _MAX_EXPORT_MB.value * 1e6 else "bfloat16"
    params = jax.tree.map(lambda x: x.astype(checkpoint.resolve_dtype(save_dtype)), params)
    os.makedirs(output_dir, exist_ok=True)
    checkpoint.save_hf_folder(output_dir, params, model_cfg, hf_config_dict(model_cfg, save_dtype))
    shutil.copyfile(os.path.join(work_dir, TOKENIZER_FILE), os.path.join(output_dir, TOKENIZER_FILE))
    shutil.copyfile(os.path.join(work_dir, stdlib_corpus.SPLIT_FILE),
                    os.path.join(output_dir, stdlib_corpus.SPLIT_FILE))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "legacy": False,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings,
        "sp_model_kwargs": {},
    }
    files = {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special,
             "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
                                        "max_length": cfg.max_position_embeddings}}
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "w") as f:
            json.dump(content, f, indent=2)
    return save_dtype


def heldout_eval(output_dir: str, context: int, max_tokens: int, batch_size: int) -> dict:
    """Held-out perplexity of the exported folder (as scripts/eval_perplexity.py computes it)."""
    model_cfg, params, _ = checkpoint.load_model(output_dir, "float32")
    docs = stdlib_corpus.heldout_token_ids(output_dir, max_tokens=max_tokens)
    windows = stdlib_corpus.make_windows(docs, context)
    return stdlib_corpus.perplexity(stdlib_corpus.jaxinfer_nll_fn(model_cfg, params), windows, batch_size)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(train_lib.DropOrbaxInfo())
    run_start = time.time()
    cfg = config_from_flags()
    work_dir, output_dir = _WORK_DIR.value, _OUTPUT_DIR.value
    os.makedirs(work_dir, exist_ok=True)
    try:
        train_lib.check_run_config(work_dir, dataclasses.asdict(cfg))
    except ValueError as e:
        raise app.UsageError(str(e)) from None

    split, stream, data_stats = prepare_data(cfg, work_dir)
    data_s = time.time() - run_start
    params, meta = train(cfg, stream, work_dir)
    train_s = time.time() - run_start - data_s

    save_dtype = export(cfg, params, work_dir, output_dir)
    heldout = heldout_eval(output_dir, cfg.seq_len, _LOOP.eval_max_tokens.value, _LOOP.eval_batch_size.value)
    logging.info("held-out: perplexity %.3f (mean NLL %.4f) over %d tokens", heldout["perplexity"],
                 heldout["mean_nll"], heldout["tokens"])

    last = train_lib.read_log(work_dir)[-50:]
    model_cfg = cfg.model_config()
    num_params = sum(x.size for x in jax.tree.leaves(params))
    summary = {
        "model": {"family": "llama", "hidden_size": model_cfg.hidden_size,
                  "intermediate_size": model_cfg.intermediate_size, "num_layers": model_cfg.num_layers,
                  "num_heads": model_cfg.num_heads, "num_kv_heads": model_cfg.num_kv_heads,
                  "head_dim": model_cfg.head_dim, "vocab_size": model_cfg.vocab_size,
                  "tie_word_embeddings": model_cfg.tie_word_embeddings,
                  "max_position_embeddings": model_cfg.max_position_embeddings},
        "num_params": int(num_params), "weights_dtype": save_dtype,
        "safetensors_bytes": os.path.getsize(os.path.join(output_dir, "model.safetensors")),
        "training": {**{k: v for k, v in dataclasses.asdict(cfg).items()
                        if k not in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                     "num_kv_heads", "tie_embeddings", "max_position_embeddings")},
                     "optimizer": "optax.adamw(b1=0.9, b2=0.95) + clip_by_global_norm, warmup + cosine decay",
                     "steps": meta["step"], "planned_steps": meta["total_steps"], "tokens_seen": meta["tokens"],
                     "epochs": meta["tokens"] / data_stats["train_tokens"],
                     "stopped_by_wall_clock_budget": meta["stopped_by_budget"],
                     "max_minutes": _LOOP.max_minutes.value},
        "data": data_stats,
        "final_train_loss": last[-1]["loss"] if last else None,
        "final_train_loss_mean_last_50_steps": float(np.mean([r["loss"] for r in last])) if last else None,
        "heldout": {**heldout, "context": cfg.seq_len, "max_tokens": _LOOP.eval_max_tokens.value},
        "wall_time_s": {"data": round(data_s, 1), "train_loop_all_sessions": round(meta["elapsed_s"], 1),
                        "train_this_session": round(train_s, 1), "total_this_session": round(time.time() - run_start, 1)},
        "train_tokens_per_s": meta["tokens"] / max(1e-9, meta["elapsed_s"]),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} CPU cores)",
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__},
    }
    with open(os.path.join(output_dir, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("done in %.1f min: %s", (time.time() - run_start) / 60, json.dumps(summary["heldout"]))


if __name__ == "__main__":
    app.run(main)
