"""The bundled model's data: the Python standard library, its train/held-out split, and scoring.

Shared by scripts/train_tiny.py (which trains on the split's train files),
scripts/eval_perplexity.py (which scores the held-out files) and
tests/test_bundled_model.py (which scores the same windows with HF transformers). No
absl flags here, so any of them can import it.

Documents are token streams `[BOS] + encode(text) + [EOS]`. Training samples random
windows of all training documents concatenated; evaluation cuts each held-out document
into non-overlapping windows of `context` predicted tokens (each window starts fresh,
without the previous window as context) and averages the NLL of every predicted token.

Dimension codes: W windows, B batch, C context (tokens per window), V vocab.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sysconfig
from typing import Callable, Optional, Sequence

import numpy as np

SPLIT_FILE = "data_split.json"
# A file is held out when sha1(relative path) % HELDOUT_MODULUS == 0 (about 2% of the
# files). A hash, not a position in the sorted list, so adding or removing a file in
# another Python version does not move every other file between the sets.
HELDOUT_MODULUS = 50
# NOTE: pydoc_data/topics.py is 750 KB of generated prose (the HTML docs as a dict of
# strings), 2.4% of the corpus; no other stdlib file is over 310 KB.
MAX_FILE_BYTES = 500_000
# Charmap codec tables (encodings/cp*.py, iso8859_*.py, mac_*.py, ..., mostly written by
# Tools/unicode/gencodec.py): 70 files of 256-entry tables of hex escapes, not code.
_CODEC_TABLE = re.compile(r"^(decoding_table = \(|decoding_map = codecs\.make_identity_dict\(range\(256\)\))",
                          re.MULTILINE)
# SentencePiece writes spaces as U+2581 and decodes U+2581 as a space, so a file that
# contains the character itself cannot round-trip (no stdlib file does).
_SP_SPACE = "\u2581"


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: Optional[str] = None) -> list[str]:
    """Sorted relative paths of the usable `*.py` files under the stdlib (no site-packages)."""
    root = root or stdlib_dir()
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "site-packages" and d != "__pycache__")
        for name in filenames:
            if name.endswith(".py"):
                paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(p for p in paths if read_text(os.path.join(root, p)) is not None)


def read_text(path: str) -> Optional[str]:
    """The file as text, or None if it is excluded from the corpus (see the module constants).

    Excluded: not UTF-8 (four test files written in latin-1/koi8-r on purpose), larger
    than MAX_FILE_BYTES, charmap codec tables, or containing U+2581.
    """
    if os.path.getsize(path) > MAX_FILE_BYTES:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CODEC_TABLE.search(text) or _SP_SPACE in text:
        return None
    return text


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha1(rel_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


@dataclasses.dataclass(frozen=True)
class DataSplit:
    """Relative paths (under `root`) of the training and held-out files."""

    root: str  # the stdlib directory the paths are relative to
    train: tuple  # sorted relative paths trained on
    heldout: tuple  # sorted relative paths never trained on


def compute_split(root: Optional[str] = None) -> DataSplit:
    root = root or stdlib_dir()
    files = list_stdlib_files(root)
    return DataSplit(root=root, train=tuple(f for f in files if not is_heldout(f)),
                     heldout=tuple(f for f in files if is_heldout(f)))


def save_split(path: str, split: DataSplit, **extra) -> None:
    record = {"rule": f"stdlib *.py (no site-packages, see scripts/stdlib_corpus.py); held out when "
                      f"sha1(relative path) % {HELDOUT_MODULUS} == 0",
              "stdlib": split.root, "num_train": len(split.train), "num_heldout": len(split.heldout),
              **extra, "heldout": list(split.heldout), "train": list(split.train)}
    with open(path, "w") as f:
        json.dump(record, f, indent=0)


def load_split(model_dir: str) -> DataSplit:
    """The split recorded in `model_dir`/data_split.json, else the one computed now."""
    path = os.path.join(model_dir, SPLIT_FILE)
    if not os.path.exists(path):
        return compute_split()
    with open(path) as f:
        record = json.load(f)
    # The paths are relative, so the split also applies to a stdlib somewhere else.
    root = record["stdlib"] if os.path.isdir(record["stdlib"]) else stdlib_dir()
    return DataSplit(root=root, train=tuple(record["train"]), heldout=tuple(record["heldout"]))


# ---------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Encoder of a model folder: sentencepiece `tokenizer.model`, else HF `tokenizer.json`."""

    def __init__(self, model_dir: str):
        sp_path = os.path.join(model_dir, "tokenizer.model")
        json_path = os.path.join(model_dir, "tokenizer.json")
        config = {}
        if os.path.exists(os.path.join(model_dir, "config.json")):
            with open(os.path.join(model_dir, "config.json")) as f:
                config = json.load(f)
        if os.path.exists(sp_path):
            import sentencepiece as spm
            self._sp = spm.SentencePieceProcessor(model_file=sp_path)
            self._hf = None
            self.bos_id = self._sp.bos_id()
            self.eos_id = self._sp.eos_id()
        elif os.path.exists(json_path):
            import tokenizers
            self._sp = None
            self._hf = tokenizers.Tokenizer.from_file(json_path)
            self.bos_id = config.get("bos_token_id", -1)
            eos = config.get("eos_token_id", -1)
            self.eos_id = eos[0] if isinstance(eos, list) else eos
        else:
            raise FileNotFoundError(f"{model_dir}: no tokenizer.model or tokenizer.json")
        self.bos_id = -1 if self.bos_id is None else int(self.bos_id)
        self.eos_id = -1 if self.eos_id is None else int(self.eos_id)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        if self._sp is not None:
            return self._sp.encode(list(texts))
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        if self._sp is not None:
            return self._sp.decode(list(ids))
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def document(self, ids: Sequence[int]) -> list[int]:
        """`[BOS] + ids + [EOS]` (each only if the tokenizer has it): one training document."""
        return ([self.bos_id] if self.bos_id >= 0 else []) + list(ids) + \
            ([self.eos_id] if self.eos_id >= 0 else [])


