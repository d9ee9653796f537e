"""Validation helpers of the config dataclasses (layer 1: no jax, no numpy import)."""
from __future__ import annotations

import dataclasses
import itertools
import numbers
import operator
import math
import sys


def require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{field}: {message}")


class UnknownFieldError(ValueError, TypeError):
    """A keyword that is not a field of the config class (a TypeError too, like Python's own)."""


def strict_init(cls):
    """Makes `cls(...)` raise UnknownFieldError naming an unknown keyword or positional args."""
    init = cls.__init__
    fields = tuple(f.name for f in dataclasses.fields(cls) if f.init)

    def __init__(self, *args, **kwargs):
        if args:
            raise UnknownFieldError(f"{cls.__name__}: takes keyword arguments only, got {len(args)} positional")
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            raise UnknownFieldError(f"{unknown[0]}: not a field of {cls.__name__} (fields: {', '.join(fields)})")
        init(self, **kwargs)

    __init__.__doc__, __init__.__wrapped__ = init.__doc__, init
    cls.__init__ = __init__
    return cls


def bounded_tuple(values, limit: int, field: str, what: str) -> tuple:
    """tuple(values), reading at most limit + 1 items (an endless iterator is refused, not a hang)."""
    out = tuple(itertools.islice(values, limit + 1))
    require(len(out) <= limit, field, f"at most {limit} {what}, got more")
    return out


def python_ints(config) -> None:
    """Numpy integer fields of a frozen config -> python ints (code behind it checks `int`)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if is_int(value) and type(value) is not int:
            object.__setattr__(config, f.name, int(value))


def is_int(value) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool_types()))


def is_number(value) -> bool:
    """A finite int / float (numpy scalars included), not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool_types()))
            and math.isfinite(value))


def np_bool_types() -> tuple:
    """numpy's bool scalar type when numpy is loaded (config imports no numpy itself)."""
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()


def as_token_id(value, field: str) -> int:
    """An int token id (numpy integers accepted); ValueError naming `field` otherwise."""
    message = f"{field}: token ids must be ints, got {value!r} ({type(value).__name__})"
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(message)
    try:
        return operator.index(value)
    except TypeError:  # e.g. a numpy array of several ids (a nested list passed as a prompt)
        raise ValueError(message) from None
