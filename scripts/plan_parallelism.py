"""Plans a TP x EP x PP layout of a model over N chips: memory per chip, batch, and a roofline.

For an HF config (--config, --model folder or --preset) and a chip of the hardware table,
every factorization tp * ep * pp == --num_devices is checked against the engine's rules
and estimated: weight and KV bytes per device, the most sequences of --context tokens
that fit, collective bytes, decode TPOT and prefill throughput. The layout with the
lowest TPOT among those that fit is recommended (ties: higher prefill throughput). A
layout fits when B sequences of --context tokens fit in --kv_memory_fraction of the HBM
its weights leave; B = --batch, by default the largest max batch of any valid layout,
capped at 256: every layout is compared at the same batch. All times are roofline
ESTIMATES (no latencies, no overlap, peak rates), not measurements.
docs/plan_parallelism.md explains the model and shows example output. Codes: D hidden,
N heads, K kv heads (K' as run), H head dim, L layers, V vocab (V' padded), E experts, k
experts per token, B decode batch (sequences), F ffn dim.

Memory (the engine's layout; `per_device_weight_bytes` is checked against the model's
parameter shapes and logical axes in tests/scripts/test_plan_parallelism.py):
  - "vocab", "heads", "kv_heads", "mlp", "expert_mlp" are split over tp, "expert" over
    ep; "embed", "norm", "router_expert" replicated. A parameter's bytes on a device are
    its bytes / the sizes of the mesh axes its dims are split over.
  - K kv heads: tp <= K needs K % tp == 0; tp > K needs tp % K == 0 and the heads are
    replicated (vLLM): the model runs with K' = tp heads, one per device.
  - vocab V: padded to the next multiple of lcm(64, tp) when tp does not divide it.
  - pp: layer i on stage i // (L / pp); the embedding on the first stage, the final norm
    and LM head on the last (a tied embedding also has a copy there, as in vLLM). The
    figure reported is the largest stage's.
  - KV bytes per token per device = 2 * (L / pp) * (K' / tp) * H * kv itemsize; ep does
    not divide it (attention is replicated over the expert axis).
Collectives per token, bytes sent per device (ring all-reduce of b bytes over n devices
moves 2 (n - 1) / n * b):
  - Megatron TP: two all-reduces of D activations per layer (after o_proj, after the MLP).
  - MoE layer: activations stay replicated over ep; each device runs its local experts
    on the tokens routed to them and the MoE output is ONE all-reduce over the ep * tp
    group (it replaces the MLP's TP all-reduce). An all-to-all dispatch would send
    k * D * (ep - 1) / ep each way instead (see the doc).
  - LM head: an all-gather of the V' / tp float32 logit slices: (tp - 1) / tp * V' * 4.
  - pp: one send of D activations per stage boundary.
Roofline:
  - decode TPOT = sum over stages of max(bytes read / HBM bw, FLOPs / peak) + collective
    bytes / interconnect bw. The stages are added up: one token passes them in sequence
    (no microbatching). Bytes read = weights (a MoE layer only reads the experts hit:
    E * (1 - (1 - k / E) ** B) of E for B tokens with uniform top-k routing, divided over
    ep; the untied embedding table only B rows) + B * context * KV bytes per token.
    FLOPs = B * (2 * active params per token per device + 4 * context * N / tp * H * L / pp).
  - prefill tokens/s = 1 / the slowest stage's time per token, where that time is
    (2 * active params + 4 * (context / 2) * N / tp * H * L / pp) / (peak * --mfu)
    + its collective bytes / interconnect bw. That is num_devices * peak * mfu / (2 * active
    params + attention FLOPs) per token when no work is replicated and collectives are
    free; attention replicated over ep, replicated KV heads and collectives lower it.

Usage:
  python3 scripts/plan_parallelism.py --preset llama-3-70b --hardware h100 --num_devices 8
  python3 scripts/plan_parallelism.py --model /path/to/hf_folder --hardware tpu-v6e --json_out plan.json
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxinfer.config import ModelConfig  # noqa: E402
from jaxinfer.models.parallel import kv_heads_for_tp, padded_vocab_size  # noqa: E402,F401 - the engine's own rules
from jaxinfer.models.registry import model_config_from_hf  # noqa: E402

_LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, bos_token_id=128000,
               eos_token_id=128001, hidden_act="silu", max_position_embeddings=8192, mlp_bias=False,
               num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
               torch_dtype="bfloat16", vocab_size=128256)
# The config.json of each model on the Hugging Face Hub (fields the registry reads).
PRESETS = {
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_hidden_layers=32),  # meta-llama/Meta-Llama-3-8B
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_hidden_layers=80),  # meta-llama/Meta-Llama-3-70B
    "mixtral-8x7b": dict(  # mistralai/Mixtral-8x7B-v0.1
        architectures=["MixtralForCausalLM"], model_type="mixtral", bos_token_id=1, eos_token_id=2,
        hidden_act="silu", hidden_size=4096, intermediate_size=14336, max_position_embeddings=32768,
        num_attention_heads=32, num_experts_per_tok=2, num_hidden_layers=32, num_key_value_heads=8,
        num_local_experts=8, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
        torch_dtype="bfloat16", vocab_size=32000),
    "qwen3-30b-a3b": dict(  # Qwen/Qwen3-30B-A3B
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", attention_bias=False,
        bos_token_id=151643, decoder_sparse_step=1, eos_token_id=151645, head_dim=128, hidden_act="silu",
        hidden_size=2048, intermediate_size=6144, max_position_embeddings=40960, max_window_layers=48,
        mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True, num_attention_heads=32,
        num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_key_value_heads=4,
        rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
        torch_dtype="bfloat16", use_sliding_window=False, vocab_size=151936),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    """One chip's public peak figures."""

    hbm_bytes: int  # HBM capacity
    hbm_bytes_per_s: float  # HBM bandwidth
    flops_per_s: float  # dense bf16 matmul peak (also used for float32: optimistic there)
    interconnect_bytes_per_s: float  # ICI / NVLink, one direction, per chip (half the bidirectional figure)


