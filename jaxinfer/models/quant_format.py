"""Int4 checkpoint formats: config.json's `quantization_config`, and HF GPTQ tensors.

Where it sits: checkpoint loading (jaxinfer.models.checkpoint) -> **this module**
converts what a quantized folder stores into the parameters of a quantized Linear
(jaxinfer.models.layers.Int4Format) and back. Host-side numpy only.

Two on-disk formats:

- "jaxinfer" (`quant_method: "jaxinfer-int4"`): our own layout stored as is, per linear
  layer `<name>.int4_packed` uint8 [K/2, N], `.int4_scales` float32 [K/g, N] and, when
  present, `.int4_zeros` float32 [K/g, N] and `.int4_perm` int32 [K]; [in, out]
  orientation (not transposed like HF float weights).
- HF GPTQ (`quant_method: "gptq"`, bits 4), as written by AutoGPTQ / GPTQModel /
  optimum, per layer:
    qweight int32 [K/8, N]: eight 4-bit codes per int32 packed along K, the lowest
      bits holding the lowest row (row 8i + j at bits 4j .. 4j + 3 of qweight[i]);
    qzeros  int32 [K/g, N/8]: zero points packed the same way along N;
    scales  float16 [K/g, N];
    g_idx   int32 [K] (optional): the group of each input row (act order when not
      k // g);
    w[k, n] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n]), where z is the stored
    zero plus one for checkpoint_format "gptq" (v1) and the stored zero for "gptq_v2".
  Act order is regrouped at load: rows are sorted by g_idx (stably), which makes every
  group contiguous, and the sort is kept as the layer's `perm` (the layer then reads
  x[:, perm]). Checkpoints whose zeros are all 8 load as symmetric (no `zeros`).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import numpy as np

from jaxinfer.models.layers import Int4Format
from jaxinfer.pallas import int4_matmul as int4

NATIVE_METHOD = "jaxinfer-int4"
NATIVE = "jaxinfer"  # checkpoint formats: ours, GPTQ v1, GPTQ v2
GPTQ_FORMATS = ("gptq", "gptq_v2")
CHECKPOINT_FORMATS = (NATIVE,) + GPTQ_FORMATS
NATIVE_SUFFIXES = {"packed": "int4_packed", "scales": "int4_scales", "zeros": "int4_zeros", "perm": "int4_perm"}
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# ---------------------------------------------------------------------------- config.json

class CheckpointQuantization(NamedTuple):
    """What a folder's `quantization_config` says about its tensors."""

    checkpoint_format: str  # one of CHECKPOINT_FORMATS
    group_size: int  # GPTQ may say -1: one group over all input rows of each layer
    quantize_lm_head: bool  # the LM head is stored quantized too
    fmt: Optional[Int4Format]  # native: the stored format; GPTQ: None (decided by the tensors)


def parse_quantization_config(qc: Mapping) -> CheckpointQuantization:
    """Reads a config.json `quantization_config`.

    Raises:
      ValueError: an unsupported method, bit width or checkpoint format (named).
    """
    method = qc.get("quant_method")
    bits = qc.get("bits", 4)
    if bits != 4:
        raise ValueError(f"quantization_config.bits: only 4-bit weights are supported, got {bits!r}")
    if method == NATIVE_METHOD:
        fmt = Int4Format(group_size=int(qc["group_size"]), symmetric=bool(qc["sym"]),
                         act_order=bool(qc.get("act_order", False)),
                         quantize_lm_head=bool(qc.get("quantize_lm_head", False)))
        return CheckpointQuantization(NATIVE, fmt.group_size, fmt.quantize_lm_head, fmt)
    if method == "gptq":
        checkpoint_format = qc.get("checkpoint_format", "gptq")
        if checkpoint_format not in GPTQ_FORMATS:
            raise ValueError(f"quantization_config.checkpoint_format: {checkpoint_format!r} is not supported; "
                             f"choose one of {GPTQ_FORMATS}")
        return CheckpointQuantization(checkpoint_format, int(qc.get("group_size", 128)),
                                      bool(qc.get("lm_head", False)), None)
    raise ValueError(f"quantization_config.quant_method: {method!r} is not supported; jaxinfer loads "
                     f"{NATIVE_METHOD!r} and 'gptq' (4-bit) checkpoints")


