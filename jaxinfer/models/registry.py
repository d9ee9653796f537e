"""Registry of supported architectures: HF config.json -> ModelConfig.

Each HF `model_type` maps to a family of jaxinfer.models.transformer with its own
quirks (Qwen2's q/k/v bias, Gemma's (1 + w) norm and embedding scale, Mistral's sliding
window, Qwen3's per-head q/k norm, the sparse MoE MLP of Mixtral and Qwen3-MoE).
Anything else is refused with an error that names the architecture.
"""
from __future__ import annotations

from typing import Any, Mapping

from jaxinfer.config import ModelConfig, RopeScaling

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
    if model_type in ("mistral", "mixtral"):
        return (window,) * num_layers if window else ()
    if model_type == "qwen3_moe":  # one window for every layer, behind use_sliding_window
        return (window,) * num_layers if window and hf.get("use_sliding_window", False) else ()
    if model_type in ("qwen2", "qwen3"):
        layer_types = hf.get("layer_types")
        if not window or not hf.get("use_sliding_window", False):
            return ()
        if layer_types is None:
            first = hf.get("max_window_layers", num_layers)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        return windows if any(windows) else ()
    return ()


def _moe(hf: Mapping[str, Any], model_type: str, num_layers: int) -> dict:
    """The MoE fields of ModelConfig, as transformers' modeling code decides them."""
    if model_type == "mixtral":  # every layer sparse; the experts have intermediate_size
        return dict(num_experts=int(hf.get("num_local_experts", 8)),
                    num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True)
    if model_type != "qwen3_moe":
        return {}
    # Qwen3MoeDecoderLayer: sparse iff not in mlp_only_layers and (i + 1) % step == 0.
    num_experts = int(hf.get("num_experts", hf.get("num_local_experts", 128)))
    if num_experts == 0:
        return {}
    step = int(hf.get("decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"decoder_sparse_step: must be >= 1, got {step}")
    mlp_only = set(int(i) for i in hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in mlp_only or (i + 1) % step)
    return dict(num_experts=num_experts, num_experts_per_tok=int(hf.get("num_experts_per_tok", 8)),
                moe_intermediate_size=int(hf.get("moe_intermediate_size", 768)),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_mlp_layers=dense)


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
            # Qwen3Config defaults head_dim to 128, not hidden // heads.
            head_dim=int(hf.get("head_dim") or (128 if model_type == "qwen3" else hidden // heads)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "gemma")),
            sliding_windows=_sliding_windows(hf, model_type, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_eos_ids(hf.get("eos_token_id")),
            **_moe(hf, model_type, num_layers),
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
    if model_type in ("qwen3", "qwen3_moe"):
        kwargs["qk_norm"] = True
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        kwargs["qkv_bias"] = kwargs["o_bias"] = bool(hf.get("attention_bias", False))
        kwargs["mlp_bias"] = bool(hf.get("mlp_bias", False))
    return ModelConfig(**kwargs)
