"""Checkpoint I/O: HF folders (config.json + safetensors) and orbax, both ways.

The safetensors reader is our own (jaxinfer.models.safetensors_reader: every header
field is checked before a byte of data is touched), so bfloat16 tensors load through
numpy's memmap without torch. Pickle `.bin` / `.pt` weights are refused: unpickling
runs code; `auto_map` / remote code in config.json is never imported; every file read
stays inside the model folder (jaxinfer.models.folder_paths).

Int4 folders carry a `quantization_config` in config.json: either jaxinfer's own
layout (safetensors or orbax) or HF GPTQ tensors, see jaxinfer.models.quant_format.
Loading one gives the quantized parameter tree; saving a quantized tree writes the
config entry that describes it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.models import quant_format, recursive, registry
from jaxinfer.models.layers import Int4Format
from jaxinfer.models.quant_format import CheckpointQuantization
from jaxinfer.models.folder_paths import resolve_in_folder
from jaxinfer.models.safetensors_reader import (CorruptCheckpoint, read_safetensors,  # noqa: F401 (re-exported)
                                                write_safetensors)
from jaxinfer.models.transformer import param_shapes

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

def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = _read_json(resolve_in_folder(path, "model.safetensors.index.json", "index file"))
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str)
                                                                          for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must be a non-empty JSON object of tensor name -> shard file")
        files = [resolve_in_folder(path, name, "shard named in model.safetensors.index.json")
                 for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path}: shard {os.path.relpath(file, path)} named in "
                                        f"model.safetensors.index.json is missing")
        return files
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [resolve_in_folder(path, "model.safetensors", "weight file")]
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if shards:
        return [resolve_in_folder(path, n, "weight file") for n in shards]
    pickles = sorted(n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise ValueError(f"{path}: only pickle weights found ({', '.join(pickles)}); jaxinfer refuses them "
                         f"because unpickling can run arbitrary code. Convert them to safetensors first "
                         f"(e.g. transformers' save_pretrained(..., safe_serialization=True)).")
    raise FileNotFoundError(f"{path}: no model.safetensors, sharded safetensors or orbax params found")


def _map_weight_files(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(HF tensor name -> memmapped array, name -> its file) over a folder's safetensors.

    Raises:
      ValueError: a tensor appears in two shards (both named), or only pickle weights.
      FileNotFoundError: no weights, or a shard the index names is missing.
    """
    tensors, sources = {}, {}
    files = _weight_files(path)
    for file in files:
        for name, arr in read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in more than one shard ({sources[name]}, {file})")
            tensors[name] = arr
            sources[name] = file
    if not tensors:
        raise ValueError(f"{', '.join(files)}: no tensors in the weight file(s)")
    return tensors, sources


# ---------------------------------------------------------------------------- name mapping

class HFTensor(NamedTuple):
    """Where one HF tensor goes in the parameter tree."""

    path: tuple  # parameter path, e.g. ("layers_0", "self_attn", "q_proj", "kernel")
    transpose: bool  # stored [out, in] by HF (linear weights), [in, out] by us
    expert: Optional[int] = None  # MoE: the index of this expert's slice of the stacked [E, ...] parameter


