"""The draft model of speculative decoding (SpeculativeConfig method "draft").

The draft is any model folder (or bundled name) with the target's tokenizer: the same
vocabulary, and positions at least up to the target's max_model_len. It gets a
ModelRunner of its own -- its own parameters, page pool (sized like the target's, by
EngineConfig.num_pages or max_kv_cache_bytes) and compiled programs -- on one device
(draft models are small; a tensor-parallel draft is not supported yet). The engine's
DraftModelProposer (engine/speculative.py) drives it and owns its pages.
"""
from __future__ import annotations

import os

from jaxinfer.assets import resolve_model_path
from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.models import checkpoint
from jaxinfer.runtime.model_runner import ModelRunner


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
