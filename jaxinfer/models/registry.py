"""Registry of supported architectures: HF config.json -> ModelConfig.

Each HF `model_type` maps to a family of jaxinfer.models.transformer with its own
quirks (Qwen2's q/k/v bias, Gemma's (1 + w) norm and embedding scale, Mistral's sliding
window, Qwen3's per-head q/k norm, the sparse MoE MLP of Mixtral and Qwen3-MoE).
Anything else is refused with an error that names the architecture.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from jaxinfer.config import MAX_MODEL_DIM, MAX_NUM_LAYERS, ModelConfig, RopeScaling

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)
_MISSING = object()


def _field(hf: Mapping[str, Any], key: str, default=_MISSING):
    if key not in hf or hf[key] is None:
        if default is _MISSING:
            raise ValueError(f"config.json: missing field {key!r}")
        return default
    return hf[key]


def _int(hf: Mapping[str, Any], key: str, default=_MISSING, *, low: int = 1, high: int = MAX_MODEL_DIM) -> int:
    """An int field of config.json in [low, high] (an integral float like 4096.0 accepted)."""
    value = _field(hf, key, default)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"config.json: {key} must be an int in [{low}, {high}], got {value!r}")
    return value


def _bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _field(hf, key, default)
    if not isinstance(value, bool):
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _float(value, key: str) -> float:
    """A finite number of config.json (ints accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"config.json: {key} must be a finite number, got {value!r}")
    return float(value)


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_theta` and `rope_scaling` (with "type" or "rope_type").
    for key in ("rope_parameters", "rope_scaling"):
        if not isinstance(hf.get(key) or {}, Mapping):
            raise ValueError(f"config.json: {key} must be an object, got {hf[key]!r}")
    params = dict(hf.get("rope_parameters") or {})
    theta = _float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta")
    source = "rope_parameters"
    if not params:
        params, source = dict(hf.get("rope_scaling") or {}), "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"config.json: {source}.rope_type: {rope_type!r} is not supported (linear, llama3)")
    kwargs = dict(rope_type=rope_type, factor=_float(_field(params, "factor"), f"{source}.factor"))
    if rope_type == "llama3":
        kwargs.update(low_freq_factor=_float(_field(params, "low_freq_factor"), f"{source}.low_freq_factor"),
                      high_freq_factor=_float(_field(params, "high_freq_factor"), f"{source}.high_freq_factor"),
                      original_max_position_embeddings=_int(params, "original_max_position_embeddings"))
    try:
        return theta, RopeScaling(**kwargs)
    except ValueError as e:
        raise ValueError(f"config.json: {source}: {e}") from None


def _sliding_windows(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple:
    window = hf.get("sliding_window")
    if model_type in ("mistral", "mixtral"):
        return (window,) * num_layers if window else ()
    if model_type == "qwen3_moe":  # one window for every layer, behind use_sliding_window
        return (window,) * num_layers if window and hf.get("use_sliding_window", False) else ()
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types")
        if not window or not hf.get("use_sliding_window", False):
            return ()
        if layer_types is None:
            first = _int(hf, "max_window_layers", num_layers, low=0, high=MAX_NUM_LAYERS)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ValueError(f"config.json: layer_types must be a list of {num_layers} layer types, got {layer_types!r}")
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        return windows if any(windows) else ()
    return ()


def _moe(hf: Mapping[str, Any], model_type: str, num_layers: int) -> dict:
    """The MoE fields of ModelConfig, as transformers' modeling code decides them."""
    if model_type == "mixtral":  # every layer sparse; the experts have intermediate_size
        return dict(num_experts=_int(hf, "num_local_experts", 8),
                    num_experts_per_tok=_int(hf, "num_experts_per_tok", 2),
                    moe_intermediate_size=_int(hf, "intermediate_size"), norm_topk_prob=True)
    if model_type != "qwen3_moe":
        return {}
    # Qwen3MoeDecoderLayer: sparse iff not in mlp_only_layers and (i + 1) % step == 0.
    key = "num_experts" if "num_experts" in hf else "num_local_experts"
    num_experts = _int(hf, key, 128, low=0)
    if num_experts == 0:
        return {}
    step = _int(hf, "decoder_sparse_step", 1)
    mlp_only = hf.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list):
        raise ValueError(f"config.json: mlp_only_layers must be a list of layer indices, got {mlp_only!r}")
    mlp_only = {_int({"mlp_only_layers": i}, "mlp_only_layers", low=0, high=num_layers - 1) for i in mlp_only}
    dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step)
    return dict(num_experts=num_experts, num_experts_per_tok=_int(hf, "num_experts_per_tok", 8),
                moe_intermediate_size=_int(hf, "moe_intermediate_size", 768),
                norm_topk_prob=_bool(hf, "norm_topk_prob", False), dense_mlp_layers=dense)


def _eos_ids(value) -> tuple:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"config.json: eos_token_id must be an int >= 0 or a list of them, got {value!r}")
    return tuple(values)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json.

    Raises:
      ValueError: the architecture is not supported, or a field is missing or invalid.
    """
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in _ARCHITECTURES:
        names = hf.get("architectures")
        names = names if isinstance(names, list) and names else [model_type]
        raise ValueError(f"unsupported architecture {', '.join(map(str, names))} (model_type "
                         f"{model_type!r}); jaxinfer supports {', '.join(_ARCHITECTURES.values())}")
    hidden = _int(hf, "hidden_size")
    heads = _int(hf, "num_attention_heads")
    num_layers = _int(hf, "num_hidden_layers", high=MAX_NUM_LAYERS)
    window = hf.get("sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 0):
        raise ValueError(f"config.json: sliding_window must be null or an int >= 0, got {window!r}")
    theta, scaling = _rope(hf)
    bos = hf.get("bos_token_id")
    if bos is not None and (not isinstance(bos, int) or isinstance(bos, bool) or bos < 0):
        raise ValueError(f"config.json: bos_token_id must be null or an int >= 0, got {bos!r}")
    kwargs = dict(
        family=model_type,
        vocab_size=_int(hf, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_int(hf, "intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=_int({"num_key_value_heads": hf.get("num_key_value_heads") or heads}, "num_key_value_heads"),
        # Qwen3Config defaults head_dim to 128, not hidden // heads.
        head_dim=_int({"head_dim": hf.get("head_dim") or (128 if model_type == "qwen3" else max(1, hidden // heads))},
                      "head_dim"),
        max_position_embeddings=_int(hf, "max_position_embeddings", 2048),
        rms_norm_eps=_float(hf.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool(hf, "tie_word_embeddings", model_type == "gemma"),
        sliding_windows=_sliding_windows(hf, model_type, num_layers),
        bos_token_id=bos,
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        **_moe(hf, model_type, num_layers),
    )
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if model_type == "gemma":
        # As transformers does: `hidden_activation` wins over `hidden_act`.
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        kwargs.update(norm_weight_offset=1.0, scale_embeddings=True)
    acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "gelu": "gelu"}
    if not isinstance(act, str) or act not in acts:
        raise ValueError(f"hidden_act: activation {act!r} is not supported ({', '.join(acts)})")
    kwargs["hidden_act"] = acts[act]
    if model_type == "qwen2":
        kwargs["qkv_bias"] = True
    if model_type in ("qwen3", "qwen3_moe"):
        kwargs["qk_norm"] = True
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        kwargs["qkv_bias"] = kwargs["o_bias"] = _bool(hf, "attention_bias", False)
        kwargs["mlp_bias"] = _bool(hf, "mlp_bias", False)
    try:
        return ModelConfig(**kwargs)
    except ValueError as e:  # name the config.json key, not ModelConfig's field
        field, _, message = str(e).partition(": ")
        raise ValueError(f"config.json: {_HF_KEYS.get(field, field)}: {message}") from None


# ModelConfig field -> the config.json key it comes from (named in errors).
_HF_KEYS = {"family": "model_type", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
            "num_kv_heads": "num_key_value_heads", "sliding_windows": "sliding_window",
            "num_experts": "num_experts / num_local_experts", "eos_token_ids": "eos_token_id",
            "dense_mlp_layers": "mlp_only_layers / decoder_sparse_step"}
