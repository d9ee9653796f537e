"""Group-wise int4 round-to-nearest (RTN): scales, zero points, codes, packing.

Where it sits: jaxinfer.quant.quantize -> **rtn** (and gptq, which reuses the scale and
rounding rules here) -> parameters in the layout of jaxinfer.pallas.int4_matmul.

Host-side numpy (float64 where it matters). Dimension codes: K input rows, N output
columns, g group size, G = K / g groups. Weights are in the model's [K, N] orientation
(x @ W), groups run along K.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from jaxinfer.pallas import int4_matmul as int4

MAX_CODE = 15
SYMMETRIC_ZERO = int4.SYMMETRIC_ZERO


def round_up_to_float16(scale: np.ndarray) -> np.ndarray:
    """The smallest float16 value >= each scale, as float32.

    Rounding up (never down) keeps every weight of the group inside the code range, so
    the RTN error stays within s / 2; float16 values make a GPTQ export lossless.
    """
    scale = np.asarray(scale, np.float64)
    half = np.atleast_1d(scale.astype(np.float16))
    low = half.astype(np.float64) < np.atleast_1d(scale)
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half.reshape(scale.shape).astype(np.float32)


def scale_and_zero(w: np.ndarray, symmetric: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scale and zero point of one group per output column.

    Args:
      w: [..., g, N] weights of the group(s).
      symmetric: zero point 8 and s = 2 max|w| / 15; else min/max with an integer zero point.
    Returns:
      (scale [..., N] float32, zero [..., N] float32 integer-valued in [0, 15], or None
      when symmetric).
    """
    w = np.asarray(w, np.float64)
    if symmetric:
        amax = np.abs(w).max(axis=-2)
        scale = round_up_to_float16(np.where(amax > 0, 2 * amax / MAX_CODE, 1.0))
        return scale, None
    # Widen the range to include 0, so that 0 is representable and z lies in [0, 15].
    wmin = np.minimum(w.min(axis=-2), 0.0)
    wmax = np.maximum(w.max(axis=-2), 0.0)
    scale = round_up_to_float16(np.where(wmax > wmin, (wmax - wmin) / MAX_CODE, 1.0))
    zero = np.clip(np.round(-wmin / scale), 0, MAX_CODE).astype(np.float32)
    return scale, zero


def quantize_codes(w: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray]) -> np.ndarray:
    """Codes clamp(round(w / s) + z, 0, 15) as uint8; w [..., N], scale/zero broadcastable."""
    z = SYMMETRIC_ZERO if zero is None else zero
    return np.clip(np.round(np.asarray(w, np.float64) / scale) + z, 0, MAX_CODE).astype(np.uint8)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero: Optional[np.ndarray]) -> np.ndarray:
    """(q - z) * s in float32, exactly as the int4 op computes it."""
    z = np.float32(SYMMETRIC_ZERO) if zero is None else np.asarray(zero, np.float32)
    return (codes.astype(np.float32) - z) * np.asarray(scale, np.float32)


def quantize_rtn(w: np.ndarray, group_size: int, symmetric: bool):
    """Round-to-nearest of a [K, N] weight.

    Args:
      w: [K, N] float weights.
      group_size: g, divides K.
      symmetric: see scale_and_zero.
    Returns:
      (codes [K, N] uint8, scales [G, N] float32, zeros [G, N] float32 or None).
    """
    num_rows, num_cols = w.shape
    groups = np.asarray(w, np.float64).reshape(num_rows // group_size, group_size, num_cols)  # [G, g, N]
    scale, zero = scale_and_zero(groups, symmetric)  # [G, N]
    codes = quantize_codes(groups, scale[:, None, :], None if zero is None else zero[:, None, :])  # [G, g, N]
    return codes.reshape(num_rows, num_cols), scale, zero


def linear_params(codes: np.ndarray, scales: np.ndarray, zeros: Optional[np.ndarray], group_size: int,
                  perm: Optional[np.ndarray] = None) -> dict:
    """The parameters of a quantized Linear (see jaxinfer.models.layers.Int4Format).

    Args:
      codes: [K, N] uint8 codes, rows in stored order.
      scales, zeros: [G, N] (zeros None when symmetric).
      group_size: g.
      perm: [K] int (act order: stored row i is input feature perm[i]) or None.
    Returns:
      {"packed": uint8 [K/2, N], "scales": float32 [G, N], and "zeros" / "perm" if given}.
    """
    params = {"packed": np.asarray(int4.pack(codes, group_size)), "scales": np.asarray(scales, np.float32)}
    if zeros is not None:
        params["zeros"] = np.asarray(zeros, np.float32)
    if perm is not None:
        params["perm"] = np.asarray(perm, np.int32)
    return params


def dequantize_linear(params: dict) -> np.ndarray:
    """The float32 kernel [K, N] (original row order) that a quantized Linear's parameters encode."""
    num_in = 2 * params["packed"].shape[0]
    group_size = num_in // params["scales"].shape[0]
    w = np.asarray(int4.dequantize(params["packed"], params["scales"], params.get("zeros"), group_size))
    if "perm" in params:
        restored = np.empty_like(w)
        restored[np.asarray(params["perm"])] = w
        return restored
    return w
