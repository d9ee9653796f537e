"""The pieces of scripts/simulate_cluster.py: cost models, workloads and the event simulator.

No absl flags here (the script and its test import it). Three parts:

Cost model of one *instance* (one model replica on a mesh of `devices` chips of one
hardware type, tensor parallel). A step is described by four numbers (`Step`): the
prefill tokens it runs, their attention work (query-key pairs, causal), the decode
sequences it advances one token, and the context tokens those decodes read. Two
sources give a step's seconds:

- `RooflineCost`: max(FLOPs / (peak x MFU), bytes / (bandwidth x MBU)) + a fixed
  per-step overhead. FLOPs: 2 x matmul parameters per token plus 4 x heads x head_dim
  per query-key pair per layer; bytes: the weights (read once per step, whatever the
  batch) plus the KV cache the step touches. Prefill is compute bound, small-batch
  decode bandwidth bound (the roofline of Williams et al., CACM 2009, applied to
  inference as in Pope et al., MLSys 2023).
- `LinearCost`: a least-squares fit of seconds = a + b x prefill tokens + c x attention
  pairs + d x decode sequences + e x decode context tokens to measured steps of this
  engine (`fit_linear_cost`), non-negative so that it never predicts a cheaper step for
  more work. Pure prefill points fit (a, b, c), pure decode points (a, d, e); the model
  sums the terms for a mixed (chunked-prefill) step, an assumption the validation mode
  of the script puts to the test.

Workloads (`make_workload`): Poisson arrivals; log-normal lengths with the medians of
Splitwise's two production traces (coding, conversation), or fixed lengths.

Simulator (`simulate`): a discrete-event model of a cluster in one of two designs.
*Colocated*: every instance prefills and decodes, Sarathi-Serve style (Agrawal et al.,
OSDI 2024): each step first takes every running decode (decode-maximal), then fills
the remaining token budget with prefill chunks, so a long prompt is spread over several
steps and stalls decodes less, but still slows the steps it shares. *Splitwise* (Patel
et al., ISCA 2024): prompt instances only prefill (the first token comes from them),
then the KV cache moves over the interconnect to a token instance that only decodes.
The transfer is either serial (all bytes after the prefill) or layer-wise (layer l is
sent while layer l + 1 computes; only what the last layer's compute cannot hide is
exposed). Requests go to the instance with the fewest requests in it (join the shortest
queue), both at arrival and at the prompt-to-token hand-off. An instance admits a
request when its batch has room (`max_batch`) and its KV memory (device memory minus
weights) can hold the request's whole context (prompt + output): admission reserves the
final size, so no preemption is modelled (a real engine allocates as it goes and
preempts on overflow, which this neither gains nor pays for). A prompt instance frees
a request's KV when its prompt is done (the copy is assumed not to hold it longer).
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Optional, Sequence

import numpy as np

# --------------------------------------------------------------------- hardware and models


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    memory_bytes: float  # HBM per chip
    link_bandwidth: float  # bytes/s per chip to another instance (KV transfer)
    cost_per_hour: float  # relative cost of one chip-hour (A100 = 1)


# Peaks from the vendors' data sheets (dense bf16). Link: a DGX's per-GPU InfiniBand
# NIC (H100 400 Gb/s, A100 200 Gb/s); TPUs: a nominal 25 GB/s per chip (assumed).
# Cost: relative chip-hour prices; H100 / A100 = 2.16 is the DGX-H100 / DGX-A100
# price ratio as recalled from Splitwise's hardware table (~$38 vs ~$17.6 per machine
# hour); the TPU prices are assumptions. Override with --cost_per_hour.
HARDWARE = {
    "h100": Hardware("H100", 989e12, 3.35e12, 80e9, 50e9, 2.16),
    "a100": Hardware("A100", 312e12, 2.0e12, 80e9, 25e9, 1.0),
    "v5e": Hardware("TPU v5e", 197e12, 0.82e12, 16e9, 25e9, 0.35),
    "v6e": Hardware("TPU v6e", 918e12, 1.64e12, 32e9, 25e9, 0.75),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    max_model_len: int = 8192

    @property
    def num_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * layer + embed + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters multiplied per token: all but the input embedding (a lookup), which a
        tied model shares with the LM head (a matmul)."""
        return self.num_params - (0 if self.tied_embeddings else self.vocab * self.hidden)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


