"""ModelRunner: the only owner of device arrays (parameters, KV pages) and of jax.jit.

Path: engine -> StepInput -> **runner** -> StepOutput -> engine. The host side of a
step (validation, flattening, attention rows, shared-prefix rows, padding to shape
buckets) is runtime/input_batch.py; the runner places the parameters and the KV cache
on its mesh, runs one compiled step over a StepBatch -- model forward over the flat
ragged batch, paged-KV write, attention, logit processing (penalties, biases; only
when a row asks) and on-device sampling -- and unpacks the results by request id,
with the step's StepStats.

Mesh. The runner runs on a jax.sharding.Mesh (one device unless given one). The model
runs as `mesh_model_config(config, tp)` (jaxinfer.models.parallel: vocabulary padded
when tp does not divide it, KV heads repeated when tp exceeds them); the parameters are
expanded to it and placed shard by shard (jaxinfer.sharding.placement: lazy checkpoint
sources are read per shard, never whole) with NamedShardings from their logical axis
names through the rules table of jaxinfer.sharding.rules; the KV pages get
`kv_cache_sharding` (split over KV heads); the step's inputs and outputs are
replicated, and logits are cut back to the real vocabulary inside the step. The jit is
built with these explicit in/out shardings on one device too, so a bigger mesh changes
sizes, not code. Attention and MoE experts run per shard (shard_map) inside the model.
A mesh whose pipeline axis is > 1 is not run here: `from_config` returns a
runtime/pipeline_runner.PipelineRunner, which runs this module's step pieces
(step_metadata, logits_of_step, sample_rows) once per stage.

Router statistics (MoE models): each step also returns, per MoE layer, the tokens
routed to each expert (padding tokens excluded); the runner sums them over the run.

Faults. Every step checks, per sample row, that its logits are finite (one [S, V]
isfinite reduction on the device, fetched with the sampled ids), and per token that
the K/V it wrote in every layer is finite (`kv_tokens_finite`): a row or token with a
NaN or Inf gives `SequenceOutput.finite = False` and the engine fails that request
alone, in the step that produced the value (also a mid-prompt chunk, which samples
nothing), before its pages could reach the prefix cache.
`fault_injector` (runtime/faults.py; None outside tests) makes the real compiled step
produce such rows, or raise, for chosen requests or calls.

Compilation. XLA compiles once per StepBatch.shape_key; a long mixed workload therefore
compiles a bounded number of programs. A step whose key is new reports
`is_compile=True` in its StepStats. `warm(key)` compiles a key's program ahead of
traffic from a dummy batch of its shapes (runtime/warmup.py), and every new key is
recorded in `shape_profile` (when set) for the next process's warm-up. The KV pages
are donated to each step, so XLA updates them in place.

Swapping. `swap_out(page ids)` copies pages of every layer to host memory and
`swap_in(copy, page ids)` writes them back (runtime/kv_swap.py: bucketed, sharded
gather / donated scatter), for preemption by swapping (EngineConfig.preemption_mode).
"""
from __future__ import annotations

import collections
import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models import parallel
from jaxinfer.models.quant_format import int4_format_of
from jaxinfer.models.transformer import AttentionMetadata, PrefixRows, Transformer, logical_axes
from jaxinfer.runtime import faults as faults_lib
from jaxinfer.runtime import draft_chain, input_batch, kv_cache, kv_swap, program_memory, sampler, warmup
from jaxinfer.runtime.input_batch import BatchConfig, DeviceBatch
from jaxinfer.sharding import mesh as mesh_lib
from jaxinfer.sharding import placement, rules
from jaxinfer.types import StepInput, StepOutput, StepStats

jax.tree_util.register_dataclass(DeviceBatch, data_fields=list(DeviceBatch.ARRAY_FIELDS),
                                 meta_fields=list(DeviceBatch.STATIC_FIELDS))


