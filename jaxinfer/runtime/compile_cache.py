"""The persistent XLA compilation cache: compiled step programs outlive the process.

Path: InferenceSession (before any weight is loaded, so before jax compiles anything)
-> **configure(EngineConfig.compilation_cache_dir)** -> jax's persistent cache, which
every later `jax.jit` compilation reads before compiling and writes after.

The directory: the explicit `compilation_cache_dir`; else the environment variable
JAXINFER_COMPILATION_CACHE_DIR; else `$XDG_CACHE_HOME/jaxinfer/xla` (default
`~/.cache/jaxinfer/xla`). An empty string turns jaxinfer's management off: jax's own
settings (e.g. a JAX_COMPILATION_CACHE_DIR the user set) are then left as they are, and
a directory the user already gave jax is kept when jaxinfer would only use its default.

Security: jax treats cache entries as trusted code, so the directory is created private
to the user (mode 0700); do not point it at a directory others can write.

Only programs whose compilation took at least MIN_COMPILE_SECONDS are stored (the step
programs, not the many tiny eager ops). Entries are keyed by jax, XLA and backend
versions and by the program, so a stale entry is never used for a different program.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV_VAR = "JAXINFER_COMPILATION_CACHE_DIR"
MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxinfer", "xla")


def resolve_cache_dir(path: Optional[str]) -> Optional[str]:
    """The directory to use for `EngineConfig.compilation_cache_dir` = path; None = off."""
    if path is None:
        path = os.environ.get(ENV_VAR)
        if path is None:
            return jax.config.jax_compilation_cache_dir or default_cache_dir()
    return os.path.abspath(os.path.expanduser(path)) if path else None


def configure(path: Optional[str]) -> Optional[str]:
    """Points jax's persistent compilation cache at the resolved directory.

    Returns:
      the directory in use, or None when jaxinfer leaves the cache alone ("").
    Raises:
      ValueError: naming `compilation_cache_dir` when the directory cannot be created.
    """
    directory = resolve_cache_dir(path)
    if directory is None:
        return None
    if jax.config.jax_compilation_cache_dir == directory:
        return directory
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation_cache_dir: cannot create {directory!r}: {e}") from None
    compilation_cache.set_cache_dir(directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    # A process that compiled before (with no cache) checked the cache once and would
    # keep it off: make jax look again.
    logger = logging.getLogger("jax._src.compilation_cache")  # its INFO "Resetting cache" line is noise here
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        compilation_cache.reset_cache()
    finally:
        logger.setLevel(level)
    return directory