# HF's per-expert projection names (Mixtral's w1 / w3 / w2) -> our stacked parameters.
_EXPERT_PROJS = {"mixtral": (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")),
                 "qwen3_moe": (("gate_proj", "gate_proj"), ("up_proj", "up_proj"), ("down_proj", "down_proj"))}


def _hf_names(config: ModelConfig) -> dict[str, HFTensor]:
    """HF tensor name -> HFTensor (param path, stored transposed, expert slice)."""
    names = {"model.embed_tokens.weight": HFTensor(("embed_tokens",), False),
             "model.norm.weight": HFTensor(("norm", "scale"), False)}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = HFTensor(("lm_head", "kernel"), True)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        names[hf + "input_layernorm.weight"] = HFTensor((ours, "input_layernorm", "scale"), False)
        names[hf + "post_attention_layernorm.weight"] = HFTensor((ours, "post_attention_layernorm", "scale"), False)
        for proj, bias in (("q_proj", config.qkv_bias), ("k_proj", config.qkv_bias),
                           ("v_proj", config.qkv_bias), ("o_proj", config.o_bias)):
            names[hf + f"self_attn.{proj}.weight"] = HFTensor((ours, "self_attn", proj, "kernel"), True)
            if bias:
                names[hf + f"self_attn.{proj}.bias"] = HFTensor((ours, "self_attn", proj, "bias"), False)
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                names[hf + f"self_attn.{norm}.weight"] = HFTensor((ours, "self_attn", norm, "scale"), False)
        if config.is_moe_layer(i):
            moe = hf + ("block_sparse_moe." if config.family == "mixtral" else "mlp.")
            names[moe + "gate.weight"] = HFTensor((ours, "mlp", "router"), True)
            for expert in range(config.num_experts):
                for theirs, proj in _EXPERT_PROJS[config.family]:
                    names[moe + f"experts.{expert}.{theirs}.weight"] = HFTensor((ours, "mlp", proj), True, expert)
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[hf + f"mlp.{proj}.weight"] = HFTensor((ours, "mlp", proj, "kernel"), True)
            if config.mlp_bias:
                names[hf + f"mlp.{proj}.bias"] = HFTensor((ours, "mlp", proj, "bias"), False)
    return names


def get_path(tree, path):
    """tree[path[0]][path[1]]... of a nested dict of parameters."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path, value):
    """Sets tree[path[0]]...[path[-1]] = value, creating missing levels."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _int4_tensor_names(names, quantization: Optional[CheckpointQuantization]):
    """(HF weight name -> tensor prefix of each int4 layer, required names, optional names)."""
    quantized = {}
    if quantization is not None:
        # Linear kernels only: MoE routers and experts stay float.
        quantized = {name: name[:-len(".weight")] for name, tensor in names.items()
                     if tensor.path[-1] == "kernel" and (tensor.path[0] != "lm_head" or quantization.quantize_lm_head)}
    required = {n for n in names if n not in quantized}
    optional = set()
    for prefix in quantized.values():
        if quantization.checkpoint_format == quant_format.NATIVE:
            fmt = quantization.fmt
            keys = ["packed", "scales"] + ([] if fmt.symmetric else ["zeros"]) + (["perm"] if fmt.act_order else [])
            required |= {f"{prefix}.{quant_format.NATIVE_SUFFIXES[k]}" for k in keys}
        else:
            required |= {f"{prefix}.{k}" for k in ("qweight", "qzeros", "scales")}
            optional.add(f"{prefix}.g_idx")
    return quantized, required, optional


def _int4_layer(tensors, prefix: str, quantization: CheckpointQuantization, expected: Mapping) -> dict:
    """The int4 parameters of one layer (see quant_format), shapes checked against `expected`."""
    if quantization.checkpoint_format != quant_format.NATIVE:
        num_in, num_out = expected["kernel"].shape
        layer = {k: np.asarray(tensors[f"{prefix}.{k}"]) for k in quant_format.GPTQ_SUFFIXES
                 if f"{prefix}.{k}" in tensors}
        return quant_format.gptq_to_int4(prefix, layer, num_in, num_out, quantization.group_size,
                                         quantization.checkpoint_format)
    layer = {}
    for key, suffix in quant_format.NATIVE_SUFFIXES.items():
        if key in expected:
            arr = np.asarray(tensors[f"{prefix}.{suffix}"])
            want = expected[key]
            if tuple(arr.shape) != tuple(want.shape) or arr.dtype != want.dtype:
                raise ValueError(f"tensor {prefix}.{suffix}: {arr.dtype} {tuple(arr.shape)} does not match the "
                                 f"config's {want.dtype} {tuple(want.shape)}")
            layer[key] = arr
    return layer


def _check_layer_count(tensors: Mapping[str, Any], config: ModelConfig, sources=None) -> None:
    """Refuses a config whose layer count the files do not hold, before enumerating its layers."""
    layers = {name.split(".")[2] for name in tensors if name.startswith("model.layers.") and name.count(".") > 2}
    if config.num_layers > len(layers):
        files = sorted(set(sources.values())) if sources else []
        raise ValueError(f"config.json: num_hidden_layers is {config.num_layers}, the weights"
                         f"{' (' + ', '.join(files[:3]) + ')' if files else ''} hold {len(layers)} layers")


def _check_hf_tensors(tensors: Mapping[str, Any], config: ModelConfig,
                      quantization: Optional[CheckpointQuantization] = None,
                      sources: Optional[Mapping[str, str]] = None) -> tuple[dict, Any, dict]:
    """Checks HF tensor names and float shapes against the config; reads no tensor data.

    Args:
      tensors: HF tensor name -> array-like with a `.shape` (e.g. a memmap).
      config: the model shape.
      quantization: the folder's parsed `quantization_config`, or None for float weights.
      sources: optional HF tensor name -> file it was read from (named in errors).
    Returns:
      (names, shapes, quantized): `_hf_names(config)`, `param_shapes(config)` and the
      int4 layers' HF weight name -> tensor prefix (empty for float weights).
    Raises:
      ValueError: a tensor is missing, unexpected, or has the wrong shape (named, with
        its file when `sources` has it).
    """
    _check_layer_count(tensors, config, sources)
    names = _hf_names(config)
    shapes = param_shapes(config)
    quantized, required, optional = _int4_tensor_names(names, quantization)
    unexpected = [n for n in tensors if n not in required and n not in optional and not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    files = f" ({', '.join(sorted(set(sources.values()))[:3])})" if sources else ""
    if unexpected:
        raise ValueError(f"unexpected tensor(s) in checkpoint{files}: {', '.join(sorted(unexpected)[:10])}")
    missing = sorted(n for n in required if n not in tensors)
    if missing:
        raise ValueError(f"missing tensor(s) in checkpoint{files}: {', '.join(missing[:10])}")
    for name, (path, transpose, expert) in names.items():
        if name in quantized:
            continue
        expected = tuple(get_path(shapes, path).shape)
        if expert is not None:
            expected = expected[1:]  # one expert's slice of the stacked [E, ...] parameter
        got = tuple(tensors[name].shape)
        want = expected[::-1] if transpose else expected
        where = f" (in {sources[name]})" if sources and name in sources else ""
        if got != want:
            raise ValueError(f"tensor {name}: shape {got} does not match the config's {want}{where}")
        kind = getattr(getattr(tensors[name], "dtype", None), "kind", "f")
        if kind not in "fV":  # floats (bfloat16's numpy kind is "V"); not ints or bools
            raise ValueError(f"tensor {name}: dtype {tensors[name].dtype} is not a float dtype{where}")
    return names, shapes, quantized


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], config: ModelConfig, dtype,
                           quantization: Optional[CheckpointQuantization] = None,
                           sources: Optional[Mapping[str, str]] = None, on_host: bool = False) -> dict:
    """Maps HF tensors onto the parameter tree, checking names and shapes.

    Every float tensor's shape is checked before any parameter is allocated. MoE
    experts, stored by HF as one tensor per expert, are stacked into [E, ...] arrays.

    Args:
      tensors: HF tensor name -> array.
      config: the model shape.
      dtype: dtype of the float parameters (int4 codes, scales and zeros keep theirs).
      quantization: the folder's parsed `quantization_config`, or None for float weights.
      sources: optional HF tensor name -> file it was read from (named in errors).
      on_host: numpy leaves instead of jax arrays on the default device, so that a
        multi-device runner places each device's shard without a whole copy on one device.
    Raises:
      ValueError: a tensor is missing, unexpected, or has the wrong shape (named, with
        its file when `sources` has it).
    """
    dtype = resolve_dtype(dtype)
    put = (lambda value, dt=None: np.asarray(value, dtype=dt)) if on_host else jnp.asarray
    names, shapes, quantized = _check_hf_tensors(tensors, config, quantization, sources)
    native_shapes = None
    if quantization is not None and quantization.fmt is not None:
        native_shapes = param_shapes(config, dtype, quantization.fmt)
    floats = {name: tensor for name, tensor in names.items() if name not in quantized}
    params: dict = {}
    int4_layers = {}
    for name, prefix in quantized.items():
        path = names[name].path
        expected = get_path(native_shapes if native_shapes is not None else shapes, path[:-1])
        layer = _int4_layer(tensors, prefix, quantization, expected)
        int4_layers[prefix] = layer
        set_path(params, path[:-1], layer)
    stacked: dict = {}  # MoE parameter path -> [E, ...] host array being filled
    for name, (path, transpose, expert) in floats.items():
        value = np.asarray(tensors[name])
        if transpose:
            value = value.T
        if expert is None:
            set_path(params, path, put(value, dtype))
            continue
        if path not in stacked:
            stacked[path] = np.empty(get_path(shapes, path).shape, np.dtype(dtype))
        stacked[path][expert] = value
    for path, value in stacked.items():
        set_path(params, path, put(value))
    if quantization is not None and quantization.checkpoint_format != quant_format.NATIVE:
        quant_format.finalize_gptq_layers(int4_layers)
    for layer in int4_layers.values():
        for key in [k for k in layer if k != "bias"]:
            layer[key] = put(layer[key])
    return params