class ModelRunner:
    """Runs steps of a model over a paged KV cache it owns.

    Args:
      config: model shape (as in the checkpoint: real vocabulary and KV heads).
      params: parameter tree of `config` (already in `dtype`; int4 linear layers
        allowed); leaves may be lazy jaxinfer.sharding.placement sources, read per shard.
      page_size: tokens per KV page (L).
      num_pages: pages in the pool (P).
      dtype: activation and KV-cache dtype.
      attention_impl: forwarded to the attention op.
      mesh: the devices to run on (None = a one-device mesh).
    """

    def __init__(self, config: ModelConfig, params, *, page_size: int, num_pages: int,
                 dtype=jnp.float32, attention_impl: Optional[str] = None, mesh: Optional[Mesh] = None,
                 kv_cache_dtype: str = "auto"):
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh()
        self.batch_config = BatchConfig(page_size=page_size, num_pages=num_pages, vocab_size=config.vocab_size,
                                        max_positions=config.max_position_embeddings)
        if mesh_lib.mesh_size(self.mesh, "pipeline") > 1:
            raise ValueError(f"mesh: pipeline axis of {mesh_lib.mesh_size(self.mesh, 'pipeline')}: ModelRunner runs "
                             f"one stage; use ModelRunner.from_config or runtime.pipeline_runner.PipelineRunner")
        tp = mesh_lib.mesh_size(self.mesh, "tensor")
        parallel.check_parallel_sizes(config, tp, mesh_lib.mesh_size(self.mesh, "expert"),
                                      mesh_lib.mesh_size(self.mesh, "pipeline"))
        self.model_config = parallel.mesh_model_config(config, tp)  # what the sharded model runs with
        self.model = Transformer(self.model_config, dtype=self.dtype, param_dtype=self.dtype,
                                 attention_impl=attention_impl, mesh=self.mesh if self.mesh.size > 1 else None)

        params = parallel.expand_params(config, params, tp)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        param_shardings = rules.param_shardings(self.mesh, logical_axes(self.model_config, int4_format_of(params)),
                                                shapes)
        self.params = placement.place(params, param_shardings)
        spec = kv_cache.KVCacheSpec(num_layers=config.num_layers, num_pages=num_pages, page_size=page_size,
                                    num_kv_heads=self.model_config.num_kv_heads, head_dim=config.head_dim,
                                    dtype=self.dtype, kv_cache_dtype=kv_cache_dtype)
        self.kv_caches = kv_cache.allocate(spec, self.mesh)
        cache_shardings = jax.tree.map(lambda x: x.sharding, self.kv_caches)
        replicated = rules.replicated(self.mesh)
        self._moe_layers = tuple(i for i in range(config.num_layers) if config.is_moe_layer(i))
        # Tokens routed to each expert over the run, per MoE layer [M, E] (router statistics).
        self.expert_token_counts = np.zeros((len(self._moe_layers), config.num_experts), np.int64)
        self._step_body = functools.partial(_step_fn, self.model, config.vocab_size, self._moe_layers)
        self._step = jax.jit(self._step_body, in_shardings=(param_shardings, cache_shardings, replicated),
                             out_shardings=(replicated, cache_shardings), donate_argnums=(1,))
        self._shardings = (param_shardings, cache_shardings, replicated)
        self._chains: dict = {}  # decode iterations -> the jitted draft chain (execute_chain)
        self._chain_keys: set = set()
        self._shape_keys: set = set()  # shapes whose program is compiled and held
        self._num_compiles = 0
        self.map_budget = program_memory.MapBudget()  # drops programs before mappings run out
        self.weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params)))
        self.kv_cache_bytes = kv_cache.cache_bytes(self.kv_caches)
        self.weight_bytes_per_device = _max_bytes_per_device(self.params)
        self.kv_cache_bytes_per_device = _max_bytes_per_device(self.kv_caches)
        self.fault_injector: Optional[faults_lib.FaultInjector] = None  # tests only (runtime/faults.py)
        # Where each newly compiled shape key is recorded for the next process's warm-up
        # (a runtime/warmup.ShapeProfile; set by the session; None = not recorded).
        self.shape_profile: Optional[warmup.ShapeProfile] = None
        self._page_mover = kv_swap.PageMover(self.kv_caches, self.mesh)

    @property
    def supports_swap(self) -> bool:
        """swap_out / swap_in work here: one process (several processes would each have
        to copy their shards; runtime/step_broadcast.py does not carry swap ops)."""
        return jax.process_count() == 1

    def swap_out(self, page_ids) -> kv_swap.HostPages:
        """Copies pages of every layer's K/V to host memory (runtime/kv_swap.py); the
        pages themselves are untouched (the scheduler frees them)."""
        return kv_swap.swap_out([self._page_mover], [self.kv_caches], page_ids)

    def swap_in(self, host: kv_swap.HostPages, page_ids) -> kv_swap.SwapStats:
        """Writes a swap_out copy back into `page_ids` (new pages of the same request)."""
        pools = [self.kv_caches]
        stats = kv_swap.swap_in([self._page_mover], pools, host, page_ids)
        self.kv_caches = pools[0]
        return stats

    def device_info(self) -> dict:
        """The mesh and the largest per-device shares of the weights and the KV pages."""
        return {"num_devices": int(self.mesh.size), "mesh_shape": mesh_lib.mesh_shape(self.mesh),
                "weight_bytes_per_device": self.weight_bytes_per_device,
                "kv_cache_bytes_per_device": self.kv_cache_bytes_per_device}

    @classmethod
    def from_config(cls, config: ModelConfig, params, engine_config: EngineConfig, *, dtype, max_model_len: int,
                    mesh: Optional[Mesh] = None) -> "ModelRunner":
        """A runner whose page pool is sized by kv_cache.num_pages_for (EngineConfig, device memory).

        A mesh with a pipeline axis > 1 gets a runtime.pipeline_runner.PipelineRunner
        (same interface: execute, num_pages, page_size, device_info, ...)."""
        mesh = mesh if mesh is not None else mesh_lib.make_mesh()
        if mesh_lib.mesh_size(mesh, "pipeline") > 1:
            from jaxinfer.runtime.pipeline_runner import PipelineRunner  # it imports this module
            return PipelineRunner.from_config(config, params, engine_config, dtype=dtype,
                                              max_model_len=max_model_len, mesh=mesh,
                                              num_microbatches=engine_config.pipeline_microbatches)
        # Pages are sized by the heads each device really holds (K' / tp, see parallel).
        mesh_config = parallel.mesh_model_config(config, mesh_lib.mesh_size(mesh, "tensor"))
        num_pages = kv_cache.num_pages_for(mesh_config, engine_config, dtype=dtype, max_model_len=max_model_len,
                                           mesh=mesh)
        return cls(config, params, page_size=engine_config.page_size, num_pages=num_pages, dtype=dtype,
                   attention_impl=engine_config.attention_impl, mesh=mesh,
                   kv_cache_dtype=engine_config.kv_cache_dtype)

    @property
    def num_compiles(self) -> int:
        return self._num_compiles

    def execute(self, step: StepInput) -> StepOutput:
        """Runs one step; returns, per request id, the tokens sampled at its sample offsets."""
        host_start = time.perf_counter()
        faults, fail = (None, False) if self.fault_injector is None else self.fault_injector.begin(step)
        batch = input_batch.build_batch(step, self.batch_config, faults)
        device_start = time.perf_counter()
        results, self.kv_caches = self._step(self.params, self.kv_caches, batch.device)
        results = jax.device_get(results)
        if fail:
            faults_lib.FaultInjector.fail(self.fault_injector.num_executes - 1)
        results, finite, tokens_finite, expert_counts = results[:-3], results[-3], results[-2], results[-1]
        if self._moe_layers:
            self.expert_token_counts += expert_counts
        device_seconds = time.perf_counter() - device_start
        is_compile = batch.shape_key not in self._shape_keys
        if is_compile:
            self._note_compile(batch.shape_key)
        unpack_start = time.perf_counter()
        outputs = input_batch.unpack_outputs(batch, *results, finite=finite, tokens_finite=tokens_finite)
        host_seconds = (device_start - host_start) + (time.perf_counter() - unpack_start)
        stats = StepStats(device_seconds=device_seconds, host_seconds=host_seconds, is_compile=is_compile,
                          num_tokens=batch.num_real_tokens, num_padded_tokens=int(batch.device.tokens.size),
                          is_shared_prefix=batch.device.prefix is not None,
                          shared_prefix_tokens_saved=batch.shared_prefix_tokens_saved)
        return StepOutput(outputs=outputs, stats=stats)

    def execute_chain(self, step: StepInput, chain: StepInput, lens, num_iterations: int):
        """`step`, then `num_iterations` decode steps of `chain`'s sequences, each fed the
        id it sampled before, in ONE device call (runtime/draft_chain.py: draft models).

        Args:
          step: the catch-up step; each chain request samples once in it.
          chain: the first decode step: one placeholder id per sequence, at the position
            after its request's step tokens; sample offsets (0,).
          lens: per chain sequence, its decode steps (1 .. num_iterations).
        Returns:
          (the step's StepOutput, {request id: (ids its decode steps sampled, every one finite)}).
          Router statistics (MoE) count the step's tokens only, not the decode steps'.
        Raises:
          ValueError: naming the request whose chain leaves its pages (draft_chain.chain_arrays).
        """
        host_start = time.perf_counter()
        faults, fail = (None, False) if self.fault_injector is None else self.fault_injector.begin(step)
        batch = input_batch.build_batch(step, self.batch_config, faults)
        chain_batch = input_batch.build_batch(chain, self.batch_config, faults)
        arrays = draft_chain.chain_arrays(batch, chain, chain_batch, lens, self.batch_config)
        if num_iterations not in self._chains:
            params_s, cache_s, replicated = self._shardings
            program = functools.partial(draft_chain.chain_fn, self._step_body, kv_slots_finite, self.page_size,
                                        num_iterations)
            self._chains[num_iterations] = jax.jit(
                program,
                in_shardings=(params_s, cache_s, replicated, replicated, replicated),
                out_shardings=(replicated, cache_s), donate_argnums=(1,))
        device_start = time.perf_counter()
        (results, ids, finite), self.kv_caches = self._chains[num_iterations](
            self.params, self.kv_caches, batch.device, chain_batch.device, arrays)
        results, ids, finite = jax.device_get((results, ids, finite))
        if fail:
            faults_lib.FaultInjector.fail(self.fault_injector.num_executes - 1)
        device_seconds = time.perf_counter() - device_start
        key = (batch.shape_key, chain_batch.shape_key, num_iterations)
        is_compile = key not in self._chain_keys
        if is_compile:
            self._chain_keys.add(key)
            self._num_compiles += 1
            self._after_compile()
        if self._moe_layers:
            self.expert_token_counts += results[-1]
        unpack_start = time.perf_counter()
        outputs = input_batch.unpack_outputs(batch, *results[:-3], finite=results[-3], tokens_finite=results[-2])
        chains = {seq.request_id: (tuple(int(t) for t in ids[:n, i]), bool(finite[:n, i].all()))
                  for i, (seq, n) in enumerate(zip(chain.sequences, lens))}
        host_seconds = (device_start - host_start) + (time.perf_counter() - unpack_start)
        stats = StepStats(device_seconds=device_seconds, host_seconds=host_seconds, is_compile=is_compile,
                          num_tokens=batch.num_real_tokens, num_padded_tokens=int(batch.device.tokens.size))
        return StepOutput(outputs=outputs, stats=stats), chains

    def warm(self, key: tuple) -> bool:
        """Compiles (or loads from the persistent cache) the step program of shape `key`
        without touching the pages (runtime/warmup.py); False when it is already held.

        Raises:
          ValueError: `key` is not a valid shape key.
        """
        key = warmup.check_key(key)
        if key in self._shape_keys:
            return False
        results, self.kv_caches = self._step(self.params, self.kv_caches,
                                             warmup.dummy_batch(key, self.batch_config))
        jax.block_until_ready(results)
        self._note_compile(key)
        return True

    def _note_compile(self, key: tuple) -> None:
        self._shape_keys.add(key)
        self._num_compiles += 1
        if self.shape_profile is not None:
            self.shape_profile.record(key)
        self._after_compile()

    def _after_compile(self) -> None:
        if self.map_budget.after_compile([self._step, *self._chains.values()]):
            self._shape_keys.clear()  # every program was dropped
            self._chain_keys.clear()


