"""Quantizes a model's parameter tree to int4: round-to-nearest or GPTQ.

Where it sits: session.from_pretrained(quantization=...) (or scripts) -> **quantize**
-> a parameter tree in which every linear layer holds int4 weights (the format of
jaxinfer.models.layers.Int4Format) -> runner, which runs it unchanged.

Which layers: every Linear of the decoder (q/k/v/o, gate/up/down projections), i.e.
every parameter dict holding a 2-D `kernel`, except the LM head unless
`QuantConfig.quantize_lm_head`. Embeddings and norms stay float (in `dtype`).

GPTQ runs the calibration tokens through the model one decoder layer at a time
("true sequential", as in the GPTQ reference code): the layer's input comes from the
already-quantized earlier layers, and inside the layer the projections are quantized
in execution order, (q, k, v) -> o -> (gate, up) -> down, each stage's Hessian being
collected with the previous stages already quantized. Inputs are captured by the
`intermediates` each Linear sows (see jaxinfer.models.layers.Linear).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import progress as progress_bars
from jaxinfer.config import ModelConfig
from jaxinfer.models.checkpoint import get_path, set_path
from jaxinfer.models.layers import RMSNorm
from jaxinfer.models.transformer import AttentionMetadata, DecoderLayer, embed
from jaxinfer.quant import calibration, gptq, rtn
from jaxinfer.quant.config import QuantConfig

# Accepted `quantization` values ("int4" = round to nearest); `quantize` is their one dispatch point.
QUANTIZATIONS = ("int4", "int4-gptq")
_GPTQ = "int4-gptq"
# Execution order of a decoder layer's projections: GPTQ quantizes one stage at a time.
_STAGES = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
           ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
LM_HEAD = "lm_head"


def _linear_paths(tree, prefix=()) -> list:
    """Paths of every Linear (a dict holding a 2-D `kernel`) in a parameter tree."""
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            kernel = value.get("kernel")
            if kernel is not None and getattr(kernel, "ndim", 0) == 2:
                paths.append(prefix + (key,))
            else:
                paths.extend(_linear_paths(value, prefix + (key,)))
    return paths


def is_quantized(params) -> bool:
    """Whether any layer of the tree holds int4 weights."""
    return any("packed" in d for d in _walk_dicts(params))


def _walk_dicts(tree):
    yield tree
    for value in tree.values():
        if isinstance(value, dict):
            yield from _walk_dicts(value)


def _copy_tree(tree):
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _cast(tree, dtype):
    """Float leaves to dtype, except the scales / zeros of int4 layers (float32 by format)."""
    is_int4 = "packed" in tree
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _cast(value, dtype)
        elif is_int4 and key != "bias":
            out[key] = jnp.asarray(value)
        elif jnp.issubdtype(jnp.asarray(value).dtype, jnp.floating):
            out[key] = jnp.asarray(value, dtype)
        else:
            out[key] = jnp.asarray(value)
    return out


def quantized_linear_paths(params, config: QuantConfig) -> list:
    """The layers `quantize` converts; validates the group size against each of them.

    Raises:
      ValueError: the tree is already quantized, the LM head is asked for but tied to the
        embeddings, or the group size does not divide a layer's input features (named).
    """
    if is_quantized(params):
        raise ValueError("quantization: the parameters are already int4; load the folder without `quantization`")
    paths = [p for p in _linear_paths(params) if config.quantize_lm_head or p != (LM_HEAD,)]
    if config.quantize_lm_head and (LM_HEAD,) not in paths:
        raise ValueError("quantize_lm_head: this model ties its LM head to the embedding table, which stays in "
                         "the model dtype")
    for path in paths:
        num_in = get_path(params, path)["kernel"].shape[0]
        if num_in % config.group_size:
            raise ValueError(f"group_size: {config.group_size} does not divide the {num_in} input features of "
                             f"layer {'/'.join(path)}; pick a group size that divides every layer's in_features")
    return paths


def quantize(model_config: ModelConfig, params, quantization: str, config: Optional[QuantConfig] = None, *,
             calibration_tokens: Optional[np.ndarray] = None, dtype=jnp.float32,
             progress: Optional[bool] = None) -> dict:
    """Quantizes every linear layer of `params` to group-wise int4.

    Args:
      model_config: the model shape.
      params: float parameter tree (any float dtype; quantization works in float64/32).
      quantization: "int4" (round to nearest) or "int4-gptq" (GPTQ).
      config: group size, symmetric or not, GPTQ knobs; None = QuantConfig().
      calibration_tokens: [S, C] int token ids (GPTQ only), e.g. from
        jaxinfer.quant.calibration_token_ids; C must fit the model's context.
      dtype: dtype of the leaves left float (embeddings, norms, biases).
      progress: GPTQ's bar over decoder layers (None = on a terminal or in Jupyter,
        unless JAXINFER_PROGRESS=0; see jaxinfer.progress).
    Returns:
      A new parameter tree: quantized layers hold packed, scales and, when asymmetric,
      zeros, and with GPTQ act order perm (see jaxinfer.models.layers.Int4Format); the
      rest is cast to dtype.
    Raises:
      ValueError: an invalid argument (named), see also `quantized_linear_paths`.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: {quantization!r} is not supported; choose one of {QUANTIZATIONS} or None")
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ValueError(f"quantization_config: expected a QuantConfig, got {type(config).__name__}")
    paths = quantized_linear_paths(params, config)
    if quantization == _GPTQ:
        tokens = _check_calibration(model_config, calibration_tokens)
        out = _quantize_gptq(model_config, params, paths, config, tokens, progress)
    else:
        out = _copy_tree(params)
        for path in paths:
            layer = get_path(params, path)
            codes, scales, zeros = rtn.quantize_rtn(np.asarray(layer["kernel"], np.float32), config.group_size,
                                                    config.symmetric)
            set_path(out, path, _with_bias(rtn.linear_params(codes, scales, zeros, config.group_size), layer))
    return _cast(out, dtype)