def heldout_token_ids(model_dir: str, max_files: Optional[int] = None,
                      max_tokens: Optional[int] = None) -> list[list[int]]:
    """Token ids of the held-out documents of a model folder, in split order.

    Args:
      model_dir: folder with tokenizer.model (or tokenizer.json) and, optionally, the
        data_split.json written by train_tiny.py.
      max_files: use at most this many held-out files (None = all).
      max_tokens: truncate so at most this many tokens are predicted (a document of n
        ids predicts n - 1); None = no cap.
    Returns:
      One list per document: [BOS] + ids + [EOS] (truncated at the cap).
    """
    split = load_split(model_dir)
    files = split.heldout[:max_files] if max_files else split.heldout
    texts = [read_text(os.path.join(split.root, f)) for f in files]
    missing = [f for f, t in zip(files, texts) if t is None]
    if missing:
        raise FileNotFoundError(f"held-out file(s) missing or unreadable under {split.root}: {missing[:5]}")
    tokenizer = Tokenizer(model_dir)
    docs, budget = [], max_tokens
    for ids in tokenizer.encode(texts):
        doc = tokenizer.document(ids)
        if budget is not None:
            doc = doc[:budget + 1]
            budget -= len(doc) - 1
        if len(doc) > 1:
            docs.append(doc)
        if budget is not None and budget <= 0:
            break
    return docs


# ---------------------------------------------------------------------------- scoring

@dataclasses.dataclass(frozen=True)
class Windows:
    """Non-overlapping scoring windows, padded to a common length."""

    inputs: np.ndarray  # [W, C] int32 input ids (0 after the end of a short window)
    targets: np.ndarray  # [W, C] int32 next-token ids
    mask: np.ndarray  # [W, C] bool: True where targets is a real token to score


def make_windows(docs: Sequence[Sequence[int]], context: int) -> Windows:
    """Cuts each document into windows of `context` predicted tokens (the last one shorter)."""
    if context < 1:
        raise ValueError(f"context: must be >= 1, got {context}")
    inputs, targets, mask = [], [], []
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        for start in range(0, len(doc) - 1, context):
            chunk = doc[start:start + context + 1]
            n = len(chunk) - 1
            row_in, row_tgt, row_mask = (np.zeros(context, np.int32) for _ in range(3))
            row_in[:n], row_tgt[:n], row_mask[:n] = chunk[:-1], chunk[1:], 1
            inputs.append(row_in)
            targets.append(row_tgt)
            mask.append(row_mask.astype(bool))
    if not inputs:
        raise ValueError("no tokens to score (empty documents or max_tokens = 0)")
    return Windows(np.stack(inputs), np.stack(targets), np.stack(mask))


