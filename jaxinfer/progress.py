"""Progress bars for long work: checkpoint placement, GPTQ layer by layer, offline generate.

Where it sits: layer 1 (no jax, no numpy; tqdm only). Callers one layer up or more ask
for a bar with `bar(...)` and update it; whether anything is drawn is decided here:

- `enabled=True` / `False` (an explicit argument, e.g. `generate(..., progress=True)`)
  wins;
- else the environment variable JAXINFER_PROGRESS: "0" / "false" / "off" turns every
  bar off, "1" / "true" / "on" turns them on;
- else a bar is drawn when stderr is a terminal (`sys.stderr.isatty()`) or the code
  runs in a Jupyter kernel (then `tqdm.auto` draws a notebook widget where ipywidgets is
  installed, text otherwise). Logs, pipes, CI and tests get no bar.

A disabled bar is a real tqdm object with `disable=True`: `update` and `close` cost
nothing, so callers never branch on it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

ENV_VAR = "JAXINFER_PROGRESS"
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")


def _in_notebook() -> bool:
    """True inside a Jupyter / IPython kernel (where stderr is no TTY but bars render)."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        ip = shell.get_ipython()
    except AttributeError:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def is_enabled(enabled: Optional[bool] = None, stream=None) -> bool:
    """Whether a bar would be drawn (see the module docstring for the order of rules).

    Args:
      enabled: an explicit choice (None = decide from the environment and the stream).
      stream: the stream the bar writes to (None = sys.stderr).
    Raises:
      ValueError: `enabled` is not None or a bool, or JAXINFER_PROGRESS has another value.
    """
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise ValueError(f"progress: expected None, True or False, got {enabled!r}")
        return enabled
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    if env:
        raise ValueError(f"{ENV_VAR}: expected one of {_OFF + _ON} or unset, got {os.environ[ENV_VAR]!r}")
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):  # a closed stream
        tty = False
    return tty or _in_notebook()


def bar(total: Optional[float] = None, desc: str = "", unit: str = "it", *, enabled: Optional[bool] = None,
        unit_scale: bool = False, stream=None, leave: bool = True):
    """A tqdm bar (notebook-aware), drawn only when `is_enabled(enabled, stream)`.

    Use it as a context manager or call `close()`: `with bar(n, "GPTQ", "layer") as b:
    ... b.update(1)`.

    Args:
      total: the expected count (None = unknown; the bar then shows a rate only).
      desc: the text before the bar.
      unit: what one count is ("layer", "B", "prompt").
      enabled: None (automatic), True (force) or False (never).
      unit_scale: scale large counts (e.g. bytes as kB / MB / GB).
      stream: where to write (None = sys.stderr).
      leave: keep the finished bar on screen.
    """
    on = is_enabled(enabled, stream)
    file = sys.stderr if stream is None else stream
    if on and stream is None and _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm  # a widget in Jupyter
    else:  # text (in Jupyter without ipywidgets too: tqdm.auto would only warn and fall back)
        from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not on, file=file, leave=leave,
                dynamic_ncols=True)