def _max_bytes_per_device(tree) -> int:
    """Bytes of `tree`'s shards on its fullest device (replicas counted on each device)."""
    per_device: dict = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    return int(max(per_device.values(), default=0))


def _expert_counts(state, moe_layers: tuple, num_experts: int, valid: jax.Array) -> jax.Array:
    """[M, E] int32 tokens routed to each expert of each MoE layer, padding excluded."""
    counts = []
    for i in moe_layers:
        (experts,) = state["intermediates"][f"layers_{i}"]["mlp"]["experts"]  # [T, k]
        weight = jnp.broadcast_to(valid[:, None], experts.shape).astype(jnp.int32)
        counts.append(jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].add(weight.reshape(-1)))
    return jnp.stack(counts)


def _step_fn(model: Transformer, vocab_size: int, moe_layers: tuple, params, kv_caches, batch: DeviceBatch,
             check_tokens: bool = True):
    """One compiled step: forward + KV write + attention + sampling (+ log-probs).

    Logits are cut to the real `vocab_size` (the mesh model's may be padded) before
    anything reads them, so a padded id is never sampled or counted. check_tokens=False
    leaves the written K/V unchecked (all True): a caller that writes the pages again in
    the same program checks them at its end (reading them in between would make XLA
    copy the pool; runtime/draft_chain.py)."""
    metadata = step_metadata(batch)
    apply = stage_apply(model, params, moe_layers)
    logits, prompt_lp, kv_caches, state = logits_of_step(apply, batch, vocab_size, batch.tokens, kv_caches, metadata)
    counts = stage_expert_counts(state, moe_layers, model.config.num_experts, kv_caches, batch)
    logits, kv_caches = inject_fault(logits, kv_caches, batch)
    tokens_ok = kv_tokens_finite(kv_caches, batch) if check_tokens else jnp.ones(batch.slot_mapping.shape, bool)
    return (*sample_rows(logits, batch), prompt_lp, rows_finite(logits), tokens_ok, counts), kv_caches


