"""Recursive folders (scripts/convert_recursive.py's output) served by the engine.

`InferenceSession.from_pretrained` on a recursive folder runs its loops back to back
(jaxinfer.models.recursive.load_unrolled): at full LoRA rank the tokens are the
original model's (= HF's); at low rank they follow the recursive model's own reference
forward (scripts/recursive_lib.make_forward, dense, no KV cache); a folder whose
tensors disagree with its config is refused naming the file and tensor.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams, SpeculativeConfig
from jaxinfer.models import checkpoint, recursive
from jaxinfer.models.safetensors_reader import read_header
from script_loader import load_script

PROMPTS = [[5, 17, 42, 9, 88, 3], [101, 7, 64, 12, 150, 33, 2, 71, 19, 44, 8]]
MAX_TOKENS = 5
ENGINE = EngineConfig(page_size=4, num_pages=32, max_num_batched_tokens=16, compilation_cache_dir="")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, HF greedy continuations) of a 4-layer tiny Llama."""
    path = str(tmp_path_factory.mktemp("recursive_src"))
    hf = hf_models.build("llama", path, num_hidden_layers=4)
    want = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=0)
            [0, len(p):].tolist() for p in PROMPTS]
    return path, want


@pytest.fixture(scope="module")
def lib():
    return load_script("convert_recursive").recursive_lib


def _convert(lib, src, out, rank, init="average", num_blocks=2):
    config, params, hf_config = checkpoint.load_model(src)
    spec = lib.RecursiveSpec(config.num_layers, num_blocks, init, rank)
    rp = lib.convert(config, params, spec)
    lib.save_recursive(out, hf_config, config, spec, rp, source_dir=src)
    return config, spec, rp


def _greedy(path):
    with InferenceSession.from_pretrained(path, engine=ENGINE) as session:
        outs = session.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        metrics = session.metrics()
    assert metrics["num_free_pages"] == metrics["num_total_pages"]
    return [o.token_ids for o in outs], metrics


def test_full_rank_recursive_folder_gives_the_original_tokens(source, lib, tmp_path):
    src, want = source
    out = str(tmp_path / "full")
    _convert(lib, src, out, rank=64)  # >= min(in, out) of every projection (hidden 64)
    got, metrics = _greedy(out)
    assert got == want
    # The engine sees the unrolled model: 4 layers of KV per token.
    assert metrics["kv_cache_bytes"] == _greedy(src)[1]["kv_cache_bytes"]


def test_low_rank_recursive_folder_follows_its_reference_forward(source, lib, tmp_path):
    src, want = source
    out = str(tmp_path / "low")
    config, spec, rp = _convert(lib, src, out, rank=2, init="stepwise")
    got, _ = _greedy(out)
    assert got == [lib.greedy_tokens(config, spec, rp, p, MAX_TOKENS) for p in PROMPTS]
    assert got != want  # rank 2 of 64 does not recover the original: the LoRA really is applied


def test_a_folder_that_disagrees_with_its_config_is_refused(source, lib, tmp_path):
    src, _ = source
    out = str(tmp_path / "bad")
    _convert(lib, src, out, rank=2)
    config_file = os.path.join(out, "config.json")
    with open(config_file) as f:
        record = json.load(f)

    def write(section):
        with open(config_file, "w") as f:
            json.dump(dict(record, recursive=section), f)

    write(dict(record["recursive"], lora_rank=3))  # the file holds rank-2 LoRA
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model\.layers\.0\..*lora\.0\.A has shape "
                                         r"\(2, (64|96)\), expected \(3, (64|96)\)"):
        InferenceSession.from_pretrained(out, engine=ENGINE)
    write(dict(record["recursive"], num_blocks=3))
    with pytest.raises(ValueError, match="config.json: recursive.num_blocks: 3 does not divide"):
        checkpoint.load_model(out)
    write({k: v for k, v in record["recursive"].items() if k != "norms"})
    with pytest.raises(ValueError, match="recursive.norms is missing"):
        checkpoint.load_model(out)
    write(dict(record["recursive"], num_loops=4))
    with pytest.raises(ValueError, match="recursive.num_loops 4 != num_hidden_layers / num_blocks = 2"):
        checkpoint.load_model(out)
    write(dict(record["recursive"], lora_rank=0))  # no LoRA expected: the file's LoRA tensors are unexpected
    with pytest.raises(ValueError, match=r"unexpected \['model\.layers"):
        checkpoint.load_model(out)
    header, _, _ = read_header(os.path.join(out, recursive.WEIGHTS_FILE))
    assert "model.layers.2.self_attn.q_proj.weight" not in header  # two shared layers stored, four served


def test_early_exit_self_speculation_keeps_the_tokens(source, lib, tmp_path):
    """The recursive model's first loop drafts (method "early_exit"); the full model verifies."""
    src, want = source
    out = str(tmp_path / "spec")
    _convert(lib, src, out, rank=64)
    spec = SpeculativeConfig(method="early_exit", num_speculative_tokens=3, draft_loops=1)
    sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, seed=11, ignore_eos=True)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with InferenceSession.from_pretrained(out, engine=ENGINE) as session:
        plain = [o.token_ids for o in session.generate(PROMPTS, sampled)]
    with InferenceSession.from_pretrained(out, engine=dataclasses.replace(ENGINE, speculative=spec)) as session:
        assert session.engine.proposer.runner.model_config.num_layers == 2  # 1 loop x 2 shared layers
        assert [o.token_ids for o in session.generate(PROMPTS, greedy)] == want
        assert [o.token_ids for o in session.generate(PROMPTS, sampled)] == plain  # seeded: exact
        metrics = session.metrics()
    assert metrics["spec_num_draft_tokens"] > 0 and 0 <= metrics["spec_num_accepted_tokens"]
    assert metrics["num_free_pages"] == metrics["num_total_pages"]
    # Refusals name the field: not a recursive folder; as many draft loops as the model has.
    with pytest.raises(ValueError, match="speculative.method: 'early_exit' drafts with a recursive model"):
        InferenceSession.from_pretrained(src, engine=dataclasses.replace(ENGINE, speculative=spec))
    with pytest.raises(ValueError, match="speculative.draft_loops: 2 must be fewer than the model's 2 loops"):
        InferenceSession.from_pretrained(out, engine=dataclasses.replace(
            ENGINE, speculative=dataclasses.replace(spec, draft_loops=2)))
    with pytest.raises(ValueError, match="speculative.draft_model"):
        SpeculativeConfig(method="early_exit", draft_model=src)