MODELS = {
    "llama-70b": ModelShape("llama-70b", 128256, 8192, 28672, 80, 64, 8, 128),
    "llama-8b": ModelShape("llama-8b", 128256, 4096, 14336, 32, 32, 8, 128),
    "125m": ModelShape("125m", 32000, 768, 2048, 12, 12, 4, 64, max_model_len=4096),
    # the bundled model (jaxinfer/assets/tiny-code/config.json)
    "tiny-code": ModelShape("tiny-code", 4096, 256, 768, 6, 4, 2, 64, tied_embeddings=True, max_model_len=1024),
}

# --------------------------------------------------------------------- cost models


@dataclasses.dataclass(frozen=True)
class Step:
    """One engine step: what it computes, as the cost models see it."""

    prefill_tokens: int = 0
    prefill_attn: float = 0.0  # query-key pairs of the prefill chunks (causal)
    decode_batch: int = 0
    decode_context: int = 0  # context tokens read by the decodes (sum over sequences)


def chunk_attn(tokens: int, context_before: int) -> float:
    """Query-key pairs of a causal chunk of `tokens` after `context_before` cached ones."""
    return tokens * (context_before + (tokens + 1) / 2)


class CostModel:
    """Seconds of one step; `prefill_time` / `decode_step_time` are the pure special cases."""

    def step_time(self, step: Step) -> float:
        raise NotImplementedError

    def prefill_time(self, num_tokens: int, batch: int = 1) -> float:
        """`batch` prompts of `num_tokens` tokens each, prefilled in one step."""
        return self.step_time(Step(num_tokens * batch, batch * chunk_attn(num_tokens, 0)))

    def decode_step_time(self, batch: int, total_context_tokens: int) -> float:
        return self.step_time(Step(decode_batch=batch, decode_context=total_context_tokens))


@dataclasses.dataclass(frozen=True)
class RooflineCost(CostModel):
    model: ModelShape
    hardware: Hardware
    devices: int = 8
    dtype_bytes: int = 2
    mfu: float = 0.5  # achieved fraction of peak FLOP/s in the matmuls
    mbu: float = 0.7  # achieved fraction of peak HBM bandwidth
    overhead_s: float = 0.002  # fixed seconds per step

    def flops(self, step: Step) -> float:
        m = self.model
        tokens = step.prefill_tokens + step.decode_batch
        pairs = step.prefill_attn + step.decode_context
        return 2.0 * m.matmul_params * tokens + 4.0 * m.layers * m.heads * m.head_dim * pairs

    def bytes(self, step: Step) -> float:
        m = self.model
        kv = m.kv_bytes_per_token(self.dtype_bytes)
        # weights once; the decodes' context; prefill chunks write their KV (a chunk's
        # reads of earlier chunks' KV are small next to its compute and are left out)
        return m.num_params * self.dtype_bytes + kv * (step.decode_context + step.prefill_tokens)

    def step_time(self, step: Step) -> float:
        hw = self.hardware
        compute = self.flops(step) / (hw.peak_flops * self.devices * self.mfu)
        memory = self.bytes(step) / (hw.hbm_bandwidth * self.devices * self.mbu)
        return max(compute, memory) + self.overhead_s


FEATURES = ("intercept_s", "per_prefill_token_s", "per_attn_pair_s", "per_decode_seq_s", "per_context_token_s")


@dataclasses.dataclass(frozen=True)
class LinearCost(CostModel):
    coef: tuple  # seconds, in FEATURES order

    def step_time(self, step: Step) -> float:
        a, b, c, d, e = self.coef
        return a + b * step.prefill_tokens + c * step.prefill_attn + d * step.decode_batch + e * step.decode_context


def point_step(point: dict) -> Step:
    """A measured point of the documented JSON format (see simulate_cluster.py) as a Step."""
    kind = point.get("kind")
    if kind == "prefill":
        n, b, c = int(point["tokens"]), int(point.get("batch", 1)), int(point.get("context", 0))
        return Step(n * b, b * chunk_attn(n, c))
    if kind == "decode":
        return Step(decode_batch=int(point["batch"]), decode_context=int(point["context"]))
    if kind == "mixed":
        return Step(int(point["prefill_tokens"]), float(point["prefill_attn"]), int(point["decode_batch"]),
                    int(point["decode_context"]))
    raise ValueError(f"measurement point: kind must be 'prefill', 'decode' or 'mixed', got {kind!r}")


