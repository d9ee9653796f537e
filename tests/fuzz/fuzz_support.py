"""Running a hypothesis property with per-property example counts, and counting what ran.

`run_property(name, profile, ci=..., slow=..., **strategies)(body)` runs `body` under
hypothesis with `ci` examples in the CI profile and `slow` in the slow one (profiles
in tests/fuzz/conftest.py). Every invocation of `body` is counted (shrinking
included: these are real calls, not the configured maximum); `report()` gives
{property: {"tried", "failed_invocations", "falsified", "profile"}}, which the
conftest merges into $JAXINFER_FUZZ_REPORT at the end of the session.

`bounded(seconds)` turns a hang into an error: SIGALRM raises TimeoutError in the
main thread (where pytest runs the test) after `seconds`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time

from hypothesis import given, settings

PROFILE_ENV = "JAXINFER_FUZZ_PROFILE"
REPORT_ENV = "JAXINFER_FUZZ_REPORT"
PROFILES = ("ci", "slow")

_stats: dict = {}


def active_profile(requested: str) -> str:
    """The profile a test runs: $JAXINFER_FUZZ_PROFILE=slow upgrades every test to slow."""
    return "slow" if os.environ.get(PROFILE_ENV, "").strip() == "slow" else requested


def report() -> dict:
    return {name: dict(entry) for name, entry in _stats.items()}


@contextlib.contextmanager
def bounded(seconds: float, what: str = "example"):
    """Raises TimeoutError if the block runs longer than `seconds` (a hang is a failure)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"{what} ran longer than {seconds} s (a hang)")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_property(name: str, profile: str, *, ci: int, slow: int, **strategies):
    """Decorator: runs `body(**drawn)` as a hypothesis property right away (see module doc)."""
    assert profile in PROFILES, profile

    def decorate(body):
        entry = _stats.setdefault(name, {"tried": 0, "failed_invocations": 0, "falsified": False,
                                         "profile": profile, "seconds": 0.0})
        entry["profile"] = profile

        def counted(**drawn):
            entry["tried"] += 1
            try:
                body(**drawn)
            except BaseException:
                entry["failed_invocations"] += 1
                raise

        test = given(**strategies)(counted)
        test = settings(settings.get_profile(profile), max_examples=ci if profile == "ci" else slow)(test)
        start = time.perf_counter()
        try:
            test()
        except BaseException:
            entry["falsified"] = True
            raise
        finally:
            entry["seconds"] += time.perf_counter() - start
        return body
    return decorate


def write_random_hf_folder(path: str, hf_config: dict, seed: int = 0, scale: float = 1.0) -> str:
    """A valid HF folder at `path`: config.json and model.safetensors of random float32 weights."""
    import json

    import numpy as np

    from jaxinfer.models import checkpoint, registry
    os.makedirs(path, exist_ok=True)
    config = registry.model_config_from_hf(hf_config)
    shapes = checkpoint.param_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (param_path, transpose, _) in checkpoint._hf_names(config).items():
        shape = tuple(checkpoint.get_path(shapes, param_path).shape)
        tensors[name] = (scale * rng.standard_normal(shape[::-1] if transpose else shape)).astype(np.float32)
    checkpoint.write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f)
    return path
