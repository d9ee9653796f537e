"""The bundled recursive model for the tests that serve it (models/, engine/)."""
from __future__ import annotations

import os

import pytest

from jaxinfer.assets import resolve_model_path
from script_loader import load_script

NAME = "tiny-code-recursive"
MODEL_DIR = resolve_model_path(NAME)

# A checkout without the bundled weights (a partial clone) skips, saying how to build them.
needs_model = pytest.mark.skipif(not os.path.exists(os.path.join(MODEL_DIR, "model.safetensors")),
                                 reason=f"{MODEL_DIR} not built (docs/recursive.md)")


def recursive_lib():
    """scripts/recursive_lib.py (the conversion library and the dense oracle)."""
    return load_script("convert_recursive").recursive_lib


def heldout(max_files: int) -> list:
    """Token ids of the bundled model's first held-out files."""
    return load_script("eval_perplexity").heldout_token_ids(MODEL_DIR, max_files=max_files)
