"""`serve`'s warm-up modes (ServingConfig.warmup): what the server compiles before ready.

The warm-up itself (keys, profile, grid, no page written, no compile after it) is tested
on the session (tests/runtime/test_warmup.py) and through `jaxinfer warmup`
(tests/test_cli.py); here: that each mode asks the session for the right programs, and
that /metrics reports them apart from traffic's compiles.
"""
from __future__ import annotations

import pytest

from jaxinfer.serving.core import ServingConfig


@pytest.mark.parametrize("fields, name", [({"warmup": "all"}, "warmup"), ({"warmup_context_tokens": 0},
                                                                        "warmup_context_tokens"),
                                          ({"warmup_context_tokens": True}, "warmup_context_tokens")])
def test_bad_warmup_settings_are_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=name):
        ServingConfig(**fields)


@pytest.mark.parametrize("mode, expected", [("grid", {"grid": True, "context_tokens": 16}),
                                            ("profile", {"grid": False, "context_tokens": 16}),
                                            ("none", None)])
def test_each_mode_asks_the_session_for_its_programs(make_serving_engine, serving_session, monkeypatch, mode,
                                                     expected):
    calls = []
    real = serving_session.warmup

    def warmup(**kwargs):
        calls.append(kwargs)
        return real(**{**kwargs, "grid": False})  # the grid itself is tested on the session

    monkeypatch.setattr(serving_session, "warmup", warmup)
    engine = make_serving_engine(warmup=mode, warmup_context_tokens=16)
    assert engine.is_ready
    if expected is None:
        assert calls == [] and engine.warmup_report is None
    else:
        assert calls == [expected] and engine.warmup_report["profile_programs"] == 0  # test cache is off


def test_metrics_report_warmup_programs_apart(make_serving_engine, serving_session):
    engine = make_serving_engine()
    key = (2, 2, 0, 2, 32, 1, None, True, False, 0, 0, 0, False)  # decodes at 32 pages: not met by other tests
    report = serving_session.async_engine.call(lambda e: e.warmup([key]))
    lines = {x.split()[0]: float(x.split()[-1]) for x in engine.metrics.render().decode().splitlines()
             if x.startswith("jaxinfer:warmup_programs") or x.startswith("jaxinfer:num_compiles")}
    programs = next(v for k, v in lines.items() if k.startswith("jaxinfer:warmup_programs"))
    assert programs >= report["compiled"] and key in serving_session.engine.runner._shape_keys
    assert any(k.startswith("jaxinfer:num_compiles") for k in lines)  # traffic's compiles, apart
