"""On-device sampling: logit processing, then greedy, temperature, top-k, top-p, min-p.

Path: runner -> model logits -> **sampler** -> StepOutput. Every knob is a per-row array
so one compiled program serves any mix of requests, and a row's result never depends on
the other rows (neutral knobs leave a row's logits bit-for-bit unchanged).

Logit processing (vLLM's order), each part traced only when some row of the step uses
it (the runner passes None otherwise): `apply_penalties` (repetition, then frequency
and presence), then `apply_logit_bias` (logit_bias and the min_tokens bans, as -inf
biases). Greedy rows take the argmax of the processed logits; the returned log-probs
(and top log-probs) stay those of the RAW model distribution. The key of the token a request
samples at sequence position p is `fold_in(fold_in(fold_in(key(0), seed_hi), seed_lo), p)`:
it depends only on the request's own seed and position, never on the batch, so a
seeded request gives the same tokens alone or inside any batch.

Order of the filters (vLLM's convention): temperature scales the logits; min-p drops
tokens whose probability under the scaled distribution is below min_p * p_max; top-k
keeps the k largest; top-p keeps the smallest prefix of the sorted distribution whose
mass (after top-k) reaches top_p. Dimension codes: S sequences, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfer.config import GREEDY_TEMPERATURE


def request_keys(seed_hi: jax.Array, seed_lo: jax.Array, positions: jax.Array) -> jax.Array:
    """[S] uint32 seed halves and [S] positions -> [S] PRNG keys."""
    def one(hi, lo, pos):
        key = jax.random.fold_in(jax.random.key(0), hi)
        return jax.random.fold_in(jax.random.fold_in(key, lo), pos)
    return jax.vmap(one)(seed_hi, seed_lo, positions)


def apply_penalties(logits: jax.Array, history: jax.Array, prompt_lens: jax.Array, lens: jax.Array,
                    presence: jax.Array, frequency: jax.Array, repetition: jax.Array) -> jax.Array:
    """Repetition, frequency and presence penalties (vLLM / OpenAI semantics).

    Args:
      logits: [S, V] float32.
      history: [S, H] int32 ids of each row: its prompt ids ([0, prompt_lens)), then its
        generated ids ([prompt_lens, lens)); entries from lens on are padding.
      prompt_lens, lens: [S] int32.
      presence, frequency: [S] float32; subtracted per generated token (frequency x count,
        presence once if present).
      repetition: [S] float32 > 0; every id of the history (prompt or generated) gets
        logit / p when logit > 0, logit * p otherwise.
    Returns:
      [S, V] float32 penalised logits (a row with 0, 0, 1 is unchanged).
    """
    num_rows, width = history.shape
    column = jnp.arange(width)[None, :]
    valid = column < lens[:, None]
    generated = valid & (column >= prompt_lens[:, None])
    rows = jnp.broadcast_to(jnp.arange(num_rows)[:, None], history.shape)
    zeros = jnp.zeros(logits.shape, jnp.int32)
    seen = zeros.at[rows, history].add(valid.astype(jnp.int32)) > 0
    counts = zeros.at[rows, history].add(generated.astype(jnp.int32))
    penalty = jnp.where(seen, repetition[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - frequency[:, None] * counts.astype(logits.dtype)
    return logits - presence[:, None] * (counts > 0).astype(logits.dtype)


def apply_logit_bias(logits: jax.Array, token_ids: jax.Array, biases: jax.Array) -> jax.Array:
    """Adds per-row biases to given ids ([S, B] each; padding entries add 0 to id 0; -inf bans)."""
    rows = jnp.broadcast_to(jnp.arange(logits.shape[0])[:, None], token_ids.shape)
    return logits.at[rows, token_ids].add(biases.astype(logits.dtype))


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array, keys: jax.Array, *, all_greedy: bool,
           raw_logits: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row.

    Args:
      logits: [S, V] float32, processed (penalties, biases) or raw.
      temperature: [S] float32; below GREEDY_TEMPERATURE (0 included) = greedy.
      top_k: [S] int32; <= 0 = off.
      top_p: [S] float32 in (0, 1].
      min_p: [S] float32 in [0, 1].
      keys: [S] PRNG keys (request_keys).
      all_greedy: static; skips the sort when every row is greedy.
      raw_logits: [S, V] the model's logits before processing (None = `logits`).
    Returns:
      (tokens [S] int32, logprobs [S] float32: log p of each token under the raw model
      distribution, before penalties, biases, temperature and filters).
    """
    log_probs = jax.nn.log_softmax(logits if raw_logits is None else raw_logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy, jnp.take_along_axis(log_probs, greedy[:, None], axis=-1)[:, 0]

    vocab = logits.shape[-1]
    is_greedy = (temperature < GREEDY_TEMPERATURE) | (top_k == 1)
    scaled = logits / jnp.where(is_greedy, 1.0, temperature)[:, None]
    order = jnp.argsort(-scaled, axis=-1)  # [S, V] token ids, most likely first
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]

    keep = sorted_probs >= (min_p[:, None] * sorted_probs[:, :1])
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    kept_probs = jnp.where(keep, sorted_probs, 0.0)
    kept_probs = kept_probs / jnp.sum(kept_probs, axis=-1, keepdims=True)
    mass_before = jnp.cumsum(kept_probs, axis=-1) - kept_probs
    keep &= mass_before < top_p[:, None]
    keep = keep.at[:, 0].set(True)  # the most likely token always survives

    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    tokens = jnp.where(is_greedy, greedy, sampled)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def top_logprobs(logits: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """The `num` most likely tokens of each row and their log p (raw model distribution).

    Args:
      logits: [S, V] float32.
      num: static; 0 returns empty [S, 0] arrays.
    Returns:
      (ids [S, num] int32, most likely first; log p [S, num] float32).
    """
    if num == 0:
        return jnp.zeros((logits.shape[0], 0), jnp.int32), jnp.zeros((logits.shape[0], 0), jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    values, ids = jax.lax.top_k(log_probs, num)
    return ids.astype(jnp.int32), values
