"""HF GPTQ checkpoints: the bit layout pinned by hand, act order, export -> load round trips."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.models import checkpoint, quant_format
from jaxinfer.models.transformer import AttentionMetadata, Transformer
from jaxinfer.quant import QuantConfig, dequantize_linear, quantize


def _int32(word: int) -> int:
    """A 32-bit pattern written in hex, as the signed int32 a checkpoint stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


# K = 16 input rows, N = 8 output columns, g = 8: two groups.
QWEIGHT = np.array([
    # rows 0-7 (row 8i + j at bits 4j): column 0 holds 0..7, column 1 holds 7..0, the rest 8
    [_int32(0x76543210), _int32(0x01234567)] + [_int32(0x88888888)] * 6,
    # rows 8-15: column 0 holds 8..15, column 1 all 0, the rest 8
    [_int32(0xFEDCBA98), 0] + [_int32(0x88888888)] * 6,
], np.int32)
QZEROS = np.array([[_int32(0x77777777)],  # group 0: every column stores 7
                   [_int32(0x76543210)]],  # group 1: column j stores j
                  np.int32)
SCALES = np.array([[0.5] * 8, [1.0, 2.0] + [0.125] * 6], np.float16)
# Dequantized by hand, v1 (zero = stored + 1): group 0 has zero 8 and scale 0.5; group 1
# column j has zero j + 1. Columns 2-7 hold code 8: 0 in group 0, 0.125 * (7 - j) in group 1.
EXPECTED_V1 = np.zeros((16, 8), np.float32)
EXPECTED_V1[:8, 0] = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5]  # 0.5 * (q - 8), q = 0..7
EXPECTED_V1[:8, 1] = [-0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0]  # q = 7..0
EXPECTED_V1[8:, 0] = [7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0]  # 1.0 * (q - 1), q = 8..15
EXPECTED_V1[8:, 1] = -4.0  # 2.0 * (0 - 2)
EXPECTED_V1[8:, 2:] = [0.625, 0.5, 0.375, 0.25, 0.125, 0.0]  # 0.125 * (8 - (j + 1)), j = 2..7


def _load(tensors, checkpoint_format, g_idx=None):
    layer = {"qweight": QWEIGHT, "qzeros": QZEROS, "scales": SCALES, **tensors}
    if g_idx is not None:
        layer["g_idx"] = g_idx
    loaded = {"layer": quant_format.gptq_to_int4("layer", layer, 16, 8, 8, checkpoint_format)}
    fmt = quant_format.finalize_gptq_layers(loaded)
    return loaded["layer"], fmt


def test_gptq_v1_bit_layout_by_hand():
    layer, fmt = _load({}, "gptq")
    assert fmt.group_size == 8 and not fmt.symmetric and not fmt.act_order
    np.testing.assert_array_equal(dequantize_linear(layer), EXPECTED_V1)


def test_gptq_v2_stores_the_zero_point_itself():
    layer, _ = _load({}, "gptq_v2")
    expected = EXPECTED_V1.copy()
    expected[:8] += 0.5  # group 0: zero 7 instead of 8
    expected[8:] += np.array([1.0, 2.0] + [0.125] * 6, np.float32)  # group 1: zero j instead of j + 1
    np.testing.assert_array_equal(dequantize_linear(layer), expected)


