"""Tokenizer loading: the text <-> token id mapping of a model folder.

This module owns the mapping between text and token ids for a Hugging Face
style model folder.  It sits at the session/engine boundary: the session
encodes prompts into ids before they are queued, and the engine's output
processor detokenizes the sampled ids back into text (see
:mod:`jaxinfer.engine.detokenizer` for the streaming side).  Nothing here touches JAX.  The two file formats are read by the
backends in :mod:`jaxinfer.models.tokenizer_backends`; this module picks one,
adds BOS/EOS and validates ids.

Two on-disk formats are supported, in this order of preference:

* ``tokenizer.json`` -- loaded with the Hugging Face ``tokenizers`` library.
  Special tokens are added by the file's own post-processor; when
  ``tokenizer_config.json`` asks for ``add_bos_token`` / ``add_eos_token`` and
  the post-processor does not add them, they are added here.
* ``tokenizer.model`` -- a SentencePiece model (Llama 1/2 style).  BOS is
  prepended by default (Llama's convention) unless ``tokenizer_config.json``
  sets ``add_bos_token`` to false.  Special-token strings that appear in the
  text (``"<s>"``, ``"</s>"``, added tokens listed in ``tokenizer_config.json``)
  are mapped to their ids, like ``transformers`` does.  With ``"legacy":
  false`` in ``tokenizer_config.json`` the text that follows a special token
  gets no SentencePiece dummy-prefix space.

A folder without either file has no tokenizer: :func:`load_tokenizer` returns
``None`` and callers must then work with token ids only.

Special token ids come from the tokenizer files first; ``bos_token_id`` /
``eos_token_id`` in ``generation_config.json`` and then ``config.json`` are
used as fallbacks for BOS, and are merged into :attr:`Tokenizer.eos_token_ids`
(a model may stop on several ids, e.g. ``<|end_of_text|>`` and ``<|eot_id|>``).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Sequence
from typing import Any

from jaxinfer.models.folder_paths import resolve_in_folder
from jaxinfer.models.tokenizer_backends import HFBackend, SPBackend, token_content

__all__ = ["Tokenizer", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any] | None:
    """Read a JSON object from ``path``; ``None`` when the file is absent."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _id_list(value: Any) -> list[int]:
    """``bos_token_id`` / ``eos_token_id`` from a config: int, list of ints or null."""
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value] if value >= 0 else []
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return []


def _check_text(text: Any, name: str = "text") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates (e.g. bytes decoded with surrogateescape)
        raise ValueError(f"{name}: not valid Unicode: {text[e.start]!r} at index {e.start} is a lone surrogate "
                         f"(UTF-8 cannot encode it); replace it or send valid text") from None
    return text


