"""GPTQ for one linear layer: Hessian-based error compensation (Frantar et al., 2022).

Where it sits: jaxinfer.quant.quantize (which collects each layer's calibration inputs)
-> **gptq_quantize** -> codes/scales/zeros in the int4 layout.

The layer minimizes ||X W - X W_q||^2 over the calibration inputs X [T, K]. With
H = 2 X^T X / T, GPTQ quantizes the input rows of W [K, N] one at a time (in the paper's
orientation W is [N, K] and these are its columns) and spreads each row's rounding
error over the rows not yet quantized, weighted by the inverse Hessian:

    err = (w_k - q_k) / U[k, k];   W[j] -= U[k, j] * err   for j > k,

where U is the upper Cholesky factor of H^-1 (H^-1 = U^T U). Updates are applied
lazily in blocks of `block_size` rows (the paper's "lazy batch" trick): inside a block
row by row, to the rest of the matrix once per block. H is dampened by
`damp_percent` of its mean diagonal; inputs that never fire (zero diagonal) get
weight 0. With groups, a group's scale and zero point are chosen when its first row
is reached, from the already error-updated rows of the group (blocks hold whole groups,
so those rows are current). With act_order, rows are visited by decreasing H diagonal;
groups are stored in that order (rows inside a group by input index), with the
permutation.

Host-side numpy in float64. Dimension codes: K input rows, N output columns, g group
size, B block rows.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from jaxinfer.quant import rtn


def upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """U with U^T U = H^-1, U upper triangular, for a symmetric positive definite H [K, K]."""
    lower = np.linalg.cholesky(hessian)  # H = L L^T
    lower_inv = scipy.linalg.solve_triangular(lower, np.eye(hessian.shape[0]), lower=True)  # L^-1
    inverse = lower_inv.T @ lower_inv  # H^-1
    return np.linalg.cholesky(inverse).T


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, *, group_size: int, symmetric: bool,
                  damp_percent: float = 0.01, block_size: int = 128, act_order: bool = False):
    """Quantizes one layer's weight with GPTQ.

    Args:
      w: [K, N] float weights (the model's x @ W orientation).
      hessian: [K, K] 2 X^T X / T of the layer's calibration inputs X [T, K].
      group_size: g, divides K.
      symmetric: zero point 8, else per-group zero points (see rtn.scale_and_zero).
      damp_percent: dampening, as a fraction of the mean of H's diagonal.
      block_size: rows per lazy batch; rounded up to whole groups.
      act_order: visit (and store) rows by decreasing H diagonal.
    Returns:
      (codes [K, N] uint8, scales [G, N] float32, zeros [G, N] float32 or None,
      perm [K] int32 or None): rows of `codes` and groups in stored order; stored row i
      is input row perm[i] (identity when perm is None).
    """
    num_rows, num_cols = w.shape
    weight = np.array(w, dtype=np.float64)  # updated in place
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weight[dead, :] = 0.0
    perm = None
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable").astype(np.int32)
        weight = weight[perm]
        h = h[perm][:, perm]
    h[np.diag_indices(num_rows)] += damp_percent * np.mean(np.diag(h))
    u = upper_cholesky_of_inverse(h)

    block_size = -(-block_size // group_size) * group_size  # whole groups per block
    num_groups = num_rows // group_size
    codes = np.zeros((num_rows, num_cols), np.uint8)
    scales = np.zeros((num_groups, num_cols), np.float32)
    zeros = None if symmetric else np.zeros((num_groups, num_cols), np.float32)
    for start in range(0, num_rows, block_size):
        end = min(start + block_size, num_rows)
        block = weight[start:end]  # [B, N], a view: updated in place
        errors = np.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            row = start + i
            group = row // group_size
            if row % group_size == 0:
                scale, zero = rtn.scale_and_zero(block[i:i + group_size], symmetric)
                scales[group] = scale
                if zeros is not None:
                    zeros[group] = zero
            zero = None if zeros is None else zeros[group]
            codes[row] = rtn.quantize_codes(block[i], scales[group], zero)
            dequantized = rtn.dequantize_codes(codes[row], scales[group], zero).astype(np.float64)
            err = (block[i] - dequantized) / u_block[i, i]  # [N]
            block[i + 1:] -= np.outer(u_block[i, i + 1:], err)
            errors[i] = err
        weight[end:] -= u[start:end, end:].T @ errors
    if perm is not None:
        # Canonical storage: groups in visiting order, rows inside a group by input index
        # (the order a GPTQ g_idx loads into), so that export -> load is bit-identical.
        order = np.lexsort((perm, np.arange(num_rows) // group_size))
        codes, perm = codes[order], perm[order]
    return codes, scales, zeros, perm


def layer_output_error(x: np.ndarray, w: np.ndarray, w_quantized: np.ndarray) -> float:
    """||X W - X W_q||_F: the quantity GPTQ minimizes (x [T, K], weights [K, N])."""
    return float(np.linalg.norm(np.asarray(x, np.float64) @ (np.asarray(w, np.float64)
                                                             - np.asarray(w_quantized, np.float64))))


def hessian_from_inputs(x: np.ndarray) -> np.ndarray:
    """2 X^T X / T of inputs x [T, K] (float64)."""
    x = np.asarray(x, np.float64)
    return 2.0 * x.T @ x / x.shape[0]

