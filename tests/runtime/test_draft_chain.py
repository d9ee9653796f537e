"""Draft chains (runtime/draft_chain.py, ModelRunner.execute_chain): a step and the decode
steps after it, each fed the id sampled before, in one device call.

Checked against the same steps run one call each on a second runner with the same
parameters: the same ids (greedy and seeded sampling, rows of different lengths), the
same K/V in every written slot, nothing written past a row's length; a non-finite value
fails its request only; a chain leaving a request's pages is refused on the host.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer.config import ModelConfig
from jaxinfer.models.transformer import init_params
from jaxinfer.runtime import faults
from jaxinfer.runtime.model_runner import ModelRunner
from jaxinfer.types import ScheduledSequence, StepInput

CONFIG = ModelConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=64)
PAGE = 4


def _seq(rid, token_ids, start, pages, **kw):
    knobs = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    knobs.update(kw)
    return ScheduledSequence(request_id=rid, token_ids=tuple(token_ids), start_position=start, page_ids=tuple(pages),
                             sample_offsets=(len(token_ids) - 1,), **knobs)


@pytest.fixture(scope="module")
def runners():
    params = init_params(CONFIG, jax.random.key(3))
    return [ModelRunner(CONFIG, params, page_size=PAGE, num_pages=24) for _ in range(2)]


# request id -> (prompt ids, pages, chain length, sampling knobs)
REQUESTS = {
    "greedy": (list(range(3, 12)), [0, 1, 2, 3], 3, {}),
    "seeded": (list(range(20, 26)), [5, 6, 7], 2, dict(temperature=1.0, seed=1234)),
    "one": (list(range(40, 47)), [9, 10, 11], 1, dict(temperature=0.7, top_k=5, seed=7)),
}


def _stepped(runner):
    """The catch-up step, then one call per decode step (the proposer's old path)."""
    seqs = [_seq(rid, ids, 0, pages, **kw) for rid, (ids, pages, _, kw) in REQUESTS.items()]
    out = runner.execute(StepInput(sequences=tuple(seqs))).outputs
    fed = {rid: [out[rid].token_ids[0]] for rid in REQUESTS}
    for j in range(max(n for _, _, n, _ in REQUESTS.values())):
        step = [_seq(rid, [fed[rid][-1]], len(ids) + j, pages, **kw)
                for rid, (ids, pages, n, kw) in REQUESTS.items() if j < n]
        res = runner.execute(StepInput(sequences=tuple(step))).outputs
        for s in step:
            fed[s.request_id].append(res[s.request_id].token_ids[0])
    return fed


def _chained(runner, num_iterations=3, **override):
    requests = {**REQUESTS, **override}
    seqs = [_seq(rid, ids, 0, pages, **kw) for rid, (ids, pages, _, kw) in requests.items()]
    follow = [_seq(rid, [0], len(ids), pages, **kw) for rid, (ids, pages, _, kw) in requests.items()]
    out, chains = runner.execute_chain(StepInput(sequences=tuple(seqs)), StepInput(sequences=tuple(follow)),
                                       [n for _, _, n, _ in requests.values()], num_iterations)
    return out, chains


def test_chain_equals_separate_steps(runners):
    stepped, chained = runners
    want = _stepped(stepped)
    out, chains = _chained(chained)
    for rid, (ids, pages, n, _) in REQUESTS.items():
        got = [out.outputs[rid].token_ids[0], *chains[rid][0]]
        assert got == want[rid], rid
        assert len(chains[rid][0]) == n and chains[rid][1] and out.outputs[rid].finite
    # The same K/V in every slot the requests wrote (prompt + chain positions), and the
    # slots after a row's last step untouched (both pools start at zero).
    for (k1, v1), (k2, v2) in zip(stepped.kv_caches, chained.kv_caches):
        for a, b in ((k1, k2), (v1, v2)):
            a, b = np.asarray(a), np.asarray(b)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    flat = np.asarray(chained.kv_caches[0][0]).reshape(24 * PAGE, -1)
    ids, pages, n, _ = REQUESTS["one"]  # wrote positions 0 .. len(ids) (prompt, then one chain step)
    last = len(ids) + n - 1
    assert np.abs(flat[pages[last // PAGE] * PAGE + last % PAGE]).sum() > 0
    after = last + 1
    assert np.abs(flat[pages[after // PAGE] * PAGE + after % PAGE]).sum() == 0


def test_nonfinite_value_fails_only_its_request(runners):
    runner = runners[1]
    runner.fault_injector = faults.FaultInjector(nonfinite={"seeded": float("nan")})
    try:
        out, chains = _chained(runner)
    finally:
        runner.fault_injector = None
    assert not out.outputs["seeded"].finite and not chains["seeded"][1]
    assert chains["greedy"][1] and chains["one"][1] and out.outputs["greedy"].finite


def test_chain_outside_its_pages_is_refused(runners):
    runner = runners[1]
    ids, pages, _, kw = REQUESTS["greedy"]  # 9 ids in 4 pages of 4: positions up to 15
    with pytest.raises(ValueError, match="request 'greedy': a draft chain of 8 steps"):
        _chained(runner, num_iterations=8, greedy=(ids, pages, 8, kw))
    with pytest.raises(ValueError, match="one token per sequence"):
        runner.execute_chain(StepInput(sequences=(_seq("a", [1, 2], 0, [0]),)),
                             StepInput(sequences=(_seq("a", [0, 0], 2, [0]),)), [1], 1)