def hf_tensors_from_params(params: Mapping[str, Any], config: ModelConfig,
                           checkpoint_format: str = quant_format.NATIVE) -> dict[str, np.ndarray]:
    """The inverse mapping: parameters -> HF-named numpy tensors ([out, in] linears).

    Int4 layers are written in `checkpoint_format` ("jaxinfer", "gptq" or "gptq_v2").
    """
    if checkpoint_format not in quant_format.CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: {checkpoint_format!r} is not one of {quant_format.CHECKPOINT_FORMATS}")
    tensors, host_stacks = {}, {}  # host_stacks: MoE path -> the [E, ...] array, fetched once
    for name, (path, transpose, expert) in _hf_names(config).items():
        if path[-1] == "kernel" and "packed" in get_path(params, path[:-1]):
            layer = get_path(params, path[:-1])
            prefix = name[:-len(".weight")]
            host = {k: np.asarray(jax.device_get(v)) for k, v in layer.items() if k != "bias"}
            if checkpoint_format == quant_format.NATIVE:
                tensors.update({f"{prefix}.{quant_format.NATIVE_SUFFIXES[k]}": v for k, v in host.items()})
            else:
                converted = quant_format.int4_to_gptq(prefix, host, checkpoint_format)
                tensors.update({f"{prefix}.{k}": v for k, v in converted.items()})
            continue
        if expert is None:
            value = np.asarray(jax.device_get(get_path(params, path)))
        else:
            if path not in host_stacks:
                host_stacks[path] = np.asarray(jax.device_get(get_path(params, path)))
            value = host_stacks[path][expert]
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    return tensors


