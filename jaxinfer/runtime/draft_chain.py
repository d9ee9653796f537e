"""Draft chains: one step, then up to n decode steps fed their own samples, in ONE device call.

A draft model proposes k tokens per request, one after the other: the catch-up step
(the ids the draft has not seen, sampling draft 1), then k - 1 decode steps, each fed
the token the one before sampled. Run as k calls of the step program, every draft token
pays a call's fixed cost (host batch building, dispatch, a device-to-host copy of the
samples): on the bundled models that is most of a draft step, and it is what held
self-speculation below its goal (BUILD.md). Here the k - 1 decode steps follow the
catch-up step inside the same compiled program (a lax.scan), and only the samples come
back.

Everything a decode step needs is known on the host before the call except its token
ids: a chain row's position, KV slot, key length and sample position advance by one per
iteration over the pages it already owns. So the host builds the first decode step as
an ordinary batch (input_batch.build_batch, every id checked) with placeholder ids, and
the device advances it: iteration j feeds row r the id it sampled at j - 1 (at j = 0 the
catch-up step's sample of its request), at position start_r + j, while j < len_r (the
row's own number of decode steps); afterwards its writes go to the dropped slot and its
samples are ignored. `chain_arrays` checks on the host that every position a row will
write is in its own pages and in the model's context, so the device never sees a page
the request does not own.

Each iteration is the runner's step pieces (model_runner.step_metadata, logits_of_step,
sample_rows): the same model, attention op, sampler and position keys (fold_in(seed,
p)) as a separate step, and the same finite checks per iteration.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.runtime.input_batch import BatchConfig, DeviceBatch, StepBatch
from jaxinfer.types import StepInput


class ChainArrays(NamedTuple):
    """Per chain token (= its attention row and sample row: a decode batch)."""

    src: np.ndarray  # [T] int32 the catch-up sample row whose id it is fed first (padding 0)
    lens: np.ndarray  # [T] int32 decode steps of the row (padding 0)


def chain_arrays(step: StepBatch, chain_input: StepInput, chain: StepBatch, lens: Sequence[int],
                 config: BatchConfig) -> ChainArrays:
    """The device arrays that advance `chain` (see the module docstring).

    Args:
      step: the catch-up step; every chain request samples exactly once in it.
      chain_input, chain: the first decode step (one token per sequence, a placeholder
        id) and its built batch.
      lens: per chain sequence, decode steps >= 1.
    Raises:
      ValueError: naming the request when the chain is not a plain decode step, when a
        request does not sample once in the step, or when a row would write a position
        outside its own pages or the model's context.
    """
    device = chain.device
    seqs = chain_input.sequences
    if (device.max_q_len != 1 or device.tokens.size != device.kv_lens.size or chain_input.shared_prefixes
            or device.tokens.size != device.logits_indices.size or any(len(s.token_ids) != 1 for s in seqs)
            or any(s.sample_offsets != (0,) for s in seqs) or device.penalties is not None
            or device.logit_bias is not None):
        raise ValueError("chain: the first decode step of a draft chain must be one token per sequence, one sample "
                         "each, without penalties, biases or shared prefixes")
    if len(lens) != len(seqs):
        raise ValueError(f"chain: {len(lens)} chain lengths for {len(seqs)} sequences")
    sample_row = {rid: (int(s), int(n)) for rid, s, n in zip(step.request_ids, step.sample_starts, step.num_samples)}
    src = np.zeros(device.tokens.size, np.int32)
    out = np.zeros(device.tokens.size, np.int32)
    # A plain decode batch: token i is sequence i's (step order), and so are row i and sample row i.
    for i, seq in enumerate(seqs):
        start, count = sample_row.get(seq.request_id, (0, 0))
        if count != 1:
            raise ValueError(f"chain: request {seq.request_id!r} must sample exactly once in the catch-up step")
        length = int(lens[i])
        last = seq.start_position + length - 1
        if length < 1 or last >= config.max_positions or last // config.page_size >= len(seq.page_ids):
            raise ValueError(f"request {seq.request_id!r}: a draft chain of {length} steps from position "
                             f"{seq.start_position} writes outside its {len(seq.page_ids)} pages or the model's "
                             f"context of {config.max_positions}")
        src[i], out[i] = start, length
    return ChainArrays(src, out)


def chain_fn(step_fn, kv_slots_finite, page_size: int, num_iterations: int, params, kv_caches, batch: DeviceBatch,
             chain: DeviceBatch, arrays: ChainArrays):
    """The compiled program: `step_fn` on `batch`, then `num_iterations` decode steps of `chain`.

    Args:
      step_fn: the runner's step (params, kv_caches, DeviceBatch, check_tokens) -> (results,
        kv_caches), results = (sampled [S], ..., rows finite [S], tokens finite [T], expert counts).
      kv_slots_finite: model_runner.kv_slots_finite (the K/V check, run once at the end).
    Returns:
      ((the step's results, chain ids [n, S] int32, chain finite [n, S] bool), kv_caches).
    """
    results, kv_caches = step_fn(params, kv_caches, batch, check_tokens=False)
    first = results[0][arrays.src].astype(jnp.int32)  # [T] each row's catch-up sample
    leaf = jax.tree.leaves(kv_caches)[0]
    dropped = leaf.shape[0] * leaf.shape[1]  # P * L: the slot padding tokens write to

    def body(carry, j: int):
        kv, fed = carry
        advance = jnp.clip(jnp.minimum(j, arrays.lens - 1), 0)
        active = j < arrays.lens
        pos = chain.positions + advance
        page = jnp.take_along_axis(chain.page_tables, (pos // page_size)[:, None], axis=1)[:, 0]
        b = dataclasses.replace(chain, tokens=fed, positions=pos,
                                slot_mapping=jnp.where(active, page * page_size + pos % page_size, dropped),
                                kv_lens=chain.kv_lens + advance, sample_pos=chain.sample_pos + advance)
        out, kv = step_fn(params, kv, b, check_tokens=False)
        sampled = out[0].astype(jnp.int32)
        return (kv, jnp.where(active, sampled, fed)), (sampled, out[-3], b.slot_mapping)

    # Unrolled (n is static and small): a lax.scan / while loop makes XLA:CPU copy the
    # whole page pool around the loop (measured: 68 ms a call on a 134 MB pool against
    # 1.9 ms for a plain step), while straight-line code updates the donated pages in place.
    carry, ids, finite, slots = (kv_caches, first), [], [], []
    for j in range(num_iterations):
        carry, (sampled, ok, written) = body(carry, j)
        ids.append(sampled)
        finite.append(ok)
        slots.append(written)
    kv_caches = carry[0]
    # The K/V every token wrote, read once from the final pages (no slot is written twice:
    # a row's positions advance, and finished rows write to the dropped slot).
    written_ok = kv_slots_finite(kv_caches, jnp.concatenate([batch.slot_mapping, *slots]))
    num = batch.slot_mapping.size
    results = (*results[:-2], written_ok[:num], results[-1])
    finite = jnp.stack(finite) & written_ok[num:].reshape(num_iterations, -1)  # sample row i = token i
    return (results, jnp.stack(ids), finite), kv_caches
