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


class ScriptedRunner:
    """Plays the ModelRunner without a model: request id -> the tokens it samples, in order.

    Every sample offset of a scheduled sequence takes the next token of its request's
    script (a request without one samples `default`). The StepInputs are kept in `steps`.
    """

    def __init__(self, scripts=None, *, num_pages=32, page_size=4, default=3):
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.num_pages, self.page_size = num_pages, page_size
        self.weight_bytes = self.kv_cache_bytes = 0
        self.default = default
        self.steps = []

    def device_info(self):
        return {}

    def execute(self, step_input):
        from jaxinfer.types import SequenceOutput, StepOutput, StepStats
        self.steps.append(step_input)
        outputs = {}
        for seq in step_input.sequences:
            script = self.scripts.setdefault(seq.request_id, [])
            ids = tuple(script.pop(0) if script else self.default for _ in seq.sample_offsets)
            outputs[seq.request_id] = SequenceOutput(
                request_id=seq.request_id, token_ids=ids,
                logprobs=tuple(-0.5 for _ in ids) if seq.want_logprobs else None,
                top_logprobs=tuple(((t, -0.5),) * seq.num_top_logprobs for t in ids) if seq.num_top_logprobs
                else None)
        return StepOutput(outputs=outputs, stats=StepStats(num_tokens=sum(len(s.token_ids)
                                                                          for s in step_input.sequences)))


def tiny_model_config(vocab_size=64, max_position_embeddings=64):
    from jaxinfer.config import ModelConfig
    return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=max_position_embeddings)


@pytest.fixture
def scripted_engine():
    """Returns f(scripts, tokenizer=None, eos_token_ids=(), **EngineConfig fields) -> Engine
    over a ScriptedRunner (no model, no jax work): the engine's host side, fast."""
    from jaxinfer.config import EngineConfig
    from jaxinfer.engine.engine import Engine

    def make(scripts=None, tokenizer=None, eos_token_ids=(), model_config=None, num_pages=32, **engine_fields):
        engine_fields.setdefault("page_size", 4)
        runner = ScriptedRunner(scripts, num_pages=num_pages, page_size=engine_fields["page_size"])
        return Engine(model_config or tiny_model_config(), runner, EngineConfig(num_pages=num_pages, **engine_fields),
                      tokenizer=tokenizer, eos_token_ids=eos_token_ids)
    return make
