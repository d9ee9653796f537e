"""Checkpoint I/O: HF folders (config.json + safetensors) and orbax, both ways.

The safetensors reader is our own (the format is an 8-byte header length, a JSON
header and raw little-endian bytes), so bfloat16 tensors load through numpy's memmap
without torch. Pickle `.bin` / `.pt` weights are refused: unpickling runs code.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models import registry
from jaxinfer.models.transformer import param_shapes

_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Tensors some exporters add that carry nothing the model needs.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
ORBAX_DIR = "orbax_params"


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not supported; choose one of {tuple(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype: {dtype} is not supported; choose float32 or bfloat16")
    return jnp.dtype(dtype)


# ---------------------------------------------------------------------------- safetensors

def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps every tensor of a .safetensors file as a numpy array."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > 100_000_000:
            raise ValueError(f"{path}: corrupt safetensors header (length {header_len})")
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes numpy arrays (bfloat16 included) as one .safetensors file."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        blob = arr.tobytes()
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(path, name)):
                raise FileNotFoundError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
        return [os.path.join(path, n) for n in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if shards:
        return [os.path.join(path, n) for n in shards]
    pickles = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise ValueError(f"{path}: only pickle weights found ({', '.join(pickles)}); jaxinfer refuses them "
                         f"because unpickling can run arbitrary code. Convert them to safetensors first "
                         f"(e.g. transformers' save_pretrained(..., safe_serialization=True)).")
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors or orbax params found")


# ---------------------------------------------------------------------------- name mapping

def _hf_names(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name -> (param path, is a linear kernel stored [out, in])."""
    names = {"model.embed_tokens.weight": (("embed_tokens",), False),
             "model.norm.weight": (("norm", "scale"), False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        names[hf + "input_layernorm.weight"] = ((ours, "input_layernorm", "scale"), False)
        names[hf + "post_attention_layernorm.weight"] = ((ours, "post_attention_layernorm", "scale"), False)
        for proj, bias in (("q_proj", config.qkv_bias), ("k_proj", config.qkv_bias),
                           ("v_proj", config.qkv_bias), ("o_proj", config.o_bias)):
            names[hf + f"self_attn.{proj}.weight"] = ((ours, "self_attn", proj, "kernel"), True)
            if bias:
                names[hf + f"self_attn.{proj}.bias"] = ((ours, "self_attn", proj, "bias"), False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[hf + f"mlp.{proj}.weight"] = ((ours, "mlp", proj, "kernel"), True)
            if config.mlp_bias:
                names[hf + f"mlp.{proj}.bias"] = ((ours, "mlp", proj, "bias"), False)
    return names


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype) -> dict:
    """Maps HF tensors onto the parameter tree, checking names and shapes.

    Raises:
      ValueError: a tensor is missing, unexpected, or has the wrong shape (named).
    """
    dtype = resolve_dtype(dtype)
    names = _hf_names(config)
    shapes = param_shapes(config)
    unexpected = [n for n in tensors if n not in names and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in checkpoint: {', '.join(sorted(unexpected)[:10])}")
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"missing tensor(s) in checkpoint: {', '.join(missing[:10])}")
    params: dict = {}
    for name, (path, transpose) in names.items():
        arr = tensors[name]
        expected = tuple(_get(shapes, path).shape)
        got = tuple(arr.shape[::-1]) if transpose else tuple(arr.shape)
        if got != expected:
            shown = tuple(arr.shape)
            want = expected[::-1] if transpose else expected
            raise ValueError(f"tensor {name}: shape {shown} does not match the config's {want}")
        value = np.asarray(arr)
        if transpose:
            value = value.T
        _set(params, path, jnp.asarray(value, dtype=dtype))
    return params


def hf_tensors_from_params(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse mapping: parameters -> HF-named numpy tensors ([out, in] linears)."""
    tensors = {}
    for name, (path, transpose) in _hf_names(config).items():
        value = np.asarray(jax.device_get(_get(params, path)))
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


# ---------------------------------------------------------------------------- folders

def read_hf_config(path: str) -> dict:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json (not an HF model folder)")
    with open(config_path) as f:
        return json.load(f)


def load_params(path: str, config: ModelConfig, dtype="float32") -> dict:
    """Loads the parameters of an HF folder or of a folder converted to orbax."""
    if os.path.isdir(os.path.join(path, ORBAX_DIR)):
        return load_orbax_params(os.path.join(path, ORBAX_DIR), config, dtype)
    tensors = {}
    for file in _weight_files(path):
        for name, arr in read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard")
            tensors[name] = arr
    return params_from_hf_tensors(tensors, config, dtype)


def load_model(path: str, dtype="float32") -> tuple[ModelConfig, dict, dict]:
    """Returns (ModelConfig, params, the raw HF config dict) of a model folder."""
    hf_config = read_hf_config(path)
    config = registry.model_config_from_hf(hf_config)
    return config, load_params(path, config, dtype), hf_config


def save_hf_folder(path: str, params: Mapping[str, Any], config: ModelConfig, hf_config: Mapping[str, Any],
                   max_shard_bytes: int | None = None) -> None:
    """Writes config.json and model.safetensors (or shards + index) that HF can load."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2)
    tensors = hf_tensors_from_params(params, config)
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        write_safetensors(os.path.join(path, "model.safetensors"), tensors, meta)
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, file), shard, meta)
        weight_map.update({name: file for name in shard})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------- orbax

def save_orbax_params(path: str, params: Mapping[str, Any]) -> None:
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def load_orbax_params(path: str, config: ModelConfig, dtype="float32") -> dict:
    import orbax.checkpoint as ocp
    dtype = resolve_dtype(dtype)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(config))
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(os.path.abspath(path))
        stored = getattr(metadata, "item_metadata", metadata)
        stored = getattr(stored, "tree", stored)
        try:
            stored_shapes = jax.tree.map(lambda m: tuple(m.shape), dict(stored))
            want = jax.tree.map(lambda s: tuple(s.shape), target)
            if stored_shapes != want:
                raise ValueError(f"{path}: orbax params do not match the model config's shapes")
        except (TypeError, AttributeError):
            pass
        restored = ckptr.restore(os.path.abspath(path), target)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), restored)
