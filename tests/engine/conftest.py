"""Fixtures of the engine tests: the HF greedy oracle."""
from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="module")
def oracle(hf_model_dir):
    """HF greedy generations (each request alone), memoized by (prompt, max_tokens)."""
    path, hf = hf_model_dir("llama")
    hf.generation_config.eos_token_id = None
    cache = {}

    def generate(prompt, max_tokens):
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            ids = torch.tensor([prompt])
            gen = transformers.GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                                                pad_token_id=0)
            with torch.no_grad():
                out = hf.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]
    return path, generate
