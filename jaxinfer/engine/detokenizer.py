"""Incremental detokenization for streaming output.

Path: the runner samples one token id per step -> the engine's output
processing feeds it to the request's :class:`IncrementalDetokenizer` -> the
returned text delta is appended to the request's text and streamed by the
session.  Pure Python; no JAX.

Why not just ``decode(new_id)``?  Token boundaries are not text boundaries:

* SentencePiece marks a word's leading space on the token itself and drops it
  at the start of a decode, so decoding a lone token loses that space;
* a character may be split over several byte tokens (SentencePiece
  ``<0xE4>`` byte fallback, byte-level BPE), and each partial decode then
  ends with U+FFFD (the replacement character).

The detokenizer therefore decodes a short *window* of ids twice -- the window
up to the last emitted position (``prefix``) and the whole window -- and emits
the difference, but only once the decoded text no longer ends with U+FFFD.  The
window is seeded with the last few prompt ids so the first generated token
keeps its leading space.  Each :meth:`IncrementalDetokenizer.add` decodes
O(window) ids, independent of how much has been generated.

Definition of :attr:`IncrementalDetokenizer.text`: the text of the generated
ids *in the context of the prompt*, i.e. what follows the prompt's text in
``decode(prompt_ids + generated_ids)``.  It equals ``decode(generated_ids)``
except that a leading space which SentencePiece would strip at the start of a
standalone decode is kept (``" Paris"`` after ``"The capital is"``, where
``decode(generated_ids)`` gives ``"Paris"``).  With an empty prompt the two are
identical.  Byte-level BPE tokenizers never strip that space, so for them the
two are identical anyway.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer", "MAX_PENDING_TOKENS", "PROMPT_CONTEXT_TOKENS"]

#: How many trailing prompt ids seed the decode window.
PROMPT_CONTEXT_TOKENS = 5
#: Most ids held back for an unfinished character: a UTF-8 character has at most 4
#: bytes, so a longer run still ending in U+FFFD is invalid bytes, not a pending
#: character; it is emitted (as U+FFFD) so the window, and the cost of each add, stay
#: bounded whatever the model samples.
MAX_PENDING_TOKENS = 16

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas.

    Args:
      tokenizer: anything with ``decode(ids, skip_special_tokens=...) -> str``
        (:class:`jaxinfer.models.tokenizer.Tokenizer`, a ``transformers``
        tokenizer, ...).
      prompt_token_ids: the prompt; only its last
        :data:`PROMPT_CONTEXT_TOKENS` ids are used, as decode context.
      skip_special_tokens: drop special tokens from the text.

    ``add(token_id)`` returns the new text (possibly ``""`` while a multi-byte
    character is incomplete); ``flush()`` returns whatever is still held back
    at the end of the stream (an unfinished byte sequence then shows as
    U+FFFD).  ``"".join(all deltas)`` is always equal to :attr:`text`.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True):
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(f"tokenizer must have a decode() method, got {type(tokenizer).__name__}")
        if isinstance(prompt_token_ids, (str, bytes, bytearray)):
            raise ValueError("prompt_token_ids must be a sequence of int token ids, "
                             f"got {type(prompt_token_ids).__name__}")
        try:
            prompt = [operator.index(i) for i in prompt_token_ids]
        except TypeError:
            raise ValueError("prompt_token_ids must be a sequence of int token ids") from None
        self.tokenizer = tokenizer
        self.skip_special_tokens = bool(skip_special_tokens)
        # The decode window.  It always starts at the "prefix offset" (older
        # ids are dropped), so ids[:read] is already-emitted context and
        # ids[read:] is pending (not yet emitted) -- "read offset".
        self._ids: list[int] = prompt[-PROMPT_CONTEXT_TOKENS:] if PROMPT_CONTEXT_TOKENS > 0 else []
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)  # decode(ids[:read]), cached
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self.num_tokens = 0  # generated ids seen so far

    # ------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
            self._text_cache = None
        return delta

    def _advance(self) -> None:
        """Everything decoded so far is emitted: the ids just emitted
        (``ids[read:]``) become the context of the next window."""
        del self._ids[: self._read]  # O(window): the list only holds the window
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)

    # ------------------------------------------------------------------
    def add(self, token_id: int) -> str:
        """Feed one generated id; returns the text it completes (maybe "")."""
        try:
            tid = operator.index(token_id)
        except TypeError:
            raise ValueError(
                f"token_id must be an int, got {type(token_id).__name__} ({token_id!r})") from None
        self.num_tokens += 1
        self._ids.append(tid)
        new_text = self._decode(self._ids)
        prefix_text = self._prefix_text
        held = len(self._ids) - self._read
        if len(new_text) <= len(prefix_text):
            # Nothing new yet (skipped special tokens): hold the ids back, but
            # not without bound (a run of them will never add text).
            if held >= MAX_PENDING_TOKENS:
                self._advance()
            return ""
        if new_text.endswith(_REPLACEMENT) and held < MAX_PENDING_TOKENS:
            # An incomplete multi-byte character: hold the ids back.
            return ""
        delta = new_text[len(prefix_text):]
        self._advance()
        return self._emit(delta)

    def flush(self) -> str:
        """End of stream: emit any held-back text (U+FFFD for unfinished bytes)."""
        if self._read >= len(self._ids):
            return ""
        new_text = self._decode(self._ids)
        delta = new_text[len(self._prefix_text):] if len(new_text) > len(self._prefix_text) else ""
        self._advance()
        return self._emit(delta)

    @property
    def text(self) -> str:
        """The generated text emitted so far (the concatenation of all deltas)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache] if self._text_cache else []
        return self._text_cache

    @property
    def pending_token_count(self) -> int:
        """Ids received but not yet turned into text (held back)."""
        return len(self._ids) - self._read

    def __repr__(self) -> str:
        return (f"IncrementalDetokenizer(num_tokens={self.num_tokens}, "
                f"pending={self.pending_token_count}, "
                f"text={self.text[-40:]!r})")
