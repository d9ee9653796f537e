"""Int4 weight-only quantization: round-to-nearest and GPTQ, group-wise, packed.

Where it sits (layer 3, beside jaxinfer.models): session.from_pretrained(quantization=...)
-> **jaxinfer.quant.quantize** turns a float parameter tree into the int4 format of
jaxinfer.models.layers.Int4Format -> the runner runs it; each quantized Linear calls
jaxinfer.pallas.int4_matmul.

    from jaxinfer.quant import QuantConfig, quantize, quantize_pretrained
    params = quantize(model_config, params, "int4", QuantConfig(group_size=128))
    params = quantize(model_config, params, "int4-gptq", QuantConfig(), calibration_tokens=tokens)
    params = quantize_pretrained(model_config, params, "int4-gptq", model_dir=path)  # built-in calibration text

Saving and loading quantized folders (orbax, native safetensors, HF GPTQ) lives in
jaxinfer.models.checkpoint, because a quantized parameter tree describes itself.
"""
from jaxinfer.quant.calibration import calibration_token_ids
from jaxinfer.quant.config import QuantConfig
from jaxinfer.quant.quantize import QUANTIZATIONS, is_quantized, quantize, quantize_pretrained, quantized_linear_paths
from jaxinfer.quant.rtn import dequantize_linear

__all__ = ["QUANTIZATIONS", "QuantConfig", "calibration_token_ids", "dequantize_linear", "is_quantized",
           "quantize", "quantize_pretrained", "quantized_linear_paths"]
