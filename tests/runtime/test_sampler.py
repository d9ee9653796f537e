"""Sampler: distribution properties of each filter, and seed/position keying."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime import sampler

NUM_DRAWS = 4000
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32)


def _draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, probs=PROBS, seed=0):
    """NUM_DRAWS samples of one distribution (rows differ only by their position key)."""
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (NUM_DRAWS, 1))
    full = lambda v, dt: jnp.full((NUM_DRAWS,), v, dt)
    keys = sampler.request_keys(full(0, jnp.uint32), full(seed, jnp.uint32), jnp.arange(NUM_DRAWS))
    tokens, logprobs = sampler.sample(logits, full(temperature, jnp.float32), full(top_k, jnp.int32),
                                      full(top_p, jnp.float32), full(min_p, jnp.float32), keys, all_greedy=False)
    return np.asarray(tokens), np.asarray(logprobs)


def _freq(tokens, vocab=len(PROBS)):
    return np.bincount(tokens, minlength=vocab) / tokens.size


def test_plain_sampling_matches_the_distribution():
    tokens, logprobs = _draw()
    # 4000 draws: the standard error of each frequency is below 0.008.
    np.testing.assert_allclose(_freq(tokens), PROBS, atol=0.03)
    np.testing.assert_allclose(logprobs, np.log(PROBS)[tokens], rtol=1e-5)


def test_top_k_one_and_zero_temperature_are_greedy():
    assert set(_draw(top_k=1)[0]) == {0}
    assert set(_draw(temperature=0.0)[0]) == {0}
    # Below GREEDY_TEMPERATURE (1e-40 is a float32 subnormal: logits / it would overflow to
    # inf and softmax to NaN), greedy too; the extremes SamplingParams allows stay finite.
    for tiny in (1e-40, 1e-6):
        tokens, logprobs = _draw(temperature=tiny)
        assert set(tokens) == {0} and np.isfinite(logprobs).all()
    tokens, logprobs = _draw(temperature=1e6)
    assert np.isfinite(logprobs).all() and _freq(tokens).min() > 0.1  # indistinguishable from uniform
    logits = jnp.asarray([[0.1, 3.0, -1.0], [2.0, 0.0, 5.0]])
    keys = sampler.request_keys(jnp.zeros(2, jnp.uint32), jnp.zeros(2, jnp.uint32), jnp.arange(2))
    ones, zeros = jnp.ones(2), jnp.zeros(2)
    greedy, lp = sampler.sample(logits, zeros, jnp.zeros(2, jnp.int32), ones, zeros, keys, all_greedy=True)
    assert greedy.tolist() == [1, 2]
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(2), greedy], rtol=1e-6)


def test_top_k_keeps_the_k_most_likely_renormalized():
    freq = _freq(_draw(top_k=2)[0])
    assert freq[2:].sum() == 0
    np.testing.assert_allclose(freq[:2], PROBS[:2] / PROBS[:2].sum(), atol=0.03)


def test_top_p_excludes_the_tail():
    # Cumulative mass: 0.4, 0.65, 0.8, 0.9 ... top_p=0.7 keeps {0, 1, 2}: the smallest
    # prefix whose mass reaches 0.7.
    freq = _freq(_draw(top_p=0.7)[0])
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.03)
    # A tiny top_p keeps only the most likely token.
    assert set(_draw(top_p=1e-6)[0]) == {0}


def test_min_p_drops_tokens_below_the_threshold():
    # min_p = 0.3 -> threshold 0.12: keeps tokens with p >= 0.12, i.e. {0, 1, 2}.
    freq = _freq(_draw(min_p=0.3)[0])
    assert freq[3:].sum() == 0 and freq[2] > 0


def test_temperature_sharpens_and_flattens():
    cold = _freq(_draw(temperature=0.5)[0])
    hot = _freq(_draw(temperature=2.0)[0])
    p_cold = PROBS ** 2 / (PROBS ** 2).sum()
    p_hot = PROBS ** 0.5 / (PROBS ** 0.5).sum()
    np.testing.assert_allclose(cold, p_cold, atol=0.03)
    np.testing.assert_allclose(hot, p_hot, atol=0.03)


def test_same_seed_same_tokens_other_seed_other_tokens():
    a, _ = _draw(seed=7)
    b, _ = _draw(seed=7)
    c, _ = _draw(seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_keys_depend_only_on_seed_and_position():
    k1 = sampler.request_keys(jnp.array([1, 0], jnp.uint32), jnp.array([5, 9], jnp.uint32), jnp.array([3, 4]))
    k2 = sampler.request_keys(jnp.array([0, 1], jnp.uint32), jnp.array([9, 5], jnp.uint32), jnp.array([4, 3]))
    np.testing.assert_array_equal(jax.random.key_data(k1)[0], jax.random.key_data(k2)[1])


def test_top_logprobs_most_likely_first_raw_distribution():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0], [2.0, 0.0, 5.0, 1.0]])
    ids, lps = sampler.top_logprobs(logits, 2)
    assert ids.dtype == jnp.int32 and ids.tolist() == [[1, 3], [2, 0]]
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(ids), axis=-1)
    np.testing.assert_allclose(lps, expected, rtol=1e-6)
    ids, lps = sampler.top_logprobs(logits, 0)
    assert ids.shape == (2, 0) and lps.shape == (2, 0)
