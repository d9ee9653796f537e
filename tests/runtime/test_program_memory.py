"""runtime/program_memory.py: compiled programs are dropped before the process runs out of
memory mappings (vm.max_map_count), and the functions still work afterwards."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.runtime import program_memory

pytestmark = pytest.mark.skipif(program_memory.count_mappings() is None, reason="needs /proc/self/maps (Linux)")


def _f(x):
    for _ in range(4):
        x = jnp.tanh(x @ x.T) + jnp.sin(x)
    return x.sum()


def test_compiles_add_mappings_and_a_flush_returns_them():
    fn = jax.jit(_f)
    fn(jnp.ones((3, 3))).block_until_ready()
    start = program_memory.count_mappings()
    for n in range(4, 24):
        fn(jnp.ones((n, n))).block_until_ready()
    grown = program_memory.count_mappings()
    assert grown - start >= 20  # at least one mapping per program
    budget = program_memory.MapBudget(fraction=0.5, max_map_count=2 * start)  # already over half
    assert budget.after_compile([fn]) and budget.num_flushes == 1
    assert program_memory.count_mappings() < grown - 10
    x = np.arange(9, dtype=np.float32).reshape(3, 3) / 9
    np.testing.assert_allclose(fn(x), _f(x), rtol=1e-6)  # compiles again, same result


def test_under_budget_or_without_a_limit_nothing_is_dropped():
    fn = jax.jit(_f)
    fn(jnp.ones((5, 5))).block_until_ready()
    roomy = program_memory.MapBudget(max_map_count=100 * program_memory.count_mappings())
    assert not roomy.after_compile([fn]) and roomy.num_flushes == 0
    unknown = program_memory.MapBudget(max_map_count=None)
    unknown.limit = None  # as on a system without /proc/sys/vm/max_map_count
    assert not unknown.after_compile([fn])
    with pytest.raises(ValueError, match="fraction"):
        program_memory.MapBudget(fraction=1.5)


def test_the_limit_is_read_from_proc():
    if not os.path.exists(program_memory.MAX_MAP_COUNT_FILE):
        pytest.skip("no /proc/sys/vm/max_map_count")
    assert program_memory.MapBudget().limit >= 1000


def test_a_runner_that_drops_its_programs_gives_the_same_tokens(hf_model_dir):
    """A budget so small that every compile drops the step programs: the same greedy
    tokens as a runner that keeps them, every compile counted (recompiles included)."""
    from jaxinfer import EngineConfig, InferenceSession, SamplingParams
    path, _ = hf_model_dir("llama")
    prompts = [[5, 9, 13, 17, 21], [7, 11, 2, 3, 19, 23, 29, 31, 37, 41], [4, 8]]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results, compiles = [], []
    for flush in (False, True):
        with InferenceSession.from_pretrained(path, engine=EngineConfig(page_size=4, max_num_batched_tokens=8,
                                                                        compilation_cache_dir="")) as session:
            runner = session.engine.runner
            if flush:
                runner.map_budget = program_memory.MapBudget(fraction=0.001)  # over budget at once
            results.append([o.token_ids for o in session.generate(prompts, params)])
            compiles.append(session.metrics()["num_compiles"])
            if flush:
                assert runner.map_budget.num_flushes == compiles[-1] >= 2
                # the shapes met again compiled again: more compiles than distinct shapes
                again = session.generate(prompts, params)
                assert [o.token_ids for o in again] == results[0]
                assert session.metrics()["num_compiles"] > compiles[-1]
    assert results[1] == results[0]
