"""Tokenizer loading: the text <-> token id mapping of a model folder.

This module owns the mapping between text and token ids for a Hugging Face
style model folder.  It sits at the session/engine boundary: the engine
encodes prompts into ids before scheduling them and detokenizes the sampled
ids back into text (see :mod:`jaxinfer.engine.detokenizer` for the streaming
side).  Nothing here touches JAX.

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
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Tokenizer", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"

_SP_SPACE = "\u2581"  # SentencePiece's visible space ("▁")


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must contain a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: str or {"content": str}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


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
    return text


def _dedupe(ids: Iterable[int]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for i in ids:
        seen.setdefault(i, None)
    return tuple(seen)


# --------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------


class _HFBackend:
    """``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - dependency missing
            raise ImportError(f"loading {path} requires the `tokenizers` package") from e
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"cannot load tokenizer file {path}: {e}") from e
        # Encoding must not silently truncate or pad a prompt.
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.path = path
        added = tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        if added:
            self.vocab_size = max(self.vocab_size, max(added) + 1)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_piece(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class _SPBackend:
    """``tokenizer.model`` through ``sentencepiece``, plus the special-token
    handling that ``transformers`` layers on top of it."""

    def __init__(self, path: str, tok_config: dict[str, Any]):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - dependency missing
            raise ImportError(f"loading {path} requires the `sentencepiece` package") from e
        try:
            with open(path, "rb") as f:
                proto = f.read()
            sp = sentencepiece.SentencePieceProcessor()
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # RuntimeError / OSError from the C++ side
            raise ValueError(f"cannot load SentencePiece model {path}: {e}") from e
        self.sp = sp
        self.path = path
        n = sp.get_piece_size()
        self.sp_size = n
        self.pieces = [sp.id_to_piece(i) for i in range(n)]

        # Special pieces: control symbols (<s>, </s>, ...) and <unk>.
        special: dict[str, int] = {}
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                special[self.pieces[i]] = i
        self.special_ids = set(special.values())
        # Strings parsed out of the text before SentencePiece sees it.
        self.split_tokens: dict[str, int] = dict(special)
        # Extra ids (beyond the SentencePiece vocabulary) declared in
        # tokenizer_config.json's added_tokens_decoder.
        self.extra_pieces: dict[int, str] = {}
        added = tok_config.get("added_tokens_decoder")
        if isinstance(added, dict):
            for key, spec in added.items():
                try:
                    tid = int(key)
                except (TypeError, ValueError):
                    continue
                content = _token_content(spec)
                if content is None or tid < 0:
                    continue
                if tid >= n:
                    self.extra_pieces[tid] = content
                self.split_tokens.setdefault(content, tid)
                if isinstance(spec, dict) and spec.get("special", False):
                    self.special_ids.add(tid)
        self.split_tokens.pop("", None)
        self.vocab_size = max([n, *(i + 1 for i in self.extra_pieces)])
        self._split_re = (
            re.compile("|".join(re.escape(s) for s in sorted(self.split_tokens, key=len, reverse=True)))
            if self.split_tokens
            else None
        )

        # Does decode() drop the dummy-prefix space of the first piece?
        self.strips_leading_space = False
        for i in range(n):
            p = self.pieces[i]
            ordinary = not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
            if ordinary and len(p) > 1 and p.startswith(_SP_SPACE):
                self.strips_leading_space = not sp.decode([i]).startswith(" ")
                break

        # legacy=False: text after a special token gets no dummy prefix.
        self.sp_no_prefix = None
        if tok_config.get("legacy") is False:
            self.sp_no_prefix = self._without_dummy_prefix(proto, sentencepiece)

    @staticmethod
    def _without_dummy_prefix(proto: bytes, sentencepiece: Any) -> Any:
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except Exception:  # protobuf unavailable: fall back to legacy behaviour
            return None
        try:
            m = pb.ModelProto()
            m.ParseFromString(proto)
            if not m.normalizer_spec.add_dummy_prefix:
                return None
            m.normalizer_spec.add_dummy_prefix = False
            sp = sentencepiece.SentencePieceProcessor()
            sp.LoadFromSerializedProto(m.SerializeToString())
            return sp
        except Exception:
            return None

    def token_to_id(self, token: str) -> int | None:
        if token in self.split_tokens:
            return self.split_tokens[token]
        i = self.sp.piece_to_id(token)
        if i == self.sp.unk_id() and token != self.pieces[i]:
            return None
        return i

    def id_to_piece(self, i: int) -> str | None:
        if 0 <= i < self.sp_size:
            return self.pieces[i]
        return self.extra_pieces.get(i)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        del add_special_tokens  # BOS/EOS are added by Tokenizer
        if self._split_re is None:
            return list(self.sp.encode(text)) if text else []
        out: list[int] = []
        pos = 0
        first = True
        for m in self._split_re.finditer(text):
            seg = text[pos : m.start()]
            if seg:
                out.extend(self._encode_segment(seg, first))
            first = False
            out.append(self.split_tokens[m.group(0)])
            pos = m.end()
        seg = text[pos:]
        if seg:
            out.extend(self._encode_segment(seg, first))
        return out

    def _encode_segment(self, seg: str, first: bool) -> list[int]:
        if not first and self.sp_no_prefix is not None:
            return list(self.sp_no_prefix.encode(seg))
        return list(self.sp.encode(seg))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        n = self.sp_size
        special = self.special_ids
        if not self.extra_pieces and (skip_special_tokens or not special.intersection(ids)):
            # Fast path: one SentencePiece call (skipped specials removed, so
            # byte-fallback pieces on either side of them still join up).
            if skip_special_tokens:
                ids = [i for i in ids if i not in special]
            return self.sp.decode(ids)
        # Render special / added tokens as their text and decode the runs of
        # ordinary pieces in between with SentencePiece.
        parts: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            if not run:
                return
            s = self.sp.decode(run)
            if parts and self.strips_leading_space and self.pieces[run[0]].startswith(_SP_SPACE):
                s = " " + s  # not the start of the text: keep the word's space
            parts.append(s)
            run.clear()

        for i in ids:
            if i in special:
                if skip_special_tokens:
                    continue
                flush_run()
                parts.append(self.id_to_piece(i) or "")
            elif i >= n:
                flush_run()
                parts.append(self.extra_pieces.get(i, ""))
            else:
                run.append(i)
        flush_run()
        return "".join(parts)


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
        backend: _HFBackend | _SPBackend,
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

    json_path = os.path.join(path, TOKENIZER_JSON)
    sp_path = os.path.join(path, SENTENCEPIECE_MODEL)
    if not (os.path.isfile(json_path) or os.path.isfile(sp_path)):
        return None

    tok_config = _read_json(os.path.join(path, TOKENIZER_CONFIG)) or {}
    gen_config = _read_json(os.path.join(path, GENERATION_CONFIG)) or {}
    model_config = _read_json(os.path.join(path, MODEL_CONFIG)) or {}

    backend: _HFBackend | _SPBackend
    if os.path.isfile(json_path):
        backend = _HFBackend(json_path)
        kind = "tokenizers"
    else:
        backend = _SPBackend(sp_path, tok_config)
        kind = "sentencepiece"

    def lookup(key: str) -> int | None:
        content = _token_content(tok_config.get(key))
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
