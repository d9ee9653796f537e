"""Notebook execution runs only when asked for: `-m notebooks` (python3 tasks.py notebooks).

The `notebooks` marker is registered in pyproject.toml; the default run (`-m 'not slow'`)
would select these tests, so they are deselected here unless the -m expression names the
marker. The output-free checks of the same file stay in the default run.
"""
from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    if "notebooks" in (config.getoption("markexpr") or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("notebooks") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
