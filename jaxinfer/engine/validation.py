"""Request validation: the one place where a request's fields are checked (no jax).

Path: session -> async engine -> **validation** (in the caller's thread, by
`AsyncEngine.add_requests`, and again by `Engine.add_requests` on the loop thread: it is
cheap, and the Engine stays safe to use on its own) -> scheduler. Everything behind this boundary trusts the types: prompt ids are python ints
inside the vocabulary, prompt + max_tokens fits the context and the page pool, the
priority is an int, the cache salt a string or None. A batch of requests is validated
as a whole before any of them is queued, so one bad request leaves the engine untouched.

Errors are ValueErrors that name the field; with an `index` (a batch) the name carries
it: `prompts[1]: token id 2.0 ...`, `params[0].stop_token_ids: ...`.

Samples (SamplingParams.n > 1). `expand_samples` turns a validated request into its n
samples, plain requests of n = 1 with ids "{request_id}-{i}" (i in [0, n)); sample 0
keeps the request's seed, sample i > 0 gets `sample_seed(seed, i)` (a seeded request
stays reproducible); without a seed each sample gets its own fresh seed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterable, Mapping
from typing import Optional

from jaxinfer.config import EngineConfig, ModelConfig, SamplingParams, as_token_id


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewRequest:
    """A request as it enters the engine (validated by `validate_request`)."""

    prompt_ids: tuple  # token ids of the prompt (>= 1)
    params: SamplingParams
    request_id: Optional[str] = None  # None = the engine assigns one
    priority: int = 0  # lower runs first
    cache_salt: Optional[str] = None  # prefix-cache namespace
    # set by expand_samples: the sample's index within its prompt, and the prompt's id
    index: int = 0
    parent_id: Optional[str] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What a request must fit into."""

    vocab_size: int
    max_model_len: int  # prompt + max_tokens at most
    num_pages: int  # KV pages in the pool
    page_size: int  # tokens per page
    early_exit: bool = False  # the engine serves a recursive model depth-wise (params.early_exit_threshold)


def resolve_max_model_len(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    """The context length the engine serves: EngineConfig.max_model_len or the model's.

    Raises:
      ValueError: max_model_len above the model's max_position_embeddings (a silent cut
        would surprise whoever sized their prompts by it).
    """
    limit = model_config.max_position_embeddings
    if engine_config.max_model_len is None:
        return limit
    if engine_config.max_model_len > limit:
        raise ValueError(f"max_model_len: {engine_config.max_model_len} exceeds the model's context "
                         f"(max_position_embeddings) of {limit}; pass at most {limit} or None")
    return engine_config.max_model_len


def _name(field: str, index: Optional[int]) -> str:
    return field if index is None else f"{field}[{index}]"


def validate_prompt_ids(prompt, vocab_size: int, field: str = "prompt", max_len: Optional[int] = None) -> tuple:
    """Token ids (ints, numpy integers accepted) of a non-empty prompt inside the vocabulary.

    With `max_len`, a prompt of max_len tokens or more is refused (no room for one
    output token) after reading at most max_len of them (an endless iterator too).
    """
    if isinstance(prompt, (str, bytes, bytearray, Mapping)) or not isinstance(prompt, Iterable):
        raise ValueError(f"{field}: expected a list of token ids, got {type(prompt).__name__}")
    ids = []
    for t in prompt if max_len is None else itertools.islice(prompt, max_len):
        try:
            t = as_token_id(t, field)
        except ValueError:
            raise ValueError(f"{field}: token id {t!r} is not an int ({type(t).__name__})") from None
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}: token id {t} outside the vocabulary [0, {vocab_size})")
        ids.append(t)
    if not ids:
        raise ValueError(f"{field}: empty prompt (needs at least one token)")
    if max_len is not None and len(ids) >= max_len:
        raise ValueError(f"{field}: the prompt has {max_len} tokens or more; the model's context of {max_len} "
                         f"leaves no room for an output token")
    return tuple(ids)


