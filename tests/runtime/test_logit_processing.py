"""Logit processing (penalties, logit_bias, min_tokens bans): the host arrays of
input_batch and the sampler's device functions against a numpy reference, row by row."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.runtime import sampler
from jaxinfer.runtime.input_batch import BatchConfig, build_batch
from jaxinfer.types import ScheduledSequence, StepInput

V = 50
CONFIG = BatchConfig(page_size=4, num_pages=32, vocab_size=V, max_positions=128)


def reference(logits, prompt=(), output=(), presence=0.0, frequency=0.0, repetition=1.0, bias=(), banned=()):
    """vLLM's order: repetition, frequency, presence, then biases and bans (numpy, one row)."""
    out = np.array(logits, np.float64)
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    counts = np.bincount(np.asarray(output, np.int64), minlength=V)[:V] if len(output) else np.zeros(V)
    out -= frequency * counts + presence * (counts > 0)
    for t, b in bias:
        out[t] += b
    for t in banned:
        out[t] = -np.inf
    return out


_PAGE_BASE: dict = {}  # request id -> its first page: sequences of one step never share a page


def _seq(rid, token_ids, start, sample_offsets=None, **kw):
    fields = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    fields.update(kw)
    num_pages = -(-(start + len(token_ids)) // 4)
    base = _PAGE_BASE.setdefault(rid, 5 * (len(_PAGE_BASE) % 6))
    assert base + num_pages <= CONFIG.num_pages
    offsets = (len(token_ids) - 1,) if sample_offsets is None else sample_offsets
    return ScheduledSequence(request_id=rid, token_ids=tuple(token_ids), start_position=start,
                             page_ids=tuple(range(base, base + num_pages)), sample_offsets=tuple(offsets), **fields)


def _process(batch, logits):
    out = jnp.asarray(logits)
    if batch.device.penalties is not None:
        out = sampler.apply_penalties(out, *batch.device.penalties)
    if batch.device.logit_bias is not None:
        out = sampler.apply_logit_bias(out, *batch.device.logit_bias)
    return np.asarray(out)


def test_apply_penalties_matches_the_reference():
    rng = np.random.RandomState(0)
    logits = rng.randn(3, V).astype(np.float32) * 3
    prompt, output = [1, 2, 2, 7], [7, 9, 9, 9, 3]
    history = np.zeros((3, 16), np.int32)
    history[:, :9] = prompt + output
    got = sampler.apply_penalties(
        jnp.asarray(logits), jnp.asarray(history), jnp.array([4, 4, 0], jnp.int32), jnp.array([9, 9, 0], jnp.int32),
        jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 2.0, 2.0]), jnp.array([1.3, 0.7, 5.0]))
    for row, (pr, fr, rp) in enumerate([(0.5, 0.25, 1.3), (-1.0, 2.0, 0.7)]):
        np.testing.assert_allclose(got[row], reference(logits[row], prompt, output, pr, fr, rp), rtol=1e-6)
    np.testing.assert_array_equal(got[2], logits[2])  # an empty history changes nothing


def test_apply_logit_bias_adds_and_bans():
    logits = jnp.zeros((2, V))
    ids = jnp.array([[3, 5, 0, 0], [5, 5, 0, 0]], jnp.int32)
    biases = jnp.array([[2.5, -np.inf, 0, 0], [1.0, -np.inf, 0, 0]], jnp.float32)
    got = np.asarray(sampler.apply_logit_bias(logits, ids, biases))
    assert got[0, 3] == 2.5 and got[0, 5] == -np.inf and got[1, 5] == -np.inf
    assert (np.delete(got[0], [3, 5]) == 0).all() and (np.delete(got[1], 5) == 0).all()