def rows_finite(logits: jax.Array) -> jax.Array:
    """[S] bool: every logit of the sample row is finite (the step's NaN / Inf check)."""
    return jnp.all(jnp.isfinite(logits), axis=-1)


def kv_tokens_finite(kv_caches, batch: DeviceBatch) -> jax.Array:
    """[T] bool: every K/V value (or scale) each token wrote this step, in every layer
    of `kv_caches`, is finite; padding tokens (the dropped slot) are True.

    This is what the prefix cache would share: a NaN in a mid-prompt chunk, which
    samples nothing, fails its request in the step that wrote it, before its pages
    can be registered. Integer leaves (int8 codes) are skipped: their float scales
    carry a non-finite value.
    """
    return kv_slots_finite(kv_caches, batch.slot_mapping)


def kv_slots_finite(kv_caches, slot_mapping: jax.Array) -> jax.Array:
    """[N] bool: every K/V value (or scale) in each flat slot of `slot_mapping`, in every
    layer, is finite; out-of-range slots (the dropped slot P * L) are True."""
    ok = jnp.ones(slot_mapping.shape, bool)
    for pages in jax.tree.leaves(kv_caches):
        if not jnp.issubdtype(pages.dtype, jnp.floating) or pages.ndim < 3:
            continue
        flat = pages.reshape(pages.shape[0] * pages.shape[1], -1)
        written = jnp.take(flat, slot_mapping, axis=0, mode="fill", fill_value=0)  # [N, ...]
        ok = ok & jnp.all(jnp.isfinite(written.astype(jnp.float32)), axis=-1)
    return ok


