"""Import a script of scripts/ for its helpers, its absl flags kept out of the global FlagValues.

Scripts define flags at import time; two scripts imported by tests in one pytest worker
(--model, --output, --seed in several) would collide in absl's global FlagValues. Each
script loaded here gets a private FlagValues (as `module.test_flag_values`) and a module
name of its own, so a plain `import` of the same script elsewhere is unaffected.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from unittest import mock

from absl import flags

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str):
    """The module of scripts/<name>.py, loaded once per process under `<name>_under_test`."""
    module_name = f"{name}_under_test"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve string annotations through it
    private = flags.FlagValues()
    try:
        with contextlib.ExitStack() as stack:
            for attr in dir(flags):
                if attr.startswith("DEFINE"):
                    stack.enter_context(mock.patch.object(
                        flags, attr, functools.partial(getattr(flags, attr), flag_values=private)))
            spec.loader.exec_module(module)  # defines flags only; parses nothing
    except BaseException:
        del sys.modules[module_name]
        raise
    module.test_flag_values = private
    return module
