"""The model of a decode step: from per-part costs (a measured profile or a hardware preset) to
the ping-pong timeline of one scheduling step for any topology, and from there step time, TPOT,
tokens/s, bubbles, exposed communication, KV-cache feasibility and the prefill pool's TTFT.

The timeline is exact arithmetic on a list of operations, each on one resource (the attention
worker, the expert worker, the dispatch and combine links, or one GPU that does both), in the
order the workers issue them (attention_nodes/worker.py `ping_pong`, expert_nodes/worker.py
`serve_plan`): an operation starts when its resource is free and its inputs have arrived.
docs/planner.md derives every formula used here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

KINDS = ("afd", "colocated", "ep")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a MoE model's cost: from a ModelConfig or a public config."""

    name: str
    hidden: int
    layers: int
    moe_layers: int
    vocab: int
    experts: int
    top_k: int
    moe_intermediate: int
    shared_intermediate: int  # total width of the shared experts, 0 = none
    dense_intermediate: int
    attention: str  # gqa | mla | mfa
    q_heads: int
    kv_heads: int
    head_dim: int  # GQA/MFA: query, key and value head size; MLA: value head size
    q_lora_rank: int = 0  # MLA q_lora_rank, MFA low-rank query width (share_q_dim)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0

    @classmethod
    def from_config(cls, cfg, name: str = "") -> ModelShape:
        """From an afd.config.ModelConfig."""
        hf = cfg.hf
        if cfg.is_mla:
            shared = cfg.moe_intermediate_size * (getattr(hf, "n_shared_experts", 0) or 0)
        else:
            shared = getattr(hf, "shared_expert_intermediate_size", 0) or 0
        return cls(
            name=name or cfg.model_type,
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            moe_layers=len(cfg.moe_layers),
            vocab=cfg.vocab_size,
            experts=cfg.n_routed_experts,
            top_k=cfg.num_experts_per_tok,
            moe_intermediate=cfg.moe_intermediate_size,
            shared_intermediate=shared,
            dense_intermediate=getattr(hf, "intermediate_size", 0) or 0,
            attention="mla" if cfg.is_mla else "gqa",
            q_heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.v_head_dim if cfg.is_mla else cfg.head_dim,
            q_lora_rank=(cfg.q_lora_rank or 0) if cfg.is_mla else 0,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
        )

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def kv_elems_per_token(self) -> int:
        """Cached elements per token per layer (MLA: latent + roped key; GQA: K and V)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        if self.attention == "mfa":
            return 2 * self.head_dim  # one shared key head and one value head
        return 2 * self.kv_heads * self.head_dim

    def attention_params(self) -> int:
        """Projection parameters of one attention layer."""
        h, hq, d = self.hidden, self.q_heads, self.head_dim
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            r = self.q_lora_rank
            q = h * r + r * hq * qk if r else h * hq * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv += self.kv_lora_rank * hq * (self.qk_nope_head_dim + d)
            return q + kv + hq * d * h
        if self.attention == "mfa":
            return h * self.q_lora_rank + self.q_lora_rank * hq * d + 2 * h * d + hq * d * h
        return h * hq * d + 2 * h * self.kv_heads * d + hq * d * h

    def attention_flops_per_context_token(self) -> int:
        """FLOPs of one query token against one cached token (QK and PV; MLA absorbed)."""
        if self.attention == "mla":
            return 2 * self.q_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim)
        return 4 * self.q_heads * self.head_dim

    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    def attention_side_params(self, moe: bool) -> int:
        """Parameters one layer keeps on the attention side: projections, router and shared
        experts (MoE layer) or the dense MLP."""
        p = self.attention_params()
        if moe:
            return p + self.hidden * self.experts + 3 * self.hidden * self.shared_intermediate
        return p + 3 * self.hidden * self.dense_intermediate


class Costs(Protocol):
    """Per-operation times of one machine for one model (profiler.MeasuredCosts from `afd
    profile`, hardware.RooflineCosts from a preset, both in this package). Times in seconds."""

    shape: ModelShape
    device: str  # "cpu": workers share `cores` and copy transfers on their own thread; "cuda"
    cores: int  # CPU cores the workers share (ignored on GPUs: one GPU per worker)
    interference: tuple[float, float]  # slowdown of (attention, expert) work while both run
    act_bytes: int  # bytes per activation element on the wire
    weight_bytes: float  # bytes per parameter
    kv_bytes: float  # bytes per cached element
    memory_per_worker: float  # bytes a worker may use (GPU), or the whole machine's (CPU)

    def attention_layer(self, moe: bool, batch: int, context: float) -> float:
        """Attention side of one layer for `batch` decode tokens: attention part, then the
        router and shared experts (MoE layer) or the dense MLP."""
        ...

    def expert_layer(self, pairs: float, active: float, held: int) -> float:
        """One MoE layer on an expert worker: `pairs` token-expert rows over `active` of the
        `held` experts."""
        ...

    def sample(self, batch: int) -> float:
        """Final norm, lm_head and sampling of one micro-batch."""
        ...

    def prep(self, batch: int, context: float) -> float:
        """Building one micro-batch's inputs (metadata, embedding) on the attention worker."""
        ...

    def transfer(self, nbytes: float, direction: str) -> tuple[float, float, float]:
        """(sender compute, link time, receiver compute) of one dispatch or combine of nbytes."""
        ...

    def host(self, batch: int, disaggregated: bool, context: float) -> float:
        """Scheduler-side time of one scheduling step for `batch` running sequences."""
        ...

    def colocated_step(self, batch: int, context: float) -> float | None:
        """A measured decode step of the single-process engine, or None (built from layers)."""
        ...

    def prefill(self, tokens: int) -> float:
        """One prefill forward of `tokens` prompt tokens on one worker."""
        ...