def quantization_config(fmt: Int4Format, checkpoint_format: str = NATIVE) -> dict:
    """The config.json `quantization_config` describing `fmt` in `checkpoint_format`."""
    if checkpoint_format == NATIVE:
        return {"quant_method": NATIVE_METHOD, "bits": 4, "group_size": fmt.group_size, "sym": fmt.symmetric,
                "act_order": fmt.act_order, "quantize_lm_head": fmt.quantize_lm_head,
                "layout": "int4_packed uint8 [K/2, N], group halves: see jaxinfer/pallas/int4_matmul/reference.py"}
    if checkpoint_format in GPTQ_FORMATS:
        return {"quant_method": "gptq", "bits": 4, "group_size": fmt.group_size, "desc_act": fmt.act_order,
                "sym": fmt.symmetric, "lm_head": fmt.quantize_lm_head, "checkpoint_format": checkpoint_format}
    raise ValueError(f"checkpoint_format: {checkpoint_format!r} is not one of {CHECKPOINT_FORMATS}")


def int4_format_of(params) -> Optional[Int4Format]:
    """The Int4Format a parameter tree is stored in, or None when it is not quantized.

    Raises:
      ValueError: the quantized layers disagree (group size, zeros, perm).
    """
    layers = {}

    def walk(tree, path):
        if "packed" in tree:
            layers["/".join(path)] = tree
            return
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, path + (key,))
    walk(params, ())
    if not layers:
        return None
    kinds = {(2 * np.shape(p["packed"])[0] // np.shape(p["scales"])[0], "zeros" not in p, "perm" in p)
             for p in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"params: quantized layers use different formats (group size, symmetric, act order): "
                         f"{sorted(kinds)}")
    ((group_size, symmetric, act_order),) = kinds
    return Int4Format(group_size=group_size, symmetric=symmetric, act_order=act_order,
                      quantize_lm_head="lm_head" in layers)


# ---------------------------------------------------------------------------- GPTQ tensors

def _unpack_int32(packed: np.ndarray, axis: int) -> np.ndarray:
    """Eight 4-bit values per int32, lowest bits first, unpacked along `axis` (0 or 1)."""
    words = np.asarray(packed).astype(np.int32).view(np.uint32)
    shifts = np.arange(8, dtype=np.uint32) * 4
    if axis == 0:
        values = (words[:, None, :] >> shifts[None, :, None]) & 0xF  # [R, 8, C]
        return values.reshape(-1, words.shape[1]).astype(np.uint8)
    values = (words[:, :, None] >> shifts[None, None, :]) & 0xF  # [R, C, 8]
    return values.reshape(words.shape[0], -1).astype(np.uint8)


def _pack_int32(values: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of `_unpack_int32`: 4-bit values [R, C] -> int32, 8 per word along `axis`."""
    values = np.asarray(values).astype(np.uint32) & 0xF
    shifts = np.arange(8, dtype=np.uint32) * 4
    if axis == 0:
        grouped = values.reshape(-1, 8, values.shape[1]) << shifts[None, :, None]  # [R/8, 8, C]
        return np.bitwise_or.reduce(grouped, axis=1).view(np.int32)
    grouped = values.reshape(values.shape[0], -1, 8) << shifts[None, None, :]  # [R, C/8, 8]
    return np.bitwise_or.reduce(grouped, axis=2).view(np.int32)


def gptq_to_int4(name: str, tensors: Mapping[str, np.ndarray], num_in: int, num_out: int, group_size: int,
                 checkpoint_format: str) -> dict:
    """One GPTQ layer -> the parameters of a quantized Linear (before `finalize_gptq_layers`).

    Args:
      name: the layer's tensor prefix (for error messages), e.g. model.layers.0.mlp.up_proj.
      tensors: {"qweight", "qzeros", "scales", optional "g_idx"} of the layer.
      num_in, num_out: K and N of the layer.
      group_size: from the config; <= 0 means one group over all K rows.
      checkpoint_format: "gptq" (zeros stored minus one) or "gptq_v2".
    Returns:
      {"packed" uint8 [K/2, N], "scales" float32 [G, N], "zeros" float32 [G, N],
      "perm" int32 [K]} (perm = the stable sort of g_idx; identity without act order).
    Raises:
      ValueError: a tensor has the wrong shape, or g_idx does not form groups of g rows.
    """
    group_size = num_in if group_size <= 0 else group_size
    if num_in % group_size or group_size % 2:
        raise ValueError(f"{name}: group_size {group_size} does not divide the {num_in} input rows evenly")
    num_groups = num_in // group_size
    want = {"qweight": (num_in // 8, num_out), "qzeros": (num_groups, num_out // 8), "scales": (num_groups, num_out)}
    for key, shape in want.items():
        got = tuple(np.shape(tensors[key]))
        if got != shape:
            raise ValueError(f"tensor {name}.{key}: shape {got} does not match the config's {shape}")
    codes = _unpack_int32(tensors["qweight"], axis=0)  # [K, N]
    zeros = _unpack_int32(tensors["qzeros"], axis=1).astype(np.float32)  # [G, N]
    if checkpoint_format == "gptq":
        zeros += 1.0  # v1 stores z - 1 (so a stored 15 means 16)
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g_idx = np.arange(num_in) // group_size
    g_idx = np.asarray(g_idx).astype(np.int64)
    if g_idx.shape != (num_in,) or g_idx.min() < 0 or g_idx.max() >= num_groups:
        raise ValueError(f"tensor {name}.g_idx: expected [{num_in}] group ids in [0, {num_groups})")
    counts = np.bincount(g_idx, minlength=num_groups)
    if (counts != group_size).any():
        raise ValueError(f"tensor {name}.g_idx: every group must hold {group_size} rows, got sizes "
                         f"{sorted(set(counts.tolist()))}")
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    return {"packed": np.asarray(int4.pack(codes[perm], group_size)),
            "scales": np.asarray(tensors["scales"]).astype(np.float32), "zeros": zeros, "perm": perm}


def finalize_gptq_layers(layers: Mapping[str, dict]) -> Int4Format:
    """Makes all loaded GPTQ layers share one format, in place; returns it.

    Zero points are dropped (symmetric) when every layer's are all 8; permutations are
    dropped when every layer's is the identity, else kept everywhere.
    """
    symmetric = all((p["zeros"] == int4.SYMMETRIC_ZERO).all() for p in layers.values())
    act_order = any((p["perm"] != np.arange(p["perm"].size)).any() for p in layers.values())
    group_sizes = set()
    for params in layers.values():
        group_sizes.add(2 * params["packed"].shape[0] // params["scales"].shape[0])
        if symmetric:
            del params["zeros"]
        if not act_order:
            del params["perm"]
    if len(group_sizes) != 1:
        raise ValueError(f"quantization_config.group_size: layers resolve to different group sizes "
                         f"{sorted(group_sizes)}; jaxinfer needs one")
    return Int4Format(group_size=group_sizes.pop(), symmetric=symmetric, act_order=act_order,
                      quantize_lm_head=any(n.startswith("lm_head") for n in layers))


def int4_to_gptq(name: str, params: Mapping[str, np.ndarray], checkpoint_format: str) -> dict:
    """The parameters of a quantized Linear -> GPTQ tensors (qweight, qzeros, scales, g_idx).

    Raises:
      ValueError: the layer cannot be written losslessly in this format (named): K or N
        not a multiple of 8, scales not float16 values, zero points outside what the
        format stores (v1 cannot store a zero point of 0, v2 cannot store 16).
    """
    packed = np.asarray(params["packed"])
    scales = np.asarray(params["scales"], np.float32)
    num_groups, num_out = scales.shape
    num_in = 2 * packed.shape[0]
    group_size = num_in // num_groups
    if num_in % 8 or num_out % 8:
        raise ValueError(f"{name}: GPTQ packs 8 values per int32 and needs K and N multiples of 8, "
                         f"got K={num_in}, N={num_out}")
    stored_codes = np.asarray(int4.unpack(packed, group_size))  # rows in stored order
    perm = np.asarray(params["perm"]) if "perm" in params else np.arange(num_in)
    codes = np.empty_like(stored_codes)
    codes[perm] = stored_codes
    g_idx = np.empty(num_in, np.int32)
    g_idx[perm] = np.arange(num_in) // group_size
    zeros = np.asarray(params["zeros"], np.float32) if "zeros" in params else \
        np.full(scales.shape, int4.SYMMETRIC_ZERO, np.float32)
    if (zeros != np.round(zeros)).any():
        raise ValueError(f"{name}: GPTQ stores integer zero points; this layer's are fractional")
    stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
    if stored_zeros.min() < 0 or stored_zeros.max() > 15:
        raise ValueError(f"{name}: zero points {int(zeros.min())}..{int(zeros.max())} cannot be stored in "
                         f"checkpoint_format {checkpoint_format!r}: 'gptq' (v1) stores z - 1 in 4 bits (z in "
                         f"[1, 16]), 'gptq_v2' stores z (z in [0, 15])")
    half_scales = scales.astype(np.float16)
    if (half_scales.astype(np.float32) != scales).any():
        raise ValueError(f"{name}: scales are not float16 values, so a GPTQ export would change them")
    return {"qweight": _pack_int32(codes, axis=0), "qzeros": _pack_int32(stored_zeros.astype(np.uint8), axis=1),
            "scales": half_scales, "g_idx": g_idx}
