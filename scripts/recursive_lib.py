"""Relaxed Recursive Transformers: conversion of a Llama-family model, folder I/O, reference forward.

Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA" (arXiv 2410.20672). A pretrained model of L layers becomes a block of B
shared layers run L/B times ("loops"): original layer i = loop * B + j is replaced by the
shared layer j (§3.1). The *relaxed* model adds, for every loop and every linear
projection of every block layer, a low-rank correction B_l A_l, so that loop l's layer j
computes with W_shared_j + B_l A_l (§3.2). This module holds the pure parts; the command
line, the perplexity evaluation and the summary live in scripts/convert_recursive.py.

Initialisation of the shared block (§3.1), 0-based, with loops = L / B:
  lower          shared j <- layer j (the first B layers).
  stepwise       shared j <- layer j * loops: every loops-th layer from the first, i.e.
                 evenly spaced layers at a fixed interval.
  stepwise_ends  shared j <- layer floor(j * (L - 1) / (B - 1) + 1/2): evenly spaced layers that
                 keep both the first and the last layer. The paper describes Stepwise as
                 picking layers "at specific intervals"; whether its intervals keep the
                 last layer is not settled here (see docs/recursive.md), so both are offered.
  average        shared j <- mean of layers {loop * B + j}: the layers tied to position j.

LoRA initialisation (§3.2): for loop l and block position j, the residual of each linear
weight R = W_{l*B+j} - W_shared_j ([out, in], HF orientation) is factored by truncated
SVD, R ~ U_r S_r V_r^T, with B = U_r S_r ([out, r]) and A = V_r^T ([r, in]). At full
rank (r >= min(out, in); the rank is clamped per matrix to that) the product is R up to
rounding, so the relaxed model reproduces the original model exactly.

Norm weights (and biases, Qwen3's q/k norms: every per-layer vector) follow `norms`:
  per_loop  each loop keeps the original layer's own vectors (2 * D numbers per layer for
            Llama, 0.05% of the tiny model), so a full-rank relaxed model is exact; the
            block then stores no vectors of its own.
  shared    the vectors are shared like the kernels (same init rule): the strict
            Recursive Transformer, where loops differ by nothing but their LoRA.
  auto      per_loop when lora_rank > 0, shared when lora_rank == 0 (a pure Recursive
            Transformer ties every parameter of the block).
The paper relaxes the tied linear layers with LoRA; vectors are too small for low-rank
relaxation, and keeping them per loop costs next to nothing, hence the default.

In-memory layout ("rp", a pytree of arrays):
  rp["outer"]        the untied parameters of jaxinfer's tree: embed_tokens, norm, lm_head.
  rp["block"][j]     flat {"self_attn.q_proj.kernel": [in, out], ...} of shared layer j
                     (jaxinfer orientation), with its vectors when norms == "shared".
  rp["lora"][l][j]   {"self_attn.q_proj": {"A": [r, in], "B": [out, r]}, ...} (empty at r 0).
  rp["per_loop"][l][j]  {"input_layernorm.scale": [D], ...} (empty when norms == "shared").

The reference forward reuses jaxinfer's own layer math: each (loop, j) builds the
merged parameter tree of one jaxinfer DecoderLayer (shared kernels + (B A)^T, the loop's
vectors) and applies it densely (no KV cache); after the loops requested as exits, the
final norm and LM head (tied or not, as the config says) of jaxinfer's `final_logits`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxinfer.models.recursive import (INITS, LORA_TARGETS, NORM_MODES, WEIGHTS_FILE,  # noqa: F401 (re-exported)
                                      RecursiveSpec, expected_tensors, flatten as _flatten, is_target as _is_target,
                                      merged_layer, read_recursive, unflatten as _unflatten, unrolled_params)

SUMMARY_FILE = "conversion_summary.json"
COPIED_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "data_split.json")


def resolve_model_dir(name: str) -> str:
    """A folder path as given, else a bundled model under jaxinfer/assets/ (the --model flag)."""
    if os.path.isdir(name):
        return name
    spec = importlib.util.find_spec("jaxinfer")
    if spec is not None and spec.submodule_search_locations:
        bundled = os.path.join(list(spec.submodule_search_locations)[0], "assets", name)
        if os.path.isdir(bundled):
            return bundled
    raise FileNotFoundError(f"model: {name!r} is neither a folder nor a bundled model in jaxinfer/assets/")


# ---------------------------------------------------------------------------- conversion

def check_supported(config, params: Optional[Mapping] = None) -> None:
    """Refuses what the conversion does not cover: MoE layers and int4 parameters."""
    if getattr(config, "num_experts", 0):
        raise ValueError(f"model: {config.family} has MoE layers; only dense Llama-family models convert")
    if params is not None and any(k.endswith(".packed") for k in _flatten(params.get("layers_0", {}))):
        raise ValueError("model: int4 parameters; convert the float checkpoint")


def lora_init(residual: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [r, in], B [out, r]) with B @ A the best rank-r approximation of residual [out, in].

    Truncated SVD (paper §3.2): B = U_r diag(S_r), A = V_r^T; r is clamped to min(out, in).
    """
    r = min(rank, *residual.shape)
    u, s, vt = np.linalg.svd(residual.astype(np.float64), full_matrices=False)
    return vt[:r].astype(residual.dtype), (u[:, :r] * s[:r]).astype(residual.dtype)


