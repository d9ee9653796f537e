"""PipelineRunner: the ModelRunner of a mesh whose "pipeline" axis is > 1 (MPMD stages).

Path: engine -> StepInput -> **PipelineRunner.execute** -> microbatches.split_step (m
parts of near-equal token counts) -> input_batch.build_batch per part -> stage programs
in wavefront order -> input_batch.unpack_outputs per part -> microbatches.merge_outputs
-> StepOutput -> engine. ModelRunner.from_config returns this runner for such a mesh,
so the session and the engine see the ModelRunner interface (execute, num_pages,
page_size, weight_bytes, kv_cache_bytes, device_info, expert_token_counts,
num_compiles, pipeline_metrics, swap_out / swap_in).

Stages. Stage s owns the devices at pipeline index s of the engine's mesh, as a mesh of
its own (data, expert and tensor axes kept, pipeline 1): its parameters (the sub-tree
models.pipeline.split_params gives it: its layers, plus the embedding on the first
stage and the final norm + LM head on the last, a tied embedding copied there), placed
shard by shard with the same rules table as ModelRunner, its own KV pages (its L / pp
layers, donated to every call), and its own jitted program over a
models.pipeline.PipelineStage. Tensor and expert parallelism inside a stage run as in
ModelRunner (per-shard attention and experts under the stage mesh). The last stage
ends with the ModelRunner's logit cut, sampling and log-probs (model_runner.sample_rows).

Why MPMD with async dispatch rather than one SPMD program with a pipeline axis: each
stage's program touches only its devices, a stage's layers and KV pages live only
there, and jax dispatches a jitted call without waiting for it, so the host loop
enqueues all stage calls of a step at once and each device runs its queue in order.
Activations [T, D] go from stage s to s + 1 with jax.device_put to the next stage's
replicated sharding (a device-to-device copy, also asynchronous).

Wavefront order: tick t runs stage s on microbatch t - s. Every stage then runs its
microbatches in order (so a sequence split across microbatches writes its earlier keys
before its later piece reads them), and stage s works on microbatch k while stage s + 1
works on k - 1. The bubble fraction in metrics is modelled from the padded token counts
of the microbatches (microbatches.PipelineSchedule), not timed: on fake CPU devices the
stages share the host's cores, and timing a stage would need a device sync that breaks
the overlap it measures.

Dimension codes: T tokens, D model dim, S sample rows, V vocab, M MoE layers, E experts.
"""
from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models import parallel, pipeline
from jaxinfer.models.quant_format import int4_format_of
from jaxinfer.models.transformer import logical_axes
from jaxinfer.runtime import faults as faults_lib
from jaxinfer.runtime import input_batch, kv_cache, kv_swap, microbatches, program_memory, warmup
from jaxinfer.runtime.input_batch import BatchConfig, DeviceBatch
from jaxinfer.runtime.model_runner import (_max_bytes_per_device, inject_fault, kv_tokens_finite, logits_of_step,
                                           rows_finite, sample_rows, stage_apply, stage_expert_counts, step_metadata)
from jaxinfer.sharding import mesh as mesh_lib
from jaxinfer.sharding import placement, rules
from jaxinfer.types import StepInput, StepOutput, StepStats


def stage_mesh(mesh: Mesh, stage: int) -> Mesh:
    """The devices at pipeline index `stage` of `mesh`, as a mesh with a pipeline axis of 1."""
    devices = mesh.devices[:, stage]  # [data, expert, tensor]
    return mesh_lib.make_mesh(data=devices.shape[0], expert=devices.shape[1], tensor=devices.shape[2],
                              devices=list(devices.flat))


