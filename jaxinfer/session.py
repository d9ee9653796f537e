"""InferenceSession: the public Python API (top of the request path).

    session = InferenceSession.from_pretrained(path, dtype="float32")
    outs = session.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
    for piece in session.stream(prompt, params): ...
    session = InferenceSession.from_pretrained(path, quantization="int4")  # int4 weights (RTN)

Path: **session** -> engine (scheduler, runner, output processing). The session turns
text into token ids with the model's tokenizer, validates every prompt before any of
them is queued (so a bad prompt never disturbs the others), drives the engine until its
requests finish and returns RequestOutputs in prompt order.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence, Union

from jaxinfer import quant
from jaxinfer.assets import resolve_model_path
from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams
from jaxinfer.engine.engine import Engine
from jaxinfer.models import checkpoint
from jaxinfer.models.tokenizer import load_tokenizer
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.types import RequestOutput

Prompt = Union[str, Sequence[int]]


def _num_pages(model_config: ModelConfig, engine_config: EngineConfig, itemsize: int, max_model_len: int) -> int:
    if engine_config.num_pages is not None:
        return engine_config.num_pages
    page_bytes = (2 * engine_config.page_size * model_config.num_kv_heads * model_config.head_dim
                  * itemsize * model_config.num_layers)
    pages_per_seq = -(-max_model_len // engine_config.page_size)
    return max(1, min(engine_config.max_kv_cache_bytes // page_bytes, pages_per_seq * engine_config.max_num_seqs))


class InferenceSession:
    """A loaded model plus its tokenizer and engine."""

    def __init__(self, model_config: ModelConfig, params, *, tokenizer=None, dtype="float32",
                 engine: Optional[EngineConfig] = None, eos_token_ids: Sequence[int] = ()):
        dtype = checkpoint.resolve_dtype(dtype)
        engine = engine or EngineConfig()
        if not isinstance(engine, EngineConfig):
            raise ValueError(f"engine: expected an EngineConfig, got {type(engine).__name__}")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.dtype = dtype
        max_model_len = min(engine.max_model_len or model_config.max_position_embeddings,
                            model_config.max_position_embeddings)
        num_pages = _num_pages(model_config, engine, dtype.itemsize, max_model_len)
        runner = ModelRunner(model_config, params, page_size=engine.page_size, num_pages=num_pages,
                             dtype=dtype, attention_impl=engine.attention_impl)
        eos = tuple(eos_token_ids) or tuple(model_config.eos_token_ids) or (
            tuple(tokenizer.eos_token_ids) if tokenizer is not None else ())
        self.engine = Engine(model_config, runner, engine, tokenizer=tokenizer, eos_token_ids=eos)

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
        if quantization is None:
            model_config, params, _ = checkpoint.load_model(path, dtype)
        else:
            # Quantize from float32 weights; the leaves left float are cast to dtype after.
            model_config, params, _ = checkpoint.load_model(path, "float32")
            params = quant.quantize_pretrained(model_config, params, quantization, quantization_config,
                                               model_dir=path, tokenizer=tokenizer, dtype=dtype)
        eos = _generation_eos(path) or model_config.eos_token_ids
        return cls(model_config, params, tokenizer=tokenizer, dtype=dtype, engine=engine, eos_token_ids=eos)

    # ------------------------------------------------------------------ prompts

    def _encode(self, prompt: Prompt, index: int) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}]: text prompt given but the model folder has no tokenizer; "
                                 f"pass token ids instead")
            if not prompt:
                raise ValueError(f"prompts[{index}]: empty prompt")
            return list(self.tokenizer.encode(prompt))
        try:
            ids = list(prompt)
        except TypeError:
            raise ValueError(f"prompts[{index}]: expected a string or a list of token ids, "
                             f"got {type(prompt).__name__}") from None
        if not ids:
            raise ValueError(f"prompts[{index}]: empty prompt")
        vocab = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompts[{index}]: token id {t!r} outside the vocabulary [0, {vocab})")
        return ids

    def _add(self, prompts: Sequence[Prompt], params, priority=0, cache_salt=None) -> list:
        if isinstance(prompts, str):
            raise ValueError("prompts: expected a list of prompts, got a single string (wrap it in a list)")
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"params: got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        for i, p in enumerate(params_list):
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params[{i}]: expected SamplingParams, got {type(p).__name__}")
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        # Validate all before queuing any, so that one bad prompt leaves the engine untouched.
        engine = self.engine
        for i, (ids, p) in enumerate(zip(encoded, params_list)):
            total = len(ids) + p.max_tokens
            if total > engine.max_model_len:
                raise ValueError(f"prompts[{i}]: max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                                 f"({p.max_tokens}) = {total} exceeds the model's context of {engine.max_model_len}")
        priorities = list(priority) if isinstance(priority, (list, tuple)) else [priority] * len(prompts)
        salts = list(cache_salt) if isinstance(cache_salt, (list, tuple)) else [cache_salt] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority: got {len(priorities)} priorities for {len(prompts)} prompts")
        if len(salts) != len(prompts):
            raise ValueError(f"cache_salt: got {len(salts)} salts for {len(prompts)} prompts")
        for i, (pr, salt) in enumerate(zip(priorities, salts)):
            if not isinstance(pr, int) or isinstance(pr, bool):
                raise ValueError(f"priority[{i}]: expected an int, got {pr!r}")
            if salt is not None and not isinstance(salt, str):
                raise ValueError(f"cache_salt[{i}]: expected a string or None, got {type(salt).__name__}")
        return [engine.add_request(ids, p, priority=pr, cache_salt=salt)
                for ids, p, pr, salt in zip(encoded, params_list, priorities, salts)]

    # ------------------------------------------------------------------ API

    def generate(self, prompts: Sequence[Prompt], params=None, *, priority=0, cache_salt=None) -> list:
        """Generates for every prompt (strings or token-id lists).

        Args:
          prompts: list of prompts.
          params: one SamplingParams for all, or a list with one per prompt.
          priority: int or list of ints; lower values are admitted first.
          cache_salt: str or list; requests share prefix-cache pages only within a salt.
        Returns:
          list[RequestOutput] in prompt order.
        """
        requests = self._add(prompts, params, priority, cache_salt)
        try:
            while not all(r.is_finished for r in requests):
                self.engine.step()
        except BaseException:
            for r in requests:
                self.engine.abort(r)
            raise
        outputs = [self.engine.output(r) for r in requests]
        for r in requests:
            self.engine.release(r)
        return outputs

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None, *, priority: int = 0,
               cache_salt: Optional[str] = None) -> Iterator[str]:
        """Yields the generated text of one prompt piece by piece as it is produced."""
        (request,) = self._add([prompt], params, priority, cache_salt)
        try:
            while not request.is_finished:
                self.engine.step()
                delta = request.take_stream_delta()
                if delta:
                    yield delta
        except BaseException:  # includes GeneratorExit when the caller stops early
            self.engine.abort(request)
            raise
        delta = request.take_stream_delta()
        if delta:
            yield delta
        self.last_output: RequestOutput = self.engine.output(request)
        self.engine.release(request)

    def reset_prefix_cache(self) -> None:
        """Drops every cached prefix page, e.g. between a warm-up and a timed run."""
        self.engine.reset_prefix_cache()

    def metrics(self) -> dict:
        """Engine counters: steps, preemptions, compiles, pages, weight bytes."""
        return self.engine.metrics()


def _generation_eos(path: str) -> tuple:
    import json
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return ()
    with open(file) as f:
        value = json.load(f).get("eos_token_id")
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)