def convert(config, params: Mapping, spec: RecursiveSpec) -> dict:
    """The recursive model (rp, see the module docstring) of a jaxinfer parameter tree."""
    import jax

    check_supported(config, params)
    if spec.num_layers != config.num_layers:
        raise ValueError(f"num_layers: spec has {spec.num_layers}, the config {config.num_layers}")
    host = jax.tree.map(np.asarray, jax.device_get(dict(params)))
    layers = [_flatten(host[f"layers_{i}"]) for i in range(config.num_layers)]
    b = spec.num_blocks
    block = []
    for sources in spec.source_layers():
        shared = {}
        for name, value in layers[0].items():
            if _is_target(name) or spec.norms == "shared":
                stack = np.stack([layers[i][name] for i in sources]).astype(np.float64)
                shared[name] = stack.mean(axis=0).astype(value.dtype)
        block.append(shared)
    lora = [[{} for _ in range(b)] for _ in range(spec.num_loops)]
    per_loop = [[{} for _ in range(b)] for _ in range(spec.num_loops)]
    for loop in range(spec.num_loops):
        for j in range(b):
            original = layers[loop * b + j]
            for name, value in original.items():
                if _is_target(name):
                    if spec.lora_rank:
                        a_mat, b_mat = lora_init((value - block[j][name]).T, spec.lora_rank)
                        lora[loop][j][name[:-len(".kernel")]] = {"A": a_mat, "B": b_mat}
                elif spec.norms == "per_loop":
                    per_loop[loop][j][name] = value.copy()
    outer = {k: v for k, v in host.items() if not k.startswith("layers_")}
    return {"outer": outer, "block": block, "lora": lora, "per_loop": per_loop}


def reconstruction_error(config, params: Mapping, spec: RecursiveSpec, rp: Mapping) -> dict:
    """||W_orig - (W_shared + B A)||_F / ||W_orig||_F over every relaxed linear weight: mean and max."""
    import jax

    errors = []
    for loop in range(spec.num_loops):
        for j in range(spec.num_blocks):
            merged = _flatten(jax.device_get(merged_layer(rp, loop, j)))
            original = _flatten(jax.device_get(params[f"layers_{loop * spec.num_blocks + j}"]))
            for name in merged:
                if _is_target(name):
                    w = np.asarray(original[name], np.float64)
                    errors.append(float(np.linalg.norm(w - np.asarray(merged[name], np.float64)) / np.linalg.norm(w)))
    return {"mean": float(np.mean(errors)), "max": float(np.max(errors))}


def _size(tree) -> int:
    import jax
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def parameter_counts(config, spec: RecursiveSpec, rp: Mapping) -> dict:
    """Parameter counts: original model, and the parts of the recursive one (they sum to total)."""
    from jaxinfer.models.transformer import param_shapes

    counts = {"original": _size(param_shapes(config)), "embedding_and_head": _size(rp["outer"]),
              "shared_block": _size(rp["block"]), "per_loop_vectors": _size(rp["per_loop"]),
              "lora": _size(rp["lora"])}
    counts["total"] = (counts["embedding_and_head"] + counts["shared_block"] + counts["per_loop_vectors"]
                       + counts["lora"])
    counts["total_over_original"] = counts["total"] / counts["original"]
    return counts