def test_gptq_act_order_g_idx_is_regrouped_with_a_permutation():
    # Alternating groups: even rows use group 0's scale and zero, odd rows group 1's.
    g_idx = np.arange(16, dtype=np.int32) % 2
    layer, fmt = _load({}, "gptq", g_idx=g_idx)
    assert fmt.act_order
    np.testing.assert_array_equal(layer["perm"], [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15])
    words = QWEIGHT.view(np.uint32)  # [2, 8]
    codes = np.array([(words[r // 8] >> (4 * (r % 8))) & 0xF for r in range(16)], np.float32)  # [16, 8]
    zeros = np.array([[8.0] * 8, [1.0 + j for j in range(8)]], np.float32)
    expected = (codes - zeros[g_idx]) * SCALES.astype(np.float32)[g_idx]
    np.testing.assert_array_equal(dequantize_linear(layer), expected)
    # And the layer's matmul (x[:, perm] @ stored rows) equals x @ W.
    from jaxinfer.pallas import int4_matmul as op
    x = np.random.RandomState(0).randn(3, 16).astype(np.float32)
    y = op.int4_matmul(jnp.asarray(x[:, layer["perm"]]), layer["packed"], layer["scales"], layer["zeros"],
                       group_size=8, impl="xla")
    np.testing.assert_allclose(np.asarray(y), x @ expected, rtol=1e-5, atol=1e-5)


def test_gptq_symmetric_checkpoint_loads_without_zeros():
    zeros = np.full((2, 1), _int32(0x77777777), np.int32)  # v1: every zero point is 8
    layer, fmt = _load({"qzeros": zeros}, "gptq")
    assert fmt.symmetric and "zeros" not in layer


def test_export_of_the_hand_example_gives_back_the_same_words():
    layer, _ = _load({}, "gptq")
    out = quant_format.int4_to_gptq("layer", layer, "gptq")
    np.testing.assert_array_equal(out["qweight"], QWEIGHT)
    np.testing.assert_array_equal(out["qzeros"], QZEROS)
    np.testing.assert_array_equal(out["scales"], SCALES)
    np.testing.assert_array_equal(out["g_idx"], np.arange(16) // 8)


@pytest.mark.parametrize("tensors, match", [
    ({"qweight": QWEIGHT[:1]}, "layer.qweight"),
    ({"scales": SCALES[:, :4]}, "layer.scales"),
    ({"g_idx": np.array([0] * 10 + [1] * 6, np.int32)}, "g_idx"),
])
def test_malformed_gptq_tensors_are_named(tensors, match):
    with pytest.raises(ValueError, match=match):
        _load(tensors, "gptq")


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "quantization_config.bits"),
    ({"quant_method": "awq", "bits": 4}, "quantization_config.quant_method"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
])
def test_unsupported_quantization_configs_are_named(qc, field):
    with pytest.raises(ValueError, match=field):
        quant_format.parse_quantization_config(qc)


# ---------------------------------------------------------------------------- model round trips

def _logits(config, params):
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, config.vocab_size, size=24), jnp.int32)
    apply = jax.jit(lambda p: Transformer(config).apply({"params": p}, tokens, jnp.arange(24, dtype=jnp.int32),
                                                        None, AttentionMetadata.dense(2, 12))[0])
    return np.asarray(apply(params))


def _dequantized_kernels(params):
    out = {}
    for name, layer in params.items():
        if isinstance(layer, dict) and "packed" in layer:
            out[name] = dequantize_linear({k: np.asarray(v) for k, v in layer.items() if k != "bias"})
        elif isinstance(layer, dict):
            out.update({f"{name}/{k}": v for k, v in _dequantized_kernels(layer).items()})
    return out


@pytest.mark.parametrize("method, config, checkpoint_format", [
    ("int4", QuantConfig(group_size=32), "gptq"),
    ("int4-gptq", QuantConfig(group_size=32, symmetric=False, act_order=True), "gptq_v2"),
])
def test_export_to_gptq_and_load_gives_identical_weights_and_logits(hf_model_dir, tmp_path, method, config,
                                                                      checkpoint_format):
    path, _ = hf_model_dir("llama")
    model_config, params, hf_config = checkpoint.load_model(path)
    tokens = np.random.RandomState(1).randint(3, model_config.vocab_size, size=(4, 32))
    quantized = quantize(model_config, params, method, config, calibration_tokens=tokens)
    out = str(tmp_path / "gptq")
    checkpoint.save_hf_folder(out, quantized, model_config, hf_config, checkpoint_format=checkpoint_format)
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": config.act_order,
                  "sym": config.symmetric, "lm_head": False, "checkpoint_format": checkpoint_format}
    stored = checkpoint.read_safetensors(os.path.join(out, "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj"  # K = 96, N = 64
    assert (stored[f"{prefix}.qweight"].dtype, stored[f"{prefix}.qweight"].shape) == (np.int32, (12, 64))
    assert (stored[f"{prefix}.qzeros"].dtype, stored[f"{prefix}.qzeros"].shape) == (np.int32, (3, 8))
    assert (stored[f"{prefix}.scales"].dtype, stored[f"{prefix}.scales"].shape) == (np.float16, (3, 64))
    assert stored[f"{prefix}.g_idx"].shape == (96,) and f"{prefix}.weight" not in stored

    _, loaded, _ = checkpoint.load_model(out)
    want, got = _dequantized_kernels(quantized), _dequantized_kernels(loaded)
    assert sorted(want) == sorted(got) and len(want) == 14
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(_logits(model_config, loaded), _logits(model_config, quantized))


def test_gptq_v1_cannot_store_a_zero_point_of_zero(hf_model_dir):
    path, _ = hf_model_dir("llama")
    model_config, params, _ = checkpoint.load_model(path)
    layer = quantize(model_config, params, "int4", QuantConfig(group_size=32, symmetric=False))["layers_0"]["mlp"]
    up = {k: np.array(v) for k, v in layer["up_proj"].items()}
    up["zeros"][0, 0] = 0.0
    with pytest.raises(ValueError, match="gptq_v2"):
        quant_format.int4_to_gptq("model.layers.0.mlp.up_proj", up, "gptq")
    assert quant_format.int4_to_gptq("model.layers.0.mlp.up_proj", up, "gptq_v2")["qzeros"].dtype == np.int32
