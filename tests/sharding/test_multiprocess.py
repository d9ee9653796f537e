"""One engine over two processes (jax.distributed, gloo on CPU), 4 CPU devices each, TP 8.

The in-process tests check the pieces without a job: the StepInput encoding, the
broadcasting runner and the follower loop over an in-memory channel, and the argument
checks of `initialize`. The job tests start two processes (multiprocess_worker.py, or
the `jaxinfer generate` CLI) on 127.0.0.1 and a free port, each bounded by a timeout
and killed in `finally`: greedy tokens equal HF and one process, seeded samples equal
one process, processes started with different settings both refuse to start, and a
follower that dies ends process 0 with an error, not a hang. With
`-m slow`: a follower that stops (SIGSTOP) mid-step, a process 0 that dies, and
`jaxinfer serve` over two processes (answer, then SIGTERM: both exit 0).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from jaxinfer.runtime import step_broadcast
from jaxinfer.sharding import distributed
from jaxinfer.types import ScheduledSequence, SharedPrefix, StepInput, StepOutput

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "multiprocess_worker.py")
PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
MAX_TOKENS = 4
JOB_TIMEOUT_S = 150  # one two-process run, start-up and compiles included (about 25 s alone)


# ---------------------------------------------------------------------- in process

def _sequence(request_id, **fields):
    base = dict(request_id=request_id, token_ids=(1, 2, 3), start_position=4, page_ids=(0, 7),
                sample_offsets=(2,), temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=2**63 + 5)
    return ScheduledSequence(**{**base, **fields})


def _step():
    return StepInput(sequences=(
        _sequence("a-0", want_logprobs=True, num_top_logprobs=3, presence_penalty=0.5, prompt_token_ids=(1, 2),
                  output_token_ids=(9,), logit_bias=((3, -float("inf")), (4, 1.25)), banned_token_ids=(2,),
                  ban_until_position=6),
        _sequence("b", token_ids=(8,), sample_offsets=(), next_token_id=11, want_prompt_logprobs=True)),
        shared_prefixes=(SharedPrefix(start_page=0, page_ids=(0,), members=(0, 1)),))


def test_step_input_encoding_round_trips():
    step = _step()
    data = step_broadcast.encode_step(step)
    assert step_broadcast.decode_step(data) == step
    assert step_broadcast.decode_step(step_broadcast.encode_step(StepInput(sequences=()))) == StepInput(sequences=())
    with pytest.raises(ValueError, match="ScheduledSequence"):
        step_broadcast.decode_step(data.replace(b'"seed"', b'"sead"'))
    with pytest.raises(ValueError, match="unknown record"):
        step_broadcast.decode_step(b'{"__record__": "os.system"}')


class _Channel:
    """In-memory StepChannel: one queue, read by one follower."""

    def __init__(self):
        self.messages = collections.deque()

    def send(self, message: bytes) -> None:
        self.messages.append(message)

    def receive(self, timeout_s=None) -> bytes:
        if not self.messages:
            raise TimeoutError(f"no message within {timeout_s} s")
        return self.messages.popleft()


class _Runner:
    num_pages, page_size = 12, 4

    def __init__(self):
        self.steps = []
        self.warmed = []

    def warm(self, key):
        if key in self.warmed:
            return False
        self.warmed.append(key)
        return True

    def execute(self, step):
        if step.sequences and step.sequences[0].request_id == "bad":
            raise ValueError("token_ids: refused on the host")
        self.steps.append(step)
        return StepOutput(outputs={})


def test_broadcasting_runner_and_follower_run_the_same_steps():
    channel, leader_runner, follower_runner = _Channel(), _Runner(), _Runner()
    leader = step_broadcast.BroadcastingRunner(leader_runner, channel)
    assert leader.num_pages == 12 and leader.page_size == 4  # the engine's view of the runner
    bad = StepInput(sequences=(_sequence("bad"),))
    leader.execute(_step())
    with pytest.raises(ValueError, match="refused"):
        leader.execute(bad)  # fails on every process alike: the follower goes on
    leader.execute(StepInput(sequences=()))
    key = (4, 4, 0, 4, 2, 1, None, True, False, 0, 0, 0, False)
    assert leader.warm(key) and not leader.warm(list(key))  # a warm-up program compiles on every process
    with pytest.raises(ValueError, match="shape key"):
        leader.warm((4, 4))
    leader.close()
    leader.close()  # once
    with pytest.raises(RuntimeError, match="closed"):
        leader.execute(_step())
    assert step_broadcast.follow(follower_runner, channel) == 3
    assert follower_runner.steps == leader_runner.steps == [_step(), StepInput(sequences=())]
    assert follower_runner.warmed == leader_runner.warmed == [key]
    assert not channel.messages
    with pytest.raises(TimeoutError):
        step_broadcast.follow(follower_runner, channel, idle_timeout_s=0.1)
    channel.send(b"X")
    with pytest.raises(ValueError, match="unknown message kind"):
        step_broadcast.follow(follower_runner, channel)


class _KeyValueStore:
    """The coordination service's key-value calls that StepChannel uses, in memory."""

    def __init__(self):
        self.values = {}

    def key_value_set_bytes(self, key, value):
        assert key not in self.values, key
        self.values[key] = value

    def blocking_key_value_get_bytes(self, key, timeout_ms):
        if key not in self.values:
            raise RuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
        return self.values[key]

    def key_value_delete(self, key):
        del self.values[key]