# ---------------------------------------------------------------------------- folder I/O

def _get(rp, where):
    node = rp
    for k in where:
        node = node[k]
    return node


def save_recursive(path: str, hf_config: Mapping[str, Any], config, spec: RecursiveSpec, rp: Mapping,
                   source_dir: Optional[str] = None) -> list[str]:
    """Writes config.json (+ "recursive"), model.safetensors and the source's tokenizer files.

    Returns the tensor names written.
    """
    import jax

    os.makedirs(path, exist_ok=True)
    tensors = {}
    view = dict(rp, outer=_flatten(rp["outer"]))
    for name, (where, transpose, _) in expected_tensors(config, spec).items():
        value = np.asarray(jax.device_get(_get(view, where)))
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    from jaxinfer.models.safetensors_reader import write_safetensors
    write_safetensors(os.path.join(path, WEIGHTS_FILE), tensors, {"format": "pt"})
    record = {k: v for k, v in hf_config.items() if k not in ("recursive", "quantization_config")}
    record["recursive"] = spec.section()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(record, f, indent=2)
    if source_dir is not None:
        for name in COPIED_FILES:
            if os.path.exists(os.path.join(source_dir, name)):
                shutil.copy(os.path.join(source_dir, name), os.path.join(path, name))
    return sorted(tensors)


def load_recursive(path: str) -> tuple[Any, dict, RecursiveSpec, dict]:
    """(ModelConfig of the original model, config.json dict, spec, rp) of a converted folder
    (read and checked by jaxinfer.models.recursive)."""
    from jaxinfer.models.checkpoint import read_model_config

    hf, config = read_model_config(path)
    if "recursive" not in hf:
        raise ValueError(f"{path}/config.json: no \"recursive\" section (not written by convert_recursive.py)")
    import jax

    spec, rp = read_recursive(path, hf, config)
    return config, hf, spec, jax.tree.map(np.array, rp)  # writable copies, off the file's memory map


# ---------------------------------------------------------------------------- reference forward

def make_forward(config, spec: RecursiveSpec, exits: Optional[Sequence[int]] = None, dtype: str = "float32"):
    """Jitted f(rp, inputs [S, C] int32) -> {k: logits [S * C, V] float32} after k loops, k in exits.

    Dense causal batch, no KV cache: embeddings, then for each loop and block position j
    the jaxinfer DecoderLayer with merged weights (its `layer` index is the unrolled
    depth loop * B + j, so per-layer attention windows follow the original depth), and
    at each exit jaxinfer's final norm + LM head.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxinfer.models.checkpoint import resolve_dtype
    from jaxinfer.models.transformer import AttentionMetadata, DecoderLayer, embed, final_logits

    exits = tuple(sorted(set(exits or spec.exit_after_loops)))
    if exits[0] < 1 or exits[-1] > spec.num_loops:
        raise ValueError(f"exit_after_loops: {list(exits)} must lie in 1..{spec.num_loops}")
    act = resolve_dtype(dtype)

    class Head(nn.Module):
        """Final norm and LM head, the parameters named as in jaxinfer's Transformer."""
        dtype: Any = act
        param_dtype: Any = act
        init_std: float = 0.02
        quant: Any = None
        mesh: Any = None

        @nn.compact
        def __call__(self, x, embedding):
            return final_logits(self, config, x, embedding, None)

    head = Head()

    @jax.jit
    def forward(rp, inputs, exit_after=None):
        """exit_after: optional [S * C] int32, the loops each position ran before it exited
        (num_loops = none): from then on the position's K/V come from its exit hidden
        state (CALM's state propagation, the engine's "copy" fill)."""
        batch, length = inputs.shape
        positions = jnp.tile(jnp.arange(length, dtype=jnp.int32), batch)
        metadata = AttentionMetadata.dense(batch, length)
        embedding = rp["outer"]["embed_tokens"]
        x = embed(config, embedding, inputs.reshape(-1), act)
        head_params = {k: v for k, v in rp["outer"].items() if k in ("norm", "lm_head")}
        logits = {}
        h_exit = x
        for loop in range(exits[-1]):
            for j in range(spec.num_blocks):
                if exit_after is not None:
                    x = jnp.where((exit_after <= loop)[:, None], h_exit, x)
                layer = DecoderLayer(config, loop * spec.num_blocks + j, act, act)
                x, _ = layer.apply({"params": merged_layer(rp, loop, j)}, x, positions, None, metadata)
            if exit_after is not None:
                h_exit = jnp.where((exit_after == loop + 1)[:, None], x, h_exit)
            if loop + 1 in exits:
                logits[loop + 1] = head.apply({"params": head_params}, x, embedding)
        return logits

    return forward