def fit_linear_cost(points: Sequence[dict]) -> tuple:
    """Non-negative least squares over the measured points; returns (LinearCost, r2, rms_rel_error)."""
    if len(points) < len(FEATURES):
        raise ValueError(f"fit: need at least {len(FEATURES)} measured points, got {len(points)}")
    steps = [point_step(p) for p in points]
    x = np.array([[1.0, s.prefill_tokens, s.prefill_attn, s.decode_batch, s.decode_context] for s in steps])
    y = np.array([float(p["seconds"]) for p in points])
    scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # conditioning: columns span 1 .. 1e6
    # relative errors matter (a 1 ms decode step as much as a 100 ms prefill): weight by 1/y
    w = 1.0 / np.maximum(y, 1e-9)
    try:
        from scipy.optimize import nnls
        sol, _ = nnls(x / scale * w[:, None], y * w)
    except ImportError:  # plain least squares, negative coefficients clipped
        sol = np.clip(np.linalg.lstsq(x / scale * w[:, None], y * w, rcond=None)[0], 0, None)
    coef = sol / scale
    pred = x @ coef
    r2 = 1.0 - float(np.sum((y - pred) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-30))
    rel = float(np.sqrt(np.mean(((pred - y) / y) ** 2)))
    return LinearCost(tuple(float(c) for c in coef)), r2, rel

# --------------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Request:
    rid: int
    arrival: float
    prompt_len: int
    output_len: int


# (median, log-normal sigma) of prompt and output lengths. Medians from Splitwise's
# characterisation of its two Azure traces; the spreads are chosen here (the paper
# shows wide, skewed distributions, not these parameters).
WORKLOADS = {
    "coding": {"prompt": (1500, 0.8), "output": (13, 0.9)},
    "conversation": {"prompt": (1020, 0.8), "output": (129, 0.8)},
}


