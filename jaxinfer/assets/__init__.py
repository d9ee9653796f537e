"""Models shipped inside the package, addressable by name."""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# tiny-code: scripts/train_tiny.py. tiny-code-recursive: tiny-code converted by
# scripts/convert_recursive.py (2 shared layers x 3 loops, rank-16 LoRA) and uptrained by
# scripts/uptrain_recursive.py (docs/recursive.md).
NAMED_MODELS = {name: os.path.join(_HERE, name) for name in ("tiny-code", "tiny-code-recursive")}
DEFAULT_MODEL = "tiny-code"


def resolve_model_path(name_or_path: str) -> str:
    """A registered name -> its bundled folder; anything else is returned unchanged."""
    if name_or_path in NAMED_MODELS:
        path = NAMED_MODELS[name_or_path]
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model {name_or_path!r}: bundled folder {path} is missing its config.json")
        return path
    return name_or_path
