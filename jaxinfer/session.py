"""InferenceSession: the public Python API (top of the request path).

    session = InferenceSession.from_pretrained(path, dtype="float32")
    outs = session.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for piece in session.stream(prompt, params): ...                  # text pieces
    for delta in session.stream(prompt, params, output="deltas"): ... # ids, finish reason, usage
    session = InferenceSession.from_pretrained(path, quantization="int4")  # int4 weights (RTN)

Path: **session** -> async engine (engine/async_engine.py: one loop thread owns the
engine) -> engine (scheduler, runner, output processing). The session turns text into
token ids with the model's tokenizer and hands the requests to the AsyncEngine, which
validates every prompt and parameter before any of them is queued (so a bad prompt
never disturbs the others). `generate` and `stream` are clients of the loop thread:
any number of threads (or asyncio tasks, `agenerate` / `astream`) may call them at once.

Several processes (jax.distributed, docs/multiprocess.md): every process builds the
same session over the global mesh; process 0 runs the engine and its runner sends each
step to the others (runtime/step_broadcast.py), which call `run_follower()` and take
no requests. Closing process 0's session stops them.

Design note: the session always goes through the loop thread, also for a single caller:
one path, one set of races (none: only the loop thread touches the engine), at the cost
of a thread hand-off per finished request (`generate`) or step (`stream`), measured as
noise (scripts/benchmark_latency.py, BUILD.md). Splitwise: engine/splitwise.py; a
recursive folder runs depth-wise (runtime/depthwise_runner.py) unless its settings forbid.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence, Union

from jaxinfer import progress as progress_bars, quant
from jaxinfer.assets import resolve_model_path
from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.async_engine import AsyncEngine, RequestStream
from jaxinfer.engine import splitwise
from jaxinfer.engine.engine import Engine
from jaxinfer.engine.validation import NewRequest, resolve_max_model_len
from jaxinfer.models import checkpoint, lazy_checkpoint, parallel
from jaxinfer.models.tokenizer import load_tokenizer
from jaxinfer.runtime import compile_cache, depthwise_runner, draft_runner, step_broadcast
from jaxinfer.runtime import warmup as warmup_lib
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.sharding import distributed
from jaxinfer.sharding.mesh import mesh_for_engine
from jaxinfer.types import RequestOutput

Prompt = Union[str, Sequence[int]]


class InferenceSession:
    """A loaded model plus its tokenizer and engine."""

    def __init__(self, model_config: ModelConfig, params, *, tokenizer=None, dtype="float32",
                 engine: Optional[EngineConfig] = None, eos_token_ids: Sequence[int] = (),
                 generation_defaults: Optional[dict] = None, model_path: Optional[str] = None):
        dtype = checkpoint.resolve_dtype(dtype)
        engine = engine or EngineConfig()
        if not isinstance(engine, EngineConfig):
            raise ValueError(f"engine: expected an EngineConfig, got {type(engine).__name__}")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.dtype = dtype
        # Before the runner compiles anything (from_pretrained did it before loading).
        self.compilation_cache_dir = compile_cache.configure(engine.compilation_cache_dir)
        self.model_path = model_path  # the folder it was loaded from (None when built from arrays)
        # Default sampling fields (generation_config.json): used where a request leaves them out.
        self.generation_defaults = dict(generation_defaults or {})
        max_model_len = resolve_max_model_len(model_config, engine)
        self.max_model_len = max_model_len
        parallel.check_parallel_sizes(model_config, engine.tensor_parallel_size, engine.expert_parallel_size,
                                      engine.pipeline_parallel_size)
        mesh = mesh_for_engine(engine.tensor_parallel_size, engine.expert_parallel_size,
                               engine.pipeline_parallel_size)
        multiprocess = distributed.is_multiprocess()
        if multiprocess:  # every process must build the same runner: same pages, same settings
            if engine.pipeline_parallel_size > 1:  # its stages move activations with device_put: local only
                raise ValueError(f"pipeline_parallel_size: {engine.pipeline_parallel_size} > 1 is not supported "
                                 f"over several processes yet; use tensor / expert parallelism")
            distributed.check_mesh_spans_processes(mesh)
            if engine.speculative is not None and engine.speculative.method != "ngram" or engine.disaggregation:
                raise ValueError("speculative.draft_model / disaggregation: one process only for now")
            num_pages = step_broadcast.agreed_num_pages(
                parallel.mesh_model_config(model_config, engine.tensor_parallel_size), engine, dtype=dtype,
                max_model_len=max_model_len, mesh=mesh)
            engine = dataclasses.replace(engine, num_pages=num_pages)
            step_broadcast.check_same_setup(
                {**{f"model.{k}": v for k, v in dataclasses.asdict(model_config).items()},
                 **{f"engine.{k}": v for k, v in dataclasses.asdict(engine).items() if k != "compilation_cache_dir"},
                 "dtype": str(dtype)})
        draft = draft_runner.for_engine(model_config, params, engine, model_path, dtype=dtype,
                                        max_model_len=max_model_len)  # None without a draft model
        if engine.disaggregation is not None:  # a prefill and a decode runner (engine/splitwise.py)
            runners = splitwise.build_runners(model_config, params, engine, dtype=dtype, max_model_len=max_model_len)
        runner = runners[0] if engine.disaggregation else depthwise_runner.for_engine(
            model_config, params, engine, model_path, dtype=dtype, max_model_len=max_model_len) or \
            ModelRunner.from_config(model_config, params, engine, dtype=dtype, max_model_len=max_model_len, mesh=mesh)
        # Several processes: process 0 runs the engine and sends each step; the others
        # only follow (run_follower) and take no requests.
        self._follower_runner = None
        self.shape_profile = None
        self._channel = distributed.StepChannel() if multiprocess else None
        if multiprocess and distributed.process_index() != 0:
            self._follower_runner = runner
            self.engine = None
            self.async_engine = None
            return
        # Every program this runner compiles is recorded for the next process's warm-up.
        self.shape_profile = _shape_profile(self.compilation_cache_dir, model_config, engine, dtype, runner)
        runner.shape_profile = self.shape_profile
        if multiprocess:
            runner = step_broadcast.BroadcastingRunner(runner, self._channel)
        eos = tuple(eos_token_ids) or tuple(model_config.eos_token_ids) or (
            tuple(tokenizer.eos_token_ids) if tokenizer is not None else ())
        # Owned by the loop thread of `async_engine` once a request was made: call it
        # directly only from code that runs on that thread (AsyncEngine.call).
        self.engine = (splitwise.SplitwiseEngine(model_config, runner, runners[1], engine, tokenizer=tokenizer,
                                                 eos_token_ids=eos) if engine.disaggregation else
                       Engine(model_config, runner, engine, tokenizer=tokenizer, eos_token_ids=eos, draft_runner=draft))
        self.async_engine = AsyncEngine(self.engine)

    @classmethod
    def from_pretrained(cls, path: str, dtype="float32", engine: Optional[EngineConfig] = None,
                        quantization: Optional[str] = None,
                        quantization_config: Optional[quant.QuantConfig] = None) -> "InferenceSession":
        """Loads an HF folder (safetensors), a folder converted to orbax, or a bundled name.

        Args:
          path: model folder or bundled model name. A folder saved quantized (jaxinfer
            int4 or HF GPTQ `quantization_config`) loads as int4 without `quantization`.
          dtype: "float32" or "bfloat16": activations and the parameters left float.
          engine: EngineConfig (None = defaults).
          quantization: None (weights as stored), "int4" (round to nearest) or
            "int4-gptq" (GPTQ calibrated on the built-in Python stdlib text, see
            jaxinfer.quant.calibration; needs the folder's tokenizer). Every linear layer
            but the LM head becomes group-wise int4.
          quantization_config: QuantConfig overriding the defaults (group size 128,
            symmetric, ...), e.g. QuantConfig(group_size=32) for small models whose
            layer widths 128 does not divide.
        Raises:
          ValueError: an invalid argument (named), e.g. an unknown `quantization`, or a
            group size that does not divide a layer's input features.
        """
        checkpoint.resolve_dtype(dtype)
        if engine is not None and not isinstance(engine, EngineConfig):
            raise ValueError(f"engine: expected an EngineConfig, got {type(engine).__name__}")
        # Before loading: quantization and casts compile too, and may use the cache.
        compile_cache.configure((engine or EngineConfig()).compilation_cache_dir)
        if quantization is not None and quantization not in quant.QUANTIZATIONS:
            raise ValueError(f"quantization: {quantization!r} is not supported; choose None or one of "
                             f"{quant.QUANTIZATIONS}")
        if quantization_config is not None and quantization is None:
            raise ValueError("quantization_config: given without `quantization`; pass quantization='int4' or "
                             "'int4-gptq'")
        path = resolve_model_path(str(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: {path!r} is neither a model folder nor a bundled model name")
        tokenizer = load_tokenizer(path)
        engine = engine or EngineConfig()
        hf_config, model_config = checkpoint.read_model_config(path)
        # Before any weight is read: a layout the model cannot take, or too few devices.
        quantized = quantization is not None or checkpoint.checkpoint_quantization(hf_config) is not None
        if quantization_config is not None and not isinstance(quantization_config, quant.QuantConfig):
            raise ValueError(f"quantization_config: expected a QuantConfig, got {type(quantization_config).__name__}")
        group = (quantization_config or quant.QuantConfig()).group_size if quantization is not None else None
        parallel.check_parallel_sizes(model_config, engine.tensor_parallel_size, engine.expert_parallel_size,
                                      engine.pipeline_parallel_size, int4_group_size=group)
        mesh = mesh_for_engine(engine.tensor_parallel_size, engine.expert_parallel_size,
                               engine.pipeline_parallel_size)
        if depthwise_runner.will_run(engine, hf_config, model_path=path, quantized=quantized):
            params = None  # the depth-wise runner reads the shared block and the LoRA itself
        elif not quantized and lazy_checkpoint.is_lazy_loadable(path):  # read per device shard by the runner
            params = lazy_checkpoint.lazy_hf_params(path, model_config, dtype)
        elif quantization is None:
            # An int4 (or orbax) folder: on several devices the leaves stay on the host (numpy
            # over the memmap) and the runner puts each device's shard there.
            model_config, params, _ = checkpoint.load_model(path, dtype, on_host=mesh.size > 1)
        else:
            # Quantize from float32 weights; the leaves left float are cast to dtype after.
            model_config, params, _ = checkpoint.load_model(path, "float32")
            params = quant.quantize_pretrained(model_config, params, quantization, quantization_config,
                                               model_dir=path, tokenizer=tokenizer, dtype=dtype)
        eos = _generation_eos(path) or model_config.eos_token_ids
        return cls(model_config, params, tokenizer=tokenizer, dtype=dtype, engine=engine, eos_token_ids=eos,
                   generation_defaults=generation_defaults(path), model_path=path)

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """SamplingParams from the model folder's generation_config.json plus `overrides`.

        The defaults are the folder's temperature / top_k / top_p / min_p /
        repetition_penalty (vLLM's set); fields it does not name keep SamplingParams'
        defaults. `generate` and `stream` use this when `params` is None.
        """
        return SamplingParams(**{**self.generation_defaults, **overrides})

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompt: Prompt, index: int):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}]: text prompt given but the model folder has no tokenizer; "
                                 f"pass token ids instead")
            if not prompt:
                raise ValueError(f"prompts[{index}]: empty prompt")
            return list(self.tokenizer.encode(prompt))
        return prompt  # token ids: validated by the engine with the other fields

    def _leader(self, what: str):
        """The AsyncEngine; raises on a follower process or a closed multi-process session."""
        if self.async_engine is None:
            raise RuntimeError(f"{what}: process {distributed.process_index()} follows process 0's steps "
                               f"(run_follower); only process 0 takes requests")
        runner = self.engine.runner
        if isinstance(runner, step_broadcast.BroadcastingRunner) and runner.closed:
            raise RuntimeError(f"{what}: the session was closed and the other processes have exited")
        return self.async_engine

    def _add(self, prompts: Sequence[Prompt], params, priority=0, cache_salt=None) -> list:
        self._leader("generate")
        if isinstance(prompts, str):
            raise ValueError("prompts: expected a list of prompts, got a single string (wrap it in a list)")
        prompts = list(prompts)
        if params is None:
            params = self.default_sampling_params()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        priorities = list(priority) if isinstance(priority, (list, tuple)) else [priority] * len(prompts)
        salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority: got {len(priorities)} priorities for {len(prompts)} prompts")
        if len(salts) != len(prompts):
            raise ValueError(f"cache_salt: got {len(salts)} salts for {len(prompts)} prompts")
        new = [NewRequest(prompt_ids=self._encode(p, i), params=sp, priority=pr, cache_salt=salt)
               for i, (p, sp, pr, salt) in enumerate(zip(prompts, params_list, priorities, salts))]
        return self.async_engine.add_requests(new)

    # ------------------------------------------------------------------ API

    def generate(self, prompts: Sequence[Prompt], params=None, *, priority=0, cache_salt=None,
                 progress: Optional[bool] = None) -> list:
        """Generates for every prompt (strings or token-id lists). Thread-safe.

        Args:
          prompts: list of prompts.
          params: one SamplingParams for all, or a list with one per prompt.
          priority: int or list of ints; lower values are admitted first.
          cache_salt: str or list; requests share prefix-cache pages only within a salt.
          progress: a progress bar over the finished requests (two or more): None = when
            stderr is a terminal or in Jupyter, unless JAXINFER_PROGRESS=0 (see
            jaxinfer.progress); True / False force it on / off.
        Returns:
          list[RequestOutput] in prompt order; a prompt whose params have n > 1
          contributes n consecutive outputs (`index` 0 .. n - 1), like OpenAI's
          flat `choices`.
        Raises:
          ValueError: a bad prompt or parameter, naming it (`prompts[1]`,
            `params[0].max_tokens`, ...); then none of the prompts was queued.
        """
        show = progress_bars.is_enabled(progress)  # a bad `progress` raises before anything is queued
        streams = self._add(prompts, params, priority, cache_salt)
        try:
            with progress_bars.bar(len(streams), "generate", "request", enabled=show and len(streams) > 1) as bar:
                outputs = []
                for s in streams:  # in order: the bar advances as the earliest unfinished one ends
                    outputs.append(s.result())
                    bar.update(1)
            return outputs
        except BaseException:  # e.g. KeyboardInterrupt: stop what is still running
            for s in streams:
                s.abort()
            raise

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None, *, priority: int = 0,
               cache_salt: Optional[str] = None, output: str = "text") -> "TokenStream":
        """Streams one prompt's generation as it is produced. Thread-safe.

        The prompt is validated and queued before this returns (a bad one raises
        ValueError here); iterate the result for the pieces. Stopping early (break,
        `close()`, or dropping the iterator) aborts the request.

        Args:
          output: "text" yields the new text of each step (str, possibly skipping steps
            whose text is held back); "deltas" yields a StreamDelta per step: `text`,
            `token_ids`, `logprobs` / `top_logprobs` (when asked for) and, on the last
            one, `finish_reason` and `output` (the RequestOutput: usage and timings).
        """
        if output not in ("text", "deltas"):
            raise ValueError(f"output: expected 'text' or 'deltas', got {output!r}")
        _one_sample(params)
        (stream,) = self._add([prompt], params, priority, cache_salt)
        return TokenStream(stream, deltas=output == "deltas")

    async def agenerate(self, prompts: Sequence[Prompt], params=None, *, priority=0, cache_salt=None) -> list:
        """`generate` for asyncio: awaits the outputs without blocking the event loop."""
        streams = self._add(prompts, params, priority, cache_salt)
        try:
            return [await s.aresult() for s in streams]
        except BaseException:  # includes asyncio.CancelledError
            for s in streams:
                s.abort()
            raise

    async def astream(self, prompt: Prompt, params: Optional[SamplingParams] = None, *, priority: int = 0,
                      cache_salt: Optional[str] = None):
        """`stream(..., output="deltas")` for asyncio: `async for delta in session.astream(...)`."""
        _one_sample(params)
        (stream,) = self._add([prompt], params, priority, cache_salt)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.abort()

    def close(self) -> None:
        """Stops the engine's loop thread (aborting what runs); a later request restarts it.

        With several processes (process 0), also tells the followers to stop: the
        session takes no requests after that.
        """
        if self.async_engine is None:
            return
        self.async_engine.shutdown()
        if isinstance(self.engine.runner, step_broadcast.BroadcastingRunner):
            self.engine.runner.close()

    def run_follower(self, idle_timeout_s: Optional[float] = None) -> int:
        """Processes > 0 of a multi-process job: runs process 0's steps until it closes its session.

        Args:
          idle_timeout_s: give up after this long without a step (None = while process 0 lives).
        Returns:
          The number of steps run.
        Raises:
          RuntimeError: called in process 0, or in a single process.
          TimeoutError / jaxinfer.sharding.distributed.PeerLost: no step in time, or
            process 0 is gone.
        """
        if self._follower_runner is None:
            raise RuntimeError(f"run_follower: process {distributed.process_index()} runs the engine; only "
                               f"processes > 0 of a multi-process job follow")
        return step_broadcast.follow(self._follower_runner, self._channel, idle_timeout_s=idle_timeout_s)

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        engine = getattr(self, "async_engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)
            runner = self.engine.runner
            # At interpreter exit module globals may already be None.
            if step_broadcast is not None and isinstance(runner, step_broadcast.BroadcastingRunner):
                runner.close()

    def warmup(self, *, profile: bool = True, grid: bool = True, context_tokens: Optional[int] = None,
               progress: Optional[bool] = None) -> dict:
        """Compiles the step programs traffic will need, before the first request.

        Programs come from the persistent compilation cache when an earlier process
        compiled them (then mostly tracing time is left). Which ones (runtime/warmup.py):

        Args:
          profile: the programs earlier processes with the same model and settings
            compiled (recorded next to the compilation cache; none when it is off).
          grid: decode steps of every batch bucket and page bucket, prompt chunks of
            every token bucket, greedy and sampled, up to `context_tokens`.
          context_tokens: the longest context the grid covers (None = max_model_len).
          progress: a bar per program (None = when stderr is a terminal or in Jupyter).
        Returns:
          {"programs", "compiled" (new to this process), "seconds", "profile_programs",
          "flushes", "held"} (see Engine.warmup: on CPU a process holds ~140 step programs).
        """
        engine = self._leader("warmup")
        recorded = self.shape_profile.load() if profile and self.shape_profile is not None else []
        # The profile's programs last: should the runner have to drop its programs on the
        # way (the memory-map budget), the ones real traffic needed are those it keeps.
        keys = warmup_lib.merge(self.engine.warmup_grid(context_tokens) if grid else [], recorded)
        with progress_bars.bar(len(keys), "warm-up", "program", enabled=progress) as bar:
            report = engine.call(lambda e: e.warmup(keys, on_program=lambda: bar.update(1)))
        return {**report, "profile_programs": len(recorded)}

    def reset_prefix_cache(self) -> None:
        """Drops every cached prefix page, e.g. between a warm-up and a timed run."""
        self._leader("reset_prefix_cache").reset_prefix_cache()

    def metrics(self) -> dict:
        """Engine counters: steps, preemptions, compiles, pages, weight bytes (thread-safe)."""
        if self.async_engine is None:
            self._leader("metrics")
        return {**self.async_engine.metrics(), "compilation_cache_dir": self.compilation_cache_dir}


class TokenStream:
    """What `InferenceSession.stream` returns: an iterator over one request's output.

    Yields str pieces (output="text") or StreamDeltas (output="deltas"). After the
    iteration ends, `output` holds the RequestOutput. `close()` (or breaking out of a
    for loop and dropping it) aborts the request if it still runs.
    """

    def __init__(self, stream: RequestStream, deltas: bool):
        self.request_id = stream.request_id
        self._stream = stream
        self._iter = iter(stream)
        self._deltas = deltas
        self.output: Optional[RequestOutput] = None

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self):
        while True:
            try:
                delta = next(self._iter)
            except BaseException:  # the end, an error or Ctrl-C: make sure the request is stopped (no-op once finished)
                self._stream.abort()
                raise
            if delta.is_finished:
                self.output = delta.output
            if self._deltas:
                return delta
            if delta.text:
                return delta.text
            if delta.is_finished:
                raise StopIteration

    def close(self) -> None:
        self._stream.abort()

    def __del__(self):
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.abort()


def _shape_profile(cache_dir: Optional[str], model_config: ModelConfig, engine: EngineConfig, dtype,
                   runner) -> Optional[warmup_lib.ShapeProfile]:
    """The ShapeProfile of this model and setup under the compilation cache (None when off)."""
    if not cache_dir:
        return None
    import jax
    mesh = runner.mesh if hasattr(runner, "mesh") else None
    fields = {"model": dataclasses.asdict(model_config), "dtype": str(dtype), "page_size": runner.page_size,
              "num_pages": runner.num_pages, "kv_cache_dtype": engine.kv_cache_dtype,
              "attention_impl": engine.attention_impl, "runner": type(runner).__name__,
              "mesh": None if mesh is None else dict(mesh.shape), "devices": jax.device_count(),
              "platform": jax.default_backend(), "jax": jax.__version__}
    return warmup_lib.ShapeProfile(warmup_lib.profile_path(cache_dir, warmup_lib.fingerprint(**fields)))


def _one_sample(params) -> None:
    if params is not None and getattr(params, "n", 1) != 1:
        raise ValueError(f"params.n: stream() and astream() follow one sample, got n={params.n}; use generate() "
                         f"for several samples, or one stream per seed")


# Keys of generation_config.json that become default sampling parameters (vLLM's set).
GENERATION_DEFAULT_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _read_generation_config(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return {}
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def generation_defaults(path: str) -> dict:
    """The default sampling fields a model folder's generation_config.json sets.

    Raises:
      ValueError: naming the file and key, when a value is not a valid sampling value.
    """
    config = _read_generation_config(path)
    defaults = {k: config[k] for k in GENERATION_DEFAULT_KEYS if config.get(k) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, 'generation_config.json')}: {e}") from None
    return defaults


def _generation_eos(path: str) -> tuple:
    value = _read_generation_config(path).get("eos_token_id")
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)
