"""SamplingParams validation: wrong types are rejected with a ValueError naming the field
(bools are not ints, floats are not token ids), and the logprobs knob."""
from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.config import MAX_LOGIT_BIAS, MAX_N, MAX_TOP_LOGPROBS, SamplingParams, as_token_id


@pytest.mark.parametrize("kwargs, field", [
    (dict(logprobs="yes"), "logprobs"),
    (dict(logprobs=1.0), "logprobs"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=MAX_TOP_LOGPROBS + 1), "logprobs"),
    (dict(top_k=True), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(top_k=-2), "top_k"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=1e300), "temperature"),  # inf in float32
    (dict(temperature=1e7), "temperature"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),  # 0 in float32: logits / 0
    (dict(repetition_penalty=1e-7), "repetition_penalty"),
    (dict(repetition_penalty=1e300), "repetition_penalty"),
    (dict(top_p=False), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=True), "min_p"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=4.0), "max_tokens"),
    (dict(seed=True), "seed"),
    (dict(seed=-1), "seed"),
    (dict(stop=5), "stop"),
    (dict(stop=b"END"), "stop"),
    (dict(stop=["ok", 5]), "stop"),
    (dict(stop=[""]), "stop"),
    (dict(stop={"a": 1}), "stop"),
    (dict(stop_token_ids=[2.0]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=[np.float32(2)]), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(prompt_logprobs=1), "prompt_logprobs"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(presence_penalty=True), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty="1.1"), "repetition_penalty"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=17), "min_tokens"),  # > max_tokens (16)
    (dict(min_tokens=1.0), "min_tokens"),
    (dict(n=0), "n"),
    (dict(n=MAX_N + 1), "n"),
    (dict(n=True), "n"),
    (dict(logit_bias={1: 101}), "logit_bias"),
    (dict(logit_bias={1: float("nan")}), "logit_bias"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(logit_bias={-1: 1}), "logit_bias"),
    (dict(logit_bias={1.5: 1}), "logit_bias"),
    (dict(logit_bias={1: 1, "1": 2}), "logit_bias"),
    (dict(logit_bias={i: 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias="1:2"), "logit_bias"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


def test_the_messages_say_what_was_given():
    with pytest.raises(ValueError, match=r"stop_token_ids: token ids must be ints, got 2\.0 \(float\)"):
        SamplingParams(stop_token_ids=[2.0])
    with pytest.raises(ValueError, match=r"stop: must be a string or a list of strings, got 5 \(int\)"):
        SamplingParams(stop=5)
    with pytest.raises(ValueError, match=r"logprobs: must be a bool, None or an int in \[0, 20\], got 21"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match=r"ignore_eos: must be a bool, got 1"):
        SamplingParams(ignore_eos=1)


@pytest.mark.parametrize("logprobs, want, top", [
    (False, False, 0), (None, False, 0), (True, True, 0), (0, True, 0), (1, True, 1), (5, True, 5),
    (MAX_TOP_LOGPROBS, True, MAX_TOP_LOGPROBS),
])
def test_logprobs_knob(logprobs, want, top):
    params = SamplingParams(logprobs=logprobs)
    assert params.want_logprobs is want and params.num_top_logprobs == top


def test_stop_and_stop_token_ids_are_normalized():
    params = SamplingParams(stop="END", stop_token_ids=[np.int64(2), np.int32(3), np.uint16(4), 5])
    assert params.stop == ("END",)
    assert params.stop_token_ids == (2, 3, 4, 5) and all(type(t) is int for t in params.stop_token_ids)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == ()
    assert SamplingParams(stop=None, stop_token_ids=None).stop_token_ids == ()
    assert SamplingParams(stop=("a", "bc"), stop_token_ids=np.array([7, 8])).stop_token_ids == (7, 8)
    assert SamplingParams(stop=iter(["a"])).stop == ("a",)
    # Frozen and hashable after normalization.
    assert hash(SamplingParams(stop=["a"], stop_token_ids=[1])) == hash(SamplingParams(stop=("a",),
                                                                                       stop_token_ids=(1,)))


def test_greedy_and_defaults():
    assert SamplingParams(temperature=0).is_greedy and SamplingParams(top_k=1).is_greedy
    assert not SamplingParams().is_greedy
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


def test_as_token_id():
    assert as_token_id(np.int64(7), "x") == 7 and type(as_token_id(np.int64(7), "x")) is int
    for bad in (2.0, True, np.bool_(True), "3", None, np.array([1, 2])):
        with pytest.raises(ValueError, match="^prompt: token ids must be ints"):
            as_token_id(bad, "prompt")


def test_numpy_scalars_become_python_numbers():
    import numpy as np
    p = SamplingParams(max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3), seed=np.uint64(4))
    assert (p.max_tokens, p.top_k, p.seed) == (5, 3, 4) and p.temperature == 0.5
    assert all(type(v) is int for v in (p.max_tokens, p.top_k, p.seed)) and type(p.temperature) is float
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=np.bool_(True))


def test_sampling_additions_are_normalized():
    import dataclasses
    p = SamplingParams(logit_bias={"7": np.float32(1.5), np.int64(3): -100, 5: 100.0}, presence_penalty=np.float32(1),
                       frequency_penalty=-2, repetition_penalty=np.float64(1.2), min_tokens=np.int64(3), n=np.int32(2))
    assert p.logit_bias == ((3, -100.0), (5, 100.0), (7, 1.5))
    assert all(type(t) is int and type(b) is float for t, b in p.logit_bias)
    assert (p.presence_penalty, p.frequency_penalty, p.min_tokens, p.n) == (1.0, -2.0, 3, 2)
    assert type(p.frequency_penalty) is float and type(p.min_tokens) is int and type(p.n) is int
    assert p.has_penalties and not SamplingParams().has_penalties
    assert hash(p) == hash(dataclasses.replace(p)) and dataclasses.replace(p, n=1).logit_bias == p.logit_bias
    assert SamplingParams(logit_bias={}).logit_bias == () == SamplingParams().logit_bias
    assert SamplingParams(logit_bias=[(2, 1)]).logit_bias == ((2, 1.0),)
    d = SamplingParams()
    assert (d.presence_penalty, d.frequency_penalty, d.repetition_penalty, d.min_tokens, d.n) == (0, 0, 1, 0, 1)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


@pytest.mark.parametrize("field", ["num_pages", "max_model_len", "page_size"])
def test_engine_config_rejects_bools(field):
    from jaxinfer import EngineConfig
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: True})


@pytest.mark.parametrize("kwargs, message", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size: must be an int >= 1, got 0"),
    (dict(expert_parallel_size=True), "expert_parallel_size: must be an int >= 1, got True"),
    (dict(pipeline_parallel_size=1.5), "pipeline_parallel_size: must be an int >= 1, got 1.5"),
    (dict(pipeline_microbatches=0), "pipeline_microbatches: must be None or an int >= 1, got 0"),
])
def test_engine_config_parallel_sizes_are_checked(kwargs, message):
    from jaxinfer import EngineConfig
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        EngineConfig(**kwargs)
    assert EngineConfig(pipeline_microbatches=4).pipeline_microbatches == 4