_GIB = 1 << 30
# NOTE: the datasheets write "GB" for capacities that are binary (16 / 32 / 80 / 141 GiB
# stacks); the runtime keeps some back, which --kv_memory_fraction absorbs.
HARDWARE = {
    # Google Cloud TPU docs, "TPU v5e": 197 TFLOPs bf16, HBM2 16 GB at 819 GBps,
    # bidirectional ICI 400 GBps per chip.
    "tpu-v5e": Hardware(hbm_bytes=16 * _GIB, hbm_bytes_per_s=819e9, flops_per_s=197e12,
                        interconnect_bytes_per_s=200e9),
    # Google Cloud TPU docs, "TPU v6e" (Trillium): 918 TFLOPs bf16, HBM 32 GB at
    # 1640 GBps, bidirectional ICI 800 GBps per chip.
    "tpu-v6e": Hardware(hbm_bytes=32 * _GIB, hbm_bytes_per_s=1640e9, flops_per_s=918e12,
                        interconnect_bytes_per_s=400e9),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM: 80 GB HBM3 at 3.35 TB/s, BF16 1,979
    # TFLOPS with sparsity (989 dense), NVLink 900 GB/s (450 GB/s each way).
    "h100": Hardware(hbm_bytes=80 * _GIB, hbm_bytes_per_s=3.35e12, flops_per_s=989e12,
                     interconnect_bytes_per_s=450e9),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: 141 GB HBM3e at 4.8 TB/s, BF16 1,979
    # TFLOPS with sparsity (989 dense), NVLink 900 GB/s (450 GB/s each way).
    "h200": Hardware(hbm_bytes=141 * _GIB, hbm_bytes_per_s=4.8e12, flops_per_s=989e12,
                     interconnect_bytes_per_s=450e9),
}
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
_LOGIT_BYTES = 4  # the model returns float32 logits
_MAX_DEFAULT_BATCH = 256

_CONFIG = flags.DEFINE_string("config", None, "An HF config.json.")
_MODEL = flags.DEFINE_string("model", None, "An HF model folder (its config.json is read).")
_PRESET = flags.DEFINE_enum("preset", None, list(PRESETS), "A built-in model config.")
_HARDWARE = flags.DEFINE_enum("hardware", "tpu-v5e", list(HARDWARE), "The chip.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Chips: tp * ep * pp.", lower_bound=1)
_CONTEXT = flags.DEFINE_integer("context", 4096, "Tokens per sequence (KV cache, attention).", lower_bound=1)
_KV_MEMORY_FRACTION = flags.DEFINE_float("kv_memory_fraction", 0.9, "Share of the HBM left after the weights "
                                         "that the KV cache may use.", lower_bound=0.0, upper_bound=1.0)
