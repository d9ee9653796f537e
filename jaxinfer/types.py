"""Plain result records handed back to users of the session (layer 1: no jax)."""
from __future__ import annotations

import dataclasses
from typing import Optional

FINISH_REASONS = ("length", "stop", "eos")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestOutput:
    """What one finished request produced."""

    request_id: str  # the engine's id for the request
    prompt_token_ids: list  # the prompt as token ids (BOS included when the tokenizer adds it)
    token_ids: list  # generated ids only; an EOS / stop token that ended the request is included
    text: str  # generated text, stop string excluded ("" when the model has no tokenizer)
    finish_reason: str  # one of FINISH_REASONS
    logprobs: Optional[list] = None  # log p of each generated token, if asked for
    prompt_logprobs: Optional[list] = None  # log p of prompt tokens 1.., if asked for
    time_to_first_token: float = 0.0  # seconds from submission to the first token
    time_per_output_token: float = 0.0  # mean seconds between later tokens


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduledSequence:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    request_id: str  # engine id of the request
    token_ids: tuple  # ids fed to the model this step (>= 1)
    start_position: int  # position of token_ids[0] in the sequence; tokens before it are cached
    page_ids: tuple  # the sequence's pages in order, covering start_position + len(token_ids)
    sample: bool  # sample a next token after the last fed token (end of prompt / decode)
    temperature: float  # sampling knobs, as in SamplingParams
    top_k: int
    top_p: float
    min_p: float
    seed: int  # per-request seed; the key of the token at position p is fold_in(seed, p)
    want_logprobs: bool = False  # return log p of the sampled token
    want_prompt_logprobs: bool = False  # return log p of each fed token's successor
    next_token_id: Optional[int] = None  # the known successor of the last fed token (mid-prompt chunk)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepInput:
    """What the scheduler asks the runner to compute in one step."""

    sequences: tuple  # ScheduledSequence per scheduled sequence, in batch order
    # SharedPrefix nodes for the shared-prefix attention path; () = plain attention
    shared_prefixes: tuple = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepOutput:
    """What the runner computed: one entry per ScheduledSequence, in the same order."""

    sampled_token_ids: tuple  # int, or None where sample was False
    logprobs: tuple  # float log p of the sampled token, or None
    # per sequence, log p of each fed token's successor (token_ids[1:] then next_token_id
    # if given) as a tuple, or None where want_prompt_logprobs was False
    prompt_logprobs: tuple


@dataclasses.dataclass(frozen=True, kw_only=True)
class SharedPrefix:
    """A run of KV pages that several scheduled sequences share (one node of a prefix tree).

    The pages hold positions [start_page * L, (start_page + len(page_ids)) * L) of every
    member, were computed before this step, and precede every member's first query. A
    member's nodes tile its positions from 0 without gaps (a root, then a child, ...);
    its own attention (the suffix) starts where its deepest node ends.
    """

    start_page: int  # index of the first page in the members' page lists
    page_ids: tuple  # the shared physical pages, in order
    members: tuple  # indices into StepInput.sequences of the sequences sharing them
