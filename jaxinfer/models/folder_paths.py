"""Model-folder paths: every file a checkpoint or tokenizer names stays inside its folder.

`resolve_in_folder` refuses names like "../x.safetensors" or "/etc/x" (an index file's
weight_map is data, not a path to trust) and symlinks that lead outside the folder,
with one exception: the Hugging Face hub cache, whose snapshot folders
(`.../snapshots/<revision>/`) hold symlinks into the sibling `.../blobs/` folder.
No jax, no numpy.
"""
from __future__ import annotations

import os


def _allowed_roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    roots = [real]
    # HF hub cache: <repo>/snapshots/<revision>/<file> -> ../../blobs/<sha256>
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots


def resolve_in_folder(folder: str, name, what: str = "file") -> str:
    """The path of `name` inside `folder`, refusing names and symlinks that lead outside it.

    Args:
      folder: the model folder.
      name: a file name relative to it (as an index file names a shard).
      what: how errors describe the file (e.g. "shard named in model.safetensors.index.json").
    Raises:
      ValueError: `name` is not a relative path, or it (or a symlink on the way) leads
        outside the folder (the HF hub cache's blobs/ folder excepted).
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{folder}: {what} {name!r} is not a file name")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{folder}: {what} {name!r} points outside the model folder; refused")
    path = os.path.join(folder, name)
    real = os.path.realpath(path)
    if not any(real == root or real.startswith(root + os.sep) for root in _allowed_roots(folder)):
        raise ValueError(f"{path}: {what} {name!r} resolves to {real}, outside the model folder "
                         f"(a symlink escaping it); refused")
    return path
