"""Frozen configuration dataclasses: the model shape and the per-request sampling knobs.

Layer 1 of the map (docs/architecture.md): no jax, no numpy, nothing mutable.
Every dataclass validates itself in ``__post_init__`` and raises ValueError naming the
field and its allowed range, so bad input is rejected on the host before any work.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Optional, Sequence, Union

from jaxinfer.config.checks import UnknownFieldError, as_token_id, np_bool_types  # noqa: F401 - re-exported
from jaxinfer.config.checks import bounded_tuple as _bounded_tuple
from jaxinfer.config.checks import is_int as _is_int
from jaxinfer.config.checks import is_number as _is_number
from jaxinfer.config.checks import python_ints as _python_ints
from jaxinfer.config.checks import require as _require
from jaxinfer.config.checks import strict_init as _strict_init

# Families the model code implements. The checkpoint registry maps HF `model_type`
# strings onto these.
FAMILIES = ("llama", "mistral", "qwen2", "gemma", "qwen3", "mixtral", "qwen3_moe")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_TYPES = ("default", "linear", "llama3")


# Upper bounds of sizes: token ids, positions and KV slots are int32 on the device, and a
# config.json claiming more layers than any model has is refused before anything is built.
MAX_MODEL_DIM = 2**31 - 1
MAX_NUM_LAYERS = 4096



@_strict_init
@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF `rope_parameters` / `rope_scaling`."""

    rope_type: str  # "linear" or "llama3"
    factor: float  # positions are stretched by this factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self):
        _require(self.rope_type in ("linear", "llama3"), "rope_scaling.rope_type",
                 f"unsupported rope type {self.rope_type!r}; supported: linear, llama3")
        _require(_is_number(self.factor) and self.factor > 0, "rope_scaling.factor",
                 f"must be a finite number > 0, got {self.factor!r}")
        if self.rope_type == "llama3":
            _require(_is_number(self.high_freq_factor) and _is_number(self.low_freq_factor)
                     and self.high_freq_factor > self.low_freq_factor > 0, "rope_scaling.high_freq_factor",
                     "llama3 needs high_freq_factor > low_freq_factor > 0")
            _require(_is_int(self.original_max_position_embeddings)
                     and 0 < self.original_max_position_embeddings <= MAX_MODEL_DIM,
                     "rope_scaling.original_max_position_embeddings", f"must be an int in [1, {MAX_MODEL_DIM}]")


