"""The parameter tree of a float HF folder as lazy host sources over its safetensors.

Path: session -> **lazy_hf_params** (this file) -> jaxinfer.models.parallel's expansion
(`jaxinfer.sharding.placement.remap`) -> `jaxinfer.sharding.placement.place` (each
device reads its own shard from the memmap) -> ModelRunner.

`jaxinfer.models.checkpoint.load_params` builds whole arrays; this builds the same tree
(same paths, shapes and dtypes, `param_shapes(config)`) with HostSource leaves and reads
nothing but the safetensors headers. The folder is checked exactly as load_params checks
it (unexpected, missing and misshapen tensors named with their file, tensors in two
shards) before any leaf can be read. Only float folders are lazy: int4 folders (a
`quantization_config`, whose GPTQ tensors need repacking) and orbax folders are loaded
with `checkpoint.load_params`.

Dimension codes: E experts (MoE weights are StackedSource [E, ...] of one
MappedSource per expert).
"""
from __future__ import annotations

import os

import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models import checkpoint, recursive
from jaxinfer.sharding.placement import MappedSource, StackedSource


def _refusal(path: str) -> str | None:
    """Why `path` is not a float HF safetensors folder, or None if it is one."""
    if not os.path.isdir(path):
        return f"{path}: not a folder"
    if os.path.isdir(os.path.join(path, checkpoint.ORBAX_DIR)):
        return f"{path}: an orbax folder; load it with jaxinfer.models.checkpoint.load_params"
    config_file = os.path.join(path, "config.json")
    if os.path.exists(config_file) and recursive.is_recursive(checkpoint.read_hf_config(path)):
        return f"{path}: a recursive folder (shared block + LoRA); load it with jaxinfer.models.checkpoint.load_model"
    if os.path.exists(config_file) and "quantization_config" in checkpoint.read_hf_config(path):
        return (f"{path}: an int4 folder (config.json has a quantization_config); its tensors are repacked "
                f"when loaded, so load it with jaxinfer.models.checkpoint.load_params")
    return None


def is_lazy_loadable(path: str) -> bool:
    """True for a float HF safetensors folder (config.json without quantization_config)."""
    if not os.path.exists(os.path.join(path, "config.json")) or _refusal(path) is not None:
        return False
    try:
        checkpoint._weight_files(path)
    except (FileNotFoundError, ValueError):  # no weights, a missing shard, or pickle only
        return False
    return True


def lazy_hf_params(path: str, config: ModelConfig, dtype) -> dict:
    """The parameters of a float HF folder as HostSources over its memmapped safetensors.

    Linear weights (stored [out, in]) are MappedSources over the transposed memmap view,
    so a shard of our [in, out] kernel reads a block of the file; each MoE expert is one
    MappedSource, stacked into a StackedSource [E, ...].

    Args:
      path: the folder (config.json + model.safetensors, or shards + index).
      config: the model shape.
      dtype: dtype of every parameter ("float32" / "bfloat16" or the jnp dtype); each
        read casts from the stored dtype.
    Returns:
      A nested dict with the structure of `param_shapes(config)`, HostSource leaves.
    Raises:
      ValueError: an orbax or int4 folder (load those with checkpoint.load_params), an
        unsupported dtype, pickle-only weights, a tensor in two shards, or a missing,
        unexpected or misshapen tensor (named, with its file).
      FileNotFoundError: no weights, or a shard the index names is missing.
    """
    refusal = _refusal(path)
    if refusal is not None:
        raise ValueError(refusal)
    dtype = np.dtype(checkpoint.resolve_dtype(dtype))
    tensors, sources = checkpoint._map_weight_files(path)
    names, _, _ = checkpoint._check_hf_tensors(tensors, config, None, sources)
    params: dict = {}
    experts: dict = {}  # MoE parameter path -> {expert index: MappedSource}
    for name, (param_path, transpose, expert) in names.items():
        stored = tensors[name]
        source = MappedSource(stored.T if transpose else stored, dtype)
        if expert is None:
            checkpoint.set_path(params, param_path, source)
        else:
            experts.setdefault(param_path, {})[expert] = source
    for param_path, members in experts.items():
        checkpoint.set_path(params, param_path, StackedSource([members[e] for e in range(len(members))]))
    return params
