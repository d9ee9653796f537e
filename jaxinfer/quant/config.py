"""QuantConfig: the knobs of int4 weight-only quantization (RTN and GPTQ).

Where it sits: session.from_pretrained(quantization=...) -> **jaxinfer.quant** (turns
float parameters into the int4 format of jaxinfer.models.layers.Int4Format) -> runner.
The method itself ("int4" = round to nearest, "int4-gptq" = GPTQ) is the `quantization`
string given to `jaxinfer.quant.quantize`, not a field here. The parameters it produces
describe themselves (jaxinfer.models.quant_format.int4_format_of reads their format).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """Group-wise int4 quantization settings.

    Symmetric: s = 2 * max|w| / 15 per group and output column, q = clamp(round(w / s) + 8,
    0, 15) (all 16 codes used; w = (q - 8) * s). Asymmetric: s = (max - min) / 15 with the
    range widened to include 0, integer zero point z = round(-min / s), q = clamp(round(w /
    s) + z, 0, 15). Scales are rounded up to the nearest float16 value (so a GPTQ export,
    whose scales are float16, is lossless, and the RTN error stays <= s / 2).
    """

    group_size: int = 128  # input rows per scale; must divide every quantized layer's in_features
    symmetric: bool = True  # zero point 8; False = per-group min/max scale and zero point
    quantize_lm_head: bool = False  # also quantize an untied LM head (embeddings always stay float)
    # GPTQ (Frantar et al. 2022) only:
    damp_percent: float = 0.01  # Hessian dampening: this fraction of the mean diagonal is added
    block_size: int = 128  # columns quantized per lazy batch update (rounded to whole groups)
    act_order: bool = False  # quantize input rows by decreasing Hessian diagonal (stored with `perm`)
    num_calibration_sequences: int = 16  # built-in calibration text: sequences ...
    calibration_length: int = 512  # ... of this many tokens (capped by the model's context)
    calibration_batch_size: int = 4  # sequences per forward pass while collecting Hessians

    def __post_init__(self):
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2 \
                or self.group_size % 2:
            raise ValueError(f"group_size: must be an even int >= 2, got {self.group_size!r}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent: must be in [0, 1), got {self.damp_percent!r}")
        for name in ("block_size", "num_calibration_sequences", "calibration_length", "calibration_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
