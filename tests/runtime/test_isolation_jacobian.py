"""Jacobian isolation: in the ragged paged step, request A's logits do not depend on
anything of another request.

For the step the runner compiles (model_runner's `step_metadata`, `stage_apply` and
`logits_of_step` over a DeviceBatch that `input_batch.build_batch` lays out with real
page tables, padding rows included), we take the derivative of A's sampled logits
[V] with respect to
- the input of the first decoder layer (the token embeddings), every token row [T, D],
- every KV page of every layer ([P, L, K, H], keys and values),
and check it is exactly zero (not small: zero) on every row and page that is not A's:
the other requests' rows, the padding rows, the other requests' and the free pages.
So that the check is not vacuous, the derivative on A's own rows and history pages
must be non-zero. Cases: a mixed step (decodes + a prefill chunk), the shared-prefix
path (A and B share prefix pages: the shared pages are A's too), and a MoE model
(dropless routing: another request's tokens cannot take A's expert capacity).

The XLA reference attention is the path differentiated here; the Pallas kernels are
checked equal to it in tests/pallas.

Dimension codes: T padded tokens, D model dim, V vocab, P pages, L page size, K KV
heads, H head dim.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.models.transformer import DecoderLayer, Transformer, init_params
from jaxinfer.runtime import input_batch
from jaxinfer.runtime.model_runner import logits_of_step, stage_apply, step_metadata
from jaxinfer.types import ScheduledSequence, SharedPrefix, StepInput

PAGE_SIZE = 4
NUM_PAGES = 12
DENSE = ModelConfig(family="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, max_position_embeddings=64)
MOE = ModelConfig(family="qwen3_moe", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=64, qk_norm=True, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True)


def _seq(rid, token_ids, start, pages, sample_offsets):
    return ScheduledSequence(request_id=rid, token_ids=tuple(token_ids), start_position=start, page_ids=tuple(pages),
                             sample_offsets=tuple(sample_offsets), temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                             seed=0)


def _mixed_step():
    # A: a decode with 6 tokens of history; B: a decode; C: a prefill chunk with history.
    return StepInput(sequences=(_seq("A", [7], 6, [0, 1], [0]), _seq("B", [9], 5, [2, 3], [0]),
                                _seq("C", [11, 12, 13, 14, 15], 3, [4, 5], [4])))


def _shared_prefix_step():
    # A and B share 2 pages (8 tokens) of prefix; each feeds 3 tokens of its own.
    seqs = (_seq("A", [20, 21, 22], 8, [0, 1, 2], [2]), _seq("B", [30, 31, 32], 8, [0, 1, 3], [2]))
    return StepInput(sequences=seqs, shared_prefixes=(SharedPrefix(start_page=0, page_ids=(0, 1), members=(0, 1)),))


def _jacobians(config: ModelConfig, step: StepInput):
    """(batch, dlogits_A/dx0 [V, T, D], dlogits_A/dcaches per layer (k, v) [V, P, L, K, H])."""
    batch = input_batch.build_batch(step, input_batch.BatchConfig(
        page_size=PAGE_SIZE, num_pages=NUM_PAGES, vocab_size=config.vocab_size,
        max_positions=config.max_position_embeddings))
    device = batch.device
    params = init_params(config, jax.random.key(0), init_std=0.3)
    model = Transformer(config, dtype=jnp.float32, param_dtype=jnp.float32)
    moe_layers = tuple(i for i in range(config.num_layers) if config.is_moe_layer(i))
    shape = (NUM_PAGES, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    keys = jax.random.split(jax.random.key(1), 2 * config.num_layers)
    # Random history in every page: what earlier steps would have written.
    caches = tuple((jax.random.normal(keys[2 * i], shape), jax.random.normal(keys[2 * i + 1], shape))
                   for i in range(config.num_layers))
    a_row = int(np.flatnonzero([s.request_id == "A" for s in step.sequences])[0])  # A samples once

    def logits_a(x0_delta, kv_caches, device):
        def add_to_first_layer_input(next_fun, args, kwargs, context):
            if (context.method_name == "__call__" and isinstance(context.module, DecoderLayer)
                    and context.module.name == "layers_0"):
                args = (args[0] + x0_delta,) + tuple(args[1:])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(add_to_first_layer_input):
            logits, _, _, _ = logits_of_step(stage_apply(model, params, moe_layers), device, config.vocab_size,
                                             device.tokens, kv_caches, step_metadata(device))
        return logits[a_row]  # [V]

    @jax.jit
    def jacobians(x0_delta, kv_caches, device):
        # Reverse mode, one cotangent per vocabulary entry (lax.map, not jacrev's vmap:
        # ragged_dot, the MoE grouped matmul, has no batching rule for it).
        _, vjp = jax.vjp(lambda x, c: logits_a(x, c, device), x0_delta, kv_caches)
        return jax.lax.map(vjp, jnp.eye(config.vocab_size, dtype=jnp.float32))

    delta = jnp.zeros((device.tokens.shape[0], config.hidden_size), jnp.float32)
    d_x0, d_caches = jacobians(delta, caches, device)
    return batch, np.asarray(d_x0), jax.tree.map(np.asarray, d_caches)


@pytest.mark.parametrize("config, make_step", [(DENSE, _mixed_step), (DENSE, _shared_prefix_step), (MOE, _mixed_step)],
                         ids=["mixed", "shared_prefix", "moe"])
def test_logits_of_a_do_not_depend_on_other_requests(config, make_step):
    step = make_step()
    batch, d_x0, d_caches = _jacobians(config, step)
    (a,) = [s for s in step.sequences if s.request_id == "A"]
    slots = np.asarray(batch.device.slot_mapping)
    a_pages = set(a.page_ids)
    # A's token rows: the slots of the positions A feeds (padding rows hold slot P * L).
    a_slots = {a.page_ids[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE
               for p in range(a.start_position, a.start_position + len(a.token_ids))}
    a_rows = np.array([int(s) in a_slots for s in slots])
    assert a_rows.sum() == len(a.token_ids)
    assert (slots >= NUM_PAGES * PAGE_SIZE).any() or step.shared_prefixes, "the step should have padding rows"
    assert (batch.device.prefix is not None) == bool(step.shared_prefixes)  # the shared-prefix path runs
    # Embedding rows: zero everywhere but A's rows (others' and padding), non-zero on A's.
    assert not np.any(d_x0[:, ~a_rows, :]), "A's logits depend on another row's input"
    assert np.any(d_x0[:, a_rows, :])
    # KV pages: zero on every page outside A's page table; non-zero on A's history.
    other_pages = np.array([p not in a_pages for p in range(NUM_PAGES)])
    for layer, (d_k, d_v) in enumerate(d_caches):
        for name, d in (("k", d_k), ("v", d_v)):
            assert not np.any(d[:, other_pages]), f"layer {layer} {name}: A's logits depend on another page"
            assert np.any(d[:, ~other_pages]), f"layer {layer} {name}: no dependence on A's own history"
