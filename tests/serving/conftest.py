"""Fixtures of the server tests: one bundled-model session shared by every ServingEngine."""
from __future__ import annotations

import socket

import pytest

from jaxinfer import EngineConfig, InferenceSession
from jaxinfer.serving.core import ServingConfig, ServingEngine
from jaxinfer.serving.metrics import ServingMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serving_session():
    session = InferenceSession.from_pretrained(
        "tiny-code", engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=128, num_pages=256,
                                         compilation_cache_dir=""))
    yield session
    session.close()


@pytest.fixture
def make_serving_engine(serving_session):
    """make_serving_engine(**ServingConfig fields) -> a ready ServingEngine with metrics."""
    def make(**fields) -> ServingEngine:
        config = ServingConfig(**fields)
        metrics = ServingMetrics(config.model_name, serving_session.async_engine.metrics)
        engine = ServingEngine(serving_session, config, metrics=metrics)
        engine.warm_up()
        return engine
    return make