def validate_request(request: NewRequest, limits: RequestLimits, index: Optional[int] = None) -> NewRequest:
    """Checks every field of `request`; returns it with normalized prompt ids.

    Raises:
      ValueError: naming the field (and `index` for a batch).
    """
    if not isinstance(request.params, SamplingParams):
        raise ValueError(f"{_name('params', index)}: expected SamplingParams, got {type(request.params).__name__}")
    params = request.params
    ids = validate_prompt_ids(request.prompt_ids, limits.vocab_size, _name("prompts", index), limits.max_model_len)
    total = len(ids) + params.max_tokens
    if total > limits.max_model_len:
        raise ValueError(f"{_name('params', index)}.max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                         f"({params.max_tokens}) = {total} exceeds the model's context of {limits.max_model_len}")
    if -(-total // limits.page_size) > limits.num_pages:
        raise ValueError(f"{_name('params', index)}.max_tokens: prompt + max_tokens = {total} tokens can never "
                         f"fit in the KV cache ({limits.num_pages} pages of {limits.page_size})")
    if params.early_exit_threshold is not None and not limits.early_exit:
        raise ValueError(f"{_name('params', index)}.early_exit_threshold: early exit needs depth-wise batching (a "
                         f"recursive model folder and depthwise_batching not False)")
    for t in params.stop_token_ids:
        if t >= limits.vocab_size:
            raise ValueError(f"{_name('params', index)}.stop_token_ids: {t} outside the vocabulary "
                             f"[0, {limits.vocab_size})")
    for t, _ in params.logit_bias:
        if t >= limits.vocab_size:
            raise ValueError(f"{_name('params', index)}.logit_bias: token id {t} outside the vocabulary "
                             f"[0, {limits.vocab_size})")
    if not isinstance(request.index, int) or isinstance(request.index, bool) or request.index < 0:
        raise ValueError(f"{_name('index', index)}: expected an int >= 0, got {request.index!r}")
    if request.parent_id is not None and not isinstance(request.parent_id, str):
        raise ValueError(f"{_name('parent_id', index)}: expected a string or None, got {request.parent_id!r}")
    if not isinstance(request.priority, int) or isinstance(request.priority, bool):
        raise ValueError(f"{_name('priority', index)}: expected an int, got {request.priority!r}")
    if request.cache_salt is not None and not isinstance(request.cache_salt, str):
        raise ValueError(f"{_name('cache_salt', index)}: expected a string or None, "
                         f"got {type(request.cache_salt).__name__}")
    if request.request_id is not None and (not isinstance(request.request_id, str) or not request.request_id):
        raise ValueError(f"{_name('request_id', index)}: expected a non-empty string, got {request.request_id!r}")
    return dataclasses.replace(request, prompt_ids=ids)


def validate_requests(requests, limits: RequestLimits) -> list:
    """Validates a batch; request ids must be distinct within it. Returns the normalized list."""
    if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Iterable):
        raise ValueError(f"requests: expected a list of NewRequest, got {type(requests).__name__}")
    requests = list(requests)
    for i, r in enumerate(requests):
        if not isinstance(r, NewRequest):
            raise ValueError(f"requests[{i}]: expected a NewRequest, got {type(r).__name__}")
    out = [validate_request(r, limits, index=i) for i, r in enumerate(requests)]
    seen = set()
    for i, r in enumerate(out):
        if r.request_id is not None:
            if r.request_id in seen:
                raise ValueError(f"request_id[{i}]: {r.request_id!r} appears twice in the batch")
            seen.add(r.request_id)
    return out


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` > 0 of a request seeded `seed`: in [0, 2**63), fixed across runs."""
    digest = hashlib.sha256(f"jaxinfer-sample:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_ids(parent_id: str, n: int) -> list:
    """The request ids of the n samples of request `parent_id`."""
    return [f"{parent_id}-{i}" for i in range(n)]


def expand_samples(request: NewRequest, parent_id: str) -> list:
    """The params.n samples of a validated request, as NewRequests of n = 1 (see above)."""
    params = request.params
    out = []
    for i, request_id in enumerate(sample_ids(parent_id, params.n)):
        seed = params.seed if i == 0 or params.seed is None else sample_seed(params.seed, i)
        out.append(dataclasses.replace(request, params=dataclasses.replace(params, n=1, seed=seed),
                                       request_id=request_id, index=i, parent_id=parent_id))
    return out