def greedy_tokens(config, spec: RecursiveSpec, rp: Mapping, prompt: Sequence[int], max_tokens: int,
                  exit_threshold: Optional[float] = None, kv_fill: str = "compute", with_logprobs: bool = False):
    """The greedy continuation of prompt by the full recursive model's dense forward (the
    engine's oracle: no KV cache, the whole sequence re-run per token).

    With `exit_threshold`, each token after the first (whose fed token is a generated one:
    the engine's rule) is the argmax of the first exit (after k loops, k in
    exit_after_loops, k < num_loops) whose max probability is >= the threshold, else of the
    last loop's logits. kv_fill "compute": every fed token still runs all loops (exact
    K/V); "copy": a fed token that exited after k loops gives the deeper layers its exit
    hidden state (the engine's EngineConfig.early_exit_kv_fill). `with_logprobs`: returns
    (tokens, log p of each under the distribution it was taken from).
    """
    import jax.numpy as jnp

    exits = (spec.num_loops,) if exit_threshold is None else tuple(sorted({*spec.exit_after_loops, spec.num_loops}))
    forward = make_forward(config, spec, exits)
    tokens, ran = list(prompt), [spec.num_loops] * len(prompt)  # loops each fed position ran
    logprobs = []
    width = len(prompt) + max_tokens  # one compiled shape: the causal forward ignores the padding after
    for step in range(max_tokens):
        last = len(tokens) - 1
        out = forward(rp, jnp.asarray([tokens + [0] * (width - len(tokens))], jnp.int32),
                      jnp.asarray(ran + [spec.num_loops] * (width - len(ran)), jnp.int32)
                      if kv_fill == "copy" else None)
        chosen, loops = out[spec.num_loops], spec.num_loops
        for k in exits[:-1] if exit_threshold is not None and step > 0 else ():
            row = np.asarray(out[k], np.float64)[last]
            if 1.0 / np.exp(row - row.max()).sum() >= exit_threshold:
                chosen, loops = out[k], k
                break
        ran[-1] = loops
        row = np.asarray(chosen, np.float64)[last]
        tokens.append(int(np.argmax(row)))
        logprobs.append(float(row.max() - row.max() - np.log(np.exp(row - row.max()).sum())))
        ran.append(spec.num_loops)
    return (tokens[len(prompt):], logprobs) if with_logprobs else tokens[len(prompt):]


def exit_nll_fns(config, spec: RecursiveSpec, rp: Mapping, exits: Optional[Sequence[int]] = None,
                 dtype: str = "float32") -> dict:
    """{k: stdlib_corpus.NllFn of the recursive model exiting after k loops} for k in exits.

    One forward pass per batch computes every exit; its NLLs are kept (keyed by the
    batch's bytes), so scoring the same windows once per exit runs the model once.
    """
    import jax
    import jax.numpy as jnp

    exits = tuple(sorted(set(exits or spec.exit_after_loops)))
    forward = make_forward(config, spec, exits, dtype)
    rp = jax.tree.map(jnp.asarray, rp)

    @jax.jit
    def nll(rp, inputs, targets):
        out = {}
        for k, logits in forward(rp, inputs).items():
            logp = jax.nn.log_softmax(logits, axis=-1)
            out[k] = -jnp.take_along_axis(logp, targets.reshape(-1, 1), axis=-1)[:, 0].reshape(inputs.shape)
        return out

    cache: dict = {}

    def for_exit(k):
        def fn(inputs, targets):
            key = (np.asarray(inputs).tobytes(), np.asarray(targets).tobytes(), np.shape(inputs))
            if key not in cache:
                cache[key] = jax.device_get(nll(rp, jnp.asarray(inputs), jnp.asarray(targets)))
            return np.asarray(cache[key][k])
        return fn

    return {k: for_exit(k) for k in exits}
