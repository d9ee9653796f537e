"""Relaxed Recursive Transformer folders: the format, its checks, and loading for the engine.

Bae et al. 2024, "Relaxed Recursive Transformers: Effective Parameter Sharing with
Layer-wise LoRA" (arXiv 2410.20672). A model of L layers becomes a block of B shared
layers run L / B times ("loops"): original layer i = loop * B + j is computed by shared
layer j (§3.1); the *relaxed* model adds, per loop and per linear projection of every
block layer, a low-rank correction B_l A_l, so loop l's layer j computes with
W_shared_j + B_l A_l (§3.2). `scripts/convert_recursive.py` writes such folders from an
HF Llama-family model (conversion, SVD init, perplexity: scripts/recursive_lib.py).

Folder format: an HF folder whose config.json describes the original model plus a
"recursive" section ({"num_blocks", "num_loops", "init", "lora_rank", "lora_targets",
"exit_after_loops", "norms", "source_layers"}) and one model.safetensors holding:
  model.embed_tokens.weight, model.norm.weight, lm_head.weight (unless tied);
  model.layers.{j}.{proj}.weight            the shared kernels of block layer j ([out, in]);
  model.layers.{j}.{proj}.lora.{l}.A / .B    loop l's LoRA ([r, in] and [out, r]);
  model.layers.{j}.{vector}.loop.{l}.weight  loop l's own norm vectors (norms "per_loop"),
  or model.layers.{j}.{vector}.weight       shared ones (norms "shared").

In memory ("rp", a pytree of arrays, jaxinfer orientation: kernels [in, out]):
  rp["outer"]            embed_tokens, norm, lm_head (jaxinfer's tree);
  rp["block"][j]         flat {"self_attn.q_proj.kernel": ..., ...} of shared layer j;
  rp["lora"][l][j]       {"self_attn.q_proj": {"A": [r, in], "B": [out, r]}, ...};
  rp["per_loop"][l][j]   {"input_layernorm.scale": [D], ...}.

Serving, two ways (docs/recursive.md). Depth-wise (the default): the shared block and the
LoRA stay as they are (`read_recursive`) and one call of the block per step carries tokens
at different loops (models/recursive_block.py, runtime/depthwise_runner.py,
engine/depthwise.py). Unrolled (`EngineConfig(depthwise_batching=False)`, or a setting
depth-wise batching cannot run with): `load_unrolled` gives every (loop, j) merged
weights W_shared_j + (B_l A_l)^T, so the engine sees a plain L-layer model and every
engine feature (TP/PP, int4, speculation) applies unchanged, at L layers of memory.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from jaxinfer.config import ModelConfig

LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
INITS = ("stepwise", "average", "lower", "stepwise_ends")
NORM_MODES = ("auto", "shared", "per_loop")
WEIGHTS_FILE = "model.safetensors"
SECTION = "recursive"


@dataclasses.dataclass(frozen=True)
class RecursiveSpec:
    """Shape of the recursive model; every field is validated (ValueError naming the field)."""

    num_layers: int  # L of the original model
    num_blocks: int  # B: shared layers per loop
    init: str  # one of INITS
    lora_rank: int  # r; 0 = pure Recursive Transformer
    norms: str = "auto"  # one of NORM_MODES; "auto" is resolved in __post_init__
    exit_after_loops: tuple = ()  # loop counts with early-exit logits; () = every loop count

    def __post_init__(self):
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(f"num_blocks: must be a positive int, got {self.num_blocks!r}")
        if self.num_layers % self.num_blocks:
            raise ValueError(f"num_blocks: {self.num_blocks} does not divide the model's {self.num_layers} "
                             f"layers (num_hidden_layers); choose one of "
                             f"{[b for b in range(1, self.num_layers + 1) if self.num_layers % b == 0]}")
        if self.init not in INITS:
            raise ValueError(f"init: {self.init!r} is not one of {', '.join(INITS)}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise ValueError(f"lora_rank: must be an int >= 0 (0 = no LoRA), got {self.lora_rank!r}")
        if self.norms not in NORM_MODES:
            raise ValueError(f"norms: {self.norms!r} is not one of {', '.join(NORM_MODES)}")
        if self.norms == "auto":
            object.__setattr__(self, "norms", "per_loop" if self.lora_rank > 0 else "shared")
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in self.exit_after_loops):
            raise ValueError(f"exit_after_loops: must be ints, got {list(self.exit_after_loops)!r}")
        exits = tuple(sorted(set(self.exit_after_loops))) or tuple(range(1, self.num_loops + 1))
        if exits[0] < 1 or exits[-1] > self.num_loops:
            raise ValueError(f"exit_after_loops: {list(exits)} must lie in 1..{self.num_loops} (the number of loops)")
        object.__setattr__(self, "exit_after_loops", exits)

    @property
    def num_loops(self) -> int:
        return self.num_layers // self.num_blocks

    def source_layers(self) -> list[list[int]]:
        """For each block position j, the original layers its shared weights come from."""
        b, loops, n = self.num_blocks, self.num_loops, self.num_layers
        if self.init == "lower":
            return [[j] for j in range(b)]
        if self.init == "stepwise":
            return [[j * loops] for j in range(b)]
        if self.init == "stepwise_ends":
            return [[0]] if b == 1 else [[int(np.floor(j * (n - 1) / (b - 1) + 0.5))] for j in range(b)]
        return [[loop * b + j for loop in range(loops)] for j in range(b)]

    def section(self) -> dict:
        """The "recursive" entry of config.json."""
        return {"num_blocks": self.num_blocks, "num_loops": self.num_loops, "init": self.init,
                "lora_rank": self.lora_rank, "lora_targets": list(LORA_TARGETS) if self.lora_rank else [],
                "exit_after_loops": list(self.exit_after_loops), "norms": self.norms,
                "source_layers": self.source_layers()}


def is_recursive(hf_config: Mapping[str, Any]) -> bool:
    """True when a config.json dict describes a recursive folder."""
    return SECTION in hf_config


def spec_from_config(hf_config: Mapping[str, Any], config: ModelConfig, where: str = "config.json") -> RecursiveSpec:
    """The RecursiveSpec of a config.json dict; a bad section is a ValueError naming `where` and the field."""
    section = hf_config.get(SECTION)
    if not isinstance(section, Mapping):
        raise ValueError(f"{where}: \"{SECTION}\" must be a JSON object, got {type(section).__name__}")
    if config.num_experts:
        raise ValueError(f"{where}: {SECTION}: MoE models ({config.family}) have no recursive form")
    for key in ("num_blocks", "num_loops", "init", "lora_rank", "norms"):
        if key not in section:
            raise ValueError(f"{where}: {SECTION}.{key} is missing")
    try:
        spec = RecursiveSpec(config.num_layers, section["num_blocks"], section["init"], section["lora_rank"],
                             section["norms"], tuple(section.get("exit_after_loops") or ()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {SECTION}.{e}") from None
    if section["num_loops"] != spec.num_loops:
        raise ValueError(f"{where}: {SECTION}.num_loops {section['num_loops']!r} != num_hidden_layers / "
                         f"num_blocks = {spec.num_loops}")
    return spec


# ------------------------------------------------------------------- names and shapes

def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def unflatten(flat: Mapping) -> dict:
    """The nested dict of {"a.b.c": leaf}."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def is_target(name: str) -> bool:
    """True for the kernel of a projection that has a LoRA (a flat jaxinfer key)."""
    return name.endswith(".kernel") and name[:-len(".kernel")] in LORA_TARGETS


