"""Shared pieces of the benchmarks (no absl flags here, so several scripts can import it).

- The benchmark model: a random Llama-shaped checkpoint initialised by jaxinfer itself
  (no torch needed) and saved as an ordinary HF folder, so that jaxinfer and, for the
  baseline, HF transformers load the very same weights.
- Rooflines measured in the same run: memory bandwidth from a large float32 GEMV
  (weights-bound decode) and the float32 GEMM rate from a large square matmul.
- Environment facts for the JSON report.
"""
from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

# The 125M-parameter Llama-shaped model.
MODEL_PRESETS = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000, max_position_embeddings=4096),
    # A Llama-3.2-1B-shaped model (16 layers, GQA 32:8, 128K vocabulary) for GPU / TPU runs.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, max_position_embeddings=4096),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024, max_position_embeddings=1024),
}


def hf_llama_config(preset: str) -> dict:
    """The config.json of a random Llama of the preset's shape, as HF transformers writes it."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **MODEL_PRESETS[preset],
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False,
            "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "torch_dtype": "float32"}


def build_random_llama(preset: str, path: str, seed: int = 0) -> str:
    """Creates (once) a random Llama HF folder of the preset's shape; returns the path.

    The weights are jaxinfer's own initialisation (normal, std 0.02, from
    `jax.random.key(seed)`), written as float32 safetensors that HF transformers loads.
    """
    return build_random_folder(hf_llama_config(preset), path, seed)


def build_random_folder(hf_config: dict, path: str, seed: int = 0) -> str:
    """Creates (once) an HF folder of random weights for any config.json jaxinfer reads (e.g. a
    small Mixtral for the mesh notebook); returns the path. Weights as in build_random_llama."""
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
        return path
    from jaxinfer.models import checkpoint, registry, transformer
    config = registry.model_config_from_hf(hf_config)
    params = transformer.init_params(config, jax.random.key(seed), dtype=jnp.float32, init_std=0.02)
    tensors = checkpoint.hf_tensors_from_params(params, config)
    del params  # the 125m preset is ~0.5 GB of float32: keep one copy while writing
    os.makedirs(path, exist_ok=True)
    checkpoint.write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    del tensors
    # NOTE: config.json is written last: its presence is what marks the folder complete.
    with open(config_path, "w") as f:
        json.dump(hf_config, f, indent=2)
    return path


def time_call(fn, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn(*args) (results blocked on)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_memory_bandwidth(num_bytes: int = 512 << 20) -> float:
    """Bytes/s streamed by a float32 GEMV over a matrix much larger than the caches."""
    cols = 4096
    rows = num_bytes // (4 * cols)
    w = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (cols,), jnp.float32)
    gemv = jax.jit(lambda w, x: w @ x)
    seconds = time_call(gemv, w, x)
    return rows * cols * 4 / seconds


def measure_gemm_flops(n: int = 2048) -> float:
    """FLOP/s of a float32 n x n x n matmul."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    gemm = jax.jit(lambda a, b: a @ b)
    seconds = time_call(gemm, a, b, repeats=5)
    return 2 * n ** 3 / seconds


def environment() -> dict:
    import flax
    info = {"device": str(jax.devices()[0]), "backend": jax.default_backend(), "num_cpus": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__}
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def write_json(path: str, report: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")


def num_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
