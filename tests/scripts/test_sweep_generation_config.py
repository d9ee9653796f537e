"""scripts/sweep_generation_config.py: the metric, the grid, and the bundled model's defaults.

The metric functions are checked on hand-written completions (good code, the greedy
loop, broken code) for the ordering the sweep relies on; the bundled tiny-code
generation_config.json must hold valid SamplingParams, and once the sweep has written
its winner there, generating from `def fibonacci(n):` with those defaults must give
Python-shaped text by the same metric (no text is hard-coded: a retrained model or a
new sweep changes the words, not the test).
"""
from __future__ import annotations

import json
import os

import pytest

from script_loader import load_script
from jaxinfer import EngineConfig, InferenceSession, SamplingParams
from jaxinfer.assets import resolve_model_path
from jaxinfer.session import GENERATION_DEFAULT_KEYS

sweep = load_script("sweep_generation_config")

MODEL_DIR = resolve_model_path("tiny-code")
HEADER = "def fibonacci(n):"

GOOD = ('\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n    for _ in range(n):\n'
        '        a, b = b, a + b\n    return a\n')
# cut by max_tokens inside a call: a valid prefix, and its partial last line is ignored
GOOD_CUT = '\n    if n < 2:\n        return n\n    result = compute(n - 1,\n                     n - 2)\n    return res'
LOOP = ('\n    """Return a list of the list of the list of the list of the\n    the list of the list of the list of '
        'the list of the\n    the list of the list of the list of the list of the\n')
BROKEN = "\n    return s.compile(b'a', b'x')\n        if x\n    else:\n        a = ]\n"
PROSE = "\n    Return a list of the values in the given order.\n    This is used by the caller.\n"


def _load_config() -> dict:
    with open(os.path.join(MODEL_DIR, "generation_config.json")) as f:
        return json.load(f)


def test_syntax_ok_accepts_valid_prefixes_and_rejects_errors():
    assert sweep.syntax_ok(HEADER, GOOD, finished=True)
    assert sweep.syntax_ok(HEADER, GOOD_CUT)  # open bracket, then a cut line: still a prefix
    assert sweep.syntax_ok(HEADER, LOOP)  # the loop is a valid (open) docstring: repetition must catch it
    assert sweep.syntax_ok(HEADER, '\n    """Doc string that max_tokens cut\n    in the mid')
    assert not sweep.syntax_ok(HEADER, BROKEN)
    assert not sweep.syntax_ok(HEADER, PROSE)  # tokenize would accept it; the parser does not
    assert not sweep.syntax_ok(HEADER, "\n        a = 1\n    b = 2\n")  # inconsistent dedent
    assert not sweep.syntax_ok(HEADER, "")  # no complete line: nothing to judge
    assert not sweep.syntax_ok(HEADER, " return n  # cut mid-line")


def test_syntax_ok_uses_the_enclosing_blocks():
    # A method whose completion goes on at class level: fine inside its class, and an
    # unindent to a column no enclosing block has is an error.
    header = "    def area(self):"
    completion = "\n        return self.w * self.h\n\n    def perimeter(self):\n        return 2 * self.w\n"
    assert sweep.syntax_ok(header, completion, finished=True, enclosing=(0,))
    assert not sweep.syntax_ok(header, completion.replace("\n    def", "\n  def"), finished=True, enclosing=(0,))


def test_repetition_ranks_the_loop_worst():
    assert sweep.repetition(GOOD) < 0.1
    assert sweep.repetition(LOOP) > 0.6
    assert sweep.repetition("a b") == 0.0  # fewer lexemes than an n-gram
    assert sweep.repeated_lines("x = 1\n\nx = 1\ny = 2\n") == pytest.approx(1 / 3)
    assert sweep.repeated_lines("") == 0.0


def test_score_orders_good_over_loop_over_broken():
    good = sweep.score_completion(HEADER, GOOD, finished=True)["score"]
    cut = sweep.score_completion(HEADER, GOOD_CUT)["score"]
    loop = sweep.score_completion(HEADER, LOOP)["score"]
    broken = sweep.score_completion(HEADER, BROKEN)["score"]
    assert good > 0.9 and cut > 0.9
    assert good > loop > broken == 0.0
    summary = sweep.summarize([sweep.score_completion(HEADER, t) for t in (GOOD_CUT, LOOP, BROKEN)], [-1.0, -3.0])
    assert summary["score"] == pytest.approx((cut + loop) / 3)
    assert summary["syntax_ok"] == pytest.approx(2 / 3) and summary["mean_logp"] == pytest.approx(-2.0)


