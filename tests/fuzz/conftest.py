"""Hypothesis profiles of the fuzz suite, the `fuzz_profile` fixture and the cases report.

Profiles: "ci" (the default run: few examples per property, derandomized so CI is
deterministic; all default fuzz tests together stay under a minute on 2 cores) and
"slow" (`pytest -m slow`, or $JAXINFER_FUZZ_PROFILE=slow: at least 10^5 examples in
total, the cheap pure-validation properties carrying most of them). No example
database, and hypothesis's home folder is in the temp dir: nothing is written into the
repository.

Each property test takes `fuzz_profile`, parametrized "ci" (default run) and "slow"
(marked slow). With $JAXINFER_FUZZ_REPORT=path the examples tried and failures per
property are merged into that JSON file (entries of other properties are kept).
"""
from __future__ import annotations

import json
import os

import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

import fuzz_support

# Hypothesis also caches Unicode tables and source constants in its home folder
# (.hypothesis in the working directory by default): keep it out of the repository.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "jaxinfer-hypothesis"))

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
settings.register_profile("ci", max_examples=20, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=1000, derandomize=False, **_COMMON)


@pytest.fixture(params=[pytest.param("ci", id="ci"), pytest.param("slow", id="slow", marks=pytest.mark.slow)])
def fuzz_profile(request):
    return fuzz_support.active_profile(request.param)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get(fuzz_support.REPORT_ENV)
    stats = fuzz_support.report()
    if not path or not stats:
        return
    merged = {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        try:
            with open(path) as f:
                merged = json.load(f)
        except ValueError:
            merged = {}
    merged.update(stats)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
