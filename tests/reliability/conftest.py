"""One tiny runner for the whole reliability suite (its compiled programs are shared)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_runner():
    from reliability_helpers import make_runner
    return make_runner()