@dataclass
class StepConfig:
    """One candidate: topology, micro-batches m, scheduler steps K, batch and context.

    kind: `afd` (A attention + F expert workers), `colocated` (the single-process engine) or
    `ep` (colocated on `attention_workers` GPUs with expert parallelism: each GPU runs attention
    for its own batch and holds experts / N, DeepSeek's deployment)."""

    kind: str = "afd"
    attention_workers: int = 1
    expert_workers: int = 1
    micro_batches: int = 1
    scheduler_steps: int = 1
    batch: int = 32  # sequences per attention worker (colocated: in the engine; ep: per GPU)
    context: float = 256.0  # mean KV length of a sequence during the step
    prefill_workers: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.kind == "colocated":
            self.attention_workers, self.expert_workers = 1, 0
        if self.kind == "ep":
            self.expert_workers = self.attention_workers
        for name in ("attention_workers", "micro_batches", "scheduler_steps", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.kind == "afd" and (
            not isinstance(self.expert_workers, int) or self.expert_workers < 1
        ):
            raise ValueError("an afd topology needs at least 1 expert worker")
        if not isinstance(self.prefill_workers, int) or self.prefill_workers < 0:
            raise ValueError("prefill_workers must be an integer >= 0")
        if not (isinstance(self.context, int | float) and math.isfinite(self.context)):
            raise ValueError(f"context must be a finite number, got {self.context!r}")
        if self.context < 1:
            raise ValueError("context must be at least 1")
        if self.micro_batches > self.batch:
            raise ValueError("micro_batches cannot exceed the batch")

    @property
    def workers(self) -> int:
        """Devices (GPUs, or worker processes on a CPU) the decode side occupies."""
        if self.kind == "afd":
            return self.attention_workers + self.expert_workers
        return self.attention_workers

    @property
    def total_batch(self) -> int:
        return self.batch * self.attention_workers

    def label(self) -> str:
        if self.kind == "colocated":
            return "colocated"
        if self.kind == "ep":
            return f"EP{self.attention_workers}"
        return f"{self.attention_workers}A{self.expert_workers}F"


@dataclass
class StepPrediction:
    """Predicted figures of one configuration (times per decode step unless named otherwise)."""

    config: StepConfig
    step_time_s: float
    scheduling_step_s: float  # K decode steps and the host time around them
    decode_tokens_per_s: float
    tpot_ms: float
    stages_s: dict[str, float]  # busy time per decode step of one worker of each kind
    bubble_fraction: dict[str, float]
    exposed_comm_s: float  # how much shorter the step would be with free transfers
    bottleneck: str
    kv_bytes_per_worker: float
    memory_needed: dict[str, float]
    memory_ok: bool
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.decode_tokens_per_s / self.config.workers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s_per_worker"] = self.tokens_per_s_per_worker
        d["topology"] = self.config.label()
        return d


def split_sizes(batch: int, m: int) -> list[int]:
    """Micro-batch sizes as scheduler/cluster.split_micro_batches makes them for decode."""
    base, extra = divmod(batch, m)
    return [base + (1 if i < extra else 0) for i in range(m)]


def dispatch_row_bytes(hidden: int, act_bytes: int, top_k: int) -> int:
    """Bytes one routed row takes from attention to experts: activations, then its int32
    expert ids and float32 weights."""
    return hidden * act_bytes + top_k * 8


def expert_fraction(experts: int, top_k: int, held: int) -> float:
    """Chance that a token routes at least one of its top_k experts (uniform) to a worker
    holding `held` of `experts`: 1 - C(E - h, k) / C(E, k)."""
    if held >= experts:
        return 1.0
    if experts - held < top_k:
        return 1.0
    return 1.0 - math.comb(experts - held, top_k) / math.comb(experts, top_k)


def active_experts(held: int, experts: int, top_k: int, tokens: float) -> float:
    """Expected experts of a shard that receive at least one of `tokens` tokens."""
    if tokens <= 0:
        return 0.0
    return held * (1.0 - (1.0 - top_k / experts) ** tokens)


# ---- the timeline ---------------------------------------------------------------------------


@dataclass
class _Op:
    resource: str
    duration: float
    deps: list[int]
    side: str  # attention | expert | comm: whose busy time it counts as


def _run(ops: list[_Op]) -> tuple[list[float], list[float]]:
    """Start and end of every op; ops come in an order consistent with each resource's order and
    with their dependencies, so one pass is exact."""
    free: dict[str, float] = {}
    starts, ends = [], []
    for op in ops:
        t = max([free.get(op.resource, 0.0), *(ends[d] for d in op.deps)])
        starts.append(t)
        ends.append(t + op.duration)
        free[op.resource] = t + op.duration
    return starts, ends


Spans = list[tuple[float, float]]


def _overlap(intervals: Spans, others: Spans) -> list[float]:
    """Fraction of each interval that overlaps the union of `others` (both sorted by start,
    `others` disjoint: one resource's ops)."""
    out, j = [], 0
    for s, e in intervals:
        while j < len(others) and others[j][1] <= s:
            j += 1
        covered, k = 0.0, j
        while k < len(others) and others[k][0] < e:
            covered += min(e, others[k][1]) - max(s, others[k][0])
            k += 1
        out.append(covered / (e - s) if e > s else 0.0)
    return out


def _build_ops(costs: Costs, cfg: StepConfig, zero_comm: bool = False) -> list[_Op]:
    """The operations of one scheduling step (K decode steps) on one attention worker and one
    expert worker; workers of a kind are symmetric (equal batches, uniform routing)."""
    shape = costs.shape
    m, k_steps = cfg.micro_batches, cfg.scheduler_steps
    sizes = split_sizes(cfg.batch, m)
    a_workers = cfg.attention_workers
    f_workers = cfg.expert_workers
    ep = cfg.kind == "ep"
    res_a, res_f = ("gpu", "gpu") if ep else ("attention", "expert")
    held = shape.experts / f_workers
    frac = expert_fraction(shape.experts, shape.top_k, max(1, round(held)))
    row_bytes = dispatch_row_bytes(shape.hidden, costs.act_bytes, shape.top_k)
    oversub = 1.0
    if costs.device == "cpu":
        oversub = max(1.0, (a_workers + (0 if ep else f_workers)) / max(1, costs.cores))

    per_mb = []
    for b in sizes:
        # one expert worker's share of this micro-batch from every attention worker
        rows_in = a_workers * b * frac
        pairs = a_workers * b * shape.top_k / f_workers
        active = active_experts(round(held), shape.experts, shape.top_k, a_workers * b)
        d_bytes = b * frac * f_workers * row_bytes
        f_recv = rows_in * row_bytes
        c_bytes = b * frac * f_workers * shape.hidden * costs.act_bytes
        f_send = rows_in * shape.hidden * costs.act_bytes
        ds, dl, dr = costs.transfer(max(d_bytes, f_recv), "dispatch")
        cs, cl, cr = costs.transfer(max(c_bytes, f_send), "combine")
        if zero_comm:
            ds = dl = dr = cs = cl = cr = 0.0
        per_mb.append(
            dict(
                b=b,
                attn={
                    moe: costs.attention_layer(moe, b, cfg.context) * oversub
                    for moe in (True, False)
                },
                expert=costs.expert_layer(pairs, active, round(held)) * oversub,
                d=(ds, dl, dr),
                c=(cs, cl, cr),
                sample=costs.sample(b) * oversub,
                prep=costs.prep(b, cfg.context) * oversub,
            )
        )
    moe_flags = layer_kinds(shape)
    ops: list[_Op] = []
    # every micro-batch's inputs are built before the first layer (AttentionWorker.step)
    ops.append(_Op(res_a, sum(p["prep"] for p in per_mb), [], "attention"))
    ready = [0] * m  # the op whose end lets micro-batch i run its next attention op
    recv = [0.0] * m  # attention-side cost of taking in micro-batch i's last combine
    for step in range(k_steps):
        for layer, moe in enumerate(moe_flags):
            a_ids = []
            for i, p in enumerate(per_mb):
                dur = p["attn"][moe] + recv[i]
                if layer == 0 and step > 0:
                    dur += p["sample"] + p["prep"]  # the previous step's tokens feed this one
                if moe:
                    dur += p["d"][0]  # the sender copies its rows out
                ops.append(_Op(res_a, dur, [ready[i]], "attention"))
                ready[i] = len(ops) - 1
                a_ids.append(ready[i])
                recv[i] = p["c"][2] if moe else 0.0
                if moe and not ep:
                    ready[i] = _expert_round_trip(ops, p, ready[i], res_f)
            if moe and ep:
                # one GPU: every micro-batch's attention, then every micro-batch's experts
                # (DeepSeek's two-micro-batch overlap: transfers run under the other's compute)
                for i, p in enumerate(per_mb):
                    ready[i] = _expert_round_trip(ops, p, a_ids[i], res_f)
    for i, p in enumerate(per_mb):
        ops.append(_Op(res_a, p["sample"] + recv[i], [ready[i]], "attention"))
    return ops


def _expert_round_trip(ops: list[_Op], p: dict, after: int, res_f: str) -> int:
    """Dispatch link, expert compute (with its side of both transfers), combine link, after
    attention op `after`; returns the op whose end hands the result back."""
    ops.append(_Op("dispatch", p["d"][1], [after], "comm"))
    ops.append(_Op(res_f, p["expert"] + p["d"][2] + p["c"][0], [len(ops) - 1], "expert"))
    ops.append(_Op("combine", p["c"][1], [len(ops) - 1], "comm"))
    return len(ops) - 1


def layer_kinds(shape: ModelShape) -> list[bool]:
    """Whether each layer is MoE; dense layers first (where they sit does not change a step)."""
    return [False] * shape.dense_layers + [True] * shape.moe_layers


def _timeline(costs: Costs, cfg: StepConfig, zero_comm: bool = False):
    ops = _build_ops(costs, cfg, zero_comm)
    starts, ends = _run(ops)
    slow_a, slow_f = costs.interference
    if cfg.kind == "afd" and (slow_a != 1.0 or slow_f != 1.0):
        # both sides share the machine's memory system: stretch each op by its slowdown times
        # the fraction of it that ran while the other side was busy, then run again
        spans = {
            r: [(starts[j], ends[j]) for j, o in enumerate(ops) if o.resource == r]
            for r in ("attention", "expert")
        }
        idx = {r: [j for j, o in enumerate(ops) if o.resource == r] for r in spans}
        for r, other, slow in (("attention", "expert", slow_a), ("expert", "attention", slow_f)):
            for j, frac in zip(idx[r], _overlap(spans[r], spans[other]), strict=True):
                ops[j].duration *= 1.0 + (slow - 1.0) * frac
        starts, ends = _run(ops)
    return ops, starts, ends


def _colocated_compute(costs: Costs, cfg: StepConfig) -> float:
    """One colocated decode step's compute: measured when profiled, else summed per layer."""
    measured = costs.colocated_step(cfg.batch, cfg.context)
    if measured is not None:
        return measured
    shape = costs.shape
    return (
        sum(
            costs.attention_layer(moe, cfg.batch, cfg.context)
            + (
                costs.expert_layer(
                    cfg.batch * shape.top_k,
                    active_experts(shape.experts, shape.experts, shape.top_k, cfg.batch),
                    shape.experts,
                )
                if moe
                else 0.0
            )
            for moe in layer_kinds(shape)
        )
        + costs.sample(cfg.batch)
        + costs.prep(cfg.batch, cfg.context)
    )


# (scheduling step, stages, bubbles, exposed comm, bottleneck) of one configuration
_Stages = tuple[float, dict[str, float], dict[str, float], float, str]


def _colocated_stages(costs: Costs, cfg: StepConfig, host: float) -> _Stages:
    """Stages of a colocated step: K compute steps then the host's share."""
    k_steps = cfg.scheduler_steps
    compute = _colocated_compute(costs, cfg)
    sched = k_steps * compute + host
    stages = {"compute": compute, "host": host / k_steps}
    bubbles = {"compute": host / sched}
    bottleneck = "host" if host / k_steps > compute else "compute"
    return sched, stages, bubbles, 0.0, bottleneck


def _disaggregated_stages(costs: Costs, cfg: StepConfig, host: float, notes: list[str]) -> _Stages:
    """Stages of an AFD or EP step from its simulated timeline."""
    k_steps = cfg.scheduler_steps
    ops, starts, ends = _timeline(costs, cfg)
    makespan = max(ends)
    sched = makespan + host
    busy = {"attention": 0.0, "expert": 0.0, "comm": 0.0}
    link = {"dispatch": 0.0, "combine": 0.0}
    for op in ops:
        busy[op.side] += op.duration
        if op.resource in link:
            link[op.resource] += op.duration
    stages = {"attention": busy["attention"] / k_steps, "expert": busy["expert"] / k_steps}
    if cfg.kind == "ep":
        gpu = busy["attention"] + busy["expert"]
        bubbles = {"gpu": 1.0 - gpu / sched}
    else:
        bubbles = {
            "attention": 1.0 - busy["attention"] / sched,
            "expert": 1.0 - busy["expert"] / sched,
        }
    stages.update({name: v / k_steps for name, v in link.items()})
    stages["host"] = host / k_steps
    _, _, ends0 = _timeline(costs, cfg, zero_comm=True)
    exposed = max(0.0, makespan - max(ends0)) / k_steps
    sides = {
        "attention": busy["attention"],
        "expert": busy["expert"],
        "comm": max(link.values()),
        "host": host,
    }
    if cfg.kind == "ep":
        sides = {"gpu": busy["attention"] + busy["expert"], "comm": sides["comm"], "host": host}
    bottleneck = max(sides, key=sides.get)
    if costs.device == "cpu" and cfg.workers > costs.cores:
        notes.append(f"{cfg.workers} workers share {costs.cores} cores")
    return sched, stages, bubbles, exposed, bottleneck


def predict(costs: Costs, cfg: StepConfig) -> StepPrediction:
    """Predicted step time, throughput, bubbles and memory of one configuration."""
    notes: list[str] = []
    host = costs.host(cfg.total_batch, cfg.kind != "colocated", cfg.context)
    if cfg.kind == "colocated":
        sched, stages, bubbles, exposed, bottleneck = _colocated_stages(costs, cfg, host)
    else:
        sched, stages, bubbles, exposed, bottleneck = _disaggregated_stages(costs, cfg, host, notes)
    step = sched / cfg.scheduler_steps
    memory = memory_needed(costs, cfg)
    ok = _memory_ok(costs, cfg, memory)
    if not ok:
        notes.append("does not fit in memory")
    return StepPrediction(
        config=cfg,
        step_time_s=step,
        scheduling_step_s=sched,
        decode_tokens_per_s=cfg.total_batch / step,
        tpot_ms=step * 1e3,
        stages_s=stages,
        bubble_fraction=bubbles,
        exposed_comm_s=exposed,
        bottleneck=bottleneck,
        kv_bytes_per_worker=memory["kv"],
        memory_needed=memory,
        memory_ok=ok,
        notes=notes,
    )


def memory_needed(costs: Costs, cfg: StepConfig, max_context: float | None = None) -> dict:
    """Bytes per attention-side worker (weights + KV for the batch at max_context) and per
    expert-side worker (its experts)."""
    shape = costs.shape
    ctx = max_context if max_context is not None else cfg.context
    wb = costs.weight_bytes
    attn_side = sum(shape.attention_side_params(moe) for moe in layer_kinds(shape))
    attn_side += 2 * shape.vocab * shape.hidden
    kv = cfg.batch * ctx * shape.kv_elems_per_token() * shape.layers * costs.kv_bytes
    experts_all = shape.moe_layers * shape.experts * shape.expert_params()
    if cfg.kind == "colocated":
        return {"kv": kv, "attention": attn_side * wb + kv + experts_all * wb, "expert": 0.0}
    per_f = experts_all / cfg.expert_workers * wb
    if cfg.kind == "ep":
        return {"kv": kv, "attention": attn_side * wb + kv + per_f, "expert": 0.0}
    return {"kv": kv, "attention": attn_side * wb + kv, "expert": per_f}


def _memory_ok(costs: Costs, cfg: StepConfig, memory: dict) -> bool:
    if costs.device == "cpu":  # one machine holds every worker
        total = memory["attention"] * cfg.attention_workers
        total += memory["expert"] * (cfg.expert_workers if cfg.kind == "afd" else 0)
        return total <= costs.memory_per_worker
    return max(memory["attention"], memory["expert"]) <= costs.memory_per_worker


# ---- prefill pool --------------------------------------------------------------------------


def ttft(
    costs: Costs,
    prompt_len: int,
    request_rate: float,
    prefill_workers: int,
    decode: StepPrediction | None = None,
) -> tuple[float, float]:
    """(TTFT seconds, utilisation) of a prefill pool of P workers at `request_rate` requests/s,
    each queue M/D/1 as in DistServe: TTFT = D + rho * D / (2 (1 - rho)), rho = rate / P * D.
    P = 0: the decode workers prefill between steps (each takes rate / A of the prompts);
    infinite TTFT when the pool cannot keep up."""
    d = costs.prefill(prompt_len)
    if prefill_workers > 0:
        rho = request_rate / prefill_workers * d
        transfer = costs.transfer(
            prompt_len * costs.shape.kv_elems_per_token() * costs.shape.layers * costs.kv_bytes,
            "dispatch",
        )
        extra = sum(transfer)
    else:
        servers = decode.config.attention_workers if decode else 1
        rho = request_rate / servers * d
        extra = decode.step_time_s / 2 if decode else 0.0  # waits for the running step
    if rho >= 1.0:
        return math.inf, rho
    return d + rho * d / (2 * (1 - rho)) + extra, rho
