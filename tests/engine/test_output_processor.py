"""Output processing (engine/output_processor.py): text deltas, stop strings with the
held-back tail, finish reasons, and the same through the engine over a scripted runner."""
from __future__ import annotations

import pytest

from jaxinfer.config import SamplingParams
from jaxinfer.engine.output_processor import OutputProcessor
from jaxinfer.engine.request import Request, Status

EOS = 0
# A byte-level toy vocabulary: "é" is split over two tokens (10, 11), as byte fallback does.
PIECES = {EOS: b"</s>", 1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"!", 6: b" ", 7: b"END", 8: b"x",
          10: b"\xc3", 11: b"\xa9"}
HELLO = [1, 2, 3, 4, 5]  # "Hello world!"


class ToyTokenizer:
    """The interface the detokenizer uses: decode(ids, skip_special_tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        data = b"".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOS))
        return data.decode("utf-8", errors="replace")


def _request(params, prompt=(8,), rid="r"):
    return Request(rid, list(prompt), params, seed=0, eos_token_ids=(EOS,))


def _run(params, steps, tokenizer=ToyTokenizer(), abort_after=None):
    """Plays scheduler + engine: each step appends its tokens (stopping at a token-level
    finish), processes them and takes the delta. Returns (deltas, request)."""
    op = OutputProcessor(tokenizer)
    request = _request(params)
    op.add(request)
    deltas = []
    for n, tokens in enumerate(steps):
        num_new = 0
        for t in tokens:
            request.append_token(t, -0.25, ((t, -0.25),))
            num_new += 1
            if request.is_finished:
                break
        if op.process(request, num_new) == "stop":  # as Engine.step does
            request.status, request.finish_reason = Status.FINISHED, "stop"
        if abort_after == n:
            request.finish("abort")
        deltas.append(op.delta(request))
        if request.is_finished:
            break
    return deltas, request


def _check_stream(deltas):
    """The concatenated deltas equal the final output; only the last delta finishes."""
    final = deltas[-1].output
    assert [d.is_finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert all(d.output is None for d in deltas[:-1]) and deltas[-1].finish_reason == final.finish_reason
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids
    return final


def test_stop_string_across_tokens_is_held_back_and_excluded():
    deltas, _ = _run(SamplingParams(max_tokens=10, stop=["o wo"]), [[t] for t in HELLO])
    final = _check_stream(deltas)
    assert final.text == "Hell" and final.finish_reason == "stop"
    # 3 characters (len("o wo") - 1) are held back while running: "o" of "Hello" never leaks.
    assert [d.text for d in deltas] == ["", "He", "ll"]
    assert final.token_ids == [1, 2, 3]  # the token completing the stop string is the last


def test_without_a_match_everything_held_back_is_released_at_the_end():
    deltas, _ = _run(SamplingParams(max_tokens=5, stop=["zzz", "q"]), [[t] for t in HELLO])
    final = _check_stream(deltas)
    assert final.text == "Hello world!" and final.finish_reason == "length"
    assert [d.text for d in deltas] == ["H", "el", "lo w", "or", "ld!"]


def test_no_hold_back_without_stop_strings_of_two_chars():
    deltas, _ = _run(SamplingParams(max_tokens=5, stop="?"), [[t] for t in HELLO])
    assert [d.text for d in deltas] == ["Hel", "lo", " wor", "ld", "!"]


def test_stop_in_the_middle_of_a_multi_token_step_drops_the_rest():
    params = SamplingParams(max_tokens=10, stop=["lo"], logprobs=1)
    deltas, request = _run(params, [[1, 2, 3, 4]])
    final = _check_stream(deltas)
    assert final.text == "Hel" and final.finish_reason == "stop"
    assert final.token_ids == [1, 2] and final.logprobs == [-0.25, -0.25]
    assert final.top_logprobs == [{1: -0.25}, {2: -0.25}]
    assert deltas[-1].logprobs == (-0.25, -0.25) and deltas[-1].top_logprobs == ({1: -0.25}, {2: -0.25})


def test_stop_string_on_the_last_allowed_token_finishes_with_stop():
    deltas, _ = _run(SamplingParams(max_tokens=2, stop=["lo"]), [[1], [2]])
    final = _check_stream(deltas)
    assert final.text == "Hel" and final.finish_reason == "stop"


def test_stop_string_split_inside_a_character():
    # "é" arrives in two byte tokens: nothing is decoded from the first alone.
    deltas, _ = _run(SamplingParams(max_tokens=10, stop=["oé"]), [[1], [2], [10], [11], [5]])
    final = _check_stream(deltas)
    assert final.text == "Hell" and final.token_ids == [1, 2, 10, 11]
    assert [d.text for d in deltas] == ["He", "ll", "", ""]


@pytest.mark.parametrize("params, tokens, text, reason, token_ids", [
    (SamplingParams(max_tokens=3), HELLO, "Hello wor", "length", [1, 2, 3]),
    (SamplingParams(max_tokens=9), [1, 2, EOS, 4], "Hello", "eos", [1, 2, EOS]),
    (SamplingParams(max_tokens=9, stop_token_ids=[5]), HELLO, "Hello world", "stop", HELLO),
    # ignore_eos: EOS is an ordinary (special, textless) token
    (SamplingParams(max_tokens=4, ignore_eos=True), [1, EOS, 2, 5], "Hello!", "length", [1, EOS, 2, 5]),
    # held-back bytes of an unfinished character are flushed (as U+FFFD) whatever ends the request
    (SamplingParams(max_tokens=2), [1, 10], "Hel\ufffd", "length", [1, 10]),
    (SamplingParams(max_tokens=9), [1, 10, EOS], "Hel\ufffd", "eos", [1, 10, EOS]),
    (SamplingParams(max_tokens=9, stop_token_ids=[7]), [1, 10, 7], "Hel\ufffd", "stop", [1, 10, 7]),
])
def test_finish_reasons(params, tokens, text, reason, token_ids):
    deltas, _ = _run(params, [[t] for t in tokens])
    final = _check_stream(deltas)
    assert (final.text, final.finish_reason, final.token_ids) == (text, reason, token_ids)
    assert final.prompt_token_ids == [8] and final.num_generated_tokens == len(token_ids)


def test_abort_releases_the_held_back_text():
    deltas, _ = _run(SamplingParams(max_tokens=10, stop=["zzzz"]), [[1], [2]], abort_after=1)
    final = _check_stream(deltas)
    assert [d.text for d in deltas] == ["", "Hello"] and final.finish_reason == "abort"
    # Aborted before any token: an empty result.
    op = OutputProcessor(ToyTokenizer())
    request = _request(SamplingParams())
    op.add(request)
    request.finish("abort")
    delta = op.delta(request)
    assert delta.finish_reason == "abort" and delta.text == "" and delta.output.token_ids == []
    assert delta.output.time_to_first_token == 0.0


def test_without_a_tokenizer_text_is_empty():
    deltas, _ = _run(SamplingParams(max_tokens=9, stop=["lo"]), [[1], [2], [EOS]], tokenizer=None)
    final = _check_stream(deltas)
    assert final.text == "" and final.finish_reason == "eos" and final.token_ids == [1, 2, EOS]
    assert all(d.text == "" for d in deltas)


# ---------------------------------------------------------------------- through the engine


def _drain(engine):
    deltas = {}
    for _ in range(50):
        for d in engine.step():
            deltas.setdefault(d.request_id, []).append(d)
        if not engine.has_unfinished:
            break
    return deltas


def test_engine_finish_reasons_and_streams(scripted_engine):
    scripts = {"length": HELLO, "eos": [1, EOS], "stop_id": [1, 2, 7], "stop_str": HELLO}
    engine = scripted_engine(scripts, tokenizer=ToyTokenizer(), eos_token_ids=(EOS,))
    for rid, params in [("length", SamplingParams(max_tokens=4)), ("eos", SamplingParams(max_tokens=9)),
                        ("stop_id", SamplingParams(max_tokens=9, stop_token_ids=[7])),
                        ("stop_str", SamplingParams(max_tokens=9, stop=[" wo"]))]:
        engine.add_request([8, 8], params, request_id=rid)
    deltas = _drain(engine)
    finals = {rid: _check_stream(ds) for rid, ds in deltas.items()}
    assert {rid: (f.finish_reason, f.text) for rid, f in finals.items()} == {
        "length": ("length", "Hello world"), "eos": ("eos", "Hel"), "stop_id": ("stop", "Hello"),
        "stop_str": ("stop", "Hello")}
    # Every request is forgotten after its last delta and its pages are back.
    assert engine.requests == {} and not engine.has_unfinished
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages


def test_engine_abort_returns_the_last_delta(scripted_engine):
    engine = scripted_engine({"a": HELLO}, tokenizer=ToyTokenizer())
    rid = engine.add_request([8], SamplingParams(max_tokens=9, stop=["zz"]), request_id="a")
    first = engine.step()  # the prompt, and the first token
    assert [d.text for d in first] == ["He"]  # 1 character held back
    last = engine.abort(rid)
    assert last.finish_reason == "abort" and last.text == "l" and last.output.text == "Hel"
    assert last.output.finish_reason == "abort"
    assert engine.abort(rid) is None and engine.requests == {} and not engine.has_unfinished
    assert engine.step() == []
    assert engine.block_manager.num_free_pages == engine.block_manager.num_pages