def test_complete_part():
    assert sweep.complete_part("\n    a = 1\n    b =", finished=False) == "\n    a = 1\n"
    assert sweep.complete_part("\n    a = 1", finished=True) == "\n    a = 1\n"
    assert sweep.complete_part(" pass", finished=False) == ""


def test_grid_shapes():
    stage1 = sweep.stage1_grid([0.0, 0.4, 0.8], [1.0, 1.2])
    assert len(stage1) == 6 and all(c["top_p"] == 1.0 and c["top_k"] == 0 and c["min_p"] == 0 for c in stage1)
    best = {"temperature": 0.4, "repetition_penalty": 1.2}
    stage2 = sweep.stage2_grid(best, [0.0, 0.4, 0.8], [0.9, 1.0], [0, 40], [0.0, 0.1], 1, stage1)
    # 2 temperatures x 8 filter combinations, less the two already run without filters
    assert len(stage2) == 14
    assert {c["temperature"] for c in stage2} == {0.4, 0.8}
    assert all(c["repetition_penalty"] == 1.2 for c in stage2)
    update = sweep.generation_config_update({"bos_token_id": 1, "eos_token_id": 2, "max_length": 9, "top_k": 50},
                                            {**stage2[0]}, True)
    assert update["do_sample"] is True and update["max_length"] == 9
    assert set(update) == {"bos_token_id", "eos_token_id", "max_length", "do_sample", *sweep.SAMPLING_KEYS}
    greedy = sweep.generation_config_update({"top_k": 50}, {**stage1[0]}, False)
    assert greedy == {"do_sample": False, "temperature": 0.0}


def test_prompts_come_from_heldout_headers():
    prompts = sweep.build_prompts(MODEL_DIR, 6, 4, seed=0)
    assert len(prompts) == 6
    assert prompts == sweep.build_prompts(MODEL_DIR, 6, 4, seed=0)  # deterministic
    with open(os.path.join(MODEL_DIR, "data_split.json")) as f:
        heldout = set(json.load(f)["heldout"])
    for i, p in enumerate(prompts):
        assert p.file in heldout and p.text.endswith(p.header) and p.header.rstrip().endswith(":")
        assert p.header.lstrip().startswith(("def ", "class ", "async def "))
        if i % 2 == 0:  # bare: the dedented header alone, like the CLI prompt
            assert p.text == p.header and p.enclosing == ()


def test_bundled_generation_config_is_valid_sampling_params():
    config = _load_config()
    assert {"bos_token_id", "eos_token_id", "max_length"} <= set(config)
    assert not any(k.startswith("_") for k in config)  # HF loads this file
    fields = {k: config[k] for k in GENERATION_DEFAULT_KEYS if k in config}
    SamplingParams(**fields)
    if "do_sample" in config:
        assert config["do_sample"] == (config.get("temperature", 1.0) > 0)


def test_fibonacci_with_the_bundled_defaults_is_python_shaped():
    config = _load_config()
    if "temperature" not in config:
        pytest.skip("generation_config.json has no sampling defaults yet (run the sweep with --write)")
    # A small engine: less to compile; a seeded request's tokens do not depend on the batch.
    engine = EngineConfig(max_num_seqs=4, num_pages=32, max_num_batched_tokens=64, max_model_len=128)
    session = InferenceSession.from_pretrained("tiny-code", engine=engine)
    with session:
        params = [session.default_sampling_params(max_tokens=48, seed=seed) for seed in range(4)]
        assert params[0].temperature == config["temperature"]
        outs = session.generate([HEADER] * 4, params)
    scores = [sweep.score_completion(HEADER, o.text, o.finish_reason == "stop") for o in outs]
    assert scores[0]["syntax_ok"] == 1.0, outs[0].text  # seed 0: what the test of the CLI sees
    assert sum(s["syntax_ok"] for s in scores) >= 3, [o.text for o in outs]
    # not the greedy loop: far less repetition than "Return a list of the list of the list ..."
    assert max(s["repetition"] for s in scores) < sweep.repetition(LOOP) / 2, [o.text for o in outs]