def quantize_pretrained(model_config: ModelConfig, params, quantization: str, config: Optional[QuantConfig] = None,
                        *, model_dir: str, tokenizer=None, dtype=jnp.float32,
                        progress: Optional[bool] = None) -> dict:
    """`quantize` for the parameters of a model folder.

    GPTQ calibrates on the built-in text (jaxinfer.quant.calibration: Python stdlib
    source, the "train" files of the folder's data_split.json when there is one),
    tokenized with the folder's tokenizer.

    Args:
      model_config, params, quantization, config, dtype, progress: as for `quantize`.
      model_dir: the folder the parameters come from.
      tokenizer: its jaxinfer Tokenizer (None = load it from model_dir when GPTQ needs it).
    Raises:
      ValueError: as `quantize`; also GPTQ on a folder without a tokenizer.
    """
    config = QuantConfig() if config is None else config
    if not isinstance(config, QuantConfig):
        raise ValueError(f"quantization_config: expected a QuantConfig, got {type(config).__name__}")
    quantized_linear_paths(params, config)  # fail fast, before any calibration work
    tokens = None
    if quantization == _GPTQ:
        if tokenizer is None:
            from jaxinfer.models.tokenizer import load_tokenizer
            tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise ValueError(f"quantization: {_GPTQ!r} calibrates on built-in text and needs a tokenizer, but "
                             f"{model_dir} has none; call quantize(calibration_tokens=...) instead")
        length = min(config.calibration_length, model_config.max_position_embeddings)
        tokens = calibration.calibration_token_ids(tokenizer, model_dir, config.num_calibration_sequences, length)
    return quantize(model_config, params, quantization, config, calibration_tokens=tokens, dtype=dtype,
                    progress=progress)


def _with_bias(quantized: dict, layer: dict) -> dict:
    if "bias" in layer:
        quantized["bias"] = layer["bias"]
    return quantized


def _check_calibration(model_config: ModelConfig, tokens) -> np.ndarray:
    if tokens is None:
        raise ValueError("calibration_tokens: GPTQ needs calibration token ids [sequences, length]")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"calibration_tokens: expected a non-empty int array [sequences, length], got "
                         f"{tokens.dtype} {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
        raise ValueError(f"calibration_tokens: ids must lie in [0, {model_config.vocab_size})")
    if tokens.shape[1] > model_config.max_position_embeddings:
        raise ValueError(f"calibration_tokens: length {tokens.shape[1]} exceeds the model's context of "
                         f"{model_config.max_position_embeddings}")
    return tokens.astype(np.int32)


# ---------------------------------------------------------------------------- GPTQ driver

