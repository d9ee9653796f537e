"""The shared-prefix (Hydragen) path end to end: grouping by shared pages (no jax), the
runner's checks of the groups, and the engine's greedy outputs with the path on, off
and with the Pallas kernels in interpret mode (HF is the oracle)."""
from __future__ import annotations

import numpy as np
import pytest

import hf_models
from jaxinfer import EngineConfig, InferenceSession, SamplingParams
from jaxinfer.engine.shared_prefix import find_shared_prefixes
from jaxinfer.types import ScheduledSequence, SharedPrefix, StepInput

PAGE = 4


def _seq(rid, pages, start, num_tokens=1):
    return ScheduledSequence(request_id=str(rid), token_ids=(5,) * num_tokens, start_position=start,
                             page_ids=tuple(pages), sample_offsets=(num_tokens - 1,), temperature=0.0, top_k=0,
                             top_p=1.0, min_p=0.0, seed=0)


def test_tree_of_depth_two():
    root, few_shot = [10, 11, 12], [20, 21]
    seqs = [_seq(0, root + few_shot + [30], 5 * PAGE + 1),  # root + few-shot, decode
            _seq(1, root + few_shot + [31, 32], 6 * PAGE, num_tokens=3),  # root + few-shot, prefill chunk
            _seq(2, root + [33], 3 * PAGE + 2),  # root only
            _seq(3, [40, 41], PAGE + 1)]  # nothing shared
    nodes = find_shared_prefixes(seqs, PAGE, min_tokens=PAGE, min_seqs=2)
    assert nodes == (SharedPrefix(start_page=0, page_ids=tuple(root), members=(0, 1, 2)),
                     SharedPrefix(start_page=3, page_ids=tuple(few_shot), members=(0, 1)))


def test_only_pages_before_the_first_query_count():
    # Sequence 1's query sits inside page 12: only pages 10 and 11 precede it.
    seqs = [_seq(0, [10, 11, 12, 13], 3 * PAGE + 1), _seq(1, [10, 11, 12], 2 * PAGE + 1)]
    (node,) = find_shared_prefixes(seqs, PAGE, min_tokens=PAGE, min_seqs=2)
    assert node.page_ids == (10, 11) and node.members == (0, 1)


def test_cost_rule():
    root = [10, 11]
    seqs = [_seq(i, root + [20 + i], 2 * PAGE + 1) for i in range(3)]
    assert find_shared_prefixes(seqs, PAGE, min_tokens=3 * PAGE, min_seqs=2) == ()  # too short
    assert find_shared_prefixes(seqs, PAGE, min_tokens=PAGE, min_seqs=4) == ()  # too few sharers
    assert len(find_shared_prefixes(seqs, PAGE, min_tokens=2 * PAGE, min_seqs=3)) == 1
    # A rejected parent (1 page) prunes its child, so members' nodes never leave a gap.
    seqs = [_seq(0, [10, 20, 21, 22], 4 * PAGE), _seq(1, [10, 20, 21, 22], 4 * PAGE),
            _seq(2, [10, 30], 2 * PAGE)]
    nodes = find_shared_prefixes(seqs, PAGE, min_tokens=2 * PAGE, min_seqs=2)
    assert nodes == ()


def _workload(seed, num, system_len, few_shot_len):
    """Prompts of a system prompt for all, few-shot examples for every other one."""
    rng = np.random.RandomState(seed)
    system = rng.randint(3, hf_models.VOCAB, size=system_len).tolist()
    few_shot = rng.randint(3, hf_models.VOCAB, size=few_shot_len).tolist()
    prompts, params = [], []
    for i in range(num):
        own = rng.randint(3, hf_models.VOCAB, size=rng.randint(1, 12)).tolist()
        prompts.append(system + (few_shot if i % 2 else []) + own)
        params.append(SamplingParams(max_tokens=int(rng.randint(2, 10)), temperature=0.0, ignore_eos=True))
    # Warm-up prompts put both prefixes in the cache first, as a served system prompt would be.
    warm = [system + [3], system + few_shot + [3]]
    return warm, prompts, params


def _engine(shared, impl="xla"):
    return EngineConfig(page_size=PAGE, num_pages=192, max_num_batched_tokens=48, max_num_seqs=12,
                        shared_prefix_attention=shared, shared_prefix_min_tokens=2 * PAGE, attention_impl=impl)


def test_engine_tree_equals_hf_and_the_plain_path(oracle):
    path, generate = oracle
    warm, prompts, params = _workload(0, num=24, system_len=21, few_shot_len=10)
    outputs, metrics = {}, {}
    for shared in (False, True):
        session = InferenceSession.from_pretrained(path, engine=_engine(shared))
        session.generate(warm, SamplingParams(max_tokens=1, temperature=0.0))
        outputs[shared] = [o.token_ids for o in session.generate(prompts, params)]
        metrics[shared] = session.metrics()
        assert metrics[shared]["num_free_pages"] == metrics[shared]["num_total_pages"]
    assert outputs[True] == outputs[False]
    for p, sp, out in zip(prompts, params, outputs[True]):
        assert out == generate(p, sp.max_tokens)
    assert metrics[False]["shared_prefix_steps"] == 0 and metrics[False]["shared_prefix_tokens_saved"] == 0
    assert metrics[True]["shared_prefix_steps"] >= 5
    # Decode steps alone: >= 2 sharers re-read >= 5 pages (20 tokens) each.
    assert metrics[True]["shared_prefix_tokens_saved"] >= 5 * 20


def test_engine_pallas_interpret_equals_xla_on_a_mixed_workload(oracle):
    # Prefill chunks, decodes and shared prefixes in the same steps, through the GPU
    # kernel in interpret mode; greedy tokens must equal the XLA path's.
    path, _ = oracle
    warm, prompts, params = _workload(1, num=8, system_len=13, few_shot_len=9)
    outputs = {}
    for impl in ("xla", "pallas_interpret"):
        session = InferenceSession.from_pretrained(path, engine=_engine(True, impl))
        session.generate(warm, SamplingParams(max_tokens=1, temperature=0.0))
        outputs[impl] = [o.token_ids for o in session.generate(prompts, params)]
        assert session.metrics()["shared_prefix_steps"] > 0
    assert outputs["pallas_interpret"] == outputs["xla"]


def test_runner_rejects_inconsistent_groups(oracle):
    path, _ = oracle
    session = InferenceSession.from_pretrained(path, engine=_engine(True))
    runner = session.engine.runner
    seqs = (_seq(0, [1, 2, 3], 2 * PAGE + 1), _seq(1, [1, 2, 4], 2 * PAGE + 1))
    bad = {
        "differ": SharedPrefix(start_page=0, page_ids=(1, 3), members=(0, 1)),
        "past": SharedPrefix(start_page=0, page_ids=(1, 2, 3), members=(0,)),
        "not a sequence": SharedPrefix(start_page=0, page_ids=(1, 2), members=(0, 5)),
        "gap": SharedPrefix(start_page=1, page_ids=(2,), members=(0, 1)),
    }
    for message, node in bad.items():
        with pytest.raises(ValueError, match=f"shared_prefixes.*{message}"):
            runner.execute(StepInput(sequences=seqs, shared_prefixes=(node,)))
    good = SharedPrefix(start_page=0, page_ids=(1, 2), members=(0, 1))
    out = runner.execute(StepInput(sequences=seqs, shared_prefixes=(good,)))
    assert sorted(out.outputs) == ["0", "1"]
    assert all(len(o.token_ids) == 1 for o in out.outputs.values())