def hf_config_for_params(hf_config: Mapping[str, Any], params, checkpoint_format: str = quant_format.NATIVE) -> dict:
    """`hf_config` with a `quantization_config` that describes `params` (none if float)."""
    out = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    fmt = quant_format.int4_format_of(params)
    if fmt is not None:
        out["quantization_config"] = quant_format.quantization_config(fmt, checkpoint_format)
    return out


# ---------------------------------------------------------------------------- folders

def _read_json(path: str):
    """A JSON file's value; ValueError naming the file when it does not parse."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def read_model_config(path: str) -> tuple[dict, ModelConfig]:
    """(config.json as a dict, its ModelConfig); a config jaxinfer cannot take is a
    ValueError naming the file."""
    hf = read_hf_config(path)
    try:
        return hf, registry.model_config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None


def read_hf_config(path: str) -> dict:
    """config.json of a model folder as a dict (ValueError naming the file otherwise)."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path}: no config.json (not an HF model folder)")
    hf = _read_json(resolve_in_folder(path, "config.json", "config file"))
    if not isinstance(hf, dict):
        raise ValueError(f"{config_path}: must hold a JSON object, got {type(hf).__name__}")
    return hf


def checkpoint_quantization(hf_config: Mapping[str, Any]) -> Optional[CheckpointQuantization]:
    """The parsed `quantization_config` of a config.json, or None for a float checkpoint."""
    qc = hf_config.get("quantization_config")
    return None if qc is None else quant_format.parse_quantization_config(qc)