class PipelineRunner:
    """Runs steps of a model split into pipeline stages, each over its own KV pages.

    Args:
      config: model shape (as in the checkpoint: real vocabulary and KV heads).
      params: parameter tree of `config` (arrays or lazy placement sources).
      page_size: tokens per KV page (L).
      num_pages: pages in each stage's pool (P); every stage holds P pages of its layers.
      dtype: activation and KV-cache dtype.
      attention_impl: forwarded to the attention op.
      mesh: the engine's mesh; its pipeline axis (pp > 1) gives the stages.
      num_microbatches: the most microbatches a step is cut into (m); None = pp.
    Raises:
      ValueError: a layout the model cannot take (parallel.check_parallel_sizes), a
        mesh without a pipeline axis > 1 or with devices of other processes, or
        num_microbatches < 1 (fields named).
    """

    def __init__(self, config: ModelConfig, params, *, page_size: int, num_pages: int, dtype,
                 attention_impl: Optional[str] = None, mesh: Mesh, num_microbatches: Optional[int] = None,
                 kv_cache_dtype: str = "auto"):
        pp = mesh_lib.mesh_size(mesh, "pipeline")
        if pp < 2:
            raise ValueError(f"mesh: pipeline axis is {pp}; PipelineRunner needs >= 2 stages (use ModelRunner)")
        remote = sum(d.process_index != jax.process_index() for d in mesh.devices.flat)
        if remote:  # every stage is dispatched and fetched by this process
            raise ValueError(f"pipeline_parallel_size: {pp} stages over several processes ({remote} of the mesh's "
                             f"{mesh.size} devices belong to other processes) is not built; use one process")
        tp = mesh_lib.mesh_size(mesh, "tensor")
        parallel.check_parallel_sizes(config, tp, mesh_lib.mesh_size(mesh, "expert"), pp)
        self.num_microbatches = pp if num_microbatches is None else num_microbatches
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ValueError(f"num_microbatches: must be an int >= 1, got {num_microbatches!r}")
        self.config = config
        self.page_size = page_size
        self.num_pages = num_pages
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self.num_stages = pp
        self.batch_config = BatchConfig(page_size=page_size, num_pages=num_pages, vocab_size=config.vocab_size,
                                        max_positions=config.max_position_embeddings)
        self.model_config = parallel.mesh_model_config(config, tp)
        params = parallel.expand_params(config, params, tp)
        axes = logical_axes(self.model_config, int4_format_of(params))
        self.stage_meshes = [stage_mesh(mesh, s) for s in range(pp)]
        self.params, self.kv_caches, self._programs, self._stage_moe = [], [], [], []
        moe = tuple(i for i in range(config.num_layers) if config.is_moe_layer(i))
        for s, (smesh, sparams, saxes) in enumerate(zip(self.stage_meshes, pipeline.split_params(config, params, pp),
                                                        pipeline.split_params(config, axes, pp))):
            model = pipeline.PipelineStage(self.model_config, s, pp, dtype=self.dtype, param_dtype=self.dtype,
                                           attention_impl=attention_impl, mesh=smesh if smesh.size > 1 else None)
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sparams)
            shardings = rules.param_shardings(smesh, saxes, shapes)
            self.params.append(placement.place(sparams, shardings))
            layers = pipeline.stage_layers(config.num_layers, pp, s)
            spec = kv_cache.KVCacheSpec(num_layers=len(layers), num_pages=num_pages, page_size=page_size,
                                        num_kv_heads=self.model_config.num_kv_heads, head_dim=config.head_dim,
                                        dtype=self.dtype, kv_cache_dtype=kv_cache_dtype)
            caches = kv_cache.allocate(spec, smesh)
            self.kv_caches.append(caches)
            cache_shardings = jax.tree.map(lambda x: x.sharding, caches)
            replicated = rules.replicated(smesh)
            stage_moe = tuple(i for i in layers if i in moe)
            self._stage_moe.append(stage_moe)
            fn = _last_stage_fn if s == pp - 1 else _stage_fn
            self._programs.append(jax.jit(
                functools.partial(fn, model, config.vocab_size, stage_moe),
                in_shardings=(shardings, cache_shardings, replicated, replicated),
                out_shardings=(replicated, cache_shardings), donate_argnums=(1,)))
        self._moe_layers = moe
        # Tokens routed to each expert over the run, per MoE layer [M, E] (router statistics).
        self.expert_token_counts = np.zeros((len(moe), config.num_experts), np.int64)
        self.schedule = microbatches.PipelineSchedule(num_stages=pp)
        self._shape_keys: set = set()  # microbatch shapes whose programs are compiled and held
        self._num_compiles = 0
        self.map_budget = program_memory.MapBudget()  # drops programs before mappings run out
        self.weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params)))
        self.kv_cache_bytes = kv_cache.cache_bytes(self.kv_caches)
        self.weight_bytes_per_device = _max_bytes_per_device(self.params)
        self.stage_weight_bytes_per_device = [_max_bytes_per_device(p) for p in self.params]  # first to last
        self.kv_cache_bytes_per_device = _max_bytes_per_device(self.kv_caches)
        self.fault_injector: Optional[faults_lib.FaultInjector] = None  # tests only (runtime/faults.py)
        self.shape_profile: Optional[warmup.ShapeProfile] = None  # as ModelRunner's
        self._page_movers = [kv_swap.PageMover(c, m) for c, m in zip(self.kv_caches, self.stage_meshes)]

    @property
    def supports_swap(self) -> bool:
        """Always: every stage is in this process (checked at construction)."""
        return True

    def swap_out(self, page_ids) -> kv_swap.HostPages:
        """Copies pages to host memory: every stage's layers (one gather per stage mesh;
        the stages share page ids, as a step writes the same pages on every stage)."""
        return kv_swap.swap_out(self._page_movers, self.kv_caches, page_ids)

    def swap_in(self, host: kv_swap.HostPages, page_ids) -> kv_swap.SwapStats:
        """Writes a swap_out copy back into `page_ids` on every stage."""
        return kv_swap.swap_in(self._page_movers, self.kv_caches, host, page_ids)

    @classmethod
    def from_config(cls, config: ModelConfig, params, engine_config: EngineConfig, *, dtype, max_model_len: int,
                    mesh: Mesh, num_microbatches: Optional[int] = None) -> "PipelineRunner":
        """A runner whose per-stage page pool is sized by kv_cache.num_pages_for for the
        L / pp layers a stage's devices hold (the planner's KV bytes per device)."""
        pp = mesh_lib.mesh_size(mesh, "pipeline")
        parallel.check_parallel_sizes(config, mesh_lib.mesh_size(mesh, "tensor"), mesh_lib.mesh_size(mesh, "expert"),
                                      pp)
        mesh_config = parallel.mesh_model_config(config, mesh_lib.mesh_size(mesh, "tensor"))
        num_pages = kv_cache.num_pages_for(mesh_config, engine_config, dtype=dtype, max_model_len=max_model_len,
                                           mesh=mesh, num_layers=config.num_layers // pp)
        return cls(config, params, page_size=engine_config.page_size, num_pages=num_pages, dtype=dtype,
                   attention_impl=engine_config.attention_impl, mesh=mesh, num_microbatches=num_microbatches,
                   kv_cache_dtype=engine_config.kv_cache_dtype)

    def device_info(self) -> dict:
        """The mesh and the largest per-device shares of the weights and the KV pages
        (the fullest device: the largest stage)."""
        return {"num_devices": int(self.mesh.size), "mesh_shape": mesh_lib.mesh_shape(self.mesh),
                "weight_bytes_per_device": self.weight_bytes_per_device,
                "kv_cache_bytes_per_device": self.kv_cache_bytes_per_device}

    def pipeline_metrics(self) -> dict:
        """The pipeline's figures so far (the engine adds them to its metrics).

        `pipeline_bubble_fraction` is modelled from the microbatches' padded token
        counts (microbatches.PipelineSchedule), not measured with timers.
        """
        sched = self.schedule
        return {"pipeline_stages": self.num_stages,
                "pipeline_stage_weight_bytes_per_device": list(self.stage_weight_bytes_per_device),
                "pipeline_bubble_fraction": sched.bubble_fraction,
                "pipeline_microbatches_per_step": sched.num_microbatches / max(sched.num_steps, 1)}

    @property
    def num_compiles(self) -> int:
        """Distinct microbatch shapes run so far (each compiled one program per stage)."""
        return self._num_compiles

    def execute(self, step: StepInput) -> StepOutput:
        """Runs one step as microbatches through the stages; returns, per request id, the
        tokens sampled at its sample offsets (as ModelRunner.execute).

        Raises:
          ValueError: from input_batch.build_batch (a bad id, page or position, named)
            or microbatches.split_step (a request id twice).
        """
        host_start = time.perf_counter()
        faults, fail = (None, False) if self.fault_injector is None else self.fault_injector.begin(step)
        parts = microbatches.split_step(step, self.num_microbatches, self.page_size)
        batches = [input_batch.build_batch(part, self.batch_config, faults) for part in parts]
        device_start = time.perf_counter()
        results, counts = self._run([b.device for b in batches])
        results, counts = jax.device_get((results, counts))
        if fail:
            faults_lib.FaultInjector.fail(self.fault_injector.num_executes - 1)
        device_seconds = time.perf_counter() - device_start
        for s, stage_counts in enumerate(counts):
            if self._stage_moe[s]:
                first = self._moe_layers.index(self._stage_moe[s][0])
                self.expert_token_counts[first:first + len(self._stage_moe[s])] += sum(stage_counts)
        new_keys = {b.shape_key for b in batches} - self._shape_keys
        is_compile = bool(new_keys)
        if new_keys:
            self._note_compiles(new_keys)
        unpack_start = time.perf_counter()
        outputs = microbatches.merge_outputs([input_batch.unpack_outputs(b, *r[:5], finite=r[5],
                                                                         tokens_finite=np.logical_and.reduce(r[6]))
                                              for b, r in zip(batches, results)])
        self.schedule.add([int(b.device.tokens.size) for b in batches])
        host_seconds = (device_start - host_start) + (time.perf_counter() - unpack_start)
        stats = StepStats(device_seconds=device_seconds, host_seconds=host_seconds, is_compile=is_compile,
                          num_tokens=sum(b.num_real_tokens for b in batches),
                          num_padded_tokens=sum(int(b.device.tokens.size) for b in batches),
                          is_shared_prefix=any(b.device.prefix is not None for b in batches),
                          shared_prefix_tokens_saved=sum(b.shared_prefix_tokens_saved for b in batches))
        return StepOutput(outputs=outputs, stats=stats)

    def warm(self, key: tuple) -> bool:
        """Compiles every stage's program of microbatch shape `key` from a dummy batch that
        writes no page (runtime/warmup.py); False when it is already held."""
        key = warmup.check_key(key)
        if key in self._shape_keys:
            return False
        results, _ = self._run([warmup.dummy_batch(key, self.batch_config)])
        jax.block_until_ready(results)
        self._note_compiles({key})
        return True

    def _note_compiles(self, keys: set) -> None:
        self._shape_keys.update(keys)
        self._num_compiles += len(keys)
        if self.shape_profile is not None:
            for key in keys:
                self.shape_profile.record(key)
        if self.map_budget.after_compile(self._programs):
            self._shape_keys.clear()  # every program was dropped

    def _run(self, batches: list) -> tuple:
        """Dispatches every (stage, microbatch) call in wavefront order; nothing waits.

        Returns:
          (per microbatch the last stage's (sampled, logprobs, top_ids, top_lps,
          prompt_lp, finite) and every stage's [T] K/V-finite flags (a list), per stage
          the list of its [M_s, E] expert counts per microbatch).
        """
        pp, m = self.num_stages, len(batches)
        carry: list = [None] * m  # microbatch k's input to its next stage: tokens, then [T, D]
        results: list = [None] * m
        token_flags: list = [[] for _ in range(m)]
        counts: list = [[] for _ in range(pp)]
        for tick in range(m + pp - 1):
            for s in range(pp):
                k = tick - s
                if not 0 <= k < m:
                    continue
                batch = batches[k]
                inputs = batch.tokens if s == 0 else jax.device_put(carry[k], rules.replicated(self.stage_meshes[s]))
                out, self.kv_caches[s] = self._programs[s](self.params[s], self.kv_caches[s], inputs, batch)
                *head, flags, stage_counts = out
                counts[s].append(stage_counts)
                token_flags[k].append(flags)
                if s == pp - 1:
                    results[k] = (*head, token_flags[k])
                else:
                    carry[k] = head[0]
        return results, counts


def _stage_fn(model: pipeline.PipelineStage, vocab_size: int, moe_layers: tuple, params, kv_caches, inputs,
              batch: DeviceBatch):
    """A first or middle stage: [T] tokens or [T, D] activations -> ([T, D], [T] K/V finite, counts)."""
    del vocab_size  # the last stage's
    apply = stage_apply(model, params, moe_layers)
    (x, kv_caches), state = apply(inputs, batch.positions, kv_caches, step_metadata(batch))
    counts = stage_expert_counts(state, moe_layers, model.config.num_experts, kv_caches, batch)
    _, kv_caches = inject_fault(None, kv_caches, batch)  # this stage's layers' K/V (tests only)
    return (x, kv_tokens_finite(kv_caches, batch), counts), kv_caches


def _last_stage_fn(model: pipeline.PipelineStage, vocab_size: int, moe_layers: tuple, params, kv_caches, inputs,
                   batch: DeviceBatch):
    """The last stage: [T, D] -> final norm, LM head, logits cut to V, sampling (as
    ModelRunner's step) -> (sampled, logprobs, top_ids, top_lps, prompt_lp, finite, counts)."""
    apply = stage_apply(model, params, moe_layers)
    logits, prompt_lp, kv_caches, state = logits_of_step(apply, batch, vocab_size, inputs, kv_caches,
                                                         step_metadata(batch))
    counts = stage_expert_counts(state, moe_layers, model.config.num_experts, kv_caches, batch)
    logits, kv_caches = inject_fault(logits, kv_caches, batch)
    return (*sample_rows(logits, batch), prompt_lp, rows_finite(logits), kv_tokens_finite(kv_caches, batch),
            counts), kv_caches
