"""The bundled recursive model jaxinfer/assets/tiny-code-recursive.

tiny-code converted by scripts/convert_recursive.py (2 shared layers looped 3 times,
rank-16 LoRA per loop) and uptrained by scripts/uptrain_recursive.py; docs/recursive.md
has the commands and the held-out perplexities. Checked: the folder is within the
15 MB budget and says what it is; `InferenceSession.from_pretrained("tiny-code-recursive")`
serves it by name with the greedy tokens of the recursive model's own dense reference
forward, on real held-out code; its first loop drafts for itself (early_exit) without
changing the tokens; the uptraining lowered held-out perplexity at every exit.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from jaxinfer import EngineConfig, InferenceSession, SamplingParams, SpeculativeConfig
from recursive_assets import MODEL_DIR, NAME, heldout, needs_model, recursive_lib
MAX_TOKENS = 6
ENGINE = EngineConfig(page_size=8, num_pages=32, max_num_batched_tokens=64, compilation_cache_dir="")

pytestmark = needs_model


@pytest.fixture(scope="module")
def lib():
    return recursive_lib()


@pytest.fixture(scope="module")
def prompts(lib):
    docs = heldout(2)
    return [docs[0][:20], docs[1][:33]]


def test_folder_is_small_and_describes_its_loops():
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) <= 15 * 2**20
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        section = json.load(f)["recursive"]
    assert (section["num_blocks"], section["num_loops"], section["lora_rank"]) == (2, 3, 16)
    with open(os.path.join(MODEL_DIR, "uptrain_summary.json")) as f:
        ppl = json.load(f)["heldout_perplexity"]
    for exit_ in ("1", "2", "3"):
        assert ppl["after"][exit_] < ppl["before"][exit_], exit_


def test_served_by_name_with_the_reference_tokens_and_self_speculation(lib, prompts):
    config, _, spec, rp = lib.load_recursive(MODEL_DIR)
    want = [lib.greedy_tokens(config, spec, rp, prompt, MAX_TOKENS) for prompt in prompts]
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with InferenceSession.from_pretrained(NAME, engine=ENGINE) as session:
        assert [o.token_ids for o in session.generate(prompts, greedy)] == want
    draft = SpeculativeConfig(method="early_exit", num_speculative_tokens=3, draft_loops=1)
    with InferenceSession.from_pretrained(NAME, engine=dataclasses.replace(ENGINE, speculative=draft)) as session:
        assert [o.token_ids for o in session.generate(prompts, greedy)] == want
        metrics = session.metrics()
    assert metrics["spec_num_accepted_tokens"] > 0
    assert metrics["num_free_pages"] == metrics["num_total_pages"]