def _layer_runner(model_config: ModelConfig, layer: int, batch: int, length: int):
    """jit(params, x [B * C, D]) -> (layer output [B * C, D], X^T X of every Linear's input)."""
    module = DecoderLayer(model_config, layer, jnp.float32, jnp.float32)
    positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)  # [B * C]
    metadata = AttentionMetadata.dense(batch, length)

    @jax.jit
    def run(layer_params, x):
        (out, _), state = module.apply({"params": layer_params}, x, positions, None, metadata,
                                       mutable=["intermediates"])
        grams = jax.tree.map(lambda a: a.T @ a, state["intermediates"])  # {module: {proj: {"inputs": ([K, K],)}}}
        return out, grams
    return run


def _gptq_layer(layer_params: dict, grams: dict, num_tokens: int, module: str, proj: str, config: QuantConfig):
    """GPTQ of one projection; returns (its int4 params, its dequantized float kernel)."""
    (gram,) = grams[module][proj]["inputs"]
    hessian = 2.0 * np.asarray(gram, np.float64) / num_tokens
    kernel = np.asarray(layer_params[module][proj]["kernel"], np.float32)
    codes, scales, zeros, perm = gptq.gptq_quantize(
        kernel, hessian, group_size=config.group_size, symmetric=config.symmetric,
        damp_percent=config.damp_percent, block_size=config.block_size, act_order=config.act_order)
    quantized = rtn.linear_params(codes, scales, zeros, config.group_size, perm)
    return quantized, rtn.dequantize_linear(quantized)


def _quantize_gptq(model_config: ModelConfig, params, paths: list, config: QuantConfig, tokens: np.ndarray,
                   progress: Optional[bool] = None):
    num_seqs, length = tokens.shape
    batch = min(config.calibration_batch_size, num_seqs)
    num_batches = num_seqs // batch  # a ragged last batch is dropped: one compiled shape per layer
    num_tokens = num_batches * batch * length
    float_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    embedding = float_params["embed_tokens"]
    hidden = [embed(model_config, embedding, jnp.asarray(tokens[b * batch:(b + 1) * batch].reshape(-1)), jnp.float32)
              for b in range(num_batches)]  # each [B * C, D]
    out = _copy_tree(params)
    wanted = set(paths)
    bar = progress_bars.bar(model_config.num_layers + ((LM_HEAD,) in wanted), "GPTQ", "layer", enabled=progress)
    for layer in range(model_config.num_layers):
        name = f"layers_{layer}"
        layer_params = _copy_tree(float_params[name])
        run = _layer_runner(model_config, layer, batch, length)
        for module, projs in _STAGES:
            projs = [p for p in projs if (name, module, p) in wanted]
            if not projs:
                continue
            grams = None
            for x in hidden:
                _, g = run(layer_params, x)
                grams = g if grams is None else jax.tree.map(jnp.add, grams, g)
            for proj in projs:
                quantized, dequantized = _gptq_layer(layer_params, grams, num_tokens, module, proj, config)
                set_path(out, (name, module, proj), _with_bias(quantized, params[name][module][proj]))
                layer_params[module][proj]["kernel"] = jnp.asarray(dequantized)
        hidden = [run(layer_params, x)[0] for x in hidden]  # the next layer sees the quantized layer's output
        bar.update(1)
    if (LM_HEAD,) in wanted:
        norm = RMSNorm(model_config.rms_norm_eps, model_config.norm_weight_offset, jnp.float32, jnp.float32)
        final = jax.jit(lambda p, x: norm.apply({"params": p}, x))
        gram = sum(np.asarray(y.T @ y, np.float64) for y in (final(float_params["norm"], x) for x in hidden))
        grams = {LM_HEAD: {LM_HEAD: {"inputs": (gram,)}}}
        quantized, _ = _gptq_layer({LM_HEAD: {LM_HEAD: float_params[LM_HEAD]}}, grams, num_tokens, LM_HEAD,
                                   LM_HEAD, config)
        out[LM_HEAD] = quantized
        bar.update(1)
    bar.close()
    missed = wanted - {p for p in paths if "packed" in get_path(out, p)}
    if missed:
        raise ValueError(f"quantization: GPTQ does not know the execution order of layer(s) "
                         f"{sorted('/'.join(p) for p in missed)}")
    return out
