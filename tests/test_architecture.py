"""The package's shape, checked from source with `ast`: layers, host-only modules, sizes, links.

Four checks, each a function of a repository root that returns one "path:line: what"
string per violation (so they also run on the small synthetic trees below):

- ``layer_violations``: a module imports only its own layer or lower ones
  (docs/architecture.md, "Layers and import direction"); relative imports are resolved.
- ``host_only_violations``: the host-side modules (scheduler, block manager, request
  state, ...) never import jax, jaxlib or flax, not even inside a function, and neither
  does any jaxinfer module they import.
- ``length_violations``: no Python file in jaxinfer/ is over 500 lines.
- ``shared_reference_violations``: nothing in the repository points to the workspace
  notes outside it (they are not part of the repo).
"""
from __future__ import annotations

import ast
import os
import pathlib

import pytest

_REPO = pathlib.Path(__file__).resolve().parent.parent

# Lower number = lower layer; a module may import its own layer or a lower one.
LAYERS = (
    # NOTE: jaxinfer.assets is data shipped with the package (bundled model folders)
    # and imports nothing from jaxinfer, so it sits below every layer and any layer may
    # ask it for a bundled model's path.
    ("jaxinfer.assets", 0),
    ("jaxinfer.config", 1), ("jaxinfer.types", 1), ("jaxinfer.progress", 1),
    ("jaxinfer.pallas", 2), ("jaxinfer.sharding", 2),
    ("jaxinfer.models", 3), ("jaxinfer.quant", 3),
    ("jaxinfer.runtime", 4),
    ("jaxinfer.engine", 5),
    ("jaxinfer.session", 6), ("jaxinfer.serving", 6), ("jaxinfer.cli", 6),
)
# NOTE: jaxinfer/__init__.py is the package facade: it re-exports the public API from
# layer 6 (InferenceSession), so it sits above every layer. It may import anything; no
# module inside the package may import it (`import jaxinfer`, or a re-exported name
# through `from jaxinfer import ...`); submodules through `from jaxinfer import x` are
# judged by their own layer.
_FACADE = "jaxinfer"
_FACADE_LAYER = 7

# Host-side modules: pure Python/numpy, never jax. A path that does not exist yet is
# skipped; it is checked as soon as it is added.
HOST_ONLY = (
    "jaxinfer/engine/scheduler.py",
    "jaxinfer/engine/block_manager.py",
    "jaxinfer/engine/request.py",
    "jaxinfer/engine/shared_prefix.py",
    "jaxinfer/engine/output_processor.py",
    "jaxinfer/engine/validation.py",
    "jaxinfer/engine/errors.py",
    "jaxinfer/engine/swap.py",
    "jaxinfer/engine/speculative.py",
    "jaxinfer/runtime/input_batch.py",
    "jaxinfer/runtime/step_checks.py",
    "jaxinfer/runtime/faults.py",
    # the servers talk to the async engine and tokenizers only (docs/architecture.md)
    "jaxinfer/serving/core.py",
    "jaxinfer/serving/metrics.py",
    "jaxinfer/serving/server.py",
    "jaxinfer/serving/http_server.py",
    "jaxinfer/serving/openai_protocol.py",
    "jaxinfer/serving/chat_template.py",
    "jaxinfer/serving/grpc_server.py",
)
_DEVICE_PACKAGES = ("jax", "jaxlib", "flax")

MAX_LINES = 500

# Split so that this file does not match its own patterns.
_SHARED_PATTERNS = ("../" + "shared", "shared/" + "ARCHITECTURE", "shared/" + "KERNELS", "shared/" + "STYLE")
# Top-level files are scanned too; these folders are scanned recursively.
_SCANNED_FOLDERS = ("docs", "jaxinfer", "scripts", "tests")
_SKIPPED_NAMES = ("__pycache__",)


