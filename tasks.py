#!/usr/bin/env python3
"""Quickstart tasks that need nothing but Python 3.10+ and pip.

    python3 tasks.py demo   # venv + install + generate with the bundled model
    python3 tasks.py test   # venv + install with test extras + the whole test suite
    python3 tasks.py notebooks   # venv + test extras + every notebook in notebooks/ run headless on CPU

Each creates (or reuses) the virtual environment `.venv` beside this file, installs
jaxinfer into it, and runs the job with that environment's interpreter. Extra
arguments after the task are passed on (to `jaxinfer generate` or to pytest).
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
BIN = os.path.join(VENV, "Scripts" if os.name == "nt" else "bin")
PYTHON = os.path.join(BIN, "python")
DEMO_PROMPT = "def fibonacci(n):\n    "


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _install(extras: str = "") -> None:
    if not os.path.exists(PYTHON):
        print(f"+ creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    _run(PYTHON, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".{extras}")


def demo(args: list) -> int:
    _install()
    # Seeded sampling: the bundled 6M-parameter model loops under greedy decoding.
    # No sampling flags: the bundled model's generation_config.json holds the defaults
    # its held-out sweep chose (jaxinfer/assets/tiny-code/sampling_sweep.json).
    cmd = [os.path.join(BIN, "jaxinfer"), "generate", "--prompt", DEMO_PROMPT, "--max_tokens", "96", "--seed", "0"]
    _run(*cmd, *args)
    return 0


def test(args: list) -> int:
    _install("[test]")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")  # the suite is the CPU suite; kernels run in interpret mode
    # Two pytest workers (pytest-xdist) where there are two cores or more: ~20% faster
    # on the 2-core CI machine. `-n 0` (or any -n / -p no:xdist of yours) overrides it.
    workers = [] if any(a == "-n" or a.startswith("-n") or a == "no:xdist" for a in args) else (
        ["-n", str(min(os.cpu_count() or 1, 4))] if (os.cpu_count() or 1) >= 2 else [])
    # --durations: the slowest tests in every log, to keep the suite within its budget.
    cmd = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=25", *workers, *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def notebooks(args: list) -> int:
    """Executes every notebook headless on CPU (tests/notebooks, marker `notebooks`)."""
    _install("[test]")
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    # One notebook at a time: each one starts its own kernel (and 06 a server).
    cmd = [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--durations=10", "-m", "notebooks",
           "tests/notebooks", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


TASKS = {"demo": demo, "test": test, "notebooks": notebooks}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TASKS:
        print(f"usage: python3 tasks.py {{{'|'.join(TASKS)}}} [args...]", file=sys.stderr)
        return 2
    return TASKS[sys.argv[1]](sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
