"""One engine over several processes: process 0 sends every step, the others follow.

Path (process 0): Engine -> **BroadcastingRunner.execute(step)** -> encode the
StepInput -> StepChannel.send (jaxinfer.sharding.distributed) -> ModelRunner.execute
(the compiled step over the global mesh) -> StepOutput -> Engine.
Path (processes > 0): **follow** -> StepChannel.receive -> decode -> the same
ModelRunner.execute (its collectives meet process 0's) -> ... until a stop message.

Every process builds the same ModelRunner (same config, parameters, page count, mesh);
jit then compiles the same program everywhere, and each process feeds it the same host
inputs (the step's inputs are replicated), so only the StepInput has to travel. Its
encoding is explicit JSON of the records of jaxinfer.types (no pickle): a process
never runs code it receives.

A step that fails on the host side (input_batch's checks raise ValueError) fails the
same way in every process: process 0's engine fails that step's requests and goes on,
and followers go on too. Any other failure of a follower ends it (its exit then ends
process 0 through jax's coordination service).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Optional

from jaxinfer.config import EngineConfig, ModelConfig
from jaxinfer.runtime import kv_cache, warmup
from jaxinfer.sharding import distributed
from jaxinfer.types import ScheduledSequence, SharedPrefix, StepInput, StepOutput

_LOG = logging.getLogger(__name__)
_RECORDS = {cls.__name__: cls for cls in (StepInput, ScheduledSequence, SharedPrefix)}
_STEP, _STOP, _WARM = b"S", b"Q", b"W"


def encode_step(step: StepInput) -> bytes:
    """StepInput -> bytes (JSON; tuples become lists, records carry their type name)."""
    return json.dumps(_to_json(step), separators=(",", ":"), default=_scalar).encode()


def decode_step(data: bytes) -> StepInput:
    """bytes from encode_step -> the equal StepInput.

    Raises:
      ValueError: not an encoded StepInput (names the record and field at fault).
    """
    step = _from_json(json.loads(data.decode()))
    if not isinstance(step, StepInput):
        raise ValueError(f"step message: expected a StepInput, got {type(step).__name__}")
    return step


def _scalar(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"step message: cannot encode {type(value).__name__}")


def _to_json(value):
    if dataclasses.is_dataclass(value):
        name = type(value).__name__
        if name not in _RECORDS:
            raise TypeError(f"step message: cannot encode record {name}")
        return {"__record__": name, **{f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    if isinstance(value, dict):
        fields = dict(value)
        name = fields.pop("__record__", None)
        if name not in _RECORDS:
            raise ValueError(f"step message: unknown record {name!r}")
        try:
            return _RECORDS[name](**{k: _from_json(v) for k, v in fields.items()})
        except TypeError as e:
            raise ValueError(f"step message: {name}: {e}") from None
    return value


class BroadcastingRunner:
    """Process 0's runner: sends each StepInput to the other processes, then runs it.

    Has the ModelRunner interface the Engine uses (`execute`, `num_pages`, `page_size`,
    `weight_bytes`, `kv_cache_bytes`, `device_info()`, `expert_token_counts`, ...: any
    attribute it does not define is the wrapped runner's).

    Args:
      runner: this process's ModelRunner over the global mesh.
      channel: a StepChannel (anything with `send(bytes)`).
      peer_check_s: after a failed step, how long to ask the coordination service
        whether a process is gone (to raise PeerLost naming it); None =
        distributed.peer_check_seconds().
    """

    def __init__(self, runner, channel, *, peer_check_s: Optional[float] = None):
        self.runner = runner
        self.peer_check_s = distributed.peer_check_seconds() if peer_check_s is None else peer_check_s
        self.channel = channel
        self.closed = False
        self._lock = threading.Lock()  # one sender at a time: the loop thread, or close()

    def __getattr__(self, name):
        if name == "runner":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.runner, name)

    def execute(self, step: StepInput) -> StepOutput:
        """Sends `step`, then runs it here.

        The StepOutput's per-request `finite` flags come from this process's run (every
        process computes the same rows).

        Raises:
          ValueError: a fault injector is set (tests only: one process), or the
            host-side checks refused the step.
          RuntimeError: after close() (the followers have stopped).
          distributed.PeerLost: the step failed and another process is gone.
        """
        if self.__dict__.get("fault_injector") is not None or getattr(self.runner, "fault_injector", None) is not None:
            # A fault would change process 0's compiled program only: the collectives of
            # the processes would no longer match. Refused before anything is sent.
            raise ValueError("fault_injector: fault injection (runtime/faults.py) is not carried to the other "
                             "processes; use it with one process")
        with self._lock:
            if self.closed:
                raise RuntimeError("BroadcastingRunner: closed; the other processes have stopped following steps")
            self.channel.send(_STEP + encode_step(step))
        try:
            return self.runner.execute(step)
        except ValueError:
            raise  # the host-side checks: every process refused this step the same way
        except Exception as e:  # noqa: BLE001 - a device or collective failure
            lost = _wait_for_lost(self.peer_check_s) if _is_distributed(self.channel) else None
            if lost is not None:
                raise distributed.PeerLost(f"the step failed because {lost} ({e})") from e
            raise

    def warm(self, key: tuple) -> bool:
        """Sends a warm-up of shape `key` (runtime/warmup.py), then compiles it here: every
        process compiles the same program, so its collectives match."""
        key = warmup.check_key(key)
        with self._lock:
            if self.closed:
                raise RuntimeError("BroadcastingRunner: closed; the other processes have stopped following steps")
            self.channel.send(_WARM + json.dumps(list(key)).encode())
        return self.runner.warm(key)

    def close(self, reason: str = "done") -> None:
        """Tells the followers to stop (once); later steps are refused."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.channel.send(_STOP + reason.encode())


def _wait_for_lost(seconds: float) -> Optional[str]:
    """Which processes the coordination service finds gone within `seconds` (a peer's
    socket error often comes before the service notices); None if none."""
    return distributed.describe_lost_processes(seconds)


def _is_distributed(channel) -> bool:
    return isinstance(channel, distributed.StepChannel)


def follow(runner, channel, *, idle_timeout_s: Optional[float] = None) -> int:
    """Processes > 0: runs every step process 0 sends until it sends stop.

    Args:
      runner: this process's ModelRunner, built as process 0's.
      channel: a StepChannel (anything with `receive(timeout_s) -> bytes`).
      idle_timeout_s: give up when no message comes for this long (None = wait while
        process 0 lives: a server may idle for hours).
    Returns:
      The number of steps run.
    Raises:
      TimeoutError: no message within idle_timeout_s.
      distributed.PeerLost: process 0 is gone.
      ValueError: a message that is not a step or stop.
    """
    steps = 0
    while True:
        message = channel.receive(idle_timeout_s)
        kind, body = message[:1], message[1:]
        if kind == _STOP:
            return steps
        if kind == _WARM:  # a warm-up program (BroadcastingRunner.warm)
            runner.warm(warmup.check_key(json.loads(body.decode())))
            continue
        if kind != _STEP:
            raise ValueError(f"step channel: unknown message kind {kind!r}")
        step = decode_step(body)
        steps += 1
        try:
            runner.execute(step)
        except ValueError as e:  # refused before the device, as in process 0
            _LOG.warning("step %d refused (as in process 0): %s", steps, e)
        except Exception as e:  # noqa: BLE001 - a device or collective failure ends the follower
            lost = _wait_for_lost(distributed.peer_check_seconds()) if _is_distributed(channel) else None
            if lost is not None:
                raise distributed.PeerLost(f"step {steps} failed because {lost} ({e})") from e
            raise


def agreed_num_pages(model_config: ModelConfig, engine_config: EngineConfig, *, dtype, max_model_len: int,
                     mesh) -> int:
    """The page pool every process can hold: `num_pages`, or min over processes of its budget.

    Each process sizes the pool with kv_cache.num_pages_for (one pipeline stage: the
    session refuses more over several processes), which asks only its own devices of
    `mesh` for free memory (a device of another process cannot be asked); then all
    take the smallest, so every process allocates the same pool.

    Args:
      model_config: the mesh model config (KV heads as the devices hold them).
      engine_config, dtype, max_model_len, mesh: as for kv_cache.num_pages_for.
    Returns:
      The number of pages, >= 1, equal in every process.
    """
    num_pages = kv_cache.num_pages_for(model_config, engine_config, dtype=dtype, max_model_len=max_model_len,
                                       mesh=mesh)
    return min(int(v) for v in distributed.agree("num_pages", str(num_pages)))


def check_same_setup(settings: dict) -> None:
    """Every process must build the same runner (else the collectives would not match).

    Args:
      settings: name -> value (compared by repr), e.g. every field of the model and
        engine configs.
    Raises:
      ValueError: naming each setting that differs from process 0's, with both values.
    """
    mine = {name: repr(value) for name, value in settings.items()}
    values = [json.loads(v) for v in distributed.agree("setup", json.dumps(mine, sort_keys=True))]
    diffs = [f"{name}: process {i} has {other.get(name)}, process 0 has {ref}"
             for i, other in enumerate(values[1:], start=1)
             for name, ref in sorted(values[0].items()) if other.get(name) != ref]
    if diffs:
        raise ValueError("model / engine settings differ between processes (start every process with the same "
                         "flags and model): " + "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else ""))
