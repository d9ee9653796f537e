"""Tests for jaxinfer.engine.detokenizer.IncrementalDetokenizer.

Tokenizers are trained here (no downloads): a SentencePiece BPE model with
byte fallback and a byte-level BPE tokenizer.json.  Text with characters the
corpus never saw (🦀, 漢字, ...) is encoded as several byte tokens per
character, which is what the detokenizer must stitch back together.
"""

import json
import random

import pytest

from jaxinfer.engine.detokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from jaxinfer.models.tokenizer import load_tokenizer

FFFD = "\ufffd"
_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world",
          "data", "model", "token", "stream", "a", "of", "and", "to", "in", "is"]
_RARE = ["café", "über", "日本語", "中文", "你好", "😀", "🚀", "👍🏽"]
GENERATED = "jumps over 🦀 the 漢字 dog café 👍🏽 🦄日本語ñ and 🎉 done"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    lines = []
    for i in range(300):
        ws = [rng.choice(_WORDS) for _ in range(rng.randint(3, 10))]
        if i % 4 == 0:
            ws.insert(rng.randint(0, len(ws)), rng.choice(_RARE))
        lines.append(" ".join(ws))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory, corpus):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp_model")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=str(folder / "tokenizer"), vocab_size=350, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "legacy": False}))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("bpe_model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([corpus], trainers.BpeTrainer(
        vocab_size=350, special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}))
    return load_tokenizer(str(folder))


def _prompt_and_generated(tok):
    """Prompt ids and generated ids for `GENERATED` continuing the prompt."""
    prompt = tok.encode("the quick brown fox")
    if tok.kind == "sentencepiece":
        gen = tok.encode(GENERATED, add_special_tokens=False)  # "▁jumps ..."
    else:
        gen = tok.encode(" " + GENERATED, add_special_tokens=False)
    return prompt, gen


def _stream(det, ids):
    return [det.add(i) for i in ids]


@pytest.fixture(params=["sp", "bpe"])
def tok(request, sp_tok, bpe_tok):
    return sp_tok if request.param == "sp" else bpe_tok


def test_split_characters_premise(tok):
    # Some characters really are split over several tokens.
    _, gen = _prompt_and_generated(tok)
    partial = [tok.decode(gen[:k]) for k in range(1, len(gen) + 1)]
    assert sum(p.endswith(FFFD) for p in partial) >= 6


def test_stream_never_emits_replacement_char(tok):
    prompt, gen = _prompt_and_generated(tok)
    det = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(det, gen)
    assert all(FFFD not in d for d in deltas)
    assert "".join(deltas) == det.text == " " + GENERATED
    assert det.flush() == ""
    assert det.text == " " + GENERATED
    assert det.pending_token_count == 0
    # held back while a character was incomplete
    assert deltas.count("") >= 3
    # .text is what follows the prompt's text in decode(prompt + generated)
    full, ptext = tok.decode(prompt + gen), tok.decode(prompt)
    assert full == ptext + det.text
    # ... which is decode(generated) up to SentencePiece's stripped leading space
    if tok.kind == "sentencepiece":
        assert tok.decode(gen) == GENERATED
    else:
        assert tok.decode(gen) == " " + GENERATED


def test_first_token_keeps_leading_space(sp_tok):
    prompt = sp_tok.encode("hello")
    first = sp_tok.encode("world", add_special_tokens=False)
    assert sp_tok.convert_ids_to_tokens(first)[0].startswith("\u2581")
    assert not sp_tok.decode(first[:1]).startswith(" ")  # a standalone decode strips the space
    det = IncrementalDetokenizer(sp_tok, prompt)
    assert det.add(first[0]).startswith(" ")
    # no prompt context (or only BOS): nothing precedes it, like decode()
    det = IncrementalDetokenizer(sp_tok, [sp_tok.bos_token_id])
    out = "".join(_stream(det, first)) + det.flush()
    assert out == "world" == sp_tok.decode(first)
    det = IncrementalDetokenizer(sp_tok, [])
    assert "".join(_stream(det, first)) == "world"


