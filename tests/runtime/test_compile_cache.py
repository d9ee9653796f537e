"""The persistent compilation cache: where it lives, and that a second process hits it."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import jax
import pytest

from jaxinfer import EngineConfig
from jaxinfer.runtime import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_cache_folder_is_resolved_in_order(monkeypatch, tmp_path):
    if jax.config.jax_compilation_cache_dir:  # the user's own jax setting wins over the default
        pytest.skip("JAX_COMPILATION_CACHE_DIR is set in this environment")
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir(None) == str(tmp_path / "xdg" / "jaxinfer" / "xla")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir(None) == str(tmp_path / "env")
    assert compile_cache.resolve_cache_dir(str(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert compile_cache.resolve_cache_dir("") is None  # off
    monkeypatch.setenv(compile_cache.ENV_VAR, "")
    assert compile_cache.resolve_cache_dir(None) is None
    assert compile_cache.configure("") is None


def test_bad_folder_values_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        EngineConfig(compilation_cache_dir=5)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        compile_cache.configure(str(blocker / "xla"))


def _generate(model_dir, cache_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop(compile_cache.ENV_VAR, None)
    return subprocess.run([sys.executable, "-m", "jaxinfer.cli", "generate", "--model", model_dir,
                           "--prompt", "def add(a, b):", "--max_tokens", "4", "--temperature", "0",
                           "--compilation_cache_dir", cache_dir],
                          capture_output=True, text=True, env=env, timeout=300)


def _entries(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("jit__step_fn"))


def test_a_second_process_reuses_the_compiled_step_programs(text_model_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _generate(text_model_dir[0], str(cache))
    assert first.returncode == 0, first.stderr
    assert "Resetting cache" not in first.stderr  # jax's INFO line is kept out of normal output
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    entries = _entries(cache)
    assert entries, os.listdir(cache)  # the step programs were stored
    second = _generate(text_model_dir[0], str(cache))
    assert second.returncode == 0, second.stderr
    assert _entries(cache) == entries  # every step program came from the cache
    # Greedy: the cached programs compute what the freshly compiled ones did.
    assert first.stdout.splitlines()[:-1] == second.stdout.splitlines()[:-1]