@_strict_init
@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer of one of FAMILIES."""

    family: str  # one of FAMILIES
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K (GQA when < N)
    head_dim: int  # H (Gemma: not hidden_size // num_heads)
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # gated MLP activation: SwiGLU (silu) or GeGLU (gelu*)
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w): offset 1
    scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(hidden_size)
    # One entry per layer: the sliding window (keys with q_pos - k_pos < window are
    # visible) or None for full causal attention. Empty tuple = all None.
    sliding_windows: tuple = ()
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (before RoPE)
    # Sparse MoE MLP (Mixtral, Qwen3-MoE): 0 experts = every layer has the dense MLP.
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # top-k experts per token (1 <= k <= E when E > 0)
    moe_intermediate_size: int = 0  # each expert's ffn dim (Mixtral: intermediate_size)
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities to sum to 1
    dense_mlp_layers: tuple = ()  # layers with the dense MLP (intermediate_size) in a MoE model

    def __post_init__(self):
        _python_ints(self)
        _require(self.family in FAMILIES, "family", f"{self.family!r} not in {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            high = MAX_NUM_LAYERS if name == "num_layers" else MAX_MODEL_DIM
            _require(_is_int(value) and 0 < value <= high, name, f"must be an int in [1, {high}], got {value!r}")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _require(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        _require(self.hidden_act in ACTIVATIONS, "hidden_act", f"{self.hidden_act!r} not in {ACTIVATIONS}")
        _require(_is_number(self.rms_norm_eps) and self.rms_norm_eps > 0, "rms_norm_eps",
                 f"must be a finite number > 0, got {self.rms_norm_eps!r}")
        _require(_is_number(self.rope_theta) and 0 < self.rope_theta <= 1e38, "rope_theta",
                 f"must be a number in (0, 1e38] (float32 RoPE frequencies), got {self.rope_theta!r}")
        for name in ("qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings", "scale_embeddings", "qk_norm",
                     "norm_topk_prob"):
            _require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        _require(_is_number(self.norm_weight_offset), "norm_weight_offset",
                 f"must be a finite number, got {self.norm_weight_offset!r}")
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
                 f"must be None or a RopeScaling, got {self.rope_scaling!r}")
        _require(self.bos_token_id is None or (_is_int(self.bos_token_id) and 0 <= self.bos_token_id),
                 "bos_token_id", f"must be None or an int >= 0, got {self.bos_token_id!r}")
        for name in ("sliding_windows", "eos_token_ids", "dense_mlp_layers"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
            _require(isinstance(getattr(self, name), tuple), name, f"must be a tuple, got {getattr(self, name)!r}")
        for t in self.eos_token_ids:
            _require(_is_int(t) and t >= 0, "eos_token_ids", f"entries must be ints >= 0, got {t!r}")
        if self.sliding_windows:
            _require(len(self.sliding_windows) == self.num_layers, "sliding_windows",
                     f"needs one entry per layer ({self.num_layers}), got {len(self.sliding_windows)}")
            for w in self.sliding_windows:
                _require(w is None or (_is_int(w) and w > 0), "sliding_windows",
                         f"entries must be None or a positive int, got {w!r}")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            value = getattr(self, name)
            _require(_is_int(value) and 0 <= value <= MAX_MODEL_DIM, name,
                     f"must be an int in [0, {MAX_MODEL_DIM}], got {value!r}")
        if self.num_experts:
            _require(1 <= self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                     f"must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}")
            _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0 when num_experts > 0")
        for i in self.dense_mlp_layers:
            _require(_is_int(i) and 0 <= i < self.num_layers, "dense_mlp_layers",
                     f"entries must be layer indices in [0, {self.num_layers}), got {i!r}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer` has the sparse MoE MLP (else the dense gated MLP)."""
        return self.num_experts > 0 and layer not in self.dense_mlp_layers

    def sliding_window(self, layer: int) -> Optional[int]:
        return self.sliding_windows[layer] if self.sliding_windows else None

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


MAX_TOP_LOGPROBS = 20  # most alternatives `logprobs=N` may ask for (OpenAI's top_logprobs limit)
MAX_LOGIT_BIAS = 300  # most `logit_bias` entries per request (OpenAI's limit)
MAX_N = 128  # most samples `n` per prompt (OpenAI's limit)
# Sampling floats stay where float32 logits divided by them stay finite: a temperature
# below GREEDY_TEMPERATURE samples greedily (vLLM's convention: logits / 1e-40 would
# overflow to inf and softmax to NaN), one above MAX_TEMPERATURE is indistinguishable
# from uniform; a repetition penalty p divides or multiplies logits by p.
GREEDY_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 1e6
MAX_REPETITION_PENALTY = 1e6
MAX_STOP_STRINGS = 1024  # most stop strings per request (each is searched in every step's text)
MAX_STOP_TOKEN_IDS = 1 << 16  # most stop token ids per request


