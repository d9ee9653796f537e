"""`serve`'s warm-up modes (ServingConfig.warmup): the programs compiled before ready."""
from __future__ import annotations

import pytest

from jaxinfer.serving.core import ServingConfig


@pytest.mark.parametrize("fields, name", [({"warmup": "all"}, "warmup"), ({"warmup_context_tokens": 0},
                                                                        "warmup_context_tokens"),
                                          ({"warmup_context_tokens": True}, "warmup_context_tokens")])
def test_bad_warmup_settings_are_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        ServingConfig(**fields)


def test_grid_warmup_compiles_the_grid_before_ready(make_serving_engine, serving_session):
    engine = make_serving_engine(warmup="grid", warmup_context_tokens=16)
    grid = serving_session.engine.warmup_grid(16)
    assert engine.is_ready and engine.warmup_report["programs"] == len(grid) > 8
    assert engine.warmup_report["profile_programs"] == 0  # the test session's compilation cache is off
    runner = serving_session.engine.runner
    assert all(key in runner._shape_keys for key in grid)
    text = engine.metrics.render().decode()
    line = next(x for x in text.splitlines() if "warmup_programs" in x and not x.startswith("#"))
    assert float(line.split()[-1]) == engine.warmup_report["compiled"]  # the only warm-up of this session
