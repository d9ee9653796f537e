"""DepthwiseRunner: a recursive model's shared block, one call per step over rows at mixed loops.

Path: engine (engine/depthwise.py) -> StepInput whose sequences carry `loop` ->
**DepthwiseRunner** -> models/recursive_block.py -> StepOutput. Relaxed Recursive
Transformers' continuous depth-wise batching (Bae et al. 2024, §3.3): the runner keeps the
hidden states of every row of the last step on the device (the *carry*, [C, D] with C the
bucketed token budget); a sequence at loop l > 0 is the same request id as one of the last
step's sequences, one loop deeper, and its rows start from that sequence's rows of the
carry. Loop 0 rows embed their tokens.

Sampling. A sequence samples only when it has sample offsets: at its last loop (always),
or before it with an `exit_threshold` (early exit, §3.3's confidence-based exit): the
exit's logits (final norm + LM head on the hidden state after this loop) are sampled, and
the sequence's output carries the sampled ids only when the max probability of the raw
distribution is >= the threshold; otherwise its token_ids are () and it goes on.

KV: one pool per block layer of num_loops * P pages; loop l of logical page p is physical
page p + l * P (recursive_block's module docstring). `num_pages` is P, the pages the
engine's BlockManager hands out; a logical page therefore holds num_loops * B layers of
K/V, as a page of the unrolled model holds L.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models import checkpoint, recursive, recursive_block
from jaxinfer.models.quant_format import int4_format_of
from jaxinfer.runtime import input_batch, kv_cache, program_memory, warmup
from jaxinfer.runtime.input_batch import BatchConfig, bucket
from jaxinfer.runtime.model_runner import kv_tokens_finite, rows_finite, sample_rows, step_metadata
from jaxinfer.sharding import mesh as mesh_lib
from jaxinfer.sharding import rules
from jaxinfer.types import StepInput, StepOutput, StepStats

__all__ = ["DepthwiseRunner", "for_engine"]


class DepthwiseRunner:
    """Runs depth-wise batched steps of a relaxed recursive model (see the module docstring).

    Args:
      config: the original model's shape (num_layers = L, the effective depth).
      spec: the recursive structure (B shared layers, L / B loops).
      rp: the folder's recursive parameters (jaxinfer.models.recursive.read_recursive).
      page_size, num_pages: the logical pool (P pages of page_size tokens).
      max_rows: rows one step may carry (the engine's max_num_batched_tokens).
      dtype: activations and KV pages.
    """

    depthwise = True
    supports_swap = False  # the carry and the loop-offset pages are not in kv_swap's layout

    def __init__(self, config: ModelConfig, spec: recursive.RecursiveSpec, rp, *, page_size: int, num_pages: int,
                 max_rows: int, dtype=jnp.float32, attention_impl: Optional[str] = None,
                 lora_impl: Optional[str] = None, kv_cache_dtype: str = "auto", kv_fill: str = "compute"):
        recursive_block.check_supported(config, spec)
        self.config = self.model_config = config
        self.spec = spec
        self.num_loops = spec.num_loops
        self.exit_loops = spec.exit_after_loops
        if kv_fill not in ("compute", "copy"):
            raise ValueError(f"early_exit_kv_fill: {kv_fill!r} is not 'compute' or 'copy'")
        self.kv_fill = kv_fill  # "copy": an exiting row writes its skipped loops' K/V in its step
        self.page_size = page_size
        self.num_pages = num_pages
        if num_pages * spec.num_loops * page_size > np.iinfo(np.int32).max:
            raise ValueError(f"num_pages: {num_pages} pages x {spec.num_loops} loops x {page_size} tokens overflow "
                             f"the int32 KV slots")
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh_lib.make_mesh()
        self.bp = recursive_block.device_params(rp, spec, self.dtype)
        cache_spec = kv_cache.KVCacheSpec(num_layers=spec.num_blocks, num_pages=spec.num_loops * num_pages,
                                          page_size=page_size, num_kv_heads=config.num_kv_heads,
                                          head_dim=config.head_dim, dtype=self.dtype, kv_cache_dtype=kv_cache_dtype)
        self.kv_caches = kv_cache.allocate(cache_spec, self.mesh)
        self.batch_config = BatchConfig(page_size=page_size, num_pages=spec.num_loops * num_pages,
                                        vocab_size=config.vocab_size, max_positions=config.max_position_embeddings)
        self.max_rows = bucket(max_rows)
        self._carry = jax.device_put(jnp.zeros((self.max_rows, config.hidden_size), self.dtype),
                                     rules.replicated(self.mesh))
        self._carry_rows: dict = {}  # request id -> (first row, rows) in the carry
        replicated = rules.replicated(self.mesh)
        # Outputs placed as the inputs were, so the next step's arguments match this program.
        self._step = jax.jit(functools.partial(_depthwise_step, config, spec, self.dtype, attention_impl, lora_impl),
                             out_shardings=(replicated, jax.tree.map(lambda x: x.sharding, self.kv_caches),
                                            replicated), donate_argnums=(1, 2), static_argnums=(5,))
        self.num_copy_fill_rows = 0  # (token, skipped loop) K/V rows written by "copy" fills
        self._shape_keys: set = set()
        self._num_compiles = 0
        self.map_budget = program_memory.MapBudget()
        self.weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.bp)))
        # Weights a token runs through (FLOPs / 2): the outer ones, the shared block once per
        # loop, each loop's LoRA and vectors once.
        self.params_per_token = int(sum(x.size for x in jax.tree.leaves(self.bp["outer"]))
                                    + spec.num_loops * sum(x.size for x in jax.tree.leaves(self.bp["block"]))
                                    + sum(x.size for x in jax.tree.leaves((self.bp["lora"], self.bp["vecs"]))))
        self.kv_cache_bytes = kv_cache.cache_bytes(self.kv_caches)
        self.shape_profile = None  # set by the session: where compiled shape keys are recorded
        self.fault_injector = None

    @property
    def num_compiles(self) -> int:
        return self._num_compiles

    def device_info(self) -> dict:
        return {"num_devices": 1, "mesh_shape": mesh_lib.mesh_shape(self.mesh),
                "weight_bytes_per_device": self.weight_bytes, "kv_cache_bytes_per_device": self.kv_cache_bytes}

    def reset(self) -> None:
        """Forgets the carry's rows (after a failed step: every sequence starts again at loop 0)."""
        self._carry_rows = {}

    def execute(self, step: StepInput) -> StepOutput:
        """Runs one pass of the block over `step` (each sequence at its `loop`).

        Raises:
          ValueError: a sequence at loop > 0 without its rows in the last step, or a loop
            out of range (named by request id).
        """
        host_start = time.perf_counter()
        num_loops, pages = self.num_loops, self.num_pages
        seqs = []
        for s in step.sequences:
            if not 0 <= s.loop < num_loops:
                raise ValueError(f"request {s.request_id!r}: loop {s.loop} is not in [0, {num_loops})")
            if s.loop and (s.request_id not in self._carry_rows
                           or self._carry_rows[s.request_id][1] != len(s.token_ids)):
                raise ValueError(f"request {s.request_id!r}: loop {s.loop} but the last step had no "
                                 f"{len(s.token_ids)} rows of it")
            if any(not 0 <= p < pages for p in s.page_ids):
                raise ValueError(f"request {s.request_id!r}: page ids must be in [0, {pages})")
            seqs.append(dataclasses.replace(s, page_ids=tuple(p + s.loop * pages for p in s.page_ids)))
        batch = input_batch.build_batch(StepInput(sequences=tuple(seqs)), self.batch_config)
        device = batch.device
        num_rows = int(device.tokens.size)
        if num_rows > self.max_rows:
            raise ValueError(f"step: {num_rows} rows exceed the runner's {self.max_rows} (max_rows)")
        rows, thresholds = self._rows(step, batch, num_rows)
        # A step where nothing samples skips the LM head (its weights are a large read).
        heads = bool(batch.num_samples.sum())
        fill = self._fill_rows(step, batch, thresholds) if self.kv_fill == "copy" else None
        key = batch.shape_key + (heads, 0 if fill is None else int(fill.src.size))
        device_start = time.perf_counter()
        results, self.kv_caches, self._carry = self._step(self.bp, self.kv_caches, self._carry, device, rows, heads,
                                                          fill, thresholds)
        results = jax.device_get(results)
        device_seconds = time.perf_counter() - device_start
        is_compile = key not in self._shape_keys
        if is_compile:
            self._note_compile(key, record=heads)
        unpack_start = time.perf_counter()
        *samples, finite, tokens_finite, confidence = results
        outputs = dict(input_batch.unpack_outputs(batch, *samples, finite=finite, tokens_finite=tokens_finite))
        for i, s in enumerate(step.sequences):
            first = int(batch.sample_starts[i])
            if batch.num_samples[i] and confidence[first] < thresholds[first]:  # stays in: nothing sampled
                outputs[s.request_id] = dataclasses.replace(outputs[s.request_id], token_ids=(), logprobs=None,
                                                            top_logprobs=None)
            elif fill is not None and batch.num_samples[i] and s.exit_threshold is not None:
                self.num_copy_fill_rows += len(s.token_ids) * (self.num_loops - 1 - s.loop)
        self._carry_rows = {s.request_id: (int(batch.token_offsets[i]), int(batch.num_tokens[i]))
                            for i, s in enumerate(step.sequences)}
        host_seconds = (device_start - host_start) + (time.perf_counter() - unpack_start)
        stats = StepStats(device_seconds=device_seconds, host_seconds=host_seconds, is_compile=is_compile,
                          num_tokens=batch.num_real_tokens, num_padded_tokens=num_rows)
        return StepOutput(outputs=outputs, stats=stats)

    def warm(self, key: tuple) -> bool:
        """Compiles the step program of shape `key` (runtime/warmup.py) on a dummy batch of
        loop-0 rows that writes no page; the carry in use is left alone. False when held."""
        key = warmup.check_key(key)
        if key + (True, 0) in self._shape_keys:
            return False
        num_rows = key[0]
        if num_rows > self.max_rows:
            raise ValueError(f"key: {num_rows} rows exceed the runner's {self.max_rows} (max_rows)")
        order = np.arange(num_rows, dtype=np.int32)
        rows = recursive_block.BlockRows(np.zeros(num_rows, np.int32), order, order,
                                         np.zeros(self.num_loops, np.int32), np.full(num_rows, -1, np.int32))
        results, self.kv_caches, _ = self._step(self.bp, self.kv_caches, jnp.zeros_like(self._carry,
                                                                                      device=self._carry.sharding),
                                                warmup.dummy_batch(key, self.batch_config), rows, True, None,
                                                np.full(key[1], -1.0, np.float32))
        jax.block_until_ready(results)
        self._note_compile(key + (True, 0), record=True)
        return True

    def _note_compile(self, key: tuple, record: bool) -> None:
        """Counts a compiled program; `record`: its shape key (all but the last field, the
        LM-head flag and the fill rows) goes to the shape profile (warm-up keys are the plain runner's, with heads)."""
        self._shape_keys.add(key)
        self._num_compiles += 1
        if record and self.shape_profile is not None:
            self.shape_profile.record(key[:-2])
        if self.map_budget.after_compile([self._step]):
            self._shape_keys.clear()

    def _fill_rows(self, step: StepInput, batch, thresholds) -> Optional[recursive_block.FillRows]:
        """The "copy" fill rows of the step's exit candidates (None when there is none)."""
        pages, size, rows = self.num_pages, self.page_size, []
        for i, s in enumerate(step.sequences):
            if s.exit_threshold is None or not batch.num_samples[i] or s.loop >= self.num_loops - 1:
                continue
            first, sample_row = int(batch.token_offsets[i]), int(batch.sample_starts[i])
            for t in range(len(s.token_ids)):
                pos = s.start_position + t
                page = s.page_ids[pos // size]  # logical (`step` is the engine's, not the offset copy)
                rows += [(loop, first + t, pos, (page + loop * pages) * size + pos % size, sample_row)
                         for loop in range(s.loop + 1, self.num_loops)]
        if not rows:
            return None
        rows.sort(key=lambda r: r[0])
        width = bucket(len(rows))
        table = np.zeros((width, 5), np.int64)
        table[:, 3] = pages * self.num_loops * size  # padding: dropped
        table[:len(rows)] = rows
        group_sizes = np.bincount(table[:len(rows), 0], minlength=self.num_loops).astype(np.int32)
        loop, src, positions, slots, sample_row = (table[:, c].astype(np.int32) for c in range(5))
        return recursive_block.FillRows(src, loop, group_sizes, positions, slots, sample_row)

    def _rows(self, step: StepInput, batch, num_rows: int) -> tuple:
        """The step's BlockRows and the [S] exit threshold of each sample row (-1: always)."""
        loop = np.zeros(num_rows, np.int32)
        carry_index = np.full(num_rows, -1, np.int32)
        real = np.zeros(num_rows, bool)
        thresholds = np.full(batch.device.logits_indices.size, -1.0, np.float32)
        for i, s in enumerate(step.sequences):
            first, n = int(batch.token_offsets[i]), int(batch.num_tokens[i])
            loop[first:first + n] = s.loop
            real[first:first + n] = True
            if s.loop:
                carry_index[first:first + n] = self._carry_rows[s.request_id][0] + np.arange(n)
            if s.exit_threshold is not None and s.loop < self.num_loops - 1:
                start = int(batch.sample_starts[i])
                thresholds[start:start + int(batch.num_samples[i])] = s.exit_threshold
        perm = np.argsort(np.where(real, loop, self.num_loops), kind="stable").astype(np.int32)
        inv_perm = np.empty_like(perm)
        inv_perm[perm] = np.arange(num_rows, dtype=np.int32)
        group_sizes = np.bincount(loop[real], minlength=self.num_loops).astype(np.int32)
        return recursive_block.BlockRows(loop, perm, inv_perm, group_sizes, carry_index), thresholds


def _depthwise_step(config, spec, dtype, attention_impl, lora_impl, bp, kv_caches, carry, batch, rows, heads, fill,
                    thresholds):
    """One compiled step: the block over the rows, exit logits of the sample rows, sampling
    (the host applies the exit rule to the returned confidence; the device applies it too,
    to the "copy" fill rows). `heads` (static): some sequence samples; without, the LM head
    is not run and the sample arrays are dummies."""
    metadata = step_metadata(batch)
    hidden, kv_caches = recursive_block.block_forward(config, spec, bp, batch.tokens, carry, rows, batch.positions,
                                                      kv_caches, metadata, dtype=dtype,
                                                      attention_impl=attention_impl, lora_impl=lora_impl)
    new_carry = jax.lax.dynamic_update_slice(jnp.zeros_like(carry), hidden.astype(carry.dtype), (0, 0))
    if not heads:
        num_samples, num_top = batch.logits_indices.shape[0], batch.num_top_logprobs
        zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
        return (jnp.zeros((num_samples,), jnp.int32), zeros((num_samples,)),
                jnp.zeros((num_samples, num_top), jnp.int32), zeros((num_samples, num_top)), zeros((0,)),
                jnp.ones((num_samples,), bool), kv_tokens_finite(kv_caches, batch), zeros((num_samples,))), \
            kv_caches, new_carry
    if batch.all_logits:
        all_rows = recursive_block.exit_logits(config, bp, hidden, jnp.arange(hidden.shape[0]), dtype)  # [T, V]
        logits = all_rows[batch.logits_indices]
        log_probs = jax.nn.log_softmax(all_rows, axis=-1)
        prompt_lp = jnp.take_along_axis(log_probs, batch.targets[:, None], axis=-1)[:, 0]
    else:
        logits = recursive_block.exit_logits(config, bp, hidden, batch.logits_indices, dtype)  # [S, V]
        prompt_lp = jnp.zeros((0,), jnp.float32)
    # Max probability of the raw distribution: 1 / sum(exp(logits - max)).
    confidence = 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1)
    if fill is not None:
        kv_caches = recursive_block.copy_fill(config, spec, bp, hidden, fill, confidence >= thresholds, kv_caches,
                                              dtype=dtype, lora_impl=lora_impl)
    return (*sample_rows(logits, batch), prompt_lp, rows_finite(logits), kv_tokens_finite(kv_caches, batch),
            confidence), kv_caches, new_carry


def blockers(engine_config: EngineConfig, params) -> list:
    """(field, why) for each setting depth-wise batching cannot run with."""
    out = []
    if engine_config.speculative is not None:
        out.append(("speculative", "speculative decoding verifies with the unrolled model"))
    for name in ("tensor_parallel_size", "expert_parallel_size", "pipeline_parallel_size"):
        if getattr(engine_config, name) > 1:
            out.append((name, "the depth-wise runner runs on one device"))
    if engine_config.disaggregation is not None:
        out.append(("disaggregation", "Splitwise runs the unrolled model"))
    if engine_config.preemption_mode != "recompute":
        out.append(("preemption_mode", "swapping does not know the loop-offset pages; use 'recompute'"))
    if params is not None and int4_format_of(params) is not None:
        out.append(("quantization", "the shared block runs float weights"))
    if jax.process_count() > 1:
        out.append(("depthwise_batching", "one process only"))
    return out


def will_run(engine_config: EngineConfig, hf_config, params=None, model_path=None, quantized: bool = False) -> bool:
    """Whether a model of `hf_config` (its config.json dict) runs depth-wise under `engine_config`.

    Raises:
      ValueError: depthwise_batching=True for a folder that is not recursive, or with a
        setting it cannot run with (the setting is named).
    """
    wanted = engine_config.depthwise_batching
    if wanted is False or not recursive.is_recursive(hf_config):
        if wanted:
            raise ValueError(f"depthwise_batching: True needs a recursive model folder "
                             f"(scripts/convert_recursive.py writes one); {model_path!r} is not one")
        return False
    found = blockers(engine_config, params) + ([("quantization", "the shared block runs float weights")]
                                               if quantized else [])
    if found and wanted:
        field, why = found[0]
        raise ValueError(f"{field}: cannot run with depthwise_batching=True ({why}); set "
                         f"depthwise_batching=False to run the loops back to back")
    return not found


def for_engine(config: ModelConfig, params, engine_config: EngineConfig, model_path: Optional[str], *, dtype,
               max_model_len: int) -> Optional[DepthwiseRunner]:
    """The depth-wise runner when `engine_config` asks for one (or leaves it to the folder), else None.

    Raises:
      ValueError: depthwise_batching=True for a folder that is not recursive, or with a
        setting it cannot run with (the setting is named).
    """
    hf = checkpoint.read_hf_config(model_path) if model_path is not None and os.path.isdir(model_path) else {}
    if not will_run(engine_config, hf, params, model_path):
        return None
    spec, rp = recursive.read_recursive(model_path, hf, config)
    num_pages = kv_cache.num_pages_for(config, engine_config, dtype=dtype, max_model_len=max_model_len)
    return DepthwiseRunner(config, spec, rp, page_size=engine_config.page_size, num_pages=num_pages,
                           max_rows=engine_config.max_num_batched_tokens, dtype=dtype,
                           attention_impl=engine_config.attention_impl, lora_impl=engine_config.attention_impl,
                           kv_cache_dtype=engine_config.kv_cache_dtype, kv_fill=engine_config.early_exit_kv_fill)
