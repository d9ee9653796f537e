"""Records that cross a boundary (layer 1: no jax, no numpy).

Two families:
- what users get back: `RequestOutput` (a finished request) and `StreamDelta` (what a
  request produced in one engine step, for streaming clients);
- the step protocol between the scheduler (host) and the ModelRunner (device):
  `ScheduledStep` -> `StepInput` (made of `ScheduledSequence`s and `SharedPrefix`
  nodes) -> runner -> `StepOutput` (one `SequenceOutput` per request id, plus
  `StepStats`) -> `Scheduler.update(step, output)`, which matches outputs to requests
  by request id, never by position.

Glossary of the step: a *sequence* is one request's share of a step (a prefill chunk,
a decode token, or a decode token plus draft tokens to verify); its *sample offsets*
are the indices into its fed tokens after which a next token is sampled (none in the
middle of a prompt, one at the end of a prompt or for a decode, k + 1 for k verified
draft tokens).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional

FINISH_REASONS = ("length", "stop", "eos", "abort")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestOutput:
    """What one finished request produced."""

    request_id: str  # the engine's id for the request
    prompt_token_ids: list  # the prompt as token ids (BOS included when the tokenizer adds it)
    token_ids: list  # generated ids only; an EOS / stop token that ended the request is included
    text: str  # generated text, stop string excluded ("" when the model has no tokenizer)
    finish_reason: str  # one of FINISH_REASONS ("abort": stopped by the caller or an error)
    logprobs: Optional[list] = None  # log p of each generated token, if asked for
    # per generated token, the `logprobs=N` most likely tokens as {token id: log p}, if N >= 1
    top_logprobs: Optional[list] = None
    prompt_logprobs: Optional[list] = None  # log p of prompt tokens 1.., if asked for
    time_to_first_token: float = 0.0  # seconds from submission to the first token
    time_per_output_token: float = 0.0  # mean seconds between later tokens (compiles included)
    # seconds of XLA compilation in the steps between its first and last token (a
    # decode rate without one-off compiles: (n - 1) / ((n - 1) * tpot - this))
    decode_compile_seconds: float = 0.0
    # seconds from arrival in the engine to being first scheduled (a request aborted
    # before that: to its end)
    queue_time: float = 0.0
    # SamplingParams.n > 1: the prompt's requests are "{parent_request_id}-{index}",
    # index in [0, n); a plain request has index 0 and no parent
    index: int = 0
    parent_request_id: Optional[str] = None
    # prompt tokens whose KV came from the prefix cache at the request's first admission
    # (vLLM's num_cached_tokens; OpenAI's usage.prompt_tokens_details.cached_tokens)
    num_cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamDelta:
    """What one request produced since its previous delta (one per engine step at most).

    Text that could still turn into a stop string is held back until it cannot; the
    concatenated `text` of all deltas of a request equals its RequestOutput.text.
    """

    request_id: str
    text: str  # new text ("" when nothing could be released yet)
    token_ids: tuple  # new generated ids
    logprobs: Optional[tuple] = None  # log p of each new id, if asked for
    top_logprobs: Optional[tuple] = None  # per new id a {token id: log p} dict, if logprobs=N >= 1
    finish_reason: Optional[str] = None  # set on the request's last delta only
    output: Optional[RequestOutput] = None  # the whole result (usage, timings), on the last delta only
    index: int = 0  # sample index within its prompt (SamplingParams.n), as in RequestOutput
    parent_request_id: Optional[str] = None  # as in RequestOutput

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


# ---------------------------------------------------------------------- the step protocol


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduledSequence:
    """One sequence's share of a step: a prefill chunk or decode token(s)."""

    request_id: str  # engine id of the request
    token_ids: tuple  # ids fed to the model this step (>= 1)
    start_position: int  # position of token_ids[0] in the sequence; tokens before it are cached
    page_ids: tuple  # the sequence's pages in order, covering start_position + len(token_ids)
    # indices into token_ids after which a next token is sampled, increasing: () in the
    # middle of a prompt, (len(token_ids) - 1,) at the end of a prompt or for a decode
    sample_offsets: tuple
    temperature: float  # sampling knobs, as in SamplingParams
    top_k: int
    top_p: float
    min_p: float
    seed: int  # per-request seed; the key of the token at position p is fold_in(seed, p)
    want_logprobs: bool = False  # return log p of each sampled token
    num_top_logprobs: int = 0  # also return the this many most likely tokens per sampled token
    want_prompt_logprobs: bool = False  # return log p of each fed token's successor
    next_token_id: Optional[int] = None  # the known successor of the last fed token (mid-prompt chunk)
    # Logit processing (SamplingParams; neutral defaults = off). Penalties count a sample
    # row's history: the prompt, then the generated ids before the sampled position.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # set only when a penalty is on and the sequence samples: the prompt (the request's
    # own tuple, not copied per step) and the ids generated so far
    prompt_token_ids: tuple = ()
    output_token_ids: tuple = ()
    logit_bias: tuple = ()  # ((token id, bias), ...) added to the logits
    # min_tokens: sample rows whose sampled position is < ban_until_position give these
    # ids (EOS, stop token ids) -inf logits
    banned_token_ids: tuple = ()
    ban_until_position: int = 0
    # Depth-wise batching of a recursive model (engine/depthwise.py; other runners ignore
    # these): the loop of the shared block the tokens run this step (loop > 0: their hidden
    # states come from the previous step's row of the same request_id), and, for a sequence
    # that samples before the last loop, the confidence at or above which it exits (None:
    # it samples only after the last loop)
    loop: int = 0
    exit_threshold: Optional[float] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepInput:
    """What the scheduler asks the runner to compute in one step."""

    sequences: tuple  # ScheduledSequence per scheduled sequence, in batch order
    # SharedPrefix nodes for the shared-prefix attention path; () = plain attention
    shared_prefixes: tuple = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduledStep:
    """One scheduled step: the runner's input plus what the scheduler needs back.

    `Scheduler.update(step, output)` takes this object back with the runner's output,
    so a step can be in flight while the next one is scheduled.
    """

    step_id: int  # increasing per scheduler
    step_input: StepInput  # handed to the runner as it is
    # request id -> tokens scheduled (== len of its sequence's token_ids), read-only
    num_scheduled_tokens: Mapping[str, int]
    # request id -> draft ids fed after its last token (speculative decoding), read-only
    draft_token_ids: Mapping[str, tuple] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def num_sequences(self) -> int:
        return len(self.step_input.sequences)

    @classmethod
    def make(cls, step_id: int, step_input: StepInput, drafts: Optional[Mapping[str, tuple]] = None
             ) -> "ScheduledStep":
        counts = {s.request_id: len(s.token_ids) for s in step_input.sequences}
        if len(counts) != len(step_input.sequences):
            raise ValueError("step_input.sequences: a request id appears twice in one step")
        return cls(step_id=step_id, step_input=step_input, num_scheduled_tokens=types.MappingProxyType(counts),
                   draft_token_ids=types.MappingProxyType(dict(drafts or {})))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceOutput:
    """What the runner computed for one scheduled sequence."""

    request_id: str
    token_ids: tuple  # one sampled id per sample offset, in order (() mid-prompt)
    logprobs: Optional[tuple] = None  # log p of each sampled id (raw model distribution), if wanted
    # per sampled id, ((token id, log p), ...) of the num_top_logprobs most likely tokens
    top_logprobs: Optional[tuple] = None
    # log p of each fed token's successor (token_ids[1:] then next_token_id if given),
    # if want_prompt_logprobs
    prompt_logprobs: Optional[tuple] = None
    # False when a sample row's logits held a NaN or Inf (the runner checks every row on
    # device): the tokens are then meaningless, and the engine fails the request alone
    # without caching the pages it wrote
    finite: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepStats:
    """Figures of one executed step; the engine sums them into its metrics."""

    device_seconds: float = 0.0  # the jitted call, results fetched (includes compilation)
    host_seconds: float = 0.0  # the runner's host work: building the batch, unpacking outputs
    is_compile: bool = False  # the step's shapes were new: this call compiled a program
    num_tokens: int = 0  # real tokens run
    num_padded_tokens: int = 0  # tokens after padding to the bucket
    is_shared_prefix: bool = False  # the shared-prefix (Hydragen) attention path ran
    # prefix KV tokens (per layer) not re-read thanks to sharing: for each node, its
    # tokens x (rows the plain path would have read it in - prefix rows reading it)
    shared_prefix_tokens_saved: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepOutput:
    """What the runner computed for one StepInput."""

    outputs: Mapping[str, SequenceOutput]  # by request id, one per scheduled sequence
    stats: StepStats = StepStats()


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