def load_params(path: str, config: ModelConfig, dtype="float32",
                quantization: Optional[CheckpointQuantization] = None, on_host: bool = False) -> dict:
    """Loads the parameters of an HF folder or of a folder converted to orbax.

    `quantization` (from `checkpoint_quantization`) says how int4 layers are stored.
    """
    if os.path.isdir(os.path.join(path, ORBAX_DIR)):
        if quantization is not None and quantization.fmt is None:
            raise ValueError(f"{path}: orbax params with a GPTQ quantization_config; orbax folders store "
                             f"jaxinfer's own int4 layout")
        return load_orbax_params(os.path.join(path, ORBAX_DIR), config, dtype,
                                 quantization.fmt if quantization is not None else None)
    tensors, sources = _map_weight_files(path)
    return params_from_hf_tensors(tensors, config, dtype, quantization, sources, on_host)


def load_model(path: str, dtype="float32", on_host: bool = False) -> tuple[ModelConfig, dict, dict]:
    """Returns (ModelConfig, params, the raw HF config dict) of a model folder.

    A quantized folder (int4 `quantization_config`) gives the int4 parameter tree;
    `on_host` keeps an HF folder's leaves in numpy (orbax folders restore to the device).
    """
    hf_config, config = read_model_config(path)
    if recursive.is_recursive(hf_config):  # shared block + per-loop LoRA, merged per loop
        return config, recursive.load_unrolled(path, hf_config, config, resolve_dtype(dtype), on_host), hf_config
    return config, load_params(path, config, dtype, checkpoint_quantization(hf_config), on_host), hf_config


def save_hf_folder(path: str, params: Mapping[str, Any], config: ModelConfig, hf_config: Mapping[str, Any],
                   max_shard_bytes: int | None = None, checkpoint_format: str = quant_format.NATIVE) -> None:
    """Writes config.json and model.safetensors (or shards + index) that HF can load.

    Int4 parameters are written in `checkpoint_format` ("jaxinfer", or "gptq" / "gptq_v2"
    for HF GPTQ), with the matching `quantization_config` in config.json.
    """
    os.makedirs(path, exist_ok=True)
    tensors = hf_tensors_from_params(params, config, checkpoint_format)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_for_params(hf_config, params, checkpoint_format), f, indent=2)
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


def save_orbax_folder(path: str, params: Mapping[str, Any], hf_config: Mapping[str, Any]) -> None:
    """Writes config.json (with a `quantization_config` for int4 params) and orbax_params/."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config_for_params(hf_config, params), f, indent=2)
    save_orbax_params(os.path.join(path, ORBAX_DIR), params)


def _check_stored_shapes(path: str, stored, target) -> None:
    """Names the first parameter that is missing, unexpected or misshapen in an orbax folder."""
    def shapes(tree):
        return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    have, want = shapes(stored), shapes(target)
    for name in want:
        if name not in have:
            raise ValueError(f"{path}: orbax params lack {name} that the model config needs")
        if have[name] != want[name]:
            raise ValueError(f"{path}: orbax param {name} has shape {have[name]}, the config needs {want[name]}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{path}: unexpected orbax params: {', '.join(extra[:10])}")


def load_orbax_params(path: str, config: ModelConfig, dtype="float32", quant: Optional[Int4Format] = None) -> dict:
    """Restores orbax params; float leaves in `dtype`, int4 layers (`quant`) in their own dtypes."""
    import orbax.checkpoint as ocp
    dtype = resolve_dtype(dtype)
    target = param_shapes(config, dtype, quant)
    with ocp.StandardCheckpointer() as ckptr:
        metadata = ckptr.metadata(os.path.abspath(path))
        stored = getattr(metadata, "item_metadata", metadata)
        stored = dict(getattr(stored, "tree", stored))
        _check_stored_shapes(path, stored, target)
        restored = ckptr.restore(os.path.abspath(path), target)
    return jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), restored, target)
