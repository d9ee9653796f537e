"""Speculative decoding: draft proposers and the acceptance rule (host side, no jax).

Path: engine -> **proposer.propose(decoding requests)** -> drafts -> scheduler (each
decode's sequence is its last token followed by its k drafts, sampled at all k + 1
offsets: one chunk of the ragged paged step verifies them) -> runner -> scheduler.update
(**num_accepted**: the longest prefix of drafts equal to the tokens sampled before
them; those tokens plus the next sampled one are appended, the rest rolled back).

Exactness. The verifier samples position p of a request exactly as plain decoding
does: same processed logits (penalties count the drafts before p, min_tokens bans by
position), same key fold_in(seed, p). Draft j + 1 is accepted iff the token t sampled at
its position equals it; the first mismatch emits t instead. Every emitted token is thus
the token plain decoding samples at that position given the same prefix: with a seed the
output is the very sequence plain decoding gives (greedy: the argmax chain), whatever
the drafts were, and the distribution is the target's. For a point-mass draft
distribution q = delta(d) (prompt lookup, greedy drafts) this IS the rejection sampling
of Leviathan et al. (2023, "Fast Inference from Transformers via Speculative Decoding")
and Chen et al. (2023, "Accelerating LLM Decoding with Speculative Sampling"): accept d
with probability min(1, p(d) / q(d)) = p(d), else sample norm(max(0, p - q)) = p without
d -- "sample t ~ p, accept iff t == d, else emit t". A draft model samples its drafts
with the request's own knobs and position keys: the same noise as the target's sample
(runtime/sampler.py draws over the sorted distribution, so the noise goes by rank), and
a draft that ranks the likely tokens as the target does agrees with it at any
temperature (a self-draft always). Their rule, with a sampled q, accepts with the
optimal probability 1 - TV(p, q); this shared-noise coupling can accept less, but keeps
seeded outputs reproducible and batch-invariant with and without speculation.

Proposers.
- `NgramProposer` (prompt lookup decoding, Saxena 2023; vLLM's "ngram" method): the
  last n ids (n = ngram_max down to ngram_min) are looked up in the request's earlier
  ids; the ids that followed their most recent earlier occurrence are the draft.
  Free to compute, strong on code and on edits that copy the prompt.
- `DraftModelProposer`: a smaller model of the same tokenizer on its own runner and
  page pool, sampling k steps ahead (Leviathan et al.). It keeps each request's draft
  KV between steps and recomputes only what verification changed (the ids after the
  longest common prefix of what it fed and what was accepted). In the steady state a
  round (that catch-up and the k - 1 draft steps after it) is one device call
  (ModelRunner.execute_chain, runtime/draft_chain.py). Method "early_exit" uses it
  too, with a recursive target's first loops as the draft model (self-speculation;
  runtime/draft_runner.py builds that runner).

Budgets. A request drafts at most min(k, max_tokens left - 1) ids (so drafts never
write past max_model_len), drafts never preempt anyone (the scheduler drops them when
their pages are not free), and they count against the step's token budget.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxinfer.config import SpeculativeConfig
from jaxinfer.engine.block_manager import BlockManager
from jaxinfer.types import ScheduledSequence, StepInput


def num_accepted(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """Leading drafts equal to the token sampled at their position (sampled[j] is the
    token after the sequence's j-th fed token; drafts[j] was fed as token j + 1)."""
    n = 0
    for d, s in zip(drafts, sampled):
        if d != s:
            break
        n += 1
    return n


def draft_limit(request, k: int) -> int:
    """Drafts a request may take this step: k, fewer near max_tokens (the step appends at
    most drafts + 1 tokens)."""
    return max(0, min(k, request.params.max_tokens - len(request.output_ids) - 1))


@dataclasses.dataclass
class SpecCounters:
    """vLLM's spec-decode counters: drafts (verified sequences with >= 1 draft), their
    draft tokens, accepted tokens, and accepted tokens per draft position."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list = dataclasses.field(default_factory=list)
    draft_seconds: float = 0.0  # time in the proposer (the draft model's steps)
    num_proposer_errors: int = 0  # proposer failures (those steps ran without drafts)
    # a draft model's rounds: one device call each (a draft chain), or one call per draft position
    num_chained_rounds: int = 0
    num_stepped_rounds: int = 0

    def record(self, num_drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position += [0] * (num_drafted - len(self.accepted_per_position))
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    def metrics(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_acceptance_rate": self.num_accepted_tokens / max(self.num_draft_tokens, 1),
                # tokens per verified sequence: accepted drafts + the one sampled after them
                "spec_mean_accepted_length": 1 + self.num_accepted_tokens / max(self.num_drafts, 1),
                "spec_accepted_per_position": list(self.accepted_per_position),
                "spec_draft_seconds": self.draft_seconds, "spec_proposer_errors": self.num_proposer_errors,
                "spec_draft_chained_rounds": self.num_chained_rounds,
                "spec_draft_stepped_rounds": self.num_stepped_rounds}


def ngram_draft(ids: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> tuple:
    """The ids that followed the most recent earlier occurrence of ids' last n ids, for
    the largest n in [ngram_min, ngram_max] that occurs; () when none does."""
    if k <= 0 or len(ids) < ngram_min + 1:
        return ()
    seq = np.asarray(ids, np.int64)
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        # Windows starting at 0 .. len - n - 1: each has a follower; the suffix itself is excluded.
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tuple(int(t) for t in seq[start:start + k])
    return ()


class NgramProposer:
    def __init__(self, config: SpeculativeConfig):
        self.config = config

    def propose(self, requests: Sequence, limits: Mapping[str, int]) -> dict:
        c = self.config
        drafts = {}
        for request in requests:
            draft = ngram_draft(request.all_ids, limits.get(request.request_id, 0), c.ngram_max, c.ngram_min)
            if draft:
                drafts[request.request_id] = draft
        return drafts


# A draft round runs as one device call (ModelRunner.execute_chain) when no request has
# more than this many ids to catch up on: the steady state (after a verify step, one or
# two ids). A round that feeds a prompt runs step by step: a chain program is compiled
# per (catch-up shape, decode shape), and prompt shapes would multiply them.
CHAIN_MAX_CATCH_UP = 4


@dataclasses.dataclass
class _DraftState:
    fed: list  # ids whose K/V are in the draft model's pages, in order
    pages: list  # the draft pool's pages of the request


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n], np.int64), np.asarray(b[:n], np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


class DraftModelProposer:
    """Greedy drafts from a smaller model (its own runner and page pool).

    Args:
      runner: a ModelRunner (or anything with execute(StepInput), num_pages, page_size)
        of the draft model; the proposer owns its pages.
      config: the speculative config (k).
    """

    def __init__(self, runner, config: SpeculativeConfig):
        self.runner = runner
        self.config = config
        self.pages = BlockManager(runner.num_pages, runner.page_size, enable_prefix_caching=False)
        self._states: dict = {}  # request id -> _DraftState
        self.num_chained_rounds = 0  # rounds run as one device call (SpecCounters copies these)
        self.num_stepped_rounds = 0

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self.pages.free(state.pages)

    @staticmethod
    def _sequence(request, state: _DraftState, token_ids: tuple, start: int) -> ScheduledSequence:
        """A draft step of `request`: sampled with its own knobs and seed (the key of position
        p is the target's: the two samples share their noise), without its logit processing."""
        params = request.params
        return ScheduledSequence(request_id=request.request_id, token_ids=token_ids, start_position=start,
                                 page_ids=tuple(state.pages), sample_offsets=(len(token_ids) - 1,),
                                 temperature=float(params.temperature), top_k=int(params.top_k),
                                 top_p=float(params.top_p), min_p=float(params.min_p), seed=request.seed)

    def propose(self, requests: Sequence, limits: Mapping[str, int]) -> dict:
        live = {r.request_id for r in requests}
        for request_id in [i for i in self._states if i not in live]:
            self.release(request_id)
        # Catch up: feed each request's ids after what the draft holds; sample draft 1.
        work = []  # (request id, state, k)
        seqs = []
        for request in requests:
            k = limits.get(request.request_id, 0)
            if k <= 0:
                continue
            ids = request.all_ids
            state = self._states.setdefault(request.request_id, _DraftState([], []))
            start = min(_common_prefix(state.fed, ids), len(ids) - 1)
            del state.fed[start:]
            # The catch-up writes len(ids) positions, the later draft steps k - 1 more.
            need = self.pages.pages_needed(len(ids) + k - 1) - len(state.pages)
            if need > self.pages.num_free_pages:
                self.release(request.request_id)  # no room: no drafts for it this step
                continue
            if need > 0:
                state.pages += self.pages.allocate(need)
            seqs.append(self._sequence(request, state, tuple(ids[start:]), start))
            state.fed = list(ids)
            work.append((request, state, k))
        if not seqs:
            return {}
        chain = (hasattr(self.runner, "execute_chain") and max(k for _, _, k in work) > 1
                 and max(len(seq.token_ids) for seq in seqs) <= CHAIN_MAX_CATCH_UP)
        if chain:
            self.num_chained_rounds += 1
            drafts = self._chained(seqs, work)
        else:
            self.num_stepped_rounds += 1
            drafts = self._stepped(seqs, work)
        return {request_id: tuple(d) for request_id, d in drafts.items() if d}

    def _chained(self, seqs: list, work: list) -> dict:
        """The catch-up step and every later draft step in one device call
        (ModelRunner.execute_chain, runtime/draft_chain.py)."""
        chain = [(request, state, k) for request, state, k in work if k > 1]
        follow = [self._sequence(request, state, (0,), len(state.fed))
                  for request, state, _ in chain]
        num_iterations = self.config.num_speculative_tokens - 1
        out, chained = self.runner.execute_chain(StepInput(sequences=tuple(seqs)), StepInput(sequences=tuple(follow)),
                                                 [k - 1 for _, _, k in chain], num_iterations)
        drafts: dict = {}
        for request, state, k in work:
            rid = request.request_id
            first = out.outputs[rid]
            ids, finite = chained.get(rid, ((), True))
            if not (first.finite and first.token_ids and finite):  # a NaN in the draft model: no drafts
                self.release(rid)
                continue
            drafts[rid] = [int(first.token_ids[0]), *ids]
            state.fed += drafts[rid][:-1]  # the chain fed every draft but the last
        return drafts

    def _stepped(self, seqs: list, work: list) -> dict:
        """One device call per draft position (runners without execute_chain)."""
        drafts: dict = {request.request_id: [] for request, _, _ in work}
        for depth in range(max((k for _, _, k in work), default=0)):
            if depth > 0:  # feed each active request's last draft
                seqs = []
                for request, state, k in work:
                    mine = drafts[request.request_id]
                    if depth < k and mine:
                        seqs.append(self._sequence(request, state, (mine[-1],), len(state.fed)))
                        state.fed.append(mine[-1])
            if not seqs:
                break
            out = self.runner.execute(StepInput(sequences=tuple(seqs))).outputs
            for seq in seqs:
                result = out[seq.request_id]
                if result.finite and result.token_ids:
                    drafts[seq.request_id].append(int(result.token_ids[0]))
                else:  # a NaN in the draft model: stop drafting for this request
                    self.release(seq.request_id)
                    work = [w for w in work if w[0].request_id != seq.request_id]
                    drafts[seq.request_id] = []
        return drafts


def make_proposer(config: Optional[SpeculativeConfig], draft_runner=None):
    """The proposer of an EngineConfig.speculative (None = no speculation)."""
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config)
    if draft_runner is None:
        raise ValueError(f"speculative.method: {config.method!r} needs the draft model's runner (the session "
                         f"builds it: runtime/draft_runner.py)")
    return DraftModelProposer(draft_runner, config)


def timed_propose(proposer, requests: Sequence, limits: Mapping[str, int], counters: SpecCounters) -> dict:
    """proposer.propose, timed into counters; a proposer error means no drafts this step
    (the target model decodes as without speculation) and is counted."""
    start = time.perf_counter()
    try:
        return proposer.propose(requests, limits)
    except Exception:  # noqa: BLE001 - speculation is an optimisation: decode without it
        counters.num_proposer_errors += 1
        release = getattr(proposer, "release", None)  # the draft model's state may be half written
        for request in requests if release is not None else ():
            release(request.request_id)
        return {}
    finally:
        counters.draft_seconds += time.perf_counter() - start
        counters.num_chained_rounds = getattr(proposer, "num_chained_rounds", 0)
        counters.num_stepped_rounds = getattr(proposer, "num_stepped_rounds", 0)
