"""Fuzzing prompts into a live engine on the CPU (tiny-code's tokenizer, a one-layer model).

Token-id prompts (negative, past the vocabulary, huge ints, bools, floats, nested
lists, empty, longer than the context) and text prompts (lone surrogates, control
characters, emoji, bytes decoded with surrogateescape, 100K characters) go through
InferenceSession.generate / stream while a greedy "needle" request runs in the same
engine. Each fuzz request is accepted and finishes (some streams are abandoned after
their first piece, which aborts them), or is refused with a ValueError naming the
prompt or the field; never another exception, never a hang. Every needle's tokens
equal a clean run's (a bad request never changes another request's output), and
afterwards no page is in use and no request is tracked.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from hypothesis import strategies as st

from fuzz_support import bounded, run_property, write_random_hf_folder
from strategies import HUGE_INTS
from jaxinfer import EngineConfig, InferenceSession, SamplingParams
from jaxinfer.assets import resolve_model_path

MAX_MODEL_LEN = 64
NEEDLE = [1, 822, 1543, 12, 77, 5, 901, 44]
NEEDLE_PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """tiny-code's tokenizer and vocabulary on a one-layer random model: the same input
    surface, and compiles fast enough for a CI run of this property."""
    bundled = resolve_model_path("tiny-code")
    with open(os.path.join(bundled, "config.json")) as f:
        hf = json.load(f)
    hf.update(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32)
    path = write_random_hf_folder(str(tmp_path_factory.mktemp("tiny_code_1layer")), hf, scale=0.5)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.exists(os.path.join(bundled, name)):
            shutil.copy(os.path.join(bundled, name), path)
    engine = EngineConfig(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=16, max_num_seqs=4, page_size=16,
                          num_pages=48, shared_prefix_attention=False)
    s = InferenceSession.from_pretrained(path, engine=engine)
    yield s
    s.close()


def _idle(session):
    m = session.metrics()
    assert m["num_free_pages"] == m["num_total_pages"], f"pages leaked: {m['num_total_pages'] - m['num_free_pages']}"
    assert session.async_engine.num_unfinished == 0
    assert session.async_engine.call(lambda engine: not engine.has_unfinished and not engine.requests)


class Needle:
    """Keeps one greedy needle request in flight; checks each finished one against the clean run."""

    def __init__(self, session, clean):
        self.session, self.clean, self.stream, self.checked = session, clean, None, 0

    def keep_running(self):
        if self.stream is not None and not self.stream.finished:
            return
        self.finish()
        (self.stream,) = self.session.async_engine.add_requests([self._request()])

    def _request(self):
        from jaxinfer.engine.validation import NewRequest
        return NewRequest(prompt_ids=tuple(NEEDLE), params=NEEDLE_PARAMS)

    def finish(self):
        if self.stream is None:
            return
        out = self.stream.result(timeout=120)
        assert out.token_ids == self.clean, "the needle's tokens changed while fuzz requests ran beside it"
        self.checked += 1
        self.stream = None


ID = st.one_of(st.integers(0, 4095), st.integers(-3, 5000), HUGE_INTS, st.booleans(), st.floats(allow_nan=True),
               st.just(None), st.just([1, 2]), st.text(max_size=2))
ID_PROMPTS = st.one_of(
    st.lists(st.integers(3, 4095), min_size=1, max_size=40),  # valid: these run beside the needle
    st.lists(ID, max_size=6),
    st.builds(lambda n: [5] * n, st.sampled_from([0, MAX_MODEL_LEN - 1, MAX_MODEL_LEN, 100_000])),
)
TEXT_PROMPTS = st.one_of(
    st.text(min_size=1, max_size=30),
    st.lists(st.one_of(st.sampled_from(["def f(x):", "😀", "🎉🚀", "\x00", "\x1b[2J", "\u202e", "\ud800", "\udfff",
                                        "é", "\r\n"]),
                       st.binary(min_size=1, max_size=8).map(lambda b: b.decode("utf-8", "surrogateescape"))),
             min_size=1, max_size=6).map("".join),
    st.builds(lambda c: c * 100_000, st.sampled_from(["a", "😀", " x"])),
    st.just(""),
)
PARAMS = st.builds(lambda m, t, seed, stop: dict(max_tokens=m, temperature=t, seed=seed, stop=stop),
                   st.integers(1, 4), st.sampled_from([0.0, 0.8]), st.integers(0, 2**20),
                   st.sampled_from([(), ("\n",), ("😀",)]))


def test_fuzz_prompts_beside_a_needle(session, fuzz_profile):
    with bounded(300, "the clean needle run"):
        (clean,) = session.generate([NEEDLE], NEEDLE_PARAMS)
    needle = Needle(session, clean.token_ids)
    accepted = []

    @run_property("engine prompts", fuzz_profile, ci=30, slow=800,
                  prompt=st.one_of(ID_PROMPTS, TEXT_PROMPTS), params=PARAMS, mode=st.sampled_from(["generate",
                                                                                                      "stream_abort"]))
    def prop(prompt, params, mode):
        with bounded(120):
            needle.keep_running()
            params = SamplingParams(**params)
            try:
                if mode == "generate":
                    (out,) = session.generate([prompt], params)
                    assert out.finish_reason in ("length", "stop") and 1 <= len(out.token_ids) <= params.max_tokens
                else:
                    stream = session.stream(prompt, params, output="deltas")
                    next(iter(stream), None)
                    stream.close()
            except ValueError as e:
                message = str(e)
                assert message.startswith(("prompts[0]", "text", "params[0].max_tokens")), message
                return
            accepted.append(prompt)

    with bounded(120):
        needle.finish()
    assert needle.checked >= 1 and accepted, "the fuzz never ran a request beside the needle"
    _idle(session)
    print(f"engine prompts: {len(accepted)} accepted, {needle.checked} needles checked, "
          f"{session.metrics()['num_compiles']} compiles")
