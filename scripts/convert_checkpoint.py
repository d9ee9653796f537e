"""Converts an HF model folder into a jaxinfer orbax folder (and can verify it).

    python scripts/convert_checkpoint.py --hf_path PATH --output PATH [--dtype bfloat16]

The output folder holds the HF config.json, the tokenizer / generation files, and the
converted parameters saved with orbax-checkpoint under `orbax_params/`.
`InferenceSession.from_pretrained(output)` loads it like any model folder.
"""
from __future__ import annotations

import os
import shutil
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer.models import checkpoint  # noqa: E402

_HF_PATH = flags.DEFINE_string("hf_path", None, "HF model folder (config.json + safetensors).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(checkpoint.DTYPES), "Stored parameter dtype.")

_COPIED = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
           "tokenizer_config.json", "special_tokens_map.json")


def convert(hf_path: str, output: str, dtype: str = "float32") -> str:
    """Converts; returns the output folder."""
    config, params, _ = checkpoint.load_model(hf_path, dtype)
    os.makedirs(output, exist_ok=True)
    for name in _COPIED:
        src = os.path.join(hf_path, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(output, name))
    checkpoint.save_orbax_params(os.path.join(output, checkpoint.ORBAX_DIR), params)
    return output


def main(argv):
    del argv
    out = convert(_HF_PATH.value, _OUTPUT.value, _DTYPE.value)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
