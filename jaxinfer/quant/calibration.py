"""The built-in calibration text of GPTQ: Python standard library source.

Where it sits: session.from_pretrained(quantization="int4-gptq") -> **calibration
token ids** -> jaxinfer.quant.quantize (which runs them through the model to collect
each linear layer's inputs).

Which files. If the model folder has a `data_split.json` (written by
scripts/train_tiny.py for the bundled model), files are taken from its "train" list
only, so the held-out perplexity files are never calibrated on. Otherwise every `*.py`
file of this interpreter's standard library (no site-packages) is a candidate. Either
way the candidates are sorted and visited with a fixed stride of len(files) /
num_sequences, so the text is spread over the whole library and is deterministic for a
given Python installation and model folder. Files that are not UTF-8 are skipped.

Each visited file becomes a document [BOS] ids [EOS] (the model's own tokenizer), of
which at most `length` tokens are kept; the pieces are concatenated and cut into
`num_sequences` consecutive windows of `length` tokens.
"""
from __future__ import annotations

import json
import os
import sysconfig
from typing import Optional

import numpy as np

SPLIT_FILE = "data_split.json"


def _stdlib_files(root: str) -> list[str]:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.relpath(os.path.join(dirpath, n), root) for n in filenames if n.endswith(".py"))
    return sorted(paths)


def calibration_files(model_dir: Optional[str]) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the candidate calibration files (see the module docstring)."""
    split = os.path.join(model_dir, SPLIT_FILE) if model_dir else None
    if split and os.path.exists(split):
        with open(split) as f:
            record = json.load(f)
        root = record.get("stdlib", "")
        if not os.path.isdir(root):
            root = sysconfig.get_paths()["stdlib"]
        return root, sorted(record["train"])
    root = sysconfig.get_paths()["stdlib"]
    return root, _stdlib_files(root)


def calibration_token_ids(tokenizer, model_dir: Optional[str], num_sequences: int, length: int) -> np.ndarray:
    """Token ids of the built-in calibration text.

    Args:
      tokenizer: a jaxinfer.models.tokenizer.Tokenizer (encode, bos_token_id, eos_token_id).
      model_dir: the model folder (for its data_split.json), or None.
      num_sequences: S, windows to return.
      length: C, tokens per window.
    Returns:
      [S, C] int32 token ids.
    Raises:
      ValueError: the standard library does not hold enough text.
    """
    root, files = calibration_files(model_dir)
    needed = num_sequences * length
    stride = max(1, len(files) // num_sequences)
    stream: list[int] = []
    for offset in range(stride):  # a further pass (shifted by one file) only if the first falls short
        for rel in files[offset::stride]:
            try:
                with open(os.path.join(root, rel), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            if not text.strip():
                continue
            doc = list(tokenizer.encode(text, add_special_tokens=False))
            if tokenizer.bos_token_id is not None:
                doc.insert(0, tokenizer.bos_token_id)
            if tokenizer.eos_token_id is not None:
                doc.append(tokenizer.eos_token_id)
            stream.extend(doc[:length])
            if len(stream) >= needed:
                return np.asarray(stream[:needed], np.int32).reshape(num_sequences, length)
    raise ValueError(f"num_calibration_sequences: the standard library under {root} holds {len(stream)} tokens, "
                     f"fewer than {num_sequences} x {length}")
