"""Registry of supported architectures: HF config.json -> ModelConfig.

Each HF `model_type` maps to a family of jaxinfer.models.transformer with its own
quirks (Qwen2's q/k/v bias, Gemma's (1 + w) norm and embedding scale, Mistral's sliding
window). Anything else is refused with an error that names the architecture.
"""
from __future__ import annotations

from typing import Any, Mapping

from jaxinfer.config import ModelConfig, RopeScaling

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


def _rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_theta` and `rope_scaling` (with "type" or "rope_type").
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if not params:
        params = dict(hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported (linear, llama3)")
    kwargs = dict(rope_type=rope_type, factor=float(params["factor"]))
    if rope_type == "llama3":
        kwargs.update(low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    return float(theta), RopeScaling(**kwargs)


def _sliding_windows(hf: Mapping[str, Any], model_type: str, num_layers: int) -> tuple:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return (window,) * num_layers if window else ()
    if model_type == "qwen2":
        layer_types = hf.get("layer_types")
        if not window or not hf.get("use_sliding_window", False):
            return ()
        if layer_types is None:
            first = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        return windows if any(windows) else ()
    return ()


def _eos_ids(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def model_config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF config.json.

    Raises:
      ValueError: the architecture is not supported, or a field is missing or invalid.
    """
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        names = hf.get("architectures") or [model_type]
        raise ValueError(f"unsupported architecture {', '.join(map(str, names))} (model_type "
                         f"{model_type!r}); jaxinfer supports {', '.join(_ARCHITECTURES.values())}")
    try:
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        num_layers = int(hf["num_hidden_layers"])
        theta, scaling = _rope(hf)
        kwargs = dict(
            family=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
            sliding_windows=_sliding_windows(hf, model_type, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        )
    except KeyError as e:
        raise ValueError(f"config.json: missing field {e.args[0]!r} for model_type {model_type!r}") from None
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if model_type == "gemma":
        # As transformers does: `hidden_activation` wins over `hidden_act`.
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        kwargs.update(norm_weight_offset=1.0, scale_embeddings=True)
    acts = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
            "gelu": "gelu"}
    if act not in acts:
        raise ValueError(f"hidden_act: activation {act!r} is not supported ({', '.join(acts)})")
    kwargs["hidden_act"] = acts[act]
    if model_type == "qwen2":
        kwargs["qkv_bias"] = True
    if model_type == "llama":
        kwargs["qkv_bias"] = kwargs["o_bias"] = bool(hf.get("attention_bias", False))
        kwargs["mlp_bias"] = bool(hf.get("mlp_bias", False))
    return ModelConfig(**kwargs)