def inject_fault(logits, kv_caches, batch: DeviceBatch):
    """Adds `batch.fault` (runtime/faults.py) to the sample rows' logits and to the K/V
    each token wrote in this step; returns them unchanged (nothing traced) when None.

    Args:
      logits: [S, V] sample-row logits, or None (a pipeline stage without the LM head).
      kv_caches: per layer (k_pages, v_pages), each [P, L, K, H] or a pytree of
        [P, L, ...] leaves (quantized pages: the floating leaves, e.g. the scales, get it).
    """
    if batch.fault is None:
        return logits, kv_caches
    if logits is not None:
        logits = logits + batch.fault[batch.logits_indices][:, None].astype(logits.dtype)

    def poison(pages):
        if not jnp.issubdtype(pages.dtype, jnp.floating) or pages.ndim < 3:
            return pages  # integer codes: their float scales carry the value
        num_pages, page_size = pages.shape[:2]
        flat = pages.reshape(num_pages * page_size, *pages.shape[2:])
        value = batch.fault.astype(pages.dtype).reshape(-1, *([1] * (pages.ndim - 2)))
        # Padding tokens' slot P * L is out of range: dropped.
        return flat.at[batch.slot_mapping].add(value, mode="drop").reshape(pages.shape)

    return logits, jax.tree.map(poison, kv_caches)


