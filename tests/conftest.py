"""Shared fixtures: tiny HF checkpoints of every family, built once per test session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

# The suite leaves the user's persistent compilation cache alone (and every test sees
# the compile counts and times of a cold process); tests/runtime/test_compile_cache.py
# turns it on explicitly in a temporary folder.
os.environ.setdefault("JAXINFER_COMPILATION_CACHE_DIR", "")

# Hypothesis (tests/fuzz, the servers' fuzz tests) keeps caches in its home folder,
# `.hypothesis/` in the working directory by default: keep them out of the repository.
try:
    import tempfile

    from hypothesis.configuration import set_hypothesis_home_dir
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "jaxinfer-hypothesis"))
except ImportError:  # the runtime install, without the test extras
    pass


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory):
    """Returns f(name) -> (folder, torch model); each model is built once."""
    import hf_models
    built = {}

    def get(name):
        if name not in built:
            path = str(tmp_path_factory.mktemp(name))
            built[name] = (path, hf_models.build(name, path))
        return built[name]
    return get


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """(folder, torch model) of a tiny Llama with a sentencepiece tokenizer."""
    import hf_models
    path = str(tmp_path_factory.mktemp("text_model"))
    return path, hf_models.build_text_model(path)
