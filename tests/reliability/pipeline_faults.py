"""Faults through the PipelineRunner (2 stages on 2 fake CPU devices), run by
test_faults.py in a fresh process (jax fixes its device count at start-up):
XLA_FLAGS=--xla_force_host_platform_device_count=2. Prints "PASS" at the end.

A NaN in one request's rows (injected in the last stage's logits and in every stage's
K/V) fails that request alone; a step that raises fails that step's requests; the
others keep the tokens of a clean run through the same pipeline.
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reliability_helpers import MODEL, assert_idle, new, params, run_to_end  # noqa: E402

from jaxinfer.config import EngineConfig  # noqa: E402
from jaxinfer.engine.engine import Engine, NonFiniteOutput, StepFailed  # noqa: E402
from jaxinfer.runtime.faults import FaultInjector, InjectedFault  # noqa: E402
from jaxinfer.runtime.model_runner import ModelRunner  # noqa: E402
from jaxinfer.runtime.pipeline_runner import PipelineRunner  # noqa: E402
from jaxinfer.sharding.mesh import make_mesh  # noqa: E402

WORKLOAD = [("victim", [11, 23, 35, 47, 59, 71, 83, 95, 8], 5), ("n1", [3, 5, 7, 9, 2], 5), ("n2", [60, 61, 62], 5)]


def main() -> None:
    config = EngineConfig(page_size=4, num_pages=24, max_num_batched_tokens=16, max_num_seqs=4,
                          pipeline_parallel_size=2, shared_prefix_attention=False, compilation_cache_dir="")
    runner = ModelRunner.from_config(MODEL, params(), config, dtype="float32", max_model_len=128,
                                     mesh=make_mesh(pipeline=2))
    assert isinstance(runner, PipelineRunner), type(runner)

    def submit(engine, suffix):
        engine.add_requests([new(p, n, rid + suffix) for rid, p, n in WORKLOAD])

    engine = Engine(MODEL, runner, config)
    submit(engine, "")
    clean = {rid: o.token_ids for rid, o in run_to_end(engine).items()}
    assert_idle(engine)

    engine = Engine(MODEL, runner, config)
    runner.fault_injector = FaultInjector(nonfinite={"victim-nan": math.nan})
    submit(engine, "-nan")
    outputs = run_to_end(engine)
    errors = engine.take_errors()
    assert set(errors) == {"victim-nan"} and isinstance(errors["victim-nan"], NonFiniteOutput), errors
    assert {rid[:-4]: o.token_ids for rid, o in outputs.items()} == {k: v for k, v in clean.items() if k != "victim"}
    assert_idle(engine)

    runner.fault_injector = FaultInjector(fail_executes={0})
    submit(engine, "-err")
    try:
        engine.step()
        raise AssertionError("the injected step fault did not raise")
    except StepFailed as e:
        assert isinstance(e.error, InjectedFault) and e.request_ids
        failed = set(e.request_ids)
    outputs = run_to_end(engine)
    assert not failed & set(outputs) and {rid[:-4]: o.token_ids for rid, o in outputs.items()} == {
        rid[:-4]: clean[rid[:-4]] for rid in outputs}
    submit(engine, "-new")
    assert {rid[:-4]: o.token_ids for rid, o in run_to_end(engine).items()} == clean
    assert_idle(engine)
    print("PASS")


if __name__ == "__main__":
    main()