def test_step_channel_chunks_orders_and_forgets_messages(monkeypatch):
    monkeypatch.setattr(distributed, "CHUNK_BYTES", 5)
    store = _KeyValueStore()
    leader = distributed.StepChannel(client=store)
    follower = distributed.StepChannel(client=store, poll_s=0.01)
    follower._prefix = leader._prefix  # two processes create their channels in the same order
    messages = [b"", b"abc", b"0123456789ab"] + [bytes([i]) * 7 for i in range(distributed.KEEP_MESSAGES + 3)]
    for m in messages[:3]:
        leader.send(m)
    assert [follower.receive(1.0) for _ in range(3)] == messages[:3]
    assert len(store.values) == 1 + 1 + 3  # "abc" in one piece, 12 bytes in three
    with pytest.raises(TimeoutError, match="message 3"):
        follower.receive(0.05)
    for m in messages[3:]:
        leader.send(m)
    assert len(store.values) == 2 * distributed.KEEP_MESSAGES  # older messages deleted
    assert all(key.startswith(leader._prefix) for key in store.values)


@pytest.mark.parametrize("args, field", [
    ((None, 2, 0), "coordinator_address"), ((None, 1, 1), "coordinator_address"),
    (("localhost", 2, 0), "coordinator_address"), (("127.0.0.1:0", 2, 0), "coordinator_address"),
    (("127.0.0.1:99999", 2, 0), "coordinator_address"), (("127.0.0.1:1234", 0, 0), "num_processes"),
    (("127.0.0.1:1234", 2, 2), "process_id"), (("127.0.0.1:1234", 2, -1), "process_id"),
    (("127.0.0.1:1234", None, 0), "num_processes"), (("auto", 2, 5), "process_id"),
])
def test_initialize_names_the_bad_argument(args, field):
    with pytest.raises(ValueError, match=field):
        distributed.initialize(*args)
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        distributed.initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout_s=0)


def test_one_process_needs_no_job():
    assert distributed.initialize(None) is False and distributed.initialize(None, 1, 0) is False


