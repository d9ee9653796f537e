"""The engine's errors, host-only (no jax), so that the servers can tell them apart.

Raised by jaxinfer.engine.engine (StepFailed, RequestFailed, NonFiniteOutput) and
handed to readers by jaxinfer.engine.async_engine (EngineStopped, SlowReader); both
modules re-export them under their old names. serving/core.py maps each to the status
its client gets.
"""
from __future__ import annotations


class StepFailed(RuntimeError):
    """A step raised: its requests were aborted (pages freed); the engine keeps serving.

    Attributes:
      error: the exception the runner (or the update) raised.
      request_ids: the requests of the failed step, now forgotten by the engine.
    """

    def __init__(self, error: BaseException, request_ids: list):
        super().__init__(f"engine step failed for {len(request_ids)} request(s): {error!r}")
        self.error = error
        self.request_ids = request_ids


class RequestFailed(RuntimeError):
    """A request failed alone (the other requests went on); its pages were freed.

    Attributes:
      request_id: the failed request.
    """

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


class NonFiniteOutput(RequestFailed):
    """The model produced a NaN or Inf in the request's logits (e.g. an overflow)."""


class EngineStopped(RuntimeError):
    """The engine was shut down before the request finished."""


class SlowReader(RuntimeError):
    """The reader fell too many deltas behind; the request was aborted."""
