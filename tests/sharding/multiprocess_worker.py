"""One process of a two-process engine (run by test_multiprocess.py, never by pytest itself).

    python multiprocess_worker.py --address 127.0.0.1:PORT --process_id I --model DIR \
        --prompts '[[1, 5, 9]]' --max_tokens 4 [--die 1:3]

Each process sees 4 CPU devices (XLA_FLAGS, set before jax starts), joins the job with
small timeouts and builds the same session at TP 8 over both processes' devices, its
page pool sized from a byte budget (so the processes must agree on it). Process 0
generates (greedy, then seeded sampling) and prints one `RESULT {json}` line; process 1
checks that it refuses requests, follows the steps and prints nothing.

--die P:K: process P exits (status 17) when it is about to run step K (with --hang it
stops itself with SIGSTOP instead: alive, sockets open, no heartbeats). A surviving
process 0 then prints `LEADER_ERROR <error>` on stderr and exits 1, unless jax ends it
first (status 134: "the JAX distributed service detected fatal errors").
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _params(**fields):
    from jaxinfer.config import SamplingParams
    return SamplingParams(ignore_eos=True, **fields)


def _die_at(runner, step_number: int, hang: bool) -> None:
    """Makes `runner` end the process (or stop it, SIGSTOP) when step `step_number` (1-based) arrives."""
    execute, seen = runner.execute, [0]

    def dying(step):
        seen[0] += 1
        if seen[0] == step_number:
            if hang:  # alive but silent: no heartbeats, sockets left open
                os.kill(os.getpid(), signal.SIGSTOP)
            os._exit(17)
        return execute(step)
    runner.execute = dying


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max_tokens", type=int, required=True)
    parser.add_argument("--die", default=None, help="P:K: process P exits at step K")
    parser.add_argument("--hang", action="store_true", help="with --die: stop (SIGSTOP) instead of exiting")
    parser.add_argument("--page_size_of_1", type=int, default=4, help="process 1's page size (process 0: 4)")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline_parallel_size (TP 8 / this)")
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAXINFER_COMPILATION_CACHE_DIR"] = ""
    prompts = json.loads(args.prompts)
    die_process, die_step = map(int, args.die.split(":")) if args.die else (-1, 0)

    from jaxinfer.sharding import distributed
    distributed.initialize(args.address, 2, args.process_id, timeout_s=60, heartbeat_timeout_s=5,
                           shutdown_timeout_s=10)
    from jaxinfer import InferenceSession
    from jaxinfer.config import EngineConfig
    # 512 bytes per page and device (2 layers, K and V, 4 tokens, 1 head of 8 floats): 64 pages.
    page_size = args.page_size_of_1 if args.process_id == 1 else 4
    engine = EngineConfig(page_size=page_size, max_kv_cache_bytes=1 << 15, tensor_parallel_size=8 // args.pipeline,
                          pipeline_parallel_size=args.pipeline)
    session = InferenceSession.from_pretrained(args.model, engine=engine)
    if args.process_id != 0:
        try:
            session.generate(prompts, _params(max_tokens=1))
            raise AssertionError("a follower took a request")
        except RuntimeError as e:
            assert "run_follower" in str(e), e
        if die_process == args.process_id:
            _die_at(session._follower_runner, die_step, args.hang)
        session.run_follower(idle_timeout_s=120)
        return 0
    if die_process == 0:
        _die_at(session.engine.runner.runner, die_step, args.hang)
    try:
        greedy = session.generate(prompts, _params(max_tokens=args.max_tokens, temperature=0.0))
        time.sleep(2.5)  # the follower waits idle over several poll slices
        sampled = session.generate(prompts, _params(max_tokens=args.max_tokens, temperature=1.0, top_k=50, seed=7))
        metrics = session.metrics()
    except Exception as e:  # noqa: BLE001 - what a user would see
        print(f"LEADER_ERROR {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # jax's exit barrier would wait for the dead process
    session.close()
    print("RESULT " + json.dumps({"greedy": [o.token_ids for o in greedy], "sampled": [o.token_ids for o in sampled],
                                  "num_devices": metrics["num_devices"], "mesh_shape": metrics["mesh_shape"],
                                  "num_total_pages": metrics["num_total_pages"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