def test_host_arrays_and_device_processing_per_row():
    """A mixed step: each sample row is processed as its own reference says; rows without
    the features come out bit-for-bit unchanged (batch invariance)."""
    prompt = (4, 5, 5, 6)
    seqs = (
        _seq("rep", (8,), 6, repetition_penalty=1.5, prompt_token_ids=prompt, output_token_ids=(7, 8, 8)),
        _seq("plain", (9, 10, 11), 0),
        _seq("freq", (7,), 6, presence_penalty=0.5, frequency_penalty=1.0, prompt_token_ids=prompt,
             output_token_ids=(7, 7, 7)),
        _seq("bias", (3,), 2, logit_bias=((1, 5.0), (40, -3.0)), banned_token_ids=(2, 9), ban_until_position=4),
        _seq("late_ban", (3,), 8, banned_token_ids=(2,), ban_until_position=4),  # min_tokens reached: no ban
        _seq("chunk", (1, 2), 0, sample_offsets=(), repetition_penalty=2.0, logit_bias=((3, 1.0),)),
    )
    batch = build_batch(StepInput(sequences=seqs), CONFIG)
    pen, bias = batch.device.penalties, batch.device.logit_bias
    assert pen.history.shape == (8, 16) and bias.token_ids.shape == (8, 4)  # buckets: >= 16 and >= 4
    assert batch.shape_key[-3:-1] == (16, 4)
    np.testing.assert_array_equal(pen.lens[:5], [7, 0, 3, 0, 0])  # freq: no prompt without a repetition penalty
    logits = np.random.RandomState(1).randn(8, V).astype(np.float32) * 2
    got = _process(batch, logits)
    expected = {
        0: reference(logits[0], prompt, (7, 8, 8), repetition=1.5),
        2: reference(logits[2], (), (7, 7, 7), presence=0.5, frequency=1.0),
        3: reference(logits[3], bias=((1, 5.0), (40, -3.0)), banned=(2, 9)),
    }
    for row, ref in expected.items():
        np.testing.assert_allclose(got[row], ref, rtol=1e-6)
    for row in (1, 4, 5, 6, 7):  # plain, past min_tokens, and padding rows
        np.testing.assert_array_equal(got[row], logits[row])


def test_several_sample_offsets_count_the_ids_before_each_row():
    # Prompt of 3, output (9, 9, 11): fed [9, 11] at positions 4, 5 (draft verification):
    # the row at offset 0 samples position 5 and has seen outputs (9, 9); offset 1 all three.
    seq = _seq("s", (9, 11), 4, sample_offsets=(0, 1), frequency_penalty=1.0, prompt_token_ids=(1, 2, 3),
               output_token_ids=(9, 9, 11), banned_token_ids=(2,), ban_until_position=6)
    batch = build_batch(StepInput(sequences=(seq,)), CONFIG)
    logits = np.zeros((2, V), np.float32)
    got = _process(batch, logits)
    np.testing.assert_allclose(got[0], reference(logits[0], output=(9, 9), frequency=1.0, banned=(2,)))
    np.testing.assert_allclose(got[1], reference(logits[1], output=(9, 9, 11), frequency=1.0))  # position 6: no ban


def test_no_arrays_without_the_features_and_bounded_widths():
    plain = build_batch(StepInput(sequences=(_seq("a", (1, 2), 0),)), CONFIG)
    assert plain.device.penalties is None and plain.device.logit_bias is None
    assert plain.shape_key[-3:-1] == (0, 0)
    long_output = tuple(range(20)) * 2
    seq = _seq("a", (3,), 44, repetition_penalty=1.2, prompt_token_ids=(1,) * 4, output_token_ids=long_output,
               logit_bias=tuple((t, 1.0) for t in range(5)))
    batch = build_batch(StepInput(sequences=(seq,)), CONFIG)
    assert batch.device.penalties.history.shape[1] == 64 and batch.device.logit_bias.token_ids.shape[1] == 8


def test_bias_ids_outside_the_vocabulary_are_refused():
    seq = _seq("a", (3,), 0, logit_bias=((V, 1.0),))
    with pytest.raises(ValueError, match="logit_bias"):
        build_batch(StepInput(sequences=(seq,)), CONFIG)


def test_greedy_takes_the_processed_logits_and_logprobs_stay_raw():
    """Row 0 greedy, rows 1.. sampled at temperature 1; token 0 (the raw argmax) is banned."""
    rows = 64
    raw = jnp.tile(jnp.array([[3.0, 2.0, 0.0, -1.0]]), (rows, 1))
    processed = sampler.apply_logit_bias(raw, jnp.zeros((rows, 1), jnp.int32), jnp.full((rows, 1), -np.inf))
    keys = sampler.request_keys(jnp.zeros(rows, jnp.uint32), jnp.zeros(rows, jnp.uint32), jnp.arange(rows))
    temperature = jnp.ones(rows).at[0].set(0.0)
    tokens, lps = sampler.sample(processed, temperature, jnp.zeros(rows, jnp.int32), jnp.ones(rows), jnp.zeros(rows),
                                 keys, all_greedy=False, raw_logits=raw)
    tokens = np.asarray(tokens)
    raw_lp = np.asarray(jax.nn.log_softmax(raw[0]))
    assert tokens[0] == 1 and 0 not in set(tokens.tolist()) and len(set(tokens.tolist())) > 1
    np.testing.assert_allclose(lps, raw_lp[tokens], rtol=1e-5)  # log p of the raw distribution
    greedy, lp = sampler.sample(processed[:1], temperature[:1], jnp.zeros(1, jnp.int32), jnp.ones(1), jnp.zeros(1),
                                keys[:1], all_greedy=True, raw_logits=raw[:1])
    assert int(greedy[0]) == 1 and float(lp[0]) == pytest.approx(raw_lp[1], rel=1e-5)