def _dedupe(ids: Iterable[int]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for i in ids:
        seen.setdefault(i, None)
    return tuple(seen)


# --------------------------------------------------------------------------
# Public tokenizer
# --------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one model folder.  Build with :func:`load_tokenizer`.

    Attributes:
      vocab_size: number of token ids (including added tokens).
      bos_token_id: BOS id or ``None``.
      eos_token_ids: ids that end generation (tokenizer EOS first, then the
        ids from ``generation_config.json`` / ``config.json``), deduplicated.
      all_special_ids: ids of the tokenizer's special tokens -- exactly the ids
        ``decode`` drops with ``skip_special_tokens=True`` (control pieces and
        ``<unk>`` for SentencePiece, special added tokens for tokenizer.json).
        Ids that only the configs list as EOS are not included.
      kind: ``"tokenizers"`` or ``"sentencepiece"``.
      path: the tokenizer file that was loaded.
    """

    def __init__(
        self,
        backend: HFBackend | SPBackend,
        *,
        kind: str,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos_token: bool | None,
        add_eos_token: bool | None,
    ):
        self._backend = backend
        self.kind = kind
        self.path = backend.path
        self.vocab_size: int = int(backend.vocab_size)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.all_special_ids: set[int] = set(backend.special_ids)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # Does the backend add BOS/EOS itself (tokenizer.json post-processor)?
        self._backend_adds_bos = False
        self._backend_adds_eos = False
        if kind == "tokenizers":
            plain = backend.encode("a", add_special_tokens=False)
            full = backend.encode("a", add_special_tokens=True)
            if bos_token_id is not None:
                self._backend_adds_bos = full[:1] == [bos_token_id] and plain[:1] != [bos_token_id]
            if self.eos_token_ids:
                self._backend_adds_eos = bool(full) and full[-1] in self.eos_token_ids and (
                    not plain or plain[-1] != full[-1]
                )

    # -- properties ------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (first of :attr:`eos_token_ids`), or ``None``."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, path={self.path!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_ids={self.eos_token_ids})"
        )

    # -- encode / decode -------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS (and EOS
        where configured) are added the way ``transformers`` would."""
        _check_text(text, "text")
        ids = self._backend.encode(text, add_special_tokens=bool(add_special_tokens))
        if not add_special_tokens:
            return ids
        if self.kind == "sentencepiece":
            want_bos = self.add_bos_token is not False
            want_eos = self.add_eos_token is True
        else:
            want_bos = self.add_bos_token is True and not self._backend_adds_bos
            want_eos = self.add_eos_token is True and not self._backend_adds_eos
        if want_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if want_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens dropped when ``skip_special_tokens``.

        Ids at or above :attr:`vocab_size` decode to nothing (a model's
        embedding table is often padded past the tokenizer's vocabulary, and
        a streaming server must not fail on such a sample); negative ids and
        non-integers raise ``ValueError``.
        """
        n = self.vocab_size
        ids = [i for i in self._check_ids(ids, "ids") if i < n]
        return self._backend.decode(ids, bool(skip_special_tokens))

    def id_to_piece(self, token_id: int) -> str | None:
        """The vocabulary entry (piece) of one id, ``None`` if unknown."""
        i = self._check_ids([token_id], "token_id")[0]
        return self._backend.id_to_piece(i) if i < self.vocab_size else None

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary entries of ``ids`` (``transformers`` naming); ``None``
        for ids outside the vocabulary."""
        n = self.vocab_size
        return [self._backend.id_to_piece(i) if i < n else None for i in self._check_ids(ids, "ids")]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry, ``None`` if not in the vocabulary."""
        return self._backend.token_to_id(_check_text(token, "token"))

    # -- validation ------------------------------------------------------
    def _check_ids(self, ids: Any, name: str) -> list[int]:
        if isinstance(ids, (str, bytes, bytearray)):
            raise ValueError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
        try:
            it = iter(ids)
        except TypeError:
            it = None
        if it is None:
            raise ValueError(f"{name} must be a sequence of int token ids, got {type(ids).__name__}")
        out: list[int] = []
        for x in it:
            try:
                i = operator.index(x)
            except TypeError:
                raise ValueError(f"{name} must contain ints, got {type(x).__name__} ({x!r})") from None
            if i < 0:
                raise ValueError(f"{name} contains negative token id {i}")
            out.append(i)
        return out


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_tokenizer(path: str) -> Tokenizer | None:
    """Load the tokenizer of the model folder ``path``.

    Prefers ``tokenizer.json`` (``tokenizers``) over ``tokenizer.model``
    (``sentencepiece``).  Returns ``None`` if the folder has neither.

    Raises:
      ValueError: ``path`` is not a str/PathLike, or a tokenizer/config file is
        corrupt (the message names the file).
      FileNotFoundError: ``path`` is not a directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path!r} does not exist or is not a directory")

    # Every file is resolved inside the folder: a symlink leading out of it is refused.
    json_path = resolve_in_folder(path, TOKENIZER_JSON, "tokenizer file")
    sp_path = resolve_in_folder(path, SENTENCEPIECE_MODEL, "tokenizer file")
    if not (os.path.isfile(json_path) or os.path.isfile(sp_path)):
        return None

    tok_config = _read_json(resolve_in_folder(path, TOKENIZER_CONFIG, "tokenizer file")) or {}
    gen_config = _read_json(resolve_in_folder(path, GENERATION_CONFIG, "generation config")) or {}
    model_config = _read_json(resolve_in_folder(path, MODEL_CONFIG, "config file")) or {}

    backend: HFBackend | SPBackend
    if os.path.isfile(json_path):
        backend = HFBackend(json_path)
        kind = "tokenizers"
    else:
        backend = SPBackend(sp_path, tok_config)
        kind = "sentencepiece"

    def lookup(key: str) -> int | None:
        content = token_content(tok_config.get(key))
        if content is None:
            return None
        return backend.token_to_id(content)

    # BOS: tokenizer files first, then generation_config / config.
    bos = lookup("bos_token")
    if bos is None and kind == "sentencepiece" and backend.sp.bos_id() >= 0:
        bos = backend.sp.bos_id()
    if bos is None:
        for cfg in (gen_config, model_config):
            ids = _id_list(cfg.get("bos_token_id"))
            if ids:
                bos = ids[0]
                break

    # EOS: union of tokenizer EOS and the configs' eos_token_id.
    eos: list[int] = []
    tok_eos = lookup("eos_token")
    if tok_eos is None and kind == "sentencepiece" and backend.sp.eos_id() >= 0:
        tok_eos = backend.sp.eos_id()
    if tok_eos is not None:
        eos.append(tok_eos)
    for cfg in (gen_config, model_config):
        eos.extend(_id_list(cfg.get("eos_token_id")))
    eos_ids = _dedupe(eos)

    def flag(key: str) -> bool | None:
        v = tok_config.get(key)
        return v if isinstance(v, bool) else None

    return Tokenizer(
        backend,
        kind=kind,
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        add_bos_token=flag("add_bos_token"),
        add_eos_token=flag("add_eos_token"),
    )
