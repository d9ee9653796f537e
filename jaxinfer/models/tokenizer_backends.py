"""Tokenizer backends: the two on-disk formats behind :class:`jaxinfer.models.tokenizer.Tokenizer`.

This module owns the format-specific half of tokenization: ``HFBackend`` reads
``tokenizer.json`` through the Hugging Face ``tokenizers`` library and
``SPBackend`` reads a SentencePiece ``tokenizer.model`` plus the special-token
handling that ``transformers`` layers on top of it.  Both expose the same small
interface (``token_to_id``, ``id_to_piece``, ``encode``, ``decode``,
``vocab_size``, ``special_ids``, ``path``); :mod:`jaxinfer.models.tokenizer`
chooses one, adds BOS/EOS and validates ids at the boundary.  Nothing here
touches JAX.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HFBackend", "SPBackend", "token_content"]

_SP_SPACE = "\u2581"  # SentencePiece's visible space ("▁")


def token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: str or {"content": str}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFBackend:
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


class SPBackend:
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
                content = token_content(spec)
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