def _module_name(root: pathlib.Path, path: pathlib.Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Module name -> source file, for every module under root/jaxinfer."""
    return {_module_name(root, p): p for p in sorted((root / "jaxinfer").rglob("*.py"))
            if not set(p.parts) & set(_SKIPPED_NAMES)}


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names (relative dots resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: pathlib.Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, function bodies included.

    `from pkg import x` counts as importing `pkg.x` where that is a module of the tree,
    else `pkg`. Calls of `importlib.import_module("...")` / `__import__("...")` with a
    literal name count too.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def layer_of(module: str) -> int | None:
    """The layer of a jaxinfer module; None for modules outside jaxinfer and unknown ones."""
    if module == _FACADE:
        return _FACADE_LAYER
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


def _is_jaxinfer(module: str) -> bool:
    return module == _FACADE or module.startswith(_FACADE + ".")


def layer_violations(root: pathlib.Path) -> list[str]:
    files = _package_files(root)
    known = set(files)
    bad = []
    for module, path in files.items():
        rel = path.relative_to(root)
        own = layer_of(module)
        if own is None:
            bad.append(f"{rel}:1: {module} is in no layer (add it to LAYERS and docs/architecture.md)")
            continue
        for line, name in _imports(path, module, known):
            if not _is_jaxinfer(name):
                continue
            other = layer_of(name)
            if other is None:
                bad.append(f"{rel}:{line}: imports {name}, which is in no layer")
            elif other > own:
                bad.append(f"{rel}:{line}: layer {own} ({module}) imports {name} (layer {other})")
    return bad


def _is_device_package(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in _DEVICE_PACKAGES)


def _source_of(module: str, files: dict[str, pathlib.Path]) -> list[str]:
    """The modules of the tree Python runs to import `module`: its parent packages and itself.

    The facade jaxinfer/__init__.py is left out: it re-exports the session (so any
    import of the package runs jax today); the check is about what the host-side
    code itself asks for.
    """
    parts = module.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if m in files]


def host_only_violations(root: pathlib.Path) -> list[str]:
    files = _package_files(root)
    known = set(files)
    imports = {m: _imports(p, m, known) for m, p in files.items()}
    bad = []
    for rel in HOST_ONLY:
        path = root / rel
        if not path.is_file():
            continue
        start = _module_name(root, path)
        # Depth-first over the jaxinfer modules the host module pulls in; the first
        # device import on each path is reported at the host module's own import line.
        for line, name in imports[start]:
            if _is_device_package(name):
                bad.append(f"{rel}:{line}: host-side module imports {name}")
                continue
            if not _is_jaxinfer(name):
                continue
            seen, stack = {start}, _source_of(name, files)
            while stack:
                mod = stack.pop()
                if mod in seen:
                    continue
                seen.add(mod)
                for dep_line, dep in imports[mod]:
                    if _is_device_package(dep):
                        dep_rel = files[mod].relative_to(root)
                        bad.append(f"{rel}:{line}: host-side module imports {name}, which reaches {dep} "
                                   f"({dep_rel}:{dep_line})")
                        stack.clear()
                        break
                    if _is_jaxinfer(dep):
                        stack.extend(_source_of(dep, files))
    return bad


def length_violations(root: pathlib.Path) -> list[str]:
    bad = []
    for path in _package_files(root).values():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            bad.append(f"{path.relative_to(root)}:{MAX_LINES + 1}: {count} lines (at most {MAX_LINES}; split it)")
    return bad


def _scanned_files(root: pathlib.Path):
    for entry in sorted(root.iterdir()):
        if entry.is_file() and not entry.name.startswith("."):
            yield entry
    for folder in _SCANNED_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_NAMES)
            for name in sorted(filenames):
                if not name.endswith(".pyc"):
                    yield pathlib.Path(dirpath) / name


def shared_reference_violations(root: pathlib.Path) -> list[str]:
    bad = []
    patterns = [p.encode() for p in _SHARED_PATTERNS]
    for path in _scanned_files(root):
        data = path.read_bytes()
        for pattern in patterns:
            start = data.find(pattern)
            while start != -1:
                line = data.count(b"\n", 0, start) + 1
                bad.append(f"{path.relative_to(root)}:{line}: points to {pattern.decode()!r}, which is outside "
                           f"the repository (link docs/architecture.md instead)")
                start = data.find(pattern, start + 1)
    return bad


# ---------------------------------------------------------------------------
# The repository itself
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("check", [layer_violations, host_only_violations, length_violations,
                                   shared_reference_violations], ids=lambda f: f.__name__)
def test_repository(check):
    bad = check(_REPO)
    assert not bad, "\n".join(bad)


def test_every_layer_prefix_exists_or_is_planned():
    planned: set = set()
    files = _package_files(_REPO)
    missing = [prefix for prefix, _ in LAYERS
               if prefix not in planned and not any(m == prefix or m.startswith(prefix + ".") for m in files)]
    assert not missing


# ---------------------------------------------------------------------------
# The checker on synthetic trees
# ---------------------------------------------------------------------------


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


_CLEAN = {
    "jaxinfer/__init__.py": "from jaxinfer.session import Session\n",
    "jaxinfer/config.py": "import dataclasses\n",
    "jaxinfer/assets/__init__.py": "import os\n",
    "jaxinfer/models/__init__.py": "",
    "jaxinfer/models/model.py": "import jax\nfrom jaxinfer import config\nfrom . import layers\n",
    "jaxinfer/models/layers.py": "import flax\n",
    "jaxinfer/engine/__init__.py": "",
    "jaxinfer/engine/block_manager.py": "import numpy\nfrom jaxinfer.config import X\n",
    "jaxinfer/engine/scheduler.py": "from .block_manager import BlockManager\nfrom ..config import Y\n",
    "jaxinfer/engine/engine.py": "from jaxinfer.models.model import Model\n",
    "jaxinfer/session.py": "from jaxinfer.assets import DEFAULT\nfrom jaxinfer.engine import engine\n",
    "README.md": "See docs/architecture.md.\n",
}


def test_clean_synthetic_tree_passes(tmp_path):
    root = _write(tmp_path, _CLEAN)
    for check in (layer_violations, host_only_violations, length_violations, shared_reference_violations):
        assert check(root) == [], check.__name__


def test_upward_imports_are_found(tmp_path):
    root = _write(tmp_path, {
        **_CLEAN,
        "jaxinfer/config.py": "import dataclasses\n\n\ndef f():\n    from jaxinfer.engine import engine\n",
        "jaxinfer/models/layers.py": "import flax\nfrom ..session import Session\n",
        "jaxinfer/assets/__init__.py": "import os\nfrom jaxinfer import config\n",
        "jaxinfer/engine/engine.py": "from jaxinfer import Session\n",
        "jaxinfer/extra.py": "\n",
    })
    assert sorted(layer_violations(root)) == [
        "jaxinfer/assets/__init__.py:2: layer 0 (jaxinfer.assets) imports jaxinfer.config (layer 1)",
        "jaxinfer/config.py:5: layer 1 (jaxinfer.config) imports jaxinfer.engine.engine (layer 5)",
        "jaxinfer/engine/engine.py:1: layer 5 (jaxinfer.engine.engine) imports jaxinfer (layer 7)",
        "jaxinfer/extra.py:1: jaxinfer.extra is in no layer (add it to LAYERS and docs/architecture.md)",
        "jaxinfer/models/layers.py:2: layer 3 (jaxinfer.models.layers) imports jaxinfer.session (layer 6)",
    ]


def test_device_imports_in_host_modules_are_found(tmp_path):
    root = _write(tmp_path, {
        **_CLEAN,
        "jaxinfer/engine/block_manager.py": "import numpy\n\n\ndef f():\n    import jax.numpy as jnp\n",
        "jaxinfer/engine/scheduler.py": "from .block_manager import BlockManager\nfrom jaxinfer.models import model\n",
        # Added later: checked as soon as it exists.
        "jaxinfer/engine/validation.py": "import importlib\nflax = importlib.import_module('flax.linen')\n",
    })
    assert sorted(host_only_violations(root)) == [
        "jaxinfer/engine/block_manager.py:5: host-side module imports jax.numpy",
        "jaxinfer/engine/scheduler.py:1: host-side module imports jaxinfer.engine.block_manager, which reaches "
        "jax.numpy (jaxinfer/engine/block_manager.py:5)",
        "jaxinfer/engine/scheduler.py:2: host-side module imports jaxinfer.models.model, which reaches "
        "jax (jaxinfer/models/model.py:1)",
        "jaxinfer/engine/validation.py:2: host-side module imports flax.linen",
    ]


def test_long_files_are_found(tmp_path):
    root = _write(tmp_path, {**_CLEAN, "jaxinfer/models/layers.py": "x = 1\n" * (MAX_LINES + 1),
                             "jaxinfer/models/model.py": "x = 1\n" * MAX_LINES})
    assert length_violations(root) == [f"jaxinfer/models/layers.py:{MAX_LINES + 1}: {MAX_LINES + 1} lines "
                                       f"(at most {MAX_LINES}; split it)"]


def test_references_outside_the_repository_are_found(tmp_path):
    outside = _SHARED_PATTERNS[0] + "/" + _SHARED_PATTERNS[1].split("/")[1] + ".md"
    root = _write(tmp_path, {**_CLEAN, "README.md": f"# x\n\nSee {outside}.\n",
                             "docs/notes.md": f"a\nb\n{_SHARED_PATTERNS[1]}\n",
                             "jaxinfer/__pycache__/config.cpython-311.pyc": _SHARED_PATTERNS[0],
                             "other/notes.md": _SHARED_PATTERNS[0]})
    assert sorted(shared_reference_violations(root)) == [
        f"README.md:3: points to {_SHARED_PATTERNS[0]!r}, which is outside the repository "
        f"(link docs/architecture.md instead)",
        f"README.md:3: points to {_SHARED_PATTERNS[1]!r}, which is outside the repository "
        f"(link docs/architecture.md instead)",
        f"docs/notes.md:3: points to {_SHARED_PATTERNS[1]!r}, which is outside the repository "
        f"(link docs/architecture.md instead)",
    ]
