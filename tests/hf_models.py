"""Tiny random HF checkpoints of every family, built with transformers (the oracle).

Nothing is downloaded: each model is created from a config with `from_config`, with a
large init std so that greedy generations are not degenerate, and saved with
`save_pretrained` (safetensors).
"""
from __future__ import annotations

import torch
import transformers

VOCAB = 160
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (config class, extra kwargs). Each exercises its family's quirks.
FAMILIES = {
    "llama": (transformers.LlamaConfig, {}),
    "llama3_rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama_linear_rope": (transformers.LlamaConfig, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": (transformers.MistralConfig, dict(sliding_window=6)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                             tie_word_embeddings=True)),
    # Gemma scales embeddings by sqrt(hidden) and ties them to the LM head, so a small
    # init makes it repeat its input token; 0.4 gives varied greedy outputs.
    "gemma": (transformers.GemmaConfig, dict(head_dim=32, num_key_value_heads=1, initializer_range=0.4)),
}


def build(name: str, path: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """Creates the tiny `name` model, saves it to `path` and returns it (float32, eval)."""
    config_cls, extra = FAMILIES[name]
    config = config_cls(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        # Norm weights start at 1 (Gemma: 0); perturb them so the test sees them.
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model
