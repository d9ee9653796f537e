"""Fuzzing the tokenizers and the incremental detokenizer.

Random token ids (byte-fallback pieces that split emoji and other multi-byte characters,
special tokens, ids past the vocabulary) fed one at a time to IncrementalDetokenizer:
never an exception, the deltas always concatenate to `.text`, the held-back window
stays bounded, and when every generated character is complete the streamed text equals
the one-shot decode. Random text (lone surrogates, control characters, emoji, bytes
decoded with surrogateescape, long strings) through `encode`: ids inside the vocabulary
or a ValueError naming the text. Both the bundled SentencePiece tokenizer (tiny-code)
and a byte-level BPE tokenizer.json are fuzzed.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import strategies as st

from fuzz_support import bounded, run_property
from jaxinfer.assets import resolve_model_path
from jaxinfer.engine.detokenizer import MAX_PENDING_TOKENS, PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from jaxinfer.models.tokenizer import load_tokenizer

CORPUS = ["def add(a, b):\n    return a + b\n", "héllo wörld ☃ 😀 🎉 日本語のテキスト", "for i in range(10): print(i)",
          "naïve café — “quotes” … ✓ 🚀🚀", "\t\r\n\x00\x1b control", "Ω≈ç√∫˜µ≤≥÷ 👨‍👩‍👧"]


@pytest.fixture(scope="module")
def tokenizers_under_test(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = str(tmp_path_factory.mktemp("bytelevel"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    return {"sentencepiece": load_tokenizer(resolve_model_path("tiny-code")), "bytelevel": load_tokenizer(path)}


def _ids(vocab_size):
    return st.lists(st.one_of(st.integers(0, vocab_size - 1), st.integers(0, 300), st.integers(0, 2 * vocab_size)),
                    max_size=60)


def test_incremental_detokenization(tokenizers_under_test, fuzz_profile):
    @run_property("incremental detokenizer", fuzz_profile, ci=150, slow=8_000,
                  which=st.sampled_from(sorted(tokenizers_under_test)), prompt=_ids(4096), generated=_ids(4096),
                  skip_special=st.booleans())
    def prop(which, prompt, generated, skip_special):
        tok = tokenizers_under_test[which]
        prompt = [t % (2 * tok.vocab_size) for t in prompt]
        generated = [t % (2 * tok.vocab_size) for t in generated]
        with bounded(10):
            det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
            deltas = []
            for t in generated:
                deltas.append(det.add(t))
                assert det.pending_token_count <= MAX_PENDING_TOKENS
                assert len(det._ids) <= MAX_PENDING_TOKENS + PROMPT_CONTEXT_TOKENS + 1
            deltas.append(det.flush())
        assert all(isinstance(d, str) for d in deltas)
        assert "".join(deltas) == det.text and det.pending_token_count == 0
        assert det.num_tokens == len(generated)
        whole = tok.decode(generated, skip_special_tokens=skip_special)
        if not prompt and "\ufffd" not in whole and not any(t >= tok.vocab_size for t in generated):
            assert det.text == whole, (generated, det.text, whole)


def _hostile_text():
    surrogate = st.integers(0xD800, 0xDFFF).map(chr)
    undecodable = st.binary(max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape"))
    return st.one_of(
        st.text(max_size=40), st.text(alphabet=st.characters(codec=None), max_size=40),
        st.lists(st.one_of(st.sampled_from(CORPUS), surrogate, undecodable, st.sampled_from(["\x00", "\x1b[31m", "\u202e",
                                                                                             "\ufeff", "😀", "\U0010ffff"])),
                 max_size=6).map("".join),
        st.builds(lambda c, n: c * n, st.sampled_from(["a", "😀", " ", "\n", "é"]), st.integers(0, 100_000)),
    )


def test_encode_hostile_text(tokenizers_under_test, fuzz_profile):
    @run_property("tokenizer encode", fuzz_profile, ci=150, slow=8_000,
                  which=st.sampled_from(sorted(tokenizers_under_test)), text=_hostile_text())
    def prop(which, text):
        tok = tokenizers_under_test[which]
        with bounded(20):
            try:
                ids = tok.encode(text)
            except ValueError as e:
                assert str(e).startswith("text"), e
                assert any(0xD800 <= ord(c) <= 0xDFFF for c in text), e  # only invalid Unicode is refused
                return
            assert all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
            tok.decode(ids)
