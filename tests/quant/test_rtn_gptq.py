"""Group-wise int4 quantizers: RTN error bounds and scales, GPTQ against RTN, calibration text."""
from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.pallas import int4_matmul as op
from jaxinfer.quant import QuantConfig, calibration, gptq, rtn


def _weights(k=256, n=64, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(k, n) * 0.05 + 0.01 * rng.randn(1, n)).astype(np.float32)


def _correlated_inputs(k=256, t=2048, seed=1):
    # Features mixed by a random matrix and scaled unevenly: X^T X far from diagonal,
    # which is where GPTQ's error compensation pays off.
    rng = np.random.RandomState(seed)
    mix = np.eye(k) + 2.0 * rng.randn(k, k) / np.sqrt(k)
    return (rng.randn(t, k) @ mix * (1.0 + 3.0 * rng.rand(k))).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_rtn_error_is_at_most_half_a_step(symmetric, group_size):
    w = _weights()
    codes, scales, zeros = rtn.quantize_rtn(w, group_size, symmetric)
    assert codes.dtype == np.uint8 and codes.max() <= 15
    assert scales.shape == (256 // group_size, 64) and (zeros is None) == symmetric
    w_q = rtn.dequantize_linear(rtn.linear_params(codes, scales, zeros, group_size))
    step = np.repeat(scales, group_size, axis=0)  # [K, N]: each weight's scale
    assert (np.abs(w - w_q) <= step / 2 * (1 + 1e-6)).all()
    # Scales are float16 values, rounded up from the exact 2 max|w| / 15 (or range / 15).
    np.testing.assert_array_equal(scales.astype(np.float16).astype(np.float32), scales)
    groups = w.reshape(-1, group_size, 64).astype(np.float64)
    if symmetric:
        exact = 2 * np.abs(groups).max(axis=1) / 15
    else:
        exact = (np.maximum(groups.max(axis=1), 0) - np.minimum(groups.min(axis=1), 0)) / 15
    assert (scales >= exact).all() and (scales <= exact * (1 + 2 ** -10)).all()


def test_rtn_symmetric_by_hand():
    # Column 0: s = 2 * 1.875 / 15 = 0.25 exactly; -1.875 / s = -7.5 rounds (to even) to -8.
    # Column 1: 2 * 1.5 / 15 = 0.2 is not a float16 value; it rounds up to 1639 * 2^-13.
    w = np.array([[-1.875, -1.5], [0.3, 0.3], [0.0, 0.0], [0.7, 0.7]], np.float32)
    codes, scales, zeros = rtn.quantize_rtn(w, 4, True)
    assert zeros is None
    np.testing.assert_array_equal(scales, [[0.25, 1639 * 2.0 ** -13]])
    np.testing.assert_array_equal(codes, [[0, 1], [9, 9], [8, 8], [11, 11]])
    np.testing.assert_array_equal(rtn.dequantize_codes(codes[:, :1], scales[:, :1], None)[:, 0],
                                  [-2.0, 0.25, 0.0, 0.75])


def test_rtn_asymmetric_by_hand():
    # Range [-0.5, 1.0] -> s = 0.1, z = round(0.5 / 0.1) = 5; float16 rounds 0.1 up to 1639 * 2^-14.
    w = np.array([[-0.5], [0.0], [0.42], [1.0]], np.float32)
    codes, scales, zeros = rtn.quantize_rtn(w, 4, False)
    np.testing.assert_array_equal(scales, [[1639 * 2.0 ** -14]])
    np.testing.assert_array_equal(zeros, [[5.0]])
    np.testing.assert_array_equal(codes[:, 0], [0, 5, 9, 15])


def test_rtn_zero_group_and_packing_match_the_op_layout():
    w = _weights(k=64, n=8)
    w[:32] = 0.0  # an all-zero group: scale 1, codes 8, exactly zero after dequantization
    codes, scales, zeros = rtn.quantize_rtn(w, 32, True)
    params = rtn.linear_params(codes, scales, zeros, 32)
    np.testing.assert_array_equal(np.asarray(op.unpack(params["packed"], 32)), codes)
    assert (rtn.dequantize_linear(params)[:32] == 0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_has_lower_layer_output_error_than_rtn(symmetric):
    w, x = _weights(), _correlated_inputs()
    hessian = gptq.hessian_from_inputs(x)
    codes, scales, zeros = rtn.quantize_rtn(w, 64, symmetric)
    err_rtn = gptq.layer_output_error(x, w, rtn.dequantize_linear(rtn.linear_params(codes, scales, zeros, 64)))
    for act_order in (False, True):
        codes, scales, zeros, perm = gptq.gptq_quantize(w, hessian, group_size=64, symmetric=symmetric,
                                                        act_order=act_order)
        assert (perm is None) != act_order
        w_q = rtn.dequantize_linear(rtn.linear_params(codes, scales, zeros, 64, perm))
        # Measured: about 0.7x of RTN without act order, 0.55-0.6x with it.
        assert gptq.layer_output_error(x, w, w_q) < 0.8 * err_rtn


def test_gptq_with_identity_hessian_is_rtn():
    # Uncorrelated unit inputs: no error is worth moving, so GPTQ = round to nearest
    # (dampening only scales H, and blocks of whole groups see the original weights).
    w = _weights(k=128, n=16)
    codes_rtn, scales_rtn, _ = rtn.quantize_rtn(w, 32, True)
    codes, scales, _, _ = gptq.gptq_quantize(w, 2 * np.eye(128), group_size=32, symmetric=True)
    np.testing.assert_array_equal(codes, codes_rtn)
    np.testing.assert_array_equal(scales, scales_rtn)


def test_gptq_dead_inputs_get_zero_weight():
    w, x = _weights(k=64, n=8), _correlated_inputs(k=64, t=512)
    x[:, 5] = 0.0
    codes, scales, _, _ = gptq.gptq_quantize(w, gptq.hessian_from_inputs(x), group_size=32, symmetric=True)
    assert (rtn.dequantize_codes(codes, np.repeat(scales, 32, axis=0), None)[5] == 0).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(group_size=0), "group_size"), (dict(group_size=33), "group_size"), (dict(damp_percent=1.5), "damp_percent"),
    (dict(block_size=0), "block_size"), (dict(num_calibration_sequences=0), "num_calibration_sequences"),
])
def test_quant_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**kwargs)