# ---------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(commands, timeout_s=JOB_TIMEOUT_S, wait_for=None):
    """Runs the commands at once; returns [(status, stdout, stderr)] and the seconds taken.

    Waits for the processes `wait_for` (indices; None = all) at most until the deadline;
    every process still running then (or on any error) is killed (status None)."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAXINFER_COMPILATION_CACHE_DIR="",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    with tempfile.TemporaryDirectory() as tmp:
        procs, files = [], []
        start = time.monotonic()
        try:
            for i, command in enumerate(commands):
                out, err = open(os.path.join(tmp, f"{i}.out"), "w+"), open(os.path.join(tmp, f"{i}.err"), "w+")
                files += [out, err]
                procs.append(subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT))
            for i in range(len(procs)) if wait_for is None else wait_for:
                procs[i].wait(timeout=max(1.0, start + timeout_s - time.monotonic()))
            seconds = time.monotonic() - start
            results = []
            for i, proc in enumerate(procs):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                files[2 * i].seek(0)
                files[2 * i + 1].seek(0)
                status = None if wait_for is not None and i not in wait_for else proc.returncode
                results.append((status, files[2 * i].read(), files[2 * i + 1].read()))
            return results, seconds
        finally:
            _stop(procs, files)


def _stop(procs, files) -> None:
    """Kills what still runs and closes the output files (every test's `finally`)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for f in files:
        f.close()


def _worker_job(model, *extra, wait_for=None):
    address = f"127.0.0.1:{_free_port()}"
    return _run_job([[sys.executable, WORKER, "--address", address, "--process_id", str(i), "--model", model,
                      "--prompts", json.dumps(PROMPTS), "--max_tokens", str(MAX_TOKENS), *extra]
                     for i in range(2)], wait_for=wait_for)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    """(folder, HF greedy continuations of PROMPTS) of a tiny Llama with 8 heads (TP 8 divides them)."""
    import torch

    import hf_models
    path = str(tmp_path_factory.mktemp("llama8"))
    hf = hf_models.build("llama", path, num_attention_heads=8, num_key_value_heads=2, vocab_size=161)
    want = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(p):].tolist()
            for p in PROMPTS]
    return path, want


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-15:])


def test_two_processes_run_one_engine_at_tensor_parallel_8(llama8):
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig, SamplingParams
    path, want = llama8
    (lead, follower), seconds = _worker_job(path)
    assert lead[0] == 0 and follower[0] == 0, (_tail(lead[2]), _tail(follower[2]))
    assert "RESULT" not in follower[1]  # (native gloo lines aside: the CLI sends those to stderr)
    (line,) = [x for x in lead[1].splitlines() if x.startswith("RESULT ")]
    got = json.loads(line[len("RESULT "):])
    assert got["num_devices"] == 8 and got["mesh_shape"] == {"pipeline": 1, "expert": 1, "tensor": 8}
    assert got["num_total_pages"] == 64  # sized from the byte budget, agreed by both processes
    assert got["greedy"] == want
    with InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, num_pages=64)) as one:
        sampled = one.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_k=50, seed=7,
                                                       ignore_eos=True))
    assert got["sampled"] == [o.token_ids for o in sampled]
    print(f"two-process job: {seconds:.1f} s")


@pytest.fixture(scope="module")
def text8(text_model_dir, tmp_path_factory):
    """A tiny Llama with 8 heads and the sentencepiece tokenizer of text_model_dir (the CLI takes text)."""
    import hf_models
    path = str(tmp_path_factory.mktemp("text8") / "model")
    shutil.copytree(text_model_dir[0], path)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    hf_models.build("llama", path, num_attention_heads=8, num_key_value_heads=2, vocab_size=vocab)
    return path


def test_cli_generate_over_two_processes(text8):
    """`jaxinfer generate` with the three flags prints the one-process completion from process 0 only."""
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig, SamplingParams
    path = text8
    with InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, num_pages=32)) as one:
        (out,) = one.generate(["def add(a, b):"], SamplingParams(max_tokens=6, temperature=0.0))
    address = f"127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "jaxinfer.cli", "generate", "--model", path, "--prompt", "def add(a, b):",
               "--max_tokens", "6", "--temperature", "0", "--page_size", "4", "--num_pages", "32",
               "--tensor_parallel_size", "8", "--coordinator_address", address, "--num_processes", "2"]
    (lead, follower), _ = _run_job([command + ["--process_id", str(i)] for i in range(2)])
    assert lead[0] == 0 and follower[0] == 0, (_tail(lead[2]), _tail(follower[2]))
    assert follower[1] == ""
    assert lead[1].startswith("def add(a, b):" + out.text + "\n"), (lead[1], out.text)
    assert "devices: 8 (tensor 8)" in lead[1] and "[Gloo]" not in lead[1]


