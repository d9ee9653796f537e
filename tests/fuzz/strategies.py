"""Hypothesis strategies of hostile values: wrong types, NaN / Inf, huge and negative
numbers, bools where ints go, huge lists, nested junk."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st

HUGE_INTS = st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**12, 10**30, -(2**63), -1, 0, 1])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324, 0.5, 1.0, 2.0])


def _huge_list(element):
    # A long list without drawing each element: cheap to build, hostile to consume.
    return st.builds(lambda n, x: [x] * n, st.integers(0, 20_000), element)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), HUGE_INTS, st.floats(allow_nan=True, allow_infinity=True),
    SPECIAL_FLOATS, st.text(max_size=8), st.binary(max_size=8),
    st.builds(np.int64, st.integers(-5, 300)), st.builds(np.float32, st.floats(-3, 3, width=32)),
    st.builds(np.bool_, st.booleans()), st.just(object()), st.just(float),
)
junk = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 300)), inner, max_size=4),
                            _huge_list(st.one_of(st.integers(-2, 300), st.text(max_size=3))),
                            st.frozensets(st.integers(0, 50), max_size=4)),
    max_leaves=8,
)


def kwargs_of(fields, extra=("bogus", "temp", "maxTokens", "")):
    """A dict of some of `fields` (plus unknown names) mapped to junk."""
    return st.dictionaries(st.sampled_from(tuple(fields) + tuple(extra)), junk, max_size=5)
