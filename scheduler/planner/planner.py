"""`afd plan`: enumerate topologies, micro-batches, scheduler steps and batches, predict each with
the step model, keep those that meet the SLOs and fit in memory, rank them, write the best as a
cluster YAML for `afd launch --config`, and draw the throughput-vs-TPOT frontier.

Search (MegaScale-Infer Algorithm 1 over AFD's knobs, DistServe's placement for prefill): for
every kind (colocated, EP on GPUs, A attention + F expert workers), every m and K, the largest
batch whose TPOT meets the SLO (binary search: TPOT grows with the batch) and whose KV cache
fits; the prefill pool is the smallest P whose M/D/1 TTFT meets the SLO at the request rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from afd.scheduler.planner.step_model import Costs, StepConfig, StepPrediction, predict, ttft

MAX_BATCH = 1 << 14


@dataclass
class PlanRequest:
    """What the user asks for."""

    input_len: int
    output_len: int
    ttft_ms: float
    tpot_ms: float
    max_workers: int
    request_rate: float | None = None  # requests/s; None: as many as the plan can take
    objective: str = "throughput"  # throughput | cost
    price_per_hour: float = 1.0  # per worker (GPU, or CPU core)
    micro_batches: tuple[int, ...] = (1, 2, 3, 4)
    scheduler_steps: tuple[int, ...] = (1, 4)
    kinds: tuple[str, ...] = ("colocated", "afd")

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len", "max_workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1")
        for name in ("ttft_ms", "tpot_ms", "price_per_hour"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0")
        if self.request_rate is not None and not (
            math.isfinite(self.request_rate) and self.request_rate > 0
        ):
            raise ValueError("--request-rate must be a finite number > 0")
        if self.objective not in ("throughput", "cost"):
            raise ValueError("--objective must be throughput or cost")

    @property
    def mean_context(self) -> float:
        """Mean KV length of a sequence over its decode."""
        return self.input_len + self.output_len / 2


@dataclass
class Candidate:
    """One ranked configuration."""

    prediction: StepPrediction
    ttft_s: float
    prefill_utilization: float
    workers: int  # decode workers + prefill workers
    cost_per_mtok: float
    meets_slo: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def config(self) -> StepConfig:
        return self.prediction.config

    @property
    def tokens_per_s(self) -> float:
        return self.prediction.decode_tokens_per_s

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.tokens_per_s / self.workers

    def row(self) -> dict:
        p, c = self.prediction, self.config
        return {
            "topology": c.label(),
            "prefill_workers": c.prefill_workers,
            "m": c.micro_batches,
            "K": c.scheduler_steps,
            "batch": c.batch,
            "tpot_ms": p.tpot_ms,
            "ttft_ms": self.ttft_s * 1e3,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_per_worker": self.tokens_per_s_per_worker,
            "workers": self.workers,
            "cost_per_mtok": self.cost_per_mtok,
            "bottleneck": p.bottleneck,
            "bubble_fraction": p.bubble_fraction,
            "meets_slo": self.meets_slo,
            "reasons": self.reasons,
        }


def topologies(kinds: tuple[str, ...], max_workers: int, experts: int) -> list[tuple]:
    """(kind, A, F) decode topologies within max_workers (prefill workers come on top)."""
    out = []
    if "colocated" in kinds:
        out.append(("colocated", 1, 0))
    if "ep" in kinds:
        out += [("ep", n, n) for n in range(2, max_workers + 1)]
    if "afd" in kinds:
        for a in range(1, max_workers):
            for f in range(1, min(max_workers - a, experts) + 1):
                out.append(("afd", a, f))
    return out


def _evaluate(costs: Costs, req: PlanRequest, cfg: StepConfig, slots: int) -> Candidate | None:
    """Prediction, prefill pool and SLO check of one configuration; `slots` = workers left for
    prefill. None when it cannot hold its batch in memory."""
    from afd.scheduler.planner.step_model import memory_needed

    pred = predict(costs, cfg)
    mem = memory_needed(costs, cfg, max_context=req.input_len + req.output_len)
    if costs.device != "cpu" and max(mem["attention"], mem["expert"]) > costs.memory_per_worker:
        return None
    if costs.device == "cpu":
        total = mem["attention"] * cfg.attention_workers + mem["expert"] * cfg.expert_workers
        if total > costs.memory_per_worker:
            return None
    reasons = []
    # the rate the decode side can take: every slot turns over once per output_len steps
    capacity = cfg.total_batch / (req.output_len * pred.step_time_s)
    if req.request_rate is not None and req.request_rate > capacity:
        reasons.append(f"decode capacity {capacity:.2f} req/s < request rate")
    prefill_s = costs.prefill(req.input_len)
    best = None
    for p in range(0, slots + 1):
        rate = req.request_rate
        if rate is None:  # as many requests as the decode side can serve
            # without a prefill pool the decode workers also prefill: rate = cap (1 - rho)
            share = capacity * prefill_s / cfg.attention_workers
            rate = capacity if p > 0 else capacity / (1 + share)
        t, util = ttft(costs, req.input_len, rate, p, pred)
        if t * 1e3 <= req.ttft_ms:
            best = (p, t, util)
            break
        if best is None or t < best[1]:
            best = (p, t, util)
    p, t, util = best
    cfg.prefill_workers = p
    if p == 0:
        # prompts share the decode workers: they prefill a fraction util of the time
        pred = _slowed(pred, util)
    if t * 1e3 > req.ttft_ms:
        reasons.append(f"TTFT {t * 1e3:.0f} ms > {req.ttft_ms:g}")
    if pred.tpot_ms > req.tpot_ms:
        reasons.append(f"TPOT {pred.tpot_ms:.1f} ms > {req.tpot_ms:g}")
    workers = cfg.workers + p
    if costs.device == "cpu" and cfg.kind == "colocated":
        workers = max(workers, costs.cores)  # the engine uses every core of the machine
    hours_per_mtok = 1e6 / pred.decode_tokens_per_s / 3600
    return Candidate(
        prediction=pred,
        ttft_s=t,
        prefill_utilization=util,
        workers=workers,
        cost_per_mtok=hours_per_mtok * workers * req.price_per_hour,
        meets_slo=not reasons,
        reasons=reasons,
    )


def _slowed(pred: StepPrediction, util: float) -> StepPrediction:
    from dataclasses import replace

    if util >= 1.0:
        return pred
    step = pred.step_time_s / (1.0 - util)
    return replace(
        pred,
        step_time_s=step,
        tpot_ms=step * 1e3,
        decode_tokens_per_s=pred.config.total_batch / step,
    )


def search(costs: Costs, req: PlanRequest) -> list[Candidate]:
    """Every topology x m x K at the largest batch that meets the TPOT SLO (or the best
    achievable when none does), ranked: SLO-meeting first, then by the objective."""
    candidates: list[Candidate] = []
    for kind, a, f in topologies(req.kinds, req.max_workers, costs.shape.experts):
        ms = (1,) if kind == "colocated" else req.micro_batches
        for m in ms:
            for k in req.scheduler_steps:
                slots = req.max_workers - (a + f if kind == "afd" else a)
                if costs.device == "cpu" and kind == "colocated":
                    slots = 0  # the engine already uses every core
                best = _largest_batch(costs, req, kind, a, f, m, k, max(0, slots))
                if best is not None:
                    candidates.append(best)
    return rank(candidates, req.objective)


def _largest_batch(costs, req, kind, a, f, m, k, slots) -> Candidate | None:
    def at(batch: int) -> Candidate | None:
        cfg = StepConfig(
            kind=kind,
            attention_workers=a,
            expert_workers=f,
            micro_batches=m,
            scheduler_steps=k,
            batch=batch,
            context=req.mean_context,
        )
        return _evaluate(costs, req, cfg, slots)

    lo = m  # every micro-batch needs a sequence
    first = at(lo)
    if first is None:
        return None
    if first.prediction.tpot_ms > req.tpot_ms:
        return first  # nothing meets the SLO: keep the fastest for the table
    best, hi = first, lo
    # grow by doubling, then bisect between the last good and the first bad batch
    while hi < MAX_BATCH:
        nxt = at(min(MAX_BATCH, hi * 2))
        if nxt is None or nxt.prediction.tpot_ms > req.tpot_ms:
            break
        best, hi = nxt, min(MAX_BATCH, hi * 2)
    lo, top = hi, min(MAX_BATCH, hi * 2)
    while top - lo > max(1, lo // 32):
        mid = (lo + top) // 2
        c = at(mid)
        if c is not None and c.prediction.tpot_ms <= req.tpot_ms:
            best, lo = c, mid
        else:
            top = mid
    return best


def rank(candidates: list[Candidate], objective: str) -> list[Candidate]:
    if objective == "cost":
        key = lambda c: (not c.meets_slo, c.cost_per_mtok)  # noqa: E731
    else:
        key = lambda c: (not c.meets_slo, -c.tokens_per_s)  # noqa: E731
    return sorted(candidates, key=key)


def format_table(cands: list[Candidate], limit: int = 20) -> str:
    head = (
        f"{'#':>2} {'topology':>10} {'P':>2} {'m':>2} {'K':>2} {'batch':>6} {'TPOT ms':>8} "
        f"{'TTFT ms':>8} {'tok/s':>9} {'tok/s/w':>8} {'$/Mtok':>8} {'bottleneck':>10} "
        f"{'bubbles':>12}  SLO"
    )
    lines = [head]
    for i, c in enumerate(cands[:limit], 1):
        r = c.row()
        bub = "/".join(f"{v:.2f}" for v in r["bubble_fraction"].values())
        ttft_ms = "inf" if math.isinf(r["ttft_ms"]) else f"{r['ttft_ms']:.0f}"
        slo = "yes" if r["meets_slo"] else "; ".join(r["reasons"])
        lines.append(
            f"{i:>2} {r['topology']:>10} {r['prefill_workers']:>2} {r['m']:>2} {r['K']:>2} "
            f"{r['batch']:>6} {r['tpot_ms']:>8.1f} {ttft_ms:>8} {r['tokens_per_s']:>9.0f} "
            f"{r['tokens_per_s_per_worker']:>8.0f} {r['cost_per_mtok']:>8.3f} "
            f"{r['bottleneck']:>10} {bub:>12}  {slo}"
        )
    return "\n".join(lines)


def cluster_yaml(best: Candidate, model: str, req: PlanRequest, device: str, extra: dict) -> str:
    """A cluster YAML that `afd launch --config` starts as it is (keys are launch flags)."""
    import yaml

    c = best.config
    block = 16
    longest = req.input_len + req.output_len
    afd = c.kind == "afd"
    settings = {
        "model": model,
        "device": device,
        "num-attention-workers": c.attention_workers if afd else 0,
        "num-expert-workers": c.expert_workers if afd else 0,
        "num-prefill-workers": c.prefill_workers if afd else 0,
        "num-micro-batches": c.micro_batches,
        "num-scheduler-steps": c.scheduler_steps,
        "max-num-seqs": c.total_batch,
        "block-size": block,
        # every running sequence can reach its full length without preemption
        "num-kv-blocks": c.batch * -(-longest // block) + 8,
        "max-num-batched-tokens": max(512, req.input_len),
        **extra,
    }
    if c.kind == "ep":
        raise ValueError("the EP deployment is a reference point; AFD does not launch it")
    p = best.prediction
    comment = (
        f"# afd plan: {c.label()} m={c.micro_batches} K={c.scheduler_steps} batch={c.batch}: "
        f"predicted TPOT {p.tpot_ms:.1f} ms, TTFT {best.ttft_s * 1e3:.0f} ms, "
        f"{p.decode_tokens_per_s:.0f} tok/s\n# start it with: afd launch --config THIS_FILE\n"
    )
    return comment + yaml.safe_dump(settings, sort_keys=False)


def frontier_png(cands: list[Candidate], best: Candidate | None, req: PlanRequest, path) -> None:
    """Predicted tokens/s per worker against TPOT for every candidate; the Pareto frontier,
    the TPOT SLO and the chosen plan marked."""
    from afd.results import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 5))
    kinds = sorted({c.config.label() for c in cands})
    for label in kinds:
        pts = [c for c in cands if c.config.label() == label]
        ax.scatter(
            [c.prediction.tpot_ms for c in pts],
            [c.tokens_per_s_per_worker for c in pts],
            label=label,
            s=18,
        )
    front, top = [], -1.0
    for c in sorted(cands, key=lambda c: c.prediction.tpot_ms):
        if c.tokens_per_s_per_worker > top:
            front.append(c)
            top = c.tokens_per_s_per_worker
    ax.plot(
        [c.prediction.tpot_ms for c in front],
        [c.tokens_per_s_per_worker for c in front],
        "k--",
        lw=1,
        label="frontier",
    )
    ax.axvline(req.tpot_ms, color="red", lw=1, label="TPOT SLO")
    if best is not None:
        ax.scatter(
            [best.prediction.tpot_ms],
            [best.tokens_per_s_per_worker],
            marker="*",
            s=220,
            color="gold",
            edgecolor="k",
            zorder=5,
            label="plan",
        )
    ax.set_xlabel("predicted TPOT (ms)")
    ax.set_ylabel("predicted decode tokens/s per worker")
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title("afd plan: candidates at their largest batch under the TPOT SLO")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_costs(
    profile: str | None,
    hardware: str | None,
    model: str,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    efficiency: dict | None = None,
    calibration: str | None = None,
    workers: int = 8,
):
    """Costs from a profile JSON, or from a hardware preset and the model's config."""
    if (profile is None) == (hardware is None):
        raise ValueError("give exactly one of --profile and --hardware")
    if profile is not None:
        from afd.scheduler.planner.profiler import MeasuredCosts

        costs = MeasuredCosts.load(profile)
        if costs.model and model and costs.model != model:
            raise ValueError(f"--profile {profile} was taken for {costs.model!r}, not {model!r}")
        return costs
    from afd.scheduler.planner.hardware import RooflineCosts, calibrate, get_preset

    hw = get_preset(hardware)
    if calibration:
        hw = calibrate(hw, calibration)
    if efficiency:
        from dataclasses import replace

        hw = replace(hw, efficiency=hw.efficiency.with_overrides(efficiency))
    return RooflineCosts(model_shape(model), hw, weight_dtype, kv_dtype, workers=workers)


def model_shape(model: str):
    """The shape of a model: a published one by name (docs/planner.md), else its config."""
    from afd.scheduler.planner.published import PUBLISHED_SHAPES

    if model in PUBLISHED_SHAPES:
        return PUBLISHED_SHAPES[model]
    from afd.builtin import resolve_model
    from afd.config import ModelConfig
    from afd.scheduler.planner.step_model import ModelShape

    return ModelShape.from_config(ModelConfig.from_pretrained(resolve_model(model)), model)


def write_outputs(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
