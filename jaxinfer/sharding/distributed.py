"""Several processes, one engine: jax.distributed start-up and the step channel.

Path: cli / caller -> **initialize** (before any jax device use) -> every process sees
the devices of all processes (`jax.devices()`), so `mesh_for_engine` builds one global
mesh -> session: process 0 runs the Engine and sends each StepInput over a
**StepChannel**; processes > 0 receive them and run the same compiled step
(jaxinfer.runtime.step_broadcast). This is jax's multi-controller model: every process
runs the same program on its own devices, and XLA's collectives (gloo on CPU, NCCL on
GPU, ICI / DCN on TPU) join them.

The channel is the coordination service's key-value store (the gRPC service that
`jax.distributed.initialize` starts in process 0), not a device collective: messages
have any size and no shape header, a follower waits for the next step with a timeout,
and nothing is compiled for it. Each message is written under a sequence number
(large ones in chunks); process 0 deletes old messages, since a step's collectives
only finish once every process has read it.

When a process dies, jax's coordination service notices (its socket closes, or its
heartbeats stop for `heartbeat_timeout_s`) and every other process is terminated by
jax with "the JAX distributed service detected fatal errors ... another task died"
(exit status 134, SIGABRT); on CPU a step running at that moment often fails first
with a gloo error, which the runner turns into `PeerLost`. So no process waits longer
than about the heartbeat timeout.

The jax internals used (the coordination-service client) are reached in one place,
`_client`, with a clear error when a jax version lacks them.
"""
from __future__ import annotations

import inspect
import ipaddress
import itertools
import threading
import time
from typing import Optional

import jax

_KEY_ROOT = "jaxinfer"
CHUNK_BYTES = 1 << 20  # a message is stored in pieces of at most this many bytes
KEEP_MESSAGES = 16  # process 0 deletes a message this many messages later
# Per process; every process creates channels and agrees on values in the same order.
_channel_ids = itertools.count()
_agree_ids = itertools.count()
_heartbeat_timeout_s: Optional[int] = None  # as given to initialize (None: not started here)


def peer_check_seconds() -> float:
    """How long to ask the service whether a peer is gone after a failed step: a little
    over the heartbeat timeout (the latest it can tell), at most 30 s; 5 s if unknown."""
    return 5.0 if _heartbeat_timeout_s is None else float(min(_heartbeat_timeout_s + 2, 30))


class PeerLost(RuntimeError):
    """Another process of the job stopped (died or stopped answering)."""


def initialize(coordinator_address: Optional[str], num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, timeout_s: int = 300, heartbeat_timeout_s: int = 100,
               shutdown_timeout_s: Optional[int] = None) -> bool:
    """Joins this process to a multi-process job (jax.distributed); call before any jax device use.

    Args:
      coordinator_address: "host:port" of process 0, where the coordination service
        listens (it binds that address when it is a loopback one, else every address on
        the port); "auto" lets jax detect all three values (TPU pods, SLURM, Open MPI);
        None = one process (num_processes and process_id must then be None, 1 / 0).
      num_processes: processes in the job (>= 1).
      process_id: this process's index in [0, num_processes); 0 runs the engine.
      timeout_s: seconds to wait for every process to connect.
      heartbeat_timeout_s: seconds without a heartbeat after which a process counts as
        dead (and jax terminates the others).
      shutdown_timeout_s: seconds the processes wait for each other at exit (None =
        timeout_s).
    Returns:
      True when jax.distributed was initialized (here or before), False for one process.
    Raises:
      ValueError: a bad argument, naming it.
      RuntimeError: the processes did not all connect within timeout_s.
    """
    for name, value in (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s),
                        ("shutdown_timeout_s", shutdown_timeout_s)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(f"coordinator_address: required when num_processes ({num_processes}) > 1 or "
                             f"process_id ({process_id}) > 0; give process 0's host:port")
        return is_initialized()
    if coordinator_address != "auto":
        _check_process_numbers(num_processes, process_id)
        _check_address(coordinator_address)
    elif num_processes is not None or process_id is not None:
        _check_process_numbers(num_processes if num_processes is not None else 1,
                               process_id if process_id is not None else 0)
    if is_initialized():
        return True
    _use_gloo_on_cpu()
    kwargs = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_timeout_s,
                  shutdown_timeout_seconds=shutdown_timeout_s or timeout_s)
    if coordinator_address != "auto":
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
        host = coordinator_address.rsplit(":", 1)[0].strip("[]")
        if _is_loopback(host):  # one machine: do not listen on every interface
            kwargs["coordinator_bind_address"] = coordinator_address
    else:
        kwargs.update(num_processes=num_processes, process_id=process_id)
    global _heartbeat_timeout_s
    _heartbeat_timeout_s = heartbeat_timeout_s
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # jax versions differ in the timeouts they take
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - jax raises its runtime error type here
        raise RuntimeError(f"coordinator_address {coordinator_address}: process {process_id} of {num_processes} "
                           f"could not join the job within {timeout_s} s: {e}") from e
    return True