# (inputs [B, C] int32, targets [B, C] int32) -> NLL of every target [B, C] float32.
NllFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def perplexity(nll_fn: NllFn, windows: Windows, batch_size: int) -> dict:
    """exp(mean NLL over every masked-in target), scoring `batch_size` windows per call.

    The last batch is padded with empty windows so that every call has the same shape
    (one compilation for jitted functions).

    Returns:
      {"perplexity", "mean_nll", "tokens", "windows"}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    num_windows = windows.inputs.shape[0]
    total, count = 0.0, 0
    for start in range(0, num_windows, batch_size):
        sl = slice(start, start + batch_size)
        inputs, targets, mask = windows.inputs[sl], windows.targets[sl], windows.mask[sl]
        pad = batch_size - inputs.shape[0]
        if pad:
            inputs = np.concatenate([inputs, np.zeros((pad,) + inputs.shape[1:], np.int32)])
            targets = np.concatenate([targets, np.zeros((pad,) + targets.shape[1:], np.int32)])
        nll = np.asarray(nll_fn(inputs, targets), np.float64)[:mask.shape[0]]
        total += float(np.sum(nll[mask]))
        count += int(mask.sum())
    mean = total / count
    return {"perplexity": float(np.exp(mean)), "mean_nll": mean, "tokens": count, "windows": num_windows}


def jaxinfer_nll_fn(config, params, dtype="float32") -> NllFn:
    """NllFn of jaxinfer's Transformer run as a dense causal batch (kv_caches=None)."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.checkpoint import resolve_dtype
    from jaxinfer.models.transformer import AttentionMetadata, Transformer

    model = Transformer(config, dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(dtype))

    @jax.jit
    def nll(params, inputs, targets):
        batch, length = inputs.shape
        positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)  # [B * C]
        logits, _ = model.apply({"params": params}, inputs.reshape(-1), positions, None,
                                AttentionMetadata.dense(batch, length))  # [B * C, V] float32
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets.reshape(-1, 1), axis=-1)[:, 0]
        return -picked.reshape(batch, length)

    return lambda inputs, targets: np.asarray(nll(params, jnp.asarray(inputs), jnp.asarray(targets)))


def jaxinfer_paged_nll_fn(config, params, dtype="float32", kv_cache_dtype="auto", page_size=16) -> NllFn:
    """NllFn of jaxinfer's Transformer run through the paged KV cache, as the engine runs
    a prompt: each window is one prefill row whose K/V are written into pages (int8 /
    fp8 quantized when kv_cache_dtype says so) and read back by ragged paged attention.
    The same windows scored with kv_cache_dtype "auto" give the float cache's NLL, so
    the difference is the KV quantization's alone."""
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.checkpoint import resolve_dtype
    from jaxinfer.models.transformer import AttentionMetadata, Transformer
    from jaxinfer.pallas.ragged_paged_attention.quantized import QuantizedPages

    act = resolve_dtype(dtype)
    model = Transformer(config, dtype=act, param_dtype=act, attention_impl="xla")

    def empty_caches(num_pages):
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        if kv_cache_dtype == "auto":
            return [(jnp.zeros(shape, act), jnp.zeros(shape, act)) for _ in range(config.num_layers)]
        return [(QuantizedPages.zeros(shape, kv_cache_dtype), QuantizedPages.zeros(shape, kv_cache_dtype))
                for _ in range(config.num_layers)]

    @jax.jit
    def nll(params, inputs, targets):
        batch, length = inputs.shape
        pages_per_row = -(-length // page_size)
        positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)  # [B * C]
        tables = jnp.arange(batch * pages_per_row, dtype=jnp.int32).reshape(batch, pages_per_row)
        slots = tables[:, positions[:length] // page_size] * page_size + positions[:length] % page_size  # [B, C]
        metadata = AttentionMetadata(slot_mapping=slots.reshape(-1),
                                     cu_q_lens=jnp.arange(batch + 1, dtype=jnp.int32) * length,
                                     kv_lens=jnp.full((batch,), length, jnp.int32), page_tables=tables,
                                     max_q_len=length)
        logits, _ = model.apply({"params": params}, inputs.reshape(-1), positions,
                                empty_caches(batch * pages_per_row), metadata)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets.reshape(-1, 1), axis=-1)[:, 0]
        return -picked.reshape(batch, length)

    return lambda inputs, targets: np.asarray(nll(params, jnp.asarray(inputs), jnp.asarray(targets)))