class _WordTokenizer:
    """Stand-in tokenizer: one id per whitespace-separated word (the sum of its bytes)."""

    bos_token_id, eos_token_id = 1, 2

    def encode(self, text, add_special_tokens=True):
        assert not add_special_tokens
        return [3 + sum(w.encode()) % 997 for w in text.split()]


def test_calibration_uses_only_the_train_files_of_a_data_split(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for name in ("a.py", "b.py", "held.py"):
        (root / name).write_text(f"{name} " * 50)
    (tmp_path / "data_split.json").write_text(
        '{"stdlib": "%s", "train": ["a.py", "b.py"], "heldout": ["held.py"]}' % root)
    ids = calibration.calibration_token_ids(_WordTokenizer(), str(tmp_path), num_sequences=2, length=40)
    assert ids.shape == (2, 40) and ids.dtype == np.int32
    tok = _WordTokenizer()
    held = tok.encode("held.py", add_special_tokens=False)[0]
    assert held not in ids
    # Each file contributes one document of at most `length` tokens: [BOS] + 39 words.
    np.testing.assert_array_equal(ids[0], [1] + tok.encode("a.py " * 39, add_special_tokens=False))
    np.testing.assert_array_equal(ids[1], [1] + tok.encode("b.py " * 39, add_special_tokens=False))
    with pytest.raises(ValueError, match="num_calibration_sequences"):
        calibration.calibration_token_ids(_WordTokenizer(), str(tmp_path), num_sequences=3, length=60)


def test_calibration_without_split_reads_the_stdlib_deterministically():
    first = calibration.calibration_token_ids(_WordTokenizer(), None, num_sequences=3, length=64)
    again = calibration.calibration_token_ids(_WordTokenizer(), None, num_sequences=3, length=64)
    np.testing.assert_array_equal(first, again)
    assert first[0, 0] == 1 and len(set(first.ravel().tolist())) > 20