def _check_process_numbers(num_processes, process_id) -> None:
    if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
        raise ValueError(f"num_processes: must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or isinstance(process_id, bool) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: must be an int in [0, num_processes = {num_processes}), got {process_id!r}")


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address: expected host:port with a port in [1, 65535], got {address!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _use_gloo_on_cpu() -> None:
    """CPU collectives across processes go through gloo (the default on jax 0.10+;
    harmless on GPU / TPU hosts, it configures the CPU client only)."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # a jax without the option: its default
        pass


def is_initialized() -> bool:
    """True once jax.distributed was initialized in this process (starts no backend)."""
    state = _distributed_state()
    return state is not None and getattr(state, "client", None) is not None


def _distributed_state():
    try:
        from jax._src import distributed as jax_distributed
    except ImportError:
        return None
    return getattr(jax_distributed, "global_state", None)


def _client():
    """The coordination-service client of jax.distributed (private jax API, reached here only)."""
    state = _distributed_state()
    client = getattr(state, "client", None)
    if client is None:
        raise RuntimeError("jax.distributed is not initialized in this process: call "
                           "jaxinfer.sharding.distributed.initialize first")
    for method in ("key_value_set_bytes", "blocking_key_value_get_bytes", "key_value_delete"):
        if not hasattr(client, method):
            raise RuntimeError(f"jax {jax.__version__}: the distributed client has no {method}(); this jax "
                               f"version is not supported for several processes")
    return client


def is_multiprocess() -> bool:
    """True when this process is one of several of a jax.distributed job."""
    return jax.process_count() > 1


def process_index() -> int:
    """This process's index in the job (0 when alone)."""
    return jax.process_index()


def live_processes(timeout_s: float) -> Optional[set]:
    """Indices of the processes the coordination service sees alive; None if unknown.

    NOTE: the service's call is a barrier among the live processes: it returns once
    every live process called it, or once the others are known dead. It therefore runs
    on a daemon thread, and None after timeout_s means: no process known dead.
    """
    result: list = []

    def ask():
        try:
            result.append(set(_client().get_live_nodes(list(range(jax.process_count())))))
        except Exception:  # noqa: BLE001 - older jax, or the service itself is gone
            pass

    thread = threading.Thread(target=ask, name="jaxinfer-live-processes", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None


def describe_lost_processes(timeout_s: float) -> Optional[str]:
    """"process(es) [1] of 2 stopped ..." when the service finds processes gone within
    timeout_s, else None."""
    live = live_processes(timeout_s)
    if live is None:
        return None
    lost = sorted(set(range(jax.process_count())) - live)
    if not lost:
        return None
    return f"process(es) {lost} of {jax.process_count()} stopped (no heartbeat): see their logs"


def check_mesh_spans_processes(mesh) -> None:
    """Every process must own devices of `mesh` (each runs the same step on its devices).

    Raises:
      ValueError: naming the parallel sizes and the device counts.
    """
    count = jax.process_count()
    on = sorted({d.process_index for d in mesh.devices.flat})
    if on != list(range(count)):
        raise ValueError(f"tensor_parallel_size * expert_parallel_size * pipeline_parallel_size: the mesh's "
                         f"{mesh.size} devices are on processes {on}, but {count} processes take part; use all "
                         f"{jax.device_count()} devices ({jax.local_device_count()} per process)")


def _is_deadline(error: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(error)


def agree(name: str, value: str, *, timeout_s: float = 300.0) -> list:
    """Every process's `value` for `name`, in process order (each process calls this once per name).

    Raises:
      PeerLost: a process did not publish its value within timeout_s.
    """
    client = _client()
    key = f"{_KEY_ROOT}/agree{next(_agree_ids)}/{name}"
    client.key_value_set_bytes(f"{key}/{jax.process_index()}", value.encode())
    values = []
    for index in range(jax.process_count()):
        try:
            values.append(client.blocking_key_value_get_bytes(f"{key}/{index}", int(timeout_s * 1000)).decode())
        except Exception as e:  # noqa: BLE001
            raise PeerLost(f"{name}: process {index} of {jax.process_count()} did not answer within "
                           f"{timeout_s} s ({e})") from e
    return values


class StepChannel:
    """Messages from process 0 to every other process, in order, over the key-value store.

    Args:
      poll_s: a follower's wait is cut into waits of this many seconds (so that an
        idle timeout and Ctrl-C are seen). Process 0's death ends the wait: the read
        fails (PeerLost), or jax terminates the process.
      client: the key-value client (None = jax.distributed's; tests pass their own).
    """

    def __init__(self, *, poll_s: float = 1.0, client=None):
        self._client = client if client is not None else _client()
        self._prefix = f"{_KEY_ROOT}/channel{next(_channel_ids)}"
        self._next = 0  # the next sequence number to send or receive
        self._sent: list = []  # keys of the messages sent, oldest first
        self.poll_s = poll_s

    def send(self, message: bytes) -> None:
        """Process 0: publishes `message` as the next one (chunks first, the header last)."""
        seq = self._next
        self._next += 1
        chunks = [message[i:i + CHUNK_BYTES] for i in range(0, len(message), CHUNK_BYTES)] or [b""]
        keys = [f"{self._prefix}/{seq}/{i}" for i in range(1, len(chunks))]
        for key, chunk in zip(keys, chunks[1:]):
            self._client.key_value_set_bytes(key, chunk)
        header = f"{self._prefix}/{seq}"
        self._client.key_value_set_bytes(header, len(chunks).to_bytes(4, "little") + chunks[0])
        self._sent.append([header] + keys)
        while len(self._sent) > KEEP_MESSAGES:
            for key in self._sent.pop(0):
                self._client.key_value_delete(key)

    def receive(self, timeout_s: Optional[float] = None) -> bytes:
        """Processes > 0: the next message; waits up to timeout_s (None = while process 0 lives).

        Raises:
          TimeoutError: nothing came within timeout_s.
          PeerLost: the read failed: process 0 (the coordination service) is gone,
            when jax has not terminated this process first.
        """
        header_key = f"{self._prefix}/{self._next}"
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = self.poll_s if deadline is None else min(self.poll_s, max(deadline - time.monotonic(), 0.001))
            try:
                header = self._client.blocking_key_value_get_bytes(header_key, max(1, int(wait * 1000)))
                break
            except Exception as e:  # noqa: BLE001 - jax's runtime error type
                if not _is_deadline(e):
                    raise PeerLost(f"step channel: reading message {self._next} from process 0 failed: {e}") from e
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"step channel: no message {self._next} from process 0 within {timeout_s} s")
        num_chunks = int.from_bytes(header[:4], "little")
        parts = [header[4:]]
        for i in range(1, num_chunks):  # written before the header
            parts.append(self._client.blocking_key_value_get_bytes(f"{header_key}/{i}", 60_000))
        self._next += 1
        return b"".join(parts)
