"""Quantizes a model folder to int4 and writes it as a new folder.

    python scripts/quantize.py --model tiny-code --output runs/tiny-code-int4 [--quantization int4-gptq]
        [--quant_group_size 128] [--format safetensors|orbax|gptq|gptq_v2]

Formats: "safetensors" and "orbax" store jaxinfer's own int4 layout (uint8 codes, two
per byte, see jaxinfer/pallas/int4_matmul/reference.py); "gptq" / "gptq_v2" write HF GPTQ
tensors (qweight / qzeros / scales / g_idx). Each writes config.json with a
`quantization_config`, so `InferenceSession.from_pretrained(output)` loads the int4 model
directly. Tokenizer and generation files are copied.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MODEL = flags.DEFINE_string("model", "tiny-code", "Model folder (HF or converted) or a bundled name.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_QUANTIZATION = flags.DEFINE_enum("quantization", "int4", ["int4", "int4-gptq"],
                                  "Round to nearest (int4) or GPTQ on the built-in calibration text (int4-gptq).")
_GROUP_SIZE = flags.DEFINE_integer("quant_group_size", 128, "Input rows per scale.")
_SYMMETRIC = flags.DEFINE_bool("quant_symmetric", True, "Zero point 8; else per-group min/max zero points.")
_ACT_ORDER = flags.DEFINE_bool("quant_act_order", False, "GPTQ: visit rows by decreasing Hessian diagonal.")
_LM_HEAD = flags.DEFINE_bool("quantize_lm_head", False, "Also quantize an untied LM head.")
_FORMAT = flags.DEFINE_enum("format", "safetensors", ["safetensors", "orbax", "gptq", "gptq_v2"], "Output format.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the parameters left float.")

_COPIED = ("generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json")


def quantize_folder(model: str, output: str, quantization: str, quant_config, fmt: str, dtype: str) -> dict:
    """Quantizes `model` and writes `output`; returns a summary (bytes, seconds)."""
    import jax

    from jaxinfer import quant
    from jaxinfer.assets import resolve_model_path
    from jaxinfer.models import checkpoint

    path = resolve_model_path(model)
    config, params, hf_config = checkpoint.load_model(path, "float32")
    start = time.perf_counter()
    quantized = quant.quantize_pretrained(config, params, quantization, quant_config, model_dir=path, dtype=dtype)
    seconds = time.perf_counter() - start
    os.makedirs(output, exist_ok=True)
    if fmt == "orbax":
        checkpoint.save_orbax_folder(output, quantized, hf_config)
    else:
        checkpoint.save_hf_folder(output, quantized, config, hf_config,
                                  checkpoint_format="jaxinfer" if fmt == "safetensors" else fmt)
    for name in _COPIED:
        if os.path.exists(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), os.path.join(output, name))

    def nbytes(tree):
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
    return {"float32_bytes": nbytes(params), "int4_bytes": nbytes(quantized), "seconds": seconds}


def main(argv):
    del argv
    from jaxinfer.quant import QuantConfig
    quant_config = QuantConfig(group_size=_GROUP_SIZE.value, symmetric=_SYMMETRIC.value, act_order=_ACT_ORDER.value,
                               quantize_lm_head=_LM_HEAD.value)
    summary = quantize_folder(_MODEL.value, _OUTPUT.value, _QUANTIZATION.value, quant_config, _FORMAT.value,
                              _DTYPE.value)
    print(f"wrote {_OUTPUT.value} ({_FORMAT.value}): weights {summary['int4_bytes']:,} bytes, "
          f"{summary['int4_bytes'] / summary['float32_bytes']:.3f}x of float32; quantized in "
          f"{summary['seconds']:.1f} s")


if __name__ == "__main__":
    app.run(main)
