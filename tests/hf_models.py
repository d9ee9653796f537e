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
    # Qwen3: head_dim (32) != hidden / heads (16), per-head q/k norm, sliding window on
    # layer 1 only (layer_types from max_window_layers).
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32, use_sliding_window=True, sliding_window=6,
                                             max_window_layers=1)),
    # Mixtral: 4 experts, top-2 (renormalised), in every layer; sliding window.
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6)),
    # Qwen3-MoE: 8 small experts, top-2 with norm_topk_prob; layer 1 is dense (mlp_only_layers).
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                                    norm_topk_prob=True, mlp_only_layers=[1])),
}
# The families whose MLP is a sparse mixture of experts.
MOE_FAMILIES = ("mixtral", "qwen3_moe")


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


TEXT_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i, i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "héllo wörld — naïve café, 日本語 and emoji 😀 🚀\n",
    "import os\nimport sys\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    break\n# comment: the quick brown fox jumps over the lazy dog\n",
]


def build_text_model(path: str, vocab_size: int = 400, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny Llama with a sentencepiece tokenizer (byte fallback) trained on TEXT_CORPUS."""
    import json
    import os

    import sentencepiece as spm
    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(path, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("".join(TEXT_CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(path, "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, minloglevel=2, hard_vocab_limit=False)
    for leftover in ("corpus.txt", "tokenizer.vocab"):
        os.remove(os.path.join(path, leftover))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>"}, f)
    processor = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": processor.vocab_size()})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return model