def step_metadata(batch: DeviceBatch) -> AttentionMetadata:
    """The AttentionMetadata of a step's DeviceBatch (inside the jitted step)."""
    prefix = None if batch.prefix is None else PrefixRows(*batch.prefix)
    return AttentionMetadata(slot_mapping=batch.slot_mapping, cu_q_lens=batch.cu_q_lens, kv_lens=batch.kv_lens,
                             page_tables=batch.page_tables, max_q_len=batch.max_q_len,
                             num_decode_rows=batch.num_decode_rows, kv_starts=batch.kv_starts, prefix=prefix)


def stage_apply(model, params, moe_layers: tuple):
    """`model.apply` bound to `params`, returning (outputs, state); state holds the MoE
    layers' sown intermediates (None for a model, or pipeline stage, without MoE layers)."""
    variables = {"params": params}
    if moe_layers:
        return functools.partial(model.apply, variables, mutable=["intermediates"])
    return functools.partial(_apply_stateless, model, variables)


def logits_of_step(apply, batch: DeviceBatch, vocab_size: int, inputs, kv_caches, metadata: AttentionMetadata):
    """Runs `apply` (a whole model or a last pipeline stage) and cuts its logits to V.

    Returns:
      (logits [S, V] of the sample rows, prompt log-probs [T] (empty unless
      all_logits), new kv_caches, the apply's state).
    """
    if batch.all_logits:
        (all_rows, kv_caches), state = apply(inputs, batch.positions, kv_caches, metadata)  # [T, V']
        all_rows = all_rows[:, :vocab_size]  # [T, V]
        logits = all_rows[batch.logits_indices]  # [S, V]
        log_probs = jax.nn.log_softmax(all_rows, axis=-1)
        prompt_lp = jnp.take_along_axis(log_probs, batch.targets[:, None], axis=-1)[:, 0]  # [T]
    else:
        (logits, kv_caches), state = apply(inputs, batch.positions, kv_caches, metadata,
                                           batch.logits_indices)  # [S, V']
        logits = logits[:, :vocab_size]  # [S, V]
        prompt_lp = jnp.zeros((0,), jnp.float32)
    return logits, prompt_lp, kv_caches, state


def stage_expert_counts(state, moe_layers: tuple, num_experts: int, kv_caches, batch: DeviceBatch) -> jax.Array:
    """[M, E] tokens routed to each expert of `moe_layers` in this step ([0, 0] without them)."""
    if not moe_layers:
        return jnp.zeros((0, 0), jnp.int32)
    num_slots = kv_caches[0][0].shape[0] * kv_caches[0][0].shape[1]  # P * L: padding tokens' slot
    return _expert_counts(state, moe_layers, num_experts, batch.slot_mapping < num_slots)


def sample_rows(logits: jax.Array, batch: DeviceBatch) -> tuple:
    """Penalties, biases, sampling and log-probs of the sample rows' logits [S, V].

    Returns:
      (sampled [S], logprobs [S], top_ids [S, n], top_logprobs [S, n]).
    """
    keys = sampler.request_keys(batch.seed_hi, batch.seed_lo, batch.sample_pos)
    # Penalties, then logit biases and bans: traced only when a row of the step has them.
    processed = logits
    if batch.penalties is not None:
        processed = sampler.apply_penalties(processed, *batch.penalties)
    if batch.logit_bias is not None:
        processed = sampler.apply_logit_bias(processed, *batch.logit_bias)
    sampled, logprobs = sampler.sample(processed, batch.temperature, batch.top_k, batch.top_p, batch.min_p, keys,
                                       all_greedy=batch.all_greedy, raw_logits=logits)
    top_ids, top_lps = sampler.top_logprobs(logits, batch.num_top_logprobs)  # raw distribution
    return sampled, logprobs, top_ids, top_lps


def _apply_stateless(model: Transformer, variables, *args):
    return model.apply(variables, *args), None

