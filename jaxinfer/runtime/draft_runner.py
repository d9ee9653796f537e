"""The draft model of speculative decoding (SpeculativeConfig methods "draft", "early_exit").

The draft is any model folder (or bundled name) with the target's tokenizer: the same
vocabulary, and positions at least up to the target's max_model_len. It gets a
ModelRunner of its own -- its own parameters, page pool (sized like the target's, by
EngineConfig.num_pages or max_kv_cache_bytes) and compiled programs -- on one device
(draft models are small; a tensor-parallel draft is not supported yet). The engine's
DraftModelProposer (engine/speculative.py) drives it and owns its pages.

"early_exit" (self-speculation, Bae et al. 2024 §4): the target is a relaxed recursive
model (jaxinfer.models.recursive) and the draft is the same model exiting after its
first `draft_loops` loops: the target's first draft_loops x B layers (the same parameter
arrays, not a copy on one device), then the target's final norm and LM head. The draft
keeps its own pages: the K/V of those loops is computed twice (once by the draft, once
in the verify step), which sharing the target's pages would save.
"""
from __future__ import annotations

import dataclasses
import os

from jaxinfer.assets import resolve_model_path
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models import checkpoint, recursive
from jaxinfer.runtime.model_runner import ModelRunner


def for_engine(target: ModelConfig, params, engine_config: EngineConfig, model_path, *, dtype,
               max_model_len: int):
    """The draft runner engine_config.speculative needs ("draft", "early_exit"), else None."""
    method = engine_config.speculative.method if engine_config.speculative is not None else None
    if method == "draft":
        return build(target, engine_config, dtype=dtype, max_model_len=max_model_len)
    if method == "early_exit":
        return build_early_exit(target, params, engine_config, model_path, dtype=dtype, max_model_len=max_model_len)
    return None


def build(target: ModelConfig, engine_config: EngineConfig, *, dtype, max_model_len: int) -> ModelRunner:
    """Loads engine_config.speculative.draft_model and returns its runner.

    Raises:
      ValueError: naming `speculative.draft_model` when the folder is missing, or its
        vocabulary or context does not fit the target.
    """
    name = engine_config.speculative.draft_model
    path = resolve_model_path(str(name))
    if not os.path.isdir(path):
        raise ValueError(f"speculative.draft_model: {name!r} is neither a model folder nor a bundled model name")
    _, config = checkpoint.read_model_config(path)
    if config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative.draft_model: {name!r} has a vocabulary of {config.vocab_size} ids, the target "
                         f"{target.vocab_size}; a draft model needs the target's tokenizer")
    if config.max_position_embeddings < max_model_len:
        raise ValueError(f"speculative.draft_model: {name!r} has {config.max_position_embeddings} positions, fewer "
                         f"than max_model_len {max_model_len}")
    config, params, _ = checkpoint.load_model(path, dtype)
    return ModelRunner.from_config(config, params, engine_config, dtype=dtype, max_model_len=max_model_len)


def build_early_exit(target: ModelConfig, params, engine_config: EngineConfig, model_path, *, dtype,
                     max_model_len: int) -> ModelRunner:
    """The runner of a recursive target's first speculative.draft_loops loops (see the module docstring).

    Raises:
      ValueError: naming `speculative.method` when the target is not a recursive folder,
        `speculative.draft_loops` when it is not fewer than the target's loops.
    """
    hf = checkpoint.read_hf_config(model_path) if model_path is not None and os.path.isdir(model_path) else {}
    if not recursive.is_recursive(hf):
        raise ValueError(f"speculative.method: 'early_exit' drafts with a recursive model's first loops; "
                         f"{model_path!r} is not a recursive folder (scripts/convert_recursive.py writes one)")
    spec = recursive.spec_from_config(hf, target, os.path.join(model_path, "config.json"))
    loops = engine_config.speculative.draft_loops
    if loops >= spec.num_loops:
        raise ValueError(f"speculative.draft_loops: {loops} must be fewer than the model's {spec.num_loops} loops")
    num_layers = loops * spec.num_blocks
    draft_params = {k: v for k, v in params.items() if not k.startswith("layers_")}
    draft_params.update({f"layers_{i}": params[f"layers_{i}"] for i in range(num_layers)})
    config = dataclasses.replace(target, num_layers=num_layers)
    return ModelRunner.from_config(config, draft_params, engine_config, dtype=dtype, max_model_len=max_model_len)
