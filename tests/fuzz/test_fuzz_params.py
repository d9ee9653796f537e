"""Fuzzing SamplingParams, EngineConfig, config.json -> ModelConfig and request
validation: every input is accepted (and then well formed) or refused with a ValueError
whose message starts with the offending field; never another exception, never a hang.
No model and no device: these are the cheap properties that carry most of the slow
run's examples."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import strategies as st

from fuzz_support import bounded, run_property
from strategies import HUGE_INTS, junk, kwargs_of
from jaxinfer.config import MAX_MODEL_DIM, EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.validation import NewRequest, RequestLimits, validate_requests
from jaxinfer.models import registry

SP_FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
EC_FIELDS = [f.name for f in dataclasses.fields(EngineConfig)]


def _field_of(error: ValueError) -> str:
    return str(error).split(":", 1)[0]


def _check_sampling_params(p: SamplingParams):
    assert type(p.max_tokens) is int and p.max_tokens >= 1
    assert type(p.temperature) is float and math.isfinite(p.temperature) and p.temperature >= 0
    assert 0 < p.top_p <= 1 and 0 <= p.min_p <= 1
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed < 2**63)
    assert isinstance(p.stop, tuple) and all(isinstance(s, str) and s for s in p.stop)
    assert isinstance(p.stop_token_ids, tuple) and all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert isinstance(p.logit_bias, tuple) and all(type(t) is int and -100 <= b <= 100 for t, b in p.logit_bias)
    assert 0 <= p.min_tokens <= p.max_tokens and 1 <= p.n <= 128
    hash(p)  # frozen and hashable: usable as a cache key
    assert dataclasses.replace(p) == p


def test_sampling_params(fuzz_profile):
    @run_property("SamplingParams", fuzz_profile, ci=300, slow=40_000, kwargs=kwargs_of(SP_FIELDS))
    def prop(kwargs):
        with bounded(5):
            try:
                params = SamplingParams(**kwargs)
            except ValueError as e:
                assert _field_of(e) in kwargs, (kwargs, e)
                return
        _check_sampling_params(params)


ENGINE_VALUES = st.one_of(junk, HUGE_INTS, st.integers(1, 4096))


def test_engine_config(fuzz_profile):
    from jaxinfer.runtime import kv_cache
    model = ModelConfig(family="llama", vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=6,
                        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=1024)

    @run_property("EngineConfig", fuzz_profile, ci=300, slow=25_000,
                  kwargs=st.dictionaries(st.sampled_from(EC_FIELDS + ["bogus"]), ENGINE_VALUES, max_size=5))
    def prop(kwargs):
        with bounded(5):
            try:
                config = EngineConfig(**kwargs)
            except ValueError as e:
                assert _field_of(e) in kwargs, (kwargs, e)
                return
            # Accepted: sizing the pool is arithmetic only, and addresses int32 slots.
            max_model_len = min(config.max_model_len or 1024, 1024)
            pages = kv_cache.num_pages_for(model, config, dtype="float32", max_model_len=max_model_len)
        assert type(pages) is int and 1 <= pages
        if config.num_pages is not None:  # an explicit pool: EngineConfig already bounds it to int32 slots
            assert pages == config.num_pages and pages * config.page_size <= MAX_MODEL_DIM
        else:  # sized from the byte budget: never above it (beyond one page); int32 slots: see the test below
            page_bytes = kv_cache.bytes_per_page(model, config.page_size, "float32")
            assert pages == 1 or pages * page_bytes <= config.max_kv_cache_bytes


def test_automatic_pool_size_fits_int32_slots():
    from jaxinfer.runtime import kv_cache
    model = ModelConfig(family="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=1024)
    config = EngineConfig(max_kv_cache_bytes=10**15, max_num_seqs=2**31 - 1)
    pages = kv_cache.num_pages_for(model, config, dtype="float32", max_model_len=1024)
    assert pages * config.page_size <= MAX_MODEL_DIM


TINY_HF = {
    "llama": dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=2),
    "mistral": dict(model_type="mistral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, sliding_window=8),
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=64, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=2, mlp_only_layers=[0]),
    "qwen2": dict(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, sliding_window=4, use_sliding_window=True, max_window_layers=1,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}
HF_KEYS = sorted({k for d in TINY_HF.values() for k in d} | {
    "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
    "bos_token_id", "rope_parameters", "layer_types", "num_local_experts", "norm_topk_prob", "architectures"})
ABSURD = st.sampled_from([10**9, 10**18, -1, 0, 4.5, 1e300, math.nan, math.inf, "4096", "many", None, True, [], {},
                          [1, "x"], {"rope_type": "yarn"}, {"factor": "big"}, 2**31, 4097])


def test_hf_config_to_model_config(fuzz_profile):
    mutation = st.tuples(st.sampled_from(HF_KEYS), st.one_of(ABSURD, junk), st.booleans())

    @run_property("config.json -> ModelConfig", fuzz_profile, ci=300, slow=25_000,
                  base=st.sampled_from(sorted(TINY_HF)), mutations=st.lists(mutation, max_size=3))
    def prop(base, mutations):
        hf = dict(TINY_HF[base])
        for key, value, delete in mutations:
            if delete:
                hf.pop(key, None)
            else:
                hf[key] = value
        with bounded(5):
            try:
                config = registry.model_config_from_hf(hf)
            except ValueError as e:
                message = str(e)
                assert any(k in message for k, _, _ in mutations) or "config.json" in message \
                    or "architecture" in message, (hf, message)
                return
        assert isinstance(config, ModelConfig) and config.num_layers <= 4096
        assert all(0 < getattr(config, n) <= MAX_MODEL_DIM for n in ("vocab_size", "hidden_size", "head_dim"))


LIMITS = RequestLimits(vocab_size=4096, max_model_len=256, num_pages=64, page_size=16)
PROMPTS = st.one_of(
    st.lists(st.integers(0, 4095), min_size=1, max_size=40),
    st.lists(st.one_of(st.integers(-3, 5000), HUGE_INTS, st.booleans(), st.floats(), st.text(max_size=2),
                       st.none()), max_size=8),
    st.builds(lambda n: [7] * n, st.integers(200, 300_000)),  # longer than the context
    st.builds(lambda n: iter(range(1, n)), st.integers(1, 10**9)),  # endless-looking iterators
    junk,
)


def test_request_validation(fuzz_profile):
    request = st.builds(
        lambda prompt, max_tokens, priority, salt, rid: dict(prompt_ids=prompt, params=SamplingParams(
            max_tokens=max_tokens, temperature=0.0), priority=priority, cache_salt=salt, request_id=rid),
        PROMPTS, st.integers(1, 300), st.one_of(st.integers(-5, 5), junk), st.one_of(st.none(), st.text(max_size=4),
                                                                                    junk),
        st.one_of(st.none(), st.text(max_size=4), junk))

    @run_property("request validation", fuzz_profile, ci=300, slow=25_000, requests=st.lists(request, max_size=3))
    def prop(requests):
        with bounded(10):
            try:
                out = validate_requests([NewRequest(**r) for r in requests], LIMITS)
            except ValueError as e:
                field = _field_of(e).split(".")[0]
                assert field.split("[")[0] in ("prompts", "params", "priority", "cache_salt", "request_id"), e
                index = int(field.split("[")[1].rstrip("]"))
                assert 0 <= index < len(requests)
                return
        for r in out:
            assert isinstance(r.prompt_ids, tuple) and 1 <= len(r.prompt_ids) < LIMITS.max_model_len
            assert all(type(t) is int and 0 <= t < LIMITS.vocab_size for t in r.prompt_ids)
            assert len(r.prompt_ids) + r.params.max_tokens <= LIMITS.max_model_len