def test_cli_names_a_bad_process_flag():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    for flags, field in ((["--num_processes", "2", "--process_id", "1"], "coordinator_address"),
                         (["--coordinator_address", "127.0.0.1:1", "--num_processes", "2", "--process_id", "2"],
                          "process_id")):
        res = subprocess.run([sys.executable, "-m", "jaxinfer.cli", "generate", "--prompt", "x", *flags],
                             capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == 2 and field in res.stderr and res.stdout == "", (res.returncode, res.stderr)


@pytest.mark.slow
def test_serve_over_two_processes_answers_and_drains(text8):
    """`jaxinfer serve` in two processes: process 0 answers a completion; SIGTERM to it
    drains, stops the follower, and both exit 0."""
    import urllib.request
    address, port = f"127.0.0.1:{_free_port()}", _free_port()
    command = [sys.executable, "-m", "jaxinfer.cli", "serve", "--model", text8, "--port", str(port),
               "--grpc_port", "-1", "--page_size", "4", "--num_pages", "32", "--tensor_parallel_size", "8",
               "--coordinator_address", address, "--num_processes", "2"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAXINFER_COMPILATION_CACHE_DIR="",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    with tempfile.TemporaryDirectory() as tmp:
        outs = [open(os.path.join(tmp, f"{i}.out"), "w+") for i in range(2)]
        procs = [subprocess.Popen(command + ["--process_id", str(i)], stdout=outs[i], stderr=subprocess.STDOUT,
                                  env=env, cwd=ROOT) for i in range(2)]
        try:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while "| ready" not in open(outs[0].name).read():
                assert time.monotonic() < deadline and procs[0].poll() is None, open(outs[0].name).read()[-2000:]
                time.sleep(0.5)
            time.sleep(2.5)  # the follower idles over several poll slices
            body = json.dumps({"model": text8, "prompt": "def", "max_tokens": 3,
                               "temperature": 0}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert json.loads(response.read())["usage"]["completion_tokens"] == 3
            procs[0].terminate()
            assert [p.wait(timeout=60) for p in procs] == [0, 0], [open(o.name).read()[-2000:] for o in outs]
        finally:
            _stop(procs, outs)


def _ended_by_a_lost_peer(result) -> bool:
    status, _, err = result
    ours = "LEADER_ERROR" in err or "jaxinfer: error" in err or "PeerLost" in err
    jax_ended = "another task died" in err or "tasks are unhealthy" in err
    return status not in (0, None) and (ours or jax_ended)


def test_dead_follower_ends_process_zero(llama8):
    (lead, follower), seconds = _worker_job(llama8[0], "--die", "1:3")
    print(f"process 0: status {lead[0]} after {seconds:.1f} s\n{_tail(lead[2])}")
    assert follower[0] == 17, _tail(follower[2])
    assert _ended_by_a_lost_peer(lead), (lead[0], _tail(lead[2]))
    assert seconds < JOB_TIMEOUT_S


@pytest.mark.slow
def test_silent_follower_does_not_hang_process_zero(llama8):
    """A follower stopped mid-step (SIGSTOP: sockets open, no heartbeats) leaves process 0
    blocked in a collective until the coordination service's heartbeat timeout (5 s in
    the worker) ends it."""
    (lead, _), seconds = _worker_job(llama8[0], "--die", "1:3", "--hang", wait_for=[0])
    print(f"process 0: status {lead[0]} after {seconds:.1f} s\n{_tail(lead[2])}")
    assert _ended_by_a_lost_peer(lead), (lead[0], _tail(lead[2]))
    assert seconds < JOB_TIMEOUT_S


def test_different_settings_are_refused_in_every_process(llama8):
    results, _ = _worker_job(llama8[0], "--page_size_of_1", "8")
    for status, _, err in results:
        assert status not in (0, None) and "engine.page_size: process 1 has 8, process 0 has 4" in err, \
            (status, _tail(err))
    results, _ = _worker_job(llama8[0], "--pipeline", "2")  # stages would need device_put across processes
    for status, _, err in results:
        assert status not in (0, None) and "pipeline_parallel_size: 2 > 1 is not supported" in err, \
            (status, _tail(err))


@pytest.mark.slow
def test_dead_process_zero_ends_the_follower(llama8):
    (lead, follower), seconds = _worker_job(llama8[0], "--die", "0:3")
    print(f"process 1: status {follower[0]} after {seconds:.1f} s\n{_tail(follower[2])}")
    assert lead[0] == 17, _tail(lead[2])
    status, _, err = follower
    assert status != 0 and ("another task died" in err or "PeerLost" in err or "process 0" in err), \
        (status, _tail(err))
    assert seconds < JOB_TIMEOUT_S