def _hf_name(key: str) -> tuple[str, bool]:
    """jaxinfer flat key -> (HF suffix, stored transposed): kernel/scale -> weight."""
    *path, leaf = key.split(".")
    if leaf == "kernel":
        return ".".join(path) + ".weight", True
    return ".".join(path) + (".bias" if leaf == "bias" else ".weight"), False


def expected_tensors(config: ModelConfig, spec: RecursiveSpec) -> dict:
    """HF tensor name -> (where in rp, transposed, shape in the file) for a config and spec."""
    from jaxinfer.models.transformer import param_shapes

    shapes = flatten(param_shapes(config))
    outer = {"embed_tokens": ("model.embed_tokens.weight", False), "norm.scale": ("model.norm.weight", False)}
    if not config.tie_word_embeddings:
        outer["lm_head.kernel"] = ("lm_head.weight", True)
    out = {}
    for key, (name, transpose) in outer.items():
        shape = tuple(shapes[key].shape)
        out[name] = (("outer", key), transpose, shape[::-1] if transpose else shape)
    layer = {k[len("layers_0."):]: tuple(v.shape) for k, v in shapes.items() if k.startswith("layers_0.")}
    for j in range(spec.num_blocks):
        for key, shape in layer.items():
            suffix, transpose = _hf_name(key)
            file_shape = shape[::-1] if transpose else shape
            if is_target(key) or spec.norms == "shared":
                out[f"model.layers.{j}.{suffix}"] = (("block", j, key), transpose, file_shape)
            for loop in range(spec.num_loops):
                if is_target(key) and spec.lora_rank:
                    r = min(spec.lora_rank, *shape)
                    target = key[:-len(".kernel")]
                    out[f"model.layers.{j}.{target}.lora.{loop}.A"] = (("lora", loop, j, target, "A"), False,
                                                                      (r, shape[0]))
                    out[f"model.layers.{j}.{target}.lora.{loop}.B"] = (("lora", loop, j, target, "B"), False,
                                                                      (shape[1], r))
                elif not is_target(key) and spec.norms == "per_loop":
                    stem, ext = suffix.rsplit(".", 1)
                    out[f"model.layers.{j}.{stem}.loop.{loop}.{ext}"] = (("per_loop", loop, j, key), False, file_shape)
    return out