@_strict_init
@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request decoding parameters (the names follow vLLM's SamplingParams)."""

    max_tokens: int = 16  # generated tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    top_p: float = 1.0  # nucleus: smallest set with probability >= top_p; in (0, 1]
    min_p: float = 0.0  # drop tokens with p < min_p * p_max; in [0, 1]
    seed: Optional[int] = None  # None = a fresh seed per request
    stop: Union[str, Sequence[str], None] = ()  # stop strings (not included in text)
    stop_token_ids: Sequence[int] = ()  # stop when one of these is generated
    ignore_eos: bool = False  # keep going past the EOS token
    # log p of each generated token: False / None = off; True or 0 = the sampled token's;
    # N in [1, MAX_TOP_LOGPROBS] = also the N most likely tokens at each step (vLLM's
    # `logprobs`, OpenAI's `top_logprobs`)
    logprobs: Union[bool, int, None] = False
    prompt_logprobs: bool = False  # return log p of each prompt token after the first
    # Logit processing, applied on device before temperature and the filters, in this
    # order (vLLM's): repetition, frequency and presence penalties, then logit_bias and
    # the min_tokens bans. Returned log-probs stay those of the raw model distribution.
    # OpenAI: logits[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0),
    # counting GENERATED tokens only; each in [-2, 2].
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # CTRL / HF / vLLM: each token present in the prompt OR the output gets logit / p
    # when its logit is > 0, logit * p otherwise; > 0 (1 = off).
    repetition_penalty: float = 1.0
    # token id -> bias in [-100, 100] added to its logit; at most MAX_LOGIT_BIAS entries;
    # keys may be ints or strings of ints (OpenAI JSON). Stored as a tuple of
    # (int id, float bias) pairs sorted by id (hashable); a mapping or such pairs accepted.
    logit_bias: Union[Mapping, Sequence, None] = None
    # while fewer tokens than this were generated, EOS (unless ignore_eos) and
    # stop_token_ids cannot be sampled and stop strings are not checked; <= max_tokens
    min_tokens: int = 0
    # independent samples of the prompt, in [1, MAX_N]; the engine runs them as n
    # requests sharing the prompt's cached pages (engine/engine.py)
    n: int = 1
    # Recursive models with depth-wise batching (engine/depthwise.py): the token is sampled
    # after the first exit loop where the max probability of the exit's distribution is
    # >= this, in [0, 1]; None = the engine's default (EngineConfig.early_exit_threshold)
    early_exit_threshold: Optional[float] = None

    def __post_init__(self):
        _check_exit_threshold(self.early_exit_threshold)
        if self.early_exit_threshold is not None:
            object.__setattr__(self, "early_exit_threshold", float(self.early_exit_threshold))
        for name, kind in (("max_tokens", int), ("top_k", int), ("seed", int), ("temperature", float),
                           ("top_p", float), ("min_p", float), ("presence_penalty", float),
                           ("frequency_penalty", float), ("repetition_penalty", float), ("min_tokens", int),
                           ("n", int)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool) and (
                    _is_int(value) if kind is int else _is_number(value)):
                object.__setattr__(self, name, kind(value))  # numpy scalars -> python numbers
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
                 f"must be an int >= 1, got {self.max_tokens!r}")
        _require(_is_number(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
                 f"must be a number in [0, {MAX_TEMPERATURE:g}] (below {GREEDY_TEMPERATURE:g} samples greedily), "
                 f"got {self.temperature!r}")
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k",
                 f"must be an int >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _require(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
                 "seed", f"must be None or an int in [0, 2**63), got {self.seed!r}")
        for name in ("ignore_eos", "prompt_logprobs"):
            _require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        _require(self.logprobs is None or isinstance(self.logprobs, bool)
                 or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS), "logprobs",
                 f"must be a bool, None or an int in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_number(value) and -2 <= value <= 2, name, f"must be a number in [-2, 2], got {value!r}")
        _require(_is_number(self.repetition_penalty)
                 and 1 / MAX_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
                 "repetition_penalty", f"must be a number in [{1 / MAX_REPETITION_PENALTY:g}, "
                 f"{MAX_REPETITION_PENALTY:g}] (1 = off), got {self.repetition_penalty!r}")
        _require(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        _require(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be an int in [1, {MAX_N}], got {self.n!r}")
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (bytes, Mapping)) or not isinstance(stop, Iterable):
            raise ValueError(f"stop: must be a string or a list of strings, got {stop!r} ({type(stop).__name__})")
        stop = _bounded_tuple(stop, MAX_STOP_STRINGS, "stop", "stop strings")
        for s in stop:
            _require(isinstance(s, str) and s != "", "stop", f"entries must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", stop)
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        elif isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
            raise ValueError(f"stop_token_ids: must be a list of ints, got {ids!r} ({type(ids).__name__})")
        ids = _bounded_tuple(ids, MAX_STOP_TOKEN_IDS, "stop_token_ids", "ids")
        ids = tuple(dict.fromkeys(as_token_id(t, "stop_token_ids") for t in ids))  # distinct, in order
        for t in ids:
            _require(0 <= t <= MAX_MODEL_DIM, "stop_token_ids", f"entries must be token ids >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether a repetition, presence or frequency penalty is on."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def want_logprobs(self) -> bool:
        """Whether the sampled tokens' log p are returned."""
        return self.logprobs is not None and self.logprobs is not False

    @property
    def num_top_logprobs(self) -> int:
        """How many most likely alternatives are returned per generated token."""
        return self.logprobs if _is_int(self.logprobs) else 0


def _check_exit_threshold(value) -> None:
    """early_exit_threshold (SamplingParams and EngineConfig): None or a number in [0, 1]."""
    _require(value is None or (not isinstance(value, bool) and _is_number(value) and 0 <= value <= 1),
             "early_exit_threshold", f"must be None or a number in [0, 1], got {value!r}")


def _bias_key(key) -> int:
    """A logit_bias key: an int (numpy integers too) or a string of one, as OpenAI JSON sends it."""
    if isinstance(key, str):
        try:
            return int(key.strip())
        except ValueError:
            raise ValueError(f"logit_bias: keys must be token ids (ints or strings of ints), got {key!r}") from None
    return as_token_id(key, "logit_bias")


def _normalize_logit_bias(bias) -> tuple:
    """logit_bias as ((id, bias), ...) sorted by id; () when None or empty."""
    if bias is None:
        return ()
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, (str, bytes)) or not isinstance(bias, Iterable):
        raise ValueError(f"logit_bias: must be a mapping of token id -> bias, got {bias!r} ({type(bias).__name__})")
    else:
        items = list(_bounded_tuple(bias, MAX_LOGIT_BIAS, "logit_bias", "entries"))
        for item in items:
            _require(isinstance(item, tuple) and len(item) == 2, "logit_bias",
                     f"must be a mapping of token id -> bias or (id, bias) pairs, got the entry {item!r}")
    _require(len(items) <= MAX_LOGIT_BIAS, "logit_bias",
             f"at most {MAX_LOGIT_BIAS} entries, got {len(items)}")
    out = {}
    for key, value in items:
        token = _bias_key(key)
        _require(token >= 0, "logit_bias", f"token ids must be >= 0, got {key!r}")
        _require(token not in out, "logit_bias", f"token id {token} appears twice")
        _require(_is_number(value) and -100 <= value <= 100, "logit_bias",
                 f"bias of token {token} must be a number in [-100, 100], got {value!r}")
        out[token] = float(value)
    return tuple(sorted(out.items()))


# Implementations of the attention ops (jaxinfer.pallas.ragged_paged_attention.IMPLS;
# this layer does not import jax): XLA reference, the backend's Pallas kernel, the GPU
# kernel interpreted on CPU, the TPU kernel interpreted on CPU.
ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret", "pallas_tpu_interpret")
# KV cache storage formats (jaxinfer.pallas.ragged_paged_attention.quantized.KV_CACHE_DTYPES).
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
PREEMPTION_MODES = ("recompute", "swap", "auto")  # EngineConfig.preemption_mode
SPECULATIVE_METHODS = ("ngram", "draft", "early_exit")  # SpeculativeConfig.method


@_strict_init
@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeculativeConfig:
    """Speculative decoding (engine/speculative.py): drafts of up to num_speculative_tokens
    ids per decode, verified in one step: "ngram" (prompt lookup of the last ngram_max ..
    ngram_min ids), "draft" (a smaller model of the same tokenizer, draft_model) or
    "early_exit" (self-speculation: a recursive model's first draft_loops loops draft)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4  # k, in [1, 16]
    draft_model: Optional[str] = None  # a model folder or bundled name ("draft" only)
    ngram_max: int = 4
    ngram_min: int = 1
    draft_loops: int = 1  # "early_exit": loops of the recursive model the draft runs (< its loops)

    def __post_init__(self):
        _python_ints(self)
        _require(self.method in SPECULATIVE_METHODS, "speculative.method", f"{self.method!r} not in {SPECULATIVE_METHODS}")
        for name, low, high in (("num_speculative_tokens", 1, 16), ("ngram_min", 1, 64), ("ngram_max", 1, 64),
                                ("draft_loops", 1, 64)):
            value = getattr(self, name)
            _require(_is_int(value) and low <= value <= high, f"speculative.{name}",
                     f"must be an int in [{low}, {high}], got {value!r}")
        _require(self.ngram_min <= self.ngram_max, "speculative.ngram_min", "must be <= ngram_max")
        _require((self.draft_model is not None) == (self.method == "draft"), "speculative.draft_model",
                 f"a model folder for method 'draft', and only there; got {self.draft_model!r}")


@_strict_init
@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Serving-engine knobs: KV pages, the per-step token budget, batch limits."""

    page_size: int = 16  # tokens per KV page
    num_pages: Optional[int] = None  # pages in the pool; None = sized from max_kv_cache_bytes
    max_kv_cache_bytes: int = 1 << 30  # budget for the automatic num_pages
    max_num_batched_tokens: int = 512  # Sarathi token budget per step (decodes + prefill chunks)
    max_num_seqs: int = 64  # running sequences at most
    max_model_len: Optional[int] = None  # prompt + output cap; None = the model's context
    attention_impl: Optional[str] = None  # one of ATTENTION_IMPLS; None = backend default
    enable_prefix_caching: bool = True  # share computed full pages across requests
    # Hydragen: attention over prefix pages shared by running sequences is computed once
    # for all their queries, then merged with each one's suffix attention
    shared_prefix_attention: bool = True
    shared_prefix_min_tokens: int = 64  # cost rule: smallest shared node, in tokens
    shared_prefix_min_seqs: int = 2  # cost rule: fewest sequences sharing a node
    # Persistent XLA compilation cache (runtime/compile_cache.py): None = $JAXINFER_COMPILATION_CACHE_DIR
    # if set, else ~/.cache/jaxinfer/xla; "" = off (jax's own settings are left alone).
    compilation_cache_dir: Optional[str] = None
    # Device mesh (sharding/mesh.py): the first tp * ep * pp devices. Tensor: Megatron split of heads,
    # MLP width and vocab; expert: MoE experts over devices; pipeline: layers in stages.
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Pipeline only: most microbatches per step (docs/pipeline.md); None = pipeline_parallel_size
    pipeline_microbatches: Optional[int] = None
    # KV pages as "auto" (activation dtype), "int8" or "fp8" (e4m3) with a float32 scale per token
    # and kv head, dequantized in attention (pallas/ragged_paged_attention/quantized.py)
    kv_cache_dtype: str = "auto"
    # A preempted request's KV pages (engine/swap.py): "recompute", "swap" (to a host pool of
    # swap_space_bytes; recompute when full) or "auto" (the cheaper by measured speeds)
    preemption_mode: str = "recompute"
    swap_space_bytes: int = 1 << 30  # host memory for swapped pages
    speculative: Optional[SpeculativeConfig] = None  # speculative decoding; None = off
    # Splitwise prefill/decode disaggregation (engine/splitwise.py), "splitwise" or None (colocated):
    # prompts run on the first num_prefill_devices devices (tensor parallel over all of them;
    # None = prefill_tensor_parallel_size), decodes on the next decode_tensor_parallel_size.
    disaggregation: Optional[str] = None
    num_prefill_devices: Optional[int] = None
    prefill_tensor_parallel_size: int = 1
    decode_tensor_parallel_size: int = 1
    # Recursive models (engine/depthwise.py): one call of the shared block per step over tokens
    # at mixed loop depths. None = on for a recursive folder when its features allow it, True =
    # on (an error names what prevents it), False = each token's loops back to back (unrolled)
    depthwise_batching: Optional[bool] = None
    # Default SamplingParams.early_exit_threshold of requests that leave it None (None = no exit)
    early_exit_threshold: Optional[float] = None
    # K/V of the loops an early-exited token skips: "compute" (the token goes on through them,
    # exact) or "copy" (its exit hidden state is projected into each skipped layer's K/V in the
    # exit step, CALM's state propagation: cheaper, approximate)
    early_exit_kv_fill: str = "compute"

    def __post_init__(self):
        _python_ints(self)
        _require(self.early_exit_kv_fill in ("compute", "copy"), "early_exit_kv_fill",
                 f"must be 'compute' or 'copy', got {self.early_exit_kv_fill!r}")
        _require(self.depthwise_batching in (None, True, False), "depthwise_batching",
                 f"must be None, True or False, got {self.depthwise_batching!r}")
        _check_exit_threshold(self.early_exit_threshold)
        _require(self.speculative is None or isinstance(self.speculative, SpeculativeConfig), "speculative",
                 f"must be None or a SpeculativeConfig, got {type(self.speculative).__name__}")
        _require(self.disaggregation in (None, "splitwise"), "disaggregation",
                 f"must be None or 'splitwise', got {self.disaggregation!r}")
        _require(self.num_prefill_devices in (None, self.prefill_tensor_parallel_size), "num_prefill_devices",
                 f"must equal prefill_tensor_parallel_size ({self.prefill_tensor_parallel_size}: the prefill mesh is "
                 f"tensor parallel over all its devices), got {self.num_prefill_devices!r}")
        _require(self.disaggregation is None or self.tensor_parallel_size * self.expert_parallel_size
                 * self.pipeline_parallel_size == 1, "tensor_parallel_size",
                 "with disaggregation, set prefill_tensor_parallel_size / decode_tensor_parallel_size instead")
        _require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode",
                 f"{self.preemption_mode!r} not in {PREEMPTION_MODES}")
        _require(_is_int(self.swap_space_bytes) and self.swap_space_bytes >= 0, "swap_space_bytes",
                 f"must be an int >= 0, got {self.swap_space_bytes!r}")
        _require(self.compilation_cache_dir is None or isinstance(self.compilation_cache_dir, str),
                 "compilation_cache_dir", f"must be None or a str, got {self.compilation_cache_dir!r}")
        for name in ("enable_prefix_caching", "shared_prefix_attention"):
            _require(isinstance(getattr(self, name), bool), name, f"must be a bool, got {getattr(self, name)!r}")
        _require(_is_int(self.shared_prefix_min_seqs) and 2 <= self.shared_prefix_min_seqs <= MAX_MODEL_DIM,
                 "shared_prefix_min_seqs", f"must be an int >= 2, got {self.shared_prefix_min_seqs!r}")
        for name in ("page_size", "max_num_batched_tokens", "max_num_seqs", "max_kv_cache_bytes",
                     "shared_prefix_min_tokens", "tensor_parallel_size", "expert_parallel_size",
                     "pipeline_parallel_size", "prefill_tensor_parallel_size", "decode_tensor_parallel_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, f"must be an int >= 1, got {value!r}")
            _require(name == "max_kv_cache_bytes" or value <= MAX_MODEL_DIM, name,
                     f"must be <= {MAX_MODEL_DIM}, got {value!r}")
        _require(self.pipeline_microbatches is None or (_is_int(self.pipeline_microbatches)
                                                        and self.pipeline_microbatches >= 1),
                 "pipeline_microbatches", f"must be None or an int >= 1, got {self.pipeline_microbatches!r}")
        _require(isinstance(self.kv_cache_dtype, str) and self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype",
                 f"{self.kv_cache_dtype!r} not in {KV_CACHE_DTYPES}")
        _require(self.num_pages is None or (_is_int(self.num_pages) and self.num_pages >= 1),
                 "num_pages", f"must be None or an int >= 1, got {self.num_pages!r}")
        # KV slots (page * page_size + offset; padding slot num_pages * page_size) are int32 on the device.
        _require(self.num_pages is None or self.num_pages * self.page_size <= MAX_MODEL_DIM, "num_pages",
                 f"num_pages * page_size must be <= {MAX_MODEL_DIM} (int32 KV slots), got "
                 f"{self.num_pages} * {self.page_size}")
        _require(self.max_model_len is None or (_is_int(self.max_model_len) and 1 <= self.max_model_len
                                                <= MAX_MODEL_DIM),
                 "max_model_len", f"must be None or an int in [1, {MAX_MODEL_DIM}], got {self.max_model_len!r}")
        _require(self.attention_impl is None or self.attention_impl in ATTENTION_IMPLS, "attention_impl",
                 f"{self.attention_impl!r} not in {ATTENTION_IMPLS}")