def make_workload(kind: str, rate: float, num_requests: int, seed: int = 0, length_scale: float = 1.0,
                  prompt_len: int = 512, output_len: int = 64, max_model_len: int = 8192) -> list:
    """Poisson arrivals at `rate` req/s; lengths from a preset (scaled) or fixed."""
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"workload: rate must be > 0 and num_requests >= 1, got {rate}, {num_requests}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, size=num_requests))
    if kind == "fixed":
        prompts = np.full(num_requests, prompt_len)
        outputs = np.full(num_requests, output_len)
    elif kind in WORKLOADS:
        (pm, ps), (om, os_) = WORKLOADS[kind]["prompt"], WORKLOADS[kind]["output"]
        prompts = np.rint(pm * length_scale * rng.lognormal(0.0, ps, size=num_requests))
        outputs = np.rint(om * length_scale * rng.lognormal(0.0, os_, size=num_requests))
    else:
        raise ValueError(f"workload: {kind!r} is not one of {sorted(WORKLOADS) + ['fixed']}")
    prompts = np.clip(prompts, 1, max_model_len - 1).astype(int)
    outputs = np.clip(outputs, 1, None).astype(int)
    outputs = np.minimum(outputs, max_model_len - prompts)
    return [Request(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]

# --------------------------------------------------------------------- simulator


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    cost: CostModel
    kv_capacity_tokens: int
    max_batch: int = 64
    token_budget: int = 512  # tokens per step (Sarathi's budget / a prompt instance's batch)
    cost_per_hour: float = 1.0
    link_bandwidth: float = 50e9  # bytes/s out of / into the instance (all its chips)
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Design:
    name: str
    kind: str  # "colocated" or "splitwise"
    instances: tuple  # colocated: the instances; splitwise: the prompt instances
    token_instances: tuple = ()
    kv_bytes_per_token: int = 0
    num_layers: int = 1
    layerwise_transfer: bool = True

    @property
    def cost_per_hour(self) -> float:
        return sum(s.cost_per_hour for s in self.instances + self.token_instances)


class _Seq:
    __slots__ = ("req", "prefilled", "generated", "first", "last", "done")

    def __init__(self, req: Request):
        self.req, self.prefilled, self.generated = req, 0, 0
        self.first = self.last = self.done = None


class _Instance:
    """One instance's queues; role "both", "prompt" or "token"."""

    def __init__(self, spec: InstanceSpec, role: str, index: int):
        self.spec, self.role, self.index = spec, role, index
        self.waiting: list = []
        self.running: list = []
        self.reserved = 0  # KV tokens reserved by the running sequences
        self.busy = False
        self.link_free = 0.0  # when the inbound KV link is next free (token instances)
        self.incoming = 0  # KV transfers on their way here (counted in the queue)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running) + self.incoming

    def _need(self, seq: _Seq) -> int:
        r = seq.req
        return r.prompt_len + (1 if self.role == "prompt" else r.output_len)

    def form_step(self) -> Optional[tuple]:
        """Admits what fits, then the step's (Step, [(seq, prefill tokens)], [decode seqs])."""
        spec = self.spec
        while self.waiting and len(self.running) < spec.max_batch and \
                self.reserved + self._need(self.waiting[0]) <= spec.kv_capacity_tokens:
            seq = self.waiting.pop(0)
            self.reserved += self._need(seq)
            self.running.append(seq)
        decodes = [s for s in self.running if s.prefilled == s.req.prompt_len]
        budget = spec.token_budget - len(decodes)
        chunks, tokens, attn = [], 0, 0.0
        for s in self.running:
            if budget <= 0:
                break
            left = s.req.prompt_len - s.prefilled
            if left > 0:
                n = min(left, budget)
                chunks.append((s, n))
                tokens += n
                attn += chunk_attn(n, s.prefilled)
                budget -= n
        context = sum(s.req.prompt_len + s.generated for s in decodes)
        return (Step(tokens, attn, len(decodes), context), chunks, decodes) if chunks or decodes else None


def simulate(design: Design, requests: Sequence[Request], slo_ttft: Optional[Sequence[float]] = None,
             slo_tpot: Optional[Sequence[float]] = None) -> dict:
    """Runs the requests through the design; returns the latency and throughput figures.
    slo_ttft / slo_tpot: per-request limits in seconds (aligned with `requests`) for the
    SLO attainment; None = not reported."""
    if design.kind == "colocated":
        front = [_Instance(s, "both", i) for i, s in enumerate(design.instances)]
        back = []
    elif design.kind == "splitwise":
        front = [_Instance(s, "prompt", i) for i, s in enumerate(design.instances)]
        back = [_Instance(s, "token", i) for i, s in enumerate(design.token_instances)]
        if not back:
            raise ValueError(f"design {design.name}: Splitwise needs at least one token instance")
    else:
        raise ValueError(f"design: kind must be 'colocated' or 'splitwise', got {design.kind!r}")
    if not front:
        raise ValueError(f"design {design.name}: needs at least one instance")
    for inst in front + back:
        if inst.spec.kv_capacity_tokens < 2:
            raise ValueError(f"design {design.name}: an instance has no KV memory left after the weights")
    seqs = [_Seq(r) for r in requests]
    events: list = []  # (time, order, kind, payload)
    order = 0

    def push(t, kind, payload):
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    fits = max(i.spec.kv_capacity_tokens for i in (back or front))
    for s in seqs:
        if s.req.prompt_len + s.req.output_len > fits:
            raise ValueError(f"request {s.req.rid}: {s.req.prompt_len + s.req.output_len} tokens exceed every "
                             f"instance's KV capacity ({fits} tokens)")
        push(s.req.arrival, "arrive", s)

    def kick(inst, now):
        if inst.busy:
            return
        formed = inst.form_step()
        if formed is None:
            return
        step, chunks, decodes = formed
        inst.busy = True
        push(now + inst.spec.cost.step_time(step), "step", (inst, chunks, decodes, now))

    def shortest(pool):
        return min(pool, key=lambda i: (i.load, i.index))

    num_steps = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            inst = shortest(front)
            inst.waiting.append(payload)
            kick(inst, now)
        elif kind == "kv_arrive":
            seq, inst = payload
            inst.incoming -= 1
            inst.waiting.append(seq)
            kick(inst, now)
        else:
            inst, chunks, decodes, start = payload
            inst.busy = False
            num_steps += 1
            finished = []
            for s in decodes:
                s.generated += 1
                s.last = now
                if s.generated >= s.req.output_len:
                    finished.append(s)
            for s, n in chunks:
                s.prefilled += n
                if s.prefilled == s.req.prompt_len:  # the prompt's last chunk samples the first token
                    s.generated, s.first = 1, now
                    s.last = now
                    if s.req.output_len <= 1 or inst.role == "prompt":
                        finished.append(s)
            for s in finished:
                inst.running.remove(s)
                inst.reserved -= inst._need(s)
                if inst.role == "prompt" and s.req.output_len > 1:
                    _hand_off(design, s, inst, shortest(back), now, now - start, push)
                else:
                    s.done = now
            kick(inst, now)
    return _report(design, seqs, num_steps, slo_ttft, slo_tpot)


def _hand_off(design: Design, seq: _Seq, source: _Instance, target: _Instance, now: float, step_seconds: float,
              push) -> None:
    """Sends a prefilled request's KV to a token instance over its inbound link (FIFO:
    one transfer at a time per token instance; the slower end's bandwidth)."""
    bandwidth = min(target.spec.link_bandwidth, source.spec.link_bandwidth)
    seconds = seq.req.prompt_len * design.kv_bytes_per_token / bandwidth
    layers = max(design.num_layers, 1)
    if design.layerwise_transfer:  # layers 0..L-2 go out while later layers compute
        ready = now - step_seconds * (layers - 1) / layers
        start = max(ready, target.link_free)
        end = max(start + seconds, now + seconds / layers)
    else:
        start = max(now, target.link_free)
        end = start + seconds
    target.link_free = end
    target.incoming += 1
    push(end, "kv_arrive", (seq, target))


def _report(design: Design, seqs, num_steps, slo_ttft, slo_tpot) -> dict:
    ttft = np.array([s.first - s.req.arrival for s in seqs])
    e2e = np.array([s.done - s.req.arrival for s in seqs])
    tpot_all = np.array([(s.last - s.first) / max(s.req.output_len - 1, 1) for s in seqs])  # 0 for 1 token
    tpot = tpot_all[[s.req.output_len > 1 for s in seqs]]
    arrivals = np.sort([s.req.arrival for s in seqs])
    span = max(max(s.done for s in seqs) - arrivals[0], 1e-12)
    # Steady-state throughput: the middle 80% of the completions over the time they
    # took. Below capacity completions follow arrivals (the rate offered); above it the
    # backlog keeps the cluster busy throughout (its capacity). The first and last
    # tenth, when the cluster fills and drains, are left out. Under 10 requests: all.
    done = sorted(seqs, key=lambda s: s.done)
    inside = done[len(seqs) // 10:len(seqs) - len(seqs) // 10] if len(seqs) >= 10 else done
    window = inside[-1].done - inside[0].done if len(seqs) >= 10 else span
    window = window if window > 0 else span
    per_s = (len(inside) - 1 if len(seqs) >= 10 else len(seqs)) / len(inside) / window  # intervals, not points
    out = {"design": design.name, "num_requests": len(seqs), "num_steps": num_steps, "seconds": span,
           "throughput_rps": len(inside) * per_s,
           "throughput_tokens_per_s": sum(s.req.prompt_len + s.req.output_len for s in inside) * per_s,
           "output_tokens_per_s": sum(s.req.output_len for s in inside) * per_s, "makespan_rps": len(seqs) / span,
           "offered_rps": (len(seqs) - 1) / max(arrivals[-1] - arrivals[0], 1e-12) if len(seqs) > 1 else float("nan"),
           "ttft_mean_s": float(ttft.mean()), "tpot_mean_s": float(tpot.mean()) if len(tpot) else float("nan"),
           "cost_per_hour": design.cost_per_hour, "rps_per_cost": len(inside) * per_s / design.cost_per_hour}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e)):
        for q in (50, 99):
            out[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if len(values) else float("nan")
    if slo_ttft is not None and slo_tpot is not None:
        out["slo_attainment"] = float(((ttft <= np.asarray(slo_ttft)) & (tpot_all <= np.asarray(slo_tpot))).mean())
    return out


def unloaded_latency(cost: CostModel, req: Request) -> tuple:
    """(TTFT, TPOT) of a request alone on an instance: one prefill step, then decodes."""
    ttft = cost.prefill_time(req.prompt_len, 1)
    mid_context = req.prompt_len + max(req.output_len - 1, 0) // 2
    return ttft, cost.decode_step_time(1, mid_context)


def kv_capacity_tokens(model: ModelShape, hardware: Hardware, devices: int, dtype_bytes: int,
                       memory_fraction: float = 0.9) -> int:
    """KV tokens that fit in the instance's memory after the weights (0 if they do not fit)."""
    free = hardware.memory_bytes * devices * memory_fraction - model.num_params * dtype_bytes
    return max(int(free // model.kv_bytes_per_token(dtype_bytes)), 0)
