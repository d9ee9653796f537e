"""Request validation (engine/validation.py): every bad field is named, with the index of
the bad request in a batch, and a bad batch queues nothing."""
from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.validation import (NewRequest, RequestLimits, resolve_max_model_len, validate_prompt_ids,
                                        validate_request, validate_requests)

LIMITS = RequestLimits(vocab_size=100, max_model_len=32, num_pages=16, page_size=4)
OK = SamplingParams(max_tokens=4)


def _model(max_position_embeddings=64):
    return ModelConfig(family="llama", vocab_size=100, hidden_size=8, intermediate_size=8, num_layers=1,
                       num_heads=1, num_kv_heads=1, head_dim=8, max_position_embeddings=max_position_embeddings)


def _new(prompt, params=OK, **kw):
    return NewRequest(prompt_ids=prompt, params=params, **kw)


def test_numpy_ids_are_accepted_as_python_ints():
    for prompt in (np.array([1, 2, 99]), [np.int64(1), np.int32(2), np.uint8(99)], (1, 2, 99), range(1, 3)):
        ids = validate_prompt_ids(prompt, 100)
        assert ids == tuple(int(t) for t in prompt) and all(type(t) is int for t in ids)
    (req,) = validate_requests([_new(np.array([5, 6]))], LIMITS)
    assert req.prompt_ids == (5, 6) and type(req.prompt_ids[0]) is int


@pytest.mark.parametrize("prompt, message", [
    ([1, 2.0], r"prompts\[1\]: token id 2\.0 is not an int \(float\)"),
    ([True, 2], r"prompts\[1\]: token id True is not an int \(bool\)"),
    ([np.float32(3)], r"prompts\[1\]: token id .*3\.0.* is not an int \(float32\)"),
    ([1, None], r"prompts\[1\]: token id None is not an int"),
    (np.array([[1, 2], [3, 4]]), r"prompts\[1\]: token id array\(\[1, 2\]\) is not an int \(ndarray\)"),
    ([1, 100], r"prompts\[1\]: token id 100 outside the vocabulary \[0, 100\)"),
    ([-1], r"prompts\[1\]: token id -1 outside the vocabulary"),
    ([], r"prompts\[1\]: empty prompt"),
    ("hello", r"prompts\[1\]: expected a list of token ids, got str"),
    (7, r"prompts\[1\]: expected a list of token ids, got int"),
])
def test_bad_prompts_name_the_field(prompt, message):
    with pytest.raises(ValueError, match=message):
        validate_prompt_ids(prompt, 100, field="prompts[1]")


def test_the_index_of_the_bad_request_is_named():
    good = _new([1, 2])
    with pytest.raises(ValueError, match=r"^prompts\[1\]: token id 2\.0"):
        validate_requests([good, _new([1, 2.0])], LIMITS)
    with pytest.raises(ValueError, match=r"^params\[1\]\.stop_token_ids: 100 outside the vocabulary \[0, 100\)"):
        validate_requests([good, _new([1], SamplingParams(stop_token_ids=[np.int64(100)]))], LIMITS)
    with pytest.raises(ValueError, match=r"^priority\[1\]: expected an int, got True"):
        validate_requests([good, _new([1], priority=True)], LIMITS)
    with pytest.raises(ValueError, match=r"^cache_salt\[1\]: expected a string or None, got int"):
        validate_requests([good, _new([1], cache_salt=3)], LIMITS)
    with pytest.raises(ValueError, match=r"^request_id\[1\]: expected a non-empty string"):
        validate_requests([good, _new([1], request_id="")], LIMITS)
    with pytest.raises(ValueError, match=r"^params\[1\]: expected SamplingParams, got dict"):
        validate_requests([good, _new([1], {"max_tokens": 3})], LIMITS)
    with pytest.raises(ValueError, match=r"^request_id\[1\]: 'x' appears twice in the batch"):
        validate_requests([_new([1], request_id="x"), _new([2], request_id="x")], LIMITS)
    # Alone (no batch index), the field is named without one.
    with pytest.raises(ValueError, match=r"^prompts: empty prompt"):
        validate_request(_new([]), LIMITS)


def test_prompt_plus_max_tokens_must_fit_the_context_and_the_pool():
    validate_request(_new(list(range(28)), SamplingParams(max_tokens=4)), LIMITS)  # exactly 32
    with pytest.raises(ValueError, match=r"^params\.max_tokens: prompt \(28 tokens\) \+ max_tokens \(5\) = 33 "
                                         r"exceeds the model's context of 32"):
        validate_request(_new(list(range(28)), SamplingParams(max_tokens=5)), LIMITS)
    small_pool = RequestLimits(vocab_size=100, max_model_len=32, num_pages=3, page_size=4)
    validate_request(_new([1] * 8, SamplingParams(max_tokens=4)), small_pool)  # 12 tokens = 3 pages
    with pytest.raises(ValueError, match=r"^params\[0\]\.max_tokens: prompt \+ max_tokens = 13 tokens can never "
                                         r"fit in the KV cache \(3 pages of 4\)"):
        validate_requests([_new([1] * 8, SamplingParams(max_tokens=5))], small_pool)


def test_max_model_len_is_the_models_unless_smaller():
    assert resolve_max_model_len(_model(64), EngineConfig()) == 64
    assert resolve_max_model_len(_model(64), EngineConfig(max_model_len=48)) == 48
    assert resolve_max_model_len(_model(64), EngineConfig(max_model_len=64)) == 64
    with pytest.raises(ValueError, match=r"^max_model_len: 65 exceeds the model's context "
                                         r"\(max_position_embeddings\) of 64"):
        resolve_max_model_len(_model(64), EngineConfig(max_model_len=65))


def test_engine_rejects_a_too_long_max_model_len(scripted_engine):
    with pytest.raises(ValueError, match="max_model_len: 65 exceeds"):
        scripted_engine(model_config=_model(64), max_model_len=65)


def test_engine_add_requests_is_atomic(scripted_engine):
    engine = scripted_engine(model_config=_model(64), max_model_len=16)
    with pytest.raises(ValueError, match=r"^params\[1\]\.max_tokens: .* exceeds the model's context of 16"):
        engine.add_requests([_new([1, 2]), _new([1] * 10, SamplingParams(max_tokens=7))])
    assert not engine.has_unfinished and engine.requests == {}
    ids = engine.add_requests([_new(np.array([1, 2]), request_id="a"), _new([3])])
    assert ids[0] == "a" and len(set(ids)) == 2 and engine.has_unfinished
    with pytest.raises(ValueError, match=r"^request_id\[1\]: 'a' is already in use"):
        engine.add_requests([_new([4], request_id="b"), _new([5], request_id="a")])
    assert sorted(engine.requests) == sorted(ids)  # "b" was not queued either
    with pytest.raises(ValueError, match=r"^prompts\[0\]: token id 100 outside the vocabulary"):
        engine.add_request([100], OK)
