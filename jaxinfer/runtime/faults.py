"""Fault injection for reliability tests (host only: no jax, no numpy).

A runner (ModelRunner, PipelineRunner) has `fault_injector = None`; a test sets a
FaultInjector to make the real compiled step misbehave:

- `nonfinite[request_id] = value` (NaN or +-Inf): the next step that schedules the
  request adds `value` to that request's rows inside the compiled step: to the logits
  of its sample rows (what the LM head produced from its hidden state) and to the K/V
  it writes in that step (so its pages hold the value from then on, as a hidden state
  gone NaN would leave them). The entry is used once. Every other row gets 0.0, which
  changes nothing. The runner's per-row finiteness check (`SequenceOutput.finite`)
  then reports the request, and the engine fails it alone.
- `fail_executes`: execute calls (counted from 0 over the injector's life) that raise
  InjectedFault after the compiled step has run (its KV pages written) and before its
  outputs are unpacked, as a device or runtime error in the middle of a step would.

Cost when unused: none. With `fault_injector = None` the step batch carries no fault
array (`DeviceBatch.fault` is None), no fault code is traced and no program differs;
a step with a fault is a separate compiled program (its shape key says so).
"""
from __future__ import annotations

import dataclasses
import math


class InjectedFault(RuntimeError):
    """Raised by a runner on an execute call listed in FaultInjector.fail_executes."""


@dataclasses.dataclass
class FaultInjector:
    """What to break in which step (see the module docstring)."""

    nonfinite: dict = dataclasses.field(default_factory=dict)  # request id -> NaN / Inf added once
    fail_executes: set = dataclasses.field(default_factory=set)  # execute call numbers that raise
    num_executes: int = 0  # execute calls seen so far
    num_injected: int = 0  # non-finite values injected so far

    def __post_init__(self):
        for request_id, value in self.nonfinite.items():
            _check_value(request_id, value)

    def begin(self, step) -> tuple:
        """Called once per execute, before the batch is built.

        Returns:
          ({request id: value} of the step's sequences to poison (taken out of
          `nonfinite`, or None when there are none), whether this call must raise).
        """
        number = self.num_executes
        self.num_executes += 1
        faults = {}
        for seq in step.sequences:
            if seq.request_id in self.nonfinite:
                value = self.nonfinite.pop(seq.request_id)
                _check_value(seq.request_id, value)
                faults[seq.request_id] = float(value)
        self.num_injected += len(faults)
        return (faults or None), number in self.fail_executes

    @staticmethod
    def fail(number: int) -> None:
        raise InjectedFault(f"injected fault in execute call {number}")


def _check_value(request_id, value) -> None:
    if not isinstance(value, (int, float)) or math.isfinite(value):
        raise ValueError(f"nonfinite[{request_id!r}]: must be NaN or +-Inf, got {value!r}")