def test_flush_truncated_multibyte(tok):
    prompt = tok.encode("hello")
    ids = tok.encode(" ok 🦀", add_special_tokens=False) if tok.kind == "tokenizers" else \
        tok.encode("ok 🦀", add_special_tokens=False)
    assert tok.decode(ids).endswith("🦀")
    truncated = ids[:-1]  # drop the crab's last byte token
    assert tok.decode(truncated).endswith(FFFD)
    det = IncrementalDetokenizer(tok, prompt)
    deltas = _stream(det, truncated)
    assert all(FFFD not in d for d in deltas)
    # the space may share a byte-level token with the crab's first byte
    assert det.text in (" ok ", " ok")
    assert det.pending_token_count >= 1
    tail = det.flush()
    text = det.text
    assert tail.endswith(FFFD) and tail.strip(" " + FFFD) == ""
    assert text.startswith(" ok ") and text.endswith(FFFD)
    assert FFFD not in text.rstrip(FFFD)  # replacement characters only at the very end
    assert text == tok.decode(prompt + truncated)[len(tok.decode(prompt)):]
    assert det.flush() == "" and det.text == text


def test_special_tokens(sp_tok, bpe_tok):
    for tok in (sp_tok, bpe_tok):
        prompt = tok.encode("hello")
        a = tok.encode(" big" if tok.kind == "tokenizers" else "big", add_special_tokens=False)
        b = tok.encode(" dog", add_special_tokens=False) if tok.kind == "tokenizers" else \
            tok.encode("dog", add_special_tokens=False)
        eos = tok.eos_token_id
        det = IncrementalDetokenizer(tok, prompt)
        out = _stream(det, a + [eos] + b)
        assert "".join(out) == " big dog"
        assert out[len(a)] == ""  # the skipped special token emits nothing
        det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
        _stream(det, a + [eos])
        assert det.text == " big" + tok.id_to_piece(eos)


def test_random_streams_match_full_decode(tok):
    """Any id stream (including invalid byte sequences and specials): the
    deltas plus flush equal the full decode in the prompt's context."""
    rng = random.Random(0)
    normal = [i for i in range(tok.vocab_size) if i not in tok.all_special_ids]
    special = sorted(tok.all_special_ids)
    for _ in range(60):
        prompt = [rng.choice(normal) for _ in range(rng.randint(0, 8))]
        gen = [rng.choice(special) if rng.random() < 0.05 else rng.choice(normal)
               for _ in range(rng.randint(1, 25))]
        for skip in (True, False):
            det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
            out = "".join(_stream(det, gen)) + det.flush()
            ctx = prompt[-PROMPT_CONTEXT_TOKENS:]
            full = tok.decode(ctx + gen, skip_special_tokens=skip)
            ptext = tok.decode(ctx, skip_special_tokens=skip)
            if ptext.endswith(FFFD):
                continue  # prompt ends inside a character: "after the prompt" is ill-defined
            assert full.startswith(ptext)
            assert out == det.text == full[len(ptext):]


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok = tok
        self.max_len = 0
        self.calls = 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        self.max_len = max(self.max_len, len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_add_is_windowed(tok):
    counting = _CountingTokenizer(tok)
    prompt, gen = _prompt_and_generated(tok)
    det = IncrementalDetokenizer(counting, prompt * 20)
    stream = gen * 15  # a few hundred tokens
    out = "".join(_stream(det, stream))
    assert FFFD not in out
    assert counting.max_len <= PROMPT_CONTEXT_TOKENS + 10
    assert counting.calls <= 2 * len(stream) + 1


def test_invalid_inputs(sp_tok):
    with pytest.raises(ValueError, match="tokenizer"):
        IncrementalDetokenizer(None, [1])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        IncrementalDetokenizer(sp_tok, "hello")
    with pytest.raises(ValueError, match="prompt_token_ids"):
        IncrementalDetokenizer(sp_tok, [1, "x"])
    det = IncrementalDetokenizer(sp_tok, [1])
    with pytest.raises(ValueError, match="token_id"):
        det.add("a")
    with pytest.raises(ValueError, match="token_id"):
        det.add(1.5)