# ------------------------------------------------------------------- reading

def read_recursive(path: str, hf_config: Mapping[str, Any], config: ModelConfig) -> tuple[RecursiveSpec, dict]:
    """(spec, rp) of a recursive folder; numpy leaves over the file's memory map.

    Every tensor's name, dtype and shape is checked against the spec from the
    safetensors header before any data is read: a ValueError names the file and tensor.
    """
    from jaxinfer.models.safetensors_reader import read_header, read_safetensors

    spec = spec_from_config(hf_config, config, os.path.join(path, "config.json"))
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: a recursive folder keeps its weights in one {WEIGHTS_FILE}")
    header, _, _ = read_header(file)
    expected = expected_tensors(config, spec)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{file}: tensors do not match config.json's {SECTION} section: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, (_, _, shape) in expected.items():
        if tuple(header[name]["shape"]) != shape:
            raise ValueError(f"{file}: tensor {name} has shape {tuple(header[name]['shape'])}, expected {shape}")
        if header[name]["dtype"] not in ("F32", "F16", "BF16"):
            raise ValueError(f"{file}: tensor {name} has dtype {header[name]['dtype']}; expected a float dtype")
    tensors = read_safetensors(file)
    rp: dict = {"outer": {}, "block": [{} for _ in range(spec.num_blocks)],
                "lora": [[{} for _ in range(spec.num_blocks)] for _ in range(spec.num_loops)],
                "per_loop": [[{} for _ in range(spec.num_blocks)] for _ in range(spec.num_loops)]}
    for name, (where, transpose, _) in expected.items():
        value = tensors[name].T if transpose else tensors[name]
        if where[0] == "outer":
            rp["outer"][where[1]] = value
        elif where[0] == "block":
            rp["block"][where[1]][where[2]] = value
        elif where[0] == "per_loop":
            rp["per_loop"][where[1]][where[2]][where[3]] = value
        else:
            rp["lora"][where[1]][where[2]].setdefault(where[3], {})[where[4]] = value
    rp["outer"] = unflatten(rp["outer"])
    return spec, rp


def merged_layer(rp: Mapping, loop: int, j: int) -> dict:
    """jaxinfer DecoderLayer parameters of block layer j in `loop`: shared + (B A)^T, its vectors.

    Works on numpy and on traced jax arrays alike (the product at full float32 precision).
    """
    import jax
    import jax.numpy as jnp

    flat = dict(rp["block"][j])
    flat.update(rp["per_loop"][loop][j])
    for target, ab in rp["lora"][loop][j].items():
        key = target + ".kernel"
        delta = jnp.matmul(jnp.asarray(ab["A"], jnp.float32).T, jnp.asarray(ab["B"], jnp.float32).T,
                           precision=jax.lax.Precision.HIGHEST)  # (B A)^T: [in, out]
        flat[key] = (jnp.asarray(flat[key], jnp.float32) + delta).astype(jnp.asarray(flat[key]).dtype)
    return unflatten(flat)


def unrolled_params(rp: Mapping, spec: RecursiveSpec, num_loops: int | None = None) -> dict:
    """A plain jaxinfer parameter tree of num_loops * B layers (every loop merged): what
    jaxinfer's Transformer (with num_layers set to match) runs unchanged."""
    params = dict(rp["outer"])
    for loop in range(spec.num_loops if num_loops is None else num_loops):
        for j in range(spec.num_blocks):
            params[f"layers_{loop * spec.num_blocks + j}"] = merged_layer(rp, loop, j)
    return params


def load_unrolled(path: str, hf_config: Mapping[str, Any], config: ModelConfig, dtype, on_host: bool = False) -> dict:
    """The L-layer jaxinfer parameters of a recursive folder, in `dtype`: every loop's
    layers merged (see the module docstring). `on_host` keeps numpy leaves."""
    import jax
    import jax.numpy as jnp

    if hf_config.get("quantization_config") is not None:
        raise ValueError(f"{os.path.join(path, 'config.json')}: a recursive folder with a quantization_config; "
                         f"recursive folders hold float weights (quantize at load time instead)")
    spec, rp = read_recursive(path, hf_config, config)
    params = unrolled_params(rp, spec)
    cast = (lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(dtype))) if on_host else \
        (lambda x: jnp.asarray(x, jnp.float32).astype(dtype))
    return jax.tree.map(cast, params)