_BATCH = flags.DEFINE_integer("batch", None, "Decode batch (sequences) of the TPOT estimate; default: the "
                              f"largest max batch of any layout, capped at {_MAX_DEFAULT_BATCH}.", lower_bound=1)
_MFU = flags.DEFINE_float("mfu", 0.5, "Share of the peak FLOP/s that prefill reaches.", lower_bound=0.01,
                          upper_bound=1.0)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(DTYPE_BYTES), "Weights and activations.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", None, list(DTYPE_BYTES), "KV cache (default: --dtype).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the settings and every row here as JSON.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanSettings:
    num_devices: int
    context: int  # tokens per sequence
    kv_memory_fraction: float  # of the HBM left after the weights
    batch: int | None  # decode batch; None = the largest max batch, capped at _MAX_DEFAULT_BATCH
    mfu: float  # prefill's share of the peak FLOP/s
    dtype_bytes: int  # weights and activations
    kv_dtype_bytes: int

    def __post_init__(self):
        for name in ("num_devices", "context", "dtype_bytes", "kv_dtype_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"batch: must be None or >= 1, got {self.batch}")
        if not 0 <= self.kv_memory_fraction <= 1:
            raise ValueError(f"kv_memory_fraction: must be in [0, 1], got {self.kv_memory_fraction}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu: must be in (0, 1], got {self.mfu}")


# ------------------------------------------------------------------------------ memory

def layout_error(config: ModelConfig, tp: int, ep: int, pp: int) -> str | None:
    """Why the engine cannot run this layout, or None."""
    k = config.num_kv_heads
    has_dense_mlp = any(not config.is_moe_layer(i) for i in range(config.num_layers))
    checks = [
        (config.num_heads % tp == 0, f"num_heads {config.num_heads} % tp {tp} != 0"),
        (k % tp == 0 if tp <= k else tp % k == 0,
         f"num_kv_heads {k} % tp {tp} != 0" if tp <= k else f"tp {tp} % num_kv_heads {k} != 0 (replication)"),
        (not has_dense_mlp or config.intermediate_size % tp == 0,
         f"intermediate_size {config.intermediate_size} % tp {tp} != 0"),
        (ep == 1 or config.num_experts > 0, f"ep {ep} > 1 needs a MoE model"),
        (config.num_experts == 0 or config.num_experts % ep == 0, f"num_experts {config.num_experts} % ep {ep} != 0"),
        (config.num_experts == 0 or config.moe_intermediate_size % tp == 0,
         f"moe_intermediate_size {config.moe_intermediate_size} % tp {tp} != 0"),
        (config.num_layers % pp == 0, f"num_layers {config.num_layers} % pp {pp} != 0"),
    ]
    reasons = [reason for ok, reason in checks if not ok]
    return "; ".join(reasons) or None


def _layer_elements(config: ModelConfig, layer: int, tp: int) -> tuple[int, int]:
    """(elements outside the experts, elements of one expert) of `layer` on one device."""
    d, h, n = config.hidden_size, config.head_dim, config.num_heads
    kv_cols = kv_heads_for_tp(config.num_kv_heads, tp) * h
    q = d * n * h // tp + (n * h // tp if config.qkv_bias else 0)
    kv = 2 * (d * kv_cols // tp + (kv_cols // tp if config.qkv_bias else 0))
    o = n * h * d // tp + (d if config.o_bias else 0)  # o_proj's bias is "embed": replicated
    norms = 2 * d + (2 * h if config.qk_norm else 0)
    attention = q + kv + o + norms
    if config.is_moe_layer(layer):
        expert = 3 * d * config.moe_intermediate_size // tp  # gate, up, down of one expert
        return attention + d * config.num_experts, expert  # + the replicated router [D, E]
    f = config.intermediate_size
    mlp = 3 * d * f // tp + ((2 * f // tp + d) if config.mlp_bias else 0)  # down's bias is "embed"
    return attention + mlp, 0


@dataclasses.dataclass(frozen=True)
class _Stage:
    """One pipeline stage's parameters on one of its devices, in elements."""

    embedding: int  # the embedding table (a lookup reads only the batch's rows)
    dense: int  # read in full every step: attention, dense MLPs, routers, norms, LM head
    expert: int  # one expert's slice, summed over the stage's MoE layers


def _stages(config: ModelConfig, tp: int, pp: int) -> list[_Stage]:
    per_stage = config.num_layers // pp
    table = padded_vocab_size(config.vocab_size, tp) * config.hidden_size // tp
    stages = []
    for s in range(pp):
        parts = [_layer_elements(config, i, tp) for i in range(s * per_stage, (s + 1) * per_stage)]
        dense, expert = sum(p[0] for p in parts), sum(p[1] for p in parts)
        embedding = table if s == 0 else 0
        if s == pp - 1:
            dense += config.hidden_size + table  # the final norm and the LM head
            if config.tie_word_embeddings and pp == 1:
                embedding = 0  # the LM head is the embedding table itself
        stages.append(_Stage(embedding, dense, expert))
    return stages


def _stage_weight_elements(stage: _Stage, config: ModelConfig, ep: int) -> int:
    return stage.embedding + stage.dense + stage.expert * (config.num_experts // ep if config.num_experts else 0)


def stage_weight_bytes(config: ModelConfig, tp: int, ep: int, pp: int, dtype_bytes: int) -> list[int]:
    """Parameter bytes on each device of each pipeline stage (the same on all its devices), first to last."""
    return [_stage_weight_elements(s, config, ep) * dtype_bytes for s in _stages(config, tp, pp)]


def per_device_weight_bytes(config: ModelConfig, tp: int, ep: int, pp: int, dtype_bytes: int) -> int:
    """Parameter bytes on the fullest device (the largest pipeline stage) of a valid layout."""
    return max(stage_weight_bytes(config, tp, ep, pp, dtype_bytes))


def kv_bytes_per_token_per_device(config: ModelConfig, tp: int, pp: int, kv_dtype_bytes: int) -> int:
    """KV cache bytes one token takes on a device: 2 * (L / pp) * (K' / tp) * H * itemsize."""
    heads = kv_heads_for_tp(config.num_kv_heads, tp) // tp
    return 2 * (config.num_layers // pp) * heads * config.head_dim * kv_dtype_bytes


# ------------------------------------------------------------------------- collectives

def _all_reduce(n: int, nbytes: float) -> float:
    """Bytes each device sends in a ring all-reduce of `nbytes` over n devices."""
    return 2 * (n - 1) / n * nbytes


def _layer_collective_bytes(config: ModelConfig, layer: int, tp: int, ep: int, act_bytes: int) -> float:
    row = config.hidden_size * act_bytes
    mlp_group = tp * ep if config.is_moe_layer(layer) else tp
    return _all_reduce(tp, row) + _all_reduce(mlp_group, row)


def _stage_collective_bytes(config: ModelConfig, tp: int, ep: int, pp: int, act_bytes: int) -> list[float]:
    """Per stage, bytes a device sends per token: its layers' all-reduces, then the send
    to the next stage or, on the last, the logits all-gather."""
    per_stage = config.num_layers // pp
    gather = (tp - 1) / tp * padded_vocab_size(config.vocab_size, tp) * _LOGIT_BYTES
    out = []
    for s in range(pp):
        layers = sum(_layer_collective_bytes(config, i, tp, ep, act_bytes)
                     for i in range(s * per_stage, (s + 1) * per_stage))
        out.append(layers + (gather if s == pp - 1 else config.hidden_size * act_bytes))
    return out


# ---------------------------------------------------------------------------- roofline

def expected_experts_hit(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts a layer uses for num_tokens tokens under uniform top-k routing."""
    return num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayoutEstimate:
    """One row of the plan; byte figures are per device, times are roofline estimates."""

    tp: int
    ep: int
    pp: int
    error: str | None  # why the engine cannot run it; None = valid (the figures below are then set)
    weight_bytes: int = 0  # on the fullest device
    kv_bytes_per_token: int = 0
    max_batch: int = 0  # sequences of `context` tokens that fit; 0 = not even one
    batch: int = 0  # decode batch of the TPOT estimate
    fits: bool = False  # the weights and `batch` sequences fit
    collective_bytes_per_token_per_layer: float = 0.0  # the layer that sends most
    collective_bytes_per_step: float = 0.0  # a decode step of `batch` tokens, all stages
    tpot_s: float = 0.0  # decode time per output token at `batch`
    prefill_tokens_per_s: float = 0.0
    recommended: bool = False


def max_batch(config: ModelConfig, hw: Hardware, tp: int, ep: int, pp: int, settings: PlanSettings) -> int:
    free = hw.hbm_bytes - per_device_weight_bytes(config, tp, ep, pp, settings.dtype_bytes)
    per_seq = settings.context * kv_bytes_per_token_per_device(config, tp, pp, settings.kv_dtype_bytes)
    return max(0, int(settings.kv_memory_fraction * free // per_seq))


def estimate(config: ModelConfig, hw: Hardware, tp: int, ep: int, pp: int, batch: int,
             settings: PlanSettings) -> LayoutEstimate:
    """The figures of a valid layout at a decode batch of `batch` sequences."""
    d_bytes, ctx = settings.dtype_bytes, settings.context
    kv_per_token = kv_bytes_per_token_per_device(config, tp, pp, settings.kv_dtype_bytes)
    stages = _stages(config, tp, pp)
    collectives = _stage_collective_bytes(config, tp, ep, pp, d_bytes)
    moe = config.num_experts > 0
    hit = expected_experts_hit(config.num_experts, config.num_experts_per_tok, batch) / ep if moe else 0.0
    active_experts = config.num_experts_per_tok / ep if moe else 0.0  # expert copies per token per device
    attention_flops = 4 * (config.num_heads // tp) * config.head_dim * (config.num_layers // pp)  # per key
    decode_s, prefill_s = 0.0, []
    for stage, sent in zip(stages, collectives):
        active = stage.dense + stage.expert * active_experts
        read = (stage.dense + stage.expert * hit) * d_bytes + batch * ctx * kv_per_token
        flops = batch * (2 * active + attention_flops * ctx)
        decode_s += max(read / hw.hbm_bytes_per_s, flops / hw.flops_per_s)
        prefill_flops = 2 * active + attention_flops * ctx / 2  # a causal prompt's mean context
        prefill_s.append(prefill_flops / (hw.flops_per_s * settings.mfu) + sent / hw.interconnect_bytes_per_s)
    per_token = sum(collectives)
    most = max(_layer_collective_bytes(config, i, tp, ep, d_bytes) for i in range(config.num_layers))
    limit = max_batch(config, hw, tp, ep, pp, settings)
    return LayoutEstimate(
        tp=tp, ep=ep, pp=pp, error=None, weight_bytes=per_device_weight_bytes(config, tp, ep, pp, d_bytes),
        kv_bytes_per_token=kv_per_token, max_batch=limit, batch=batch, fits=limit >= batch,
        collective_bytes_per_token_per_layer=most, collective_bytes_per_step=batch * per_token,
        tpot_s=decode_s + batch * per_token / hw.interconnect_bytes_per_s,
        prefill_tokens_per_s=1 / max(prefill_s))


def layouts(config: ModelConfig, num_devices: int) -> list[tuple[int, int, int]]:
    """Every (tp, ep, pp) with tp * ep * pp == num_devices; ep > 1 only for a MoE model."""
    out = []
    for tp in range(1, num_devices + 1):
        for ep in range(1, num_devices // tp + 1):
            if num_devices % (tp * ep) == 0 and (ep == 1 or config.num_experts):
                out.append((tp, ep, num_devices // (tp * ep)))
    return out


def plan(config: ModelConfig, hw: Hardware, settings: PlanSettings) -> list[LayoutEstimate]:
    """Every layout's row (invalid ones with their error), the recommended one marked."""
    candidates = [(t, layout_error(config, *t)) for t in layouts(config, settings.num_devices)]
    valid = [t for t, error in candidates if error is None]
    batch = settings.batch
    if batch is None:
        batch = max([min(_MAX_DEFAULT_BATCH, max_batch(config, hw, *t, settings)) for t in valid] + [1])
    rows = [LayoutEstimate(tp=t[0], ep=t[1], pp=t[2], error=error) if error
            else estimate(config, hw, *t, batch, settings) for t, error in candidates]
    fitting = [r for r in rows if r.fits]
    if fitting:
        best = min(fitting, key=lambda r: (r.tpot_s, -r.prefill_tokens_per_s))
        rows[rows.index(best)] = dataclasses.replace(best, recommended=True)
    return rows


# ------------------------------------------------------------------------------ output

def format_table(rows: list[LayoutEstimate], hw_name: str, settings: PlanSettings) -> str:
    lines = [f"{'layout':<14}{'weights/dev':>13}{'KV/tok/dev':>12}{'max batch':>11}{'coll/tok/layer':>16}"
             f"{'coll/step':>12}{'TPOT@B':>11}{'prefill tok/s':>15}"]
    for r in rows:
        if r.error is None:
            mark = ("  <- recommended" if r.recommended else "" if r.fits else
                    "  (weights + 1 sequence exceed HBM)" if r.max_batch == 0 else f"  (holds < B={r.batch})")
            lines.append(f"{f'tp{r.tp} ep{r.ep} pp{r.pp}':<14}{r.weight_bytes / _GIB:>9.2f} GiB"
                         f"{r.kv_bytes_per_token / 1024:>8.1f} KiB{r.max_batch:>11}"
                         f"{r.collective_bytes_per_token_per_layer / 1024:>12.1f} KiB"
                         f"{r.collective_bytes_per_step / 2**20:>8.1f} MiB{r.tpot_s * 1e3:>8.2f} ms"
                         f"{r.prefill_tokens_per_s:>15,.0f}{mark}")
    for r in rows:
        if r.error is not None:
            lines.append(f"{f'tp{r.tp} ep{r.ep} pp{r.pp}':<14}invalid: {r.error}")
    batch = next((r.batch for r in rows if r.error is None), 0)
    best = [r for r in rows if r.recommended]
    lines.append(f"\n{settings.num_devices} x {hw_name}, context {settings.context}, decode batch B = {batch}, "
                 f"prefill MFU {settings.mfu}. Roofline estimates, not measurements; with pp > 1 TPOT adds up "
                 f"the stages (no microbatching).")
    lines.append(f"recommended: tp={best[0].tp} ep={best[0].ep} pp={best[0].pp} (TPOT "
                 f"{best[0].tpot_s * 1e3:.2f} ms at B={batch}, prefill {best[0].prefill_tokens_per_s:,.0f} tok/s)"
                 if best else f"recommended: none: no layout holds the weights and B={batch} sequences")
    return "\n".join(lines)


def _read_config() -> tuple[str, dict]:
    sources = [s for s in (_CONFIG.value, _MODEL.value, _PRESET.value) if s]
    if len(sources) != 1:
        raise app.UsageError("give exactly one of --config, --model, --preset")
    if _PRESET.value:
        return _PRESET.value, PRESETS[_PRESET.value]
    path = _CONFIG.value or os.path.join(_MODEL.value, "config.json")
    with open(path) as f:
        return path, json.load(f)


def settings_from_flags() -> PlanSettings:
    dtype_bytes = DTYPE_BYTES[_DTYPE.value]
    return PlanSettings(num_devices=_NUM_DEVICES.value, context=_CONTEXT.value,
                        kv_memory_fraction=_KV_MEMORY_FRACTION.value, batch=_BATCH.value, mfu=_MFU.value,
                        dtype_bytes=dtype_bytes, kv_dtype_bytes=DTYPE_BYTES[_KV_DTYPE.value or _DTYPE.value])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    name, hf_config = _read_config()
    config = model_config_from_hf(hf_config)
    settings = settings_from_flags()
    hw = HARDWARE[_HARDWARE.value]
    rows = plan(config, hw, settings)
    print(f"model: {name} ({config.family}, {config.num_layers} layers, {'MoE' if config.num_experts else 'dense'}"
          f"), dtype {_DTYPE.value}, kv_dtype {_KV_DTYPE.value or _DTYPE.value}")
    print(format_table(rows, _HARDWARE.value, settings))
    if _JSON_OUT.value:
        result = {"model": name, "hardware": dict(name=_HARDWARE.value, **dataclasses.asdict(hw)),
                  "settings": dataclasses.asdict(settings), "rows": [dataclasses.asdict(r) for r in rows],
                  "note": "roofline estimates (see docs/plan_parallelism.md), not measurements"}
        with open(_JSON_OUT.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
