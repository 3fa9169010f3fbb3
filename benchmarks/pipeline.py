"""`afd bench pipeline`: decode steps on a disaggregated topology for m = 1..k micro-batches in
one run; per-stage times, bubbles, exposed communication, balance, tokens/s, timeline, trace."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from afd.builtin import resolve_model
from afd.comm.dispatch import (
    DISPATCH_DTYPES,
    MAX_MICRO_BATCHES,
    resolve_transport_name,
    transport_names,
)

BENCH_MODEL = "bench-balanced-moe"  # shapes: afd.builtin.BENCH_MODELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=BENCH_MODEL, help=f"model dir, built-in or bench name ({BENCH_MODEL})"
    )
    p.add_argument("--num-attention-workers", type=int, default=1, help="attention workers")
    p.add_argument("--num-expert-workers", type=int, default=1, help="expert workers")
    p.add_argument("--max-micro-batches", type=int, default=2, help="measure m = 1..this")
    p.add_argument("--batch-size", type=int, default=512, help="sequences decoded per step")
    p.add_argument("--context-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="measured decode steps per variant at the largest K (rounded up to whole rounds)",
    )
    p.add_argument("--warmup", type=int, default=3, help="decode steps per variant, unmeasured")
    p.add_argument(
        "--num-scheduler-steps",
        default="1",
        metavar="K[,K...]",
        help="decode steps per scheduling step; a list (1,4) measures each K side by side",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where workers run")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype",
    )
    p.add_argument(
        "--comm-backend", default="auto", choices=transport_names(), help="A<->F transport"
    )
    p.add_argument(
        "--dispatch-dtype",
        default="auto",
        choices=DISPATCH_DTYPES,
        help="A->F activations in the compute dtype (auto) or e4m3 + per-128-channel scales",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="--device cuda: GPUs the workers share (1 runs the whole topology on one GPU)",
    )
    p.add_argument("--name", default="pipeline", help="result name: NAME.json, NAME_timeline.png")
    add_planner_arguments(p)
    p.add_argument(
        "--output-dir",
        default=None,
        help="where NAME.json, NAME_timeline.png and NAME_trace.json go "
        "(default: benchmarks/results/<machine>/)",
    )


def parse_steps_list(text: str) -> list[int]:
    """'1,4' -> [1, 4]: distinct positive decode-step counts, in the order given."""
    try:
        ks = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--num-scheduler-steps expects K or K,K,...; got {text!r}") from None
    if any(k < 1 or k > 1024 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"--num-scheduler-steps: distinct values in [1, 1024]; got {text!r}")
    return ks


def run(args: argparse.Namespace) -> int:
    from afd.entrypoints.llm import LLM
    from afd.results import check_clean, results_dir, write_result
    from afd.sampling.params import SamplingParams

    for name in (
        "num_attention_workers",
        "num_expert_workers",
        "max_micro_batches",
        "batch_size",
        "context_len",
        "steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be at least 0")
    if args.max_micro_batches > MAX_MICRO_BATCHES:
        raise ValueError(f"--max-micro-batches must be at most {MAX_MICRO_BATCHES}")
    ks = parse_steps_list(args.num_scheduler_steps)
    out = Path(args.output_dir) if args.output_dir else results_dir(args.device)
    check_clean(out / f"{args.name}.json", getattr(args, "allow_dirty", False))  # before measuring
    model = str(resolve_model(args.model))
    # Every round runs one scheduling step of every variant (K, m); --steps and --warmup count
    # decode steps of the largest K, so every variant sees the same contexts.
    args.warmup_rounds = -(-args.warmup // max(ks))
    args.rounds = -(-args.steps // max(ks))
    per_round = sum(ks) * args.max_micro_batches
    # room for every sequence until the last measured step: a preempted sequence would make
    # the steps it misses cheaper and its recompute dearer
    longest = args.context_len + (args.warmup_rounds + args.rounds) * per_round + 2
    block_size = 16
    llm = LLM(
        model,
        dtype=args.dtype,
        device=args.device,
        num_attention_workers=args.num_attention_workers,
        num_expert_workers=args.num_expert_workers,
        comm_backend=args.comm_backend,
        dispatch_dtype=args.dispatch_dtype,
        gpus_per_node=args.gpus_per_node,
        num_scheduler_steps=max(ks),
        max_num_seqs=args.batch_size * args.num_attention_workers,
        block_size=block_size,
        num_kv_blocks=args.batch_size * -(-longest // block_size) + 8,
        max_num_batched_tokens=max(512, args.batch_size * args.context_len),
    )
    try:
        result = measure(llm, args, ks, SamplingParams)
    finally:
        llm.shutdown()
    if not args.no_colocated:
        result["colocated"] = measure_colocated(model, args, ks, longest)
    if args.profile:
        add_predictions(result, args, ks)
    events = {f"{r['num_scheduler_steps']},{r['m']}": r.pop("events") for r in result["runs"]}
    path = write_result(
        args.name,
        result,
        device=args.device,
        path=out / f"{args.name}.json",
        argv=getattr(args, "command_argv", None),
        allow_dirty=getattr(args, "allow_dirty", False),
    )
    trace_path, png_path = out / f"{args.name}_trace.json", out / f"{args.name}_timeline.png"
    write_chrome_trace(result, events, trace_path)
    write_timeline_png(result, events, png_path)
    print_table(result)
    print_predictions(result)
    print(f"wrote {path}, {png_path}, {trace_path}")
    return 0


def _prefill_batch(eng, total: int, context_len: int, SamplingParams) -> None:
    """Queue `total` seeded random prompts of `context_len` tokens and prefill them all."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1_000_000, ignore_eos=True)
    for _ in range(total):
        prompt = torch.randint(3, vocab, (context_len,), generator=g).tolist()
        eng.add_request(prompt, params, stream=False)
    # Prefill everything so that every measured step is a pure decode step of the whole batch.
    while any(s.num_waiting for s in eng.schedulers) or any(
        seq.num_output_tokens == 0 for s in eng.schedulers for seq in s.running
    ):
        eng.step()


def _set_k(eng, k: int) -> None:
    eng.config = eng.config.replace(num_scheduler_steps=k)
    eng.scheduler.num_scheduler_steps = k  # the plan's K is read there


@dataclass
class _Tally:
    """What the measured rounds of one (K, m) variant add up to."""

    walls: list[float] = field(default_factory=list)
    stage_sums: dict[str, float] = field(default_factory=dict)
    loads: list = field(default_factory=list)
    wire: dict[str, int] = field(default_factory=dict)
    events: list = field(default_factory=list)

    def add(self, wall: float, last, traced: bool) -> None:
        self.walls.append(wall)
        for name, sec in last.times.items():
            self.stage_sums[name] = self.stage_sums.get(name, 0.0) + sec
        self.loads.append(last.load)
        for key, n in last.wire.items():
            self.wire[key] = self.wire.get(key, 0) + n
        if traced:
            self.events = last.events


def _step_variant(eng, ex, k: int, m: int, trace: bool) -> float:
    """One scheduling step at K = k over m micro-batches; its wall time."""
    _set_k(eng, k)
    ex.num_micro_batches = m
    ex.trace = trace
    t0 = time.perf_counter()
    eng.step()
    return time.perf_counter() - t0


def _check_decode_step(eng, ex, k: int, total: int) -> None:
    running = sum(len(s.running) for s in eng.schedulers)
    if running != total or ex.last.num_steps != k:
        raise RuntimeError(
            f"{running} of {total} sequences ran {ex.last.num_steps} decode steps in a "
            f"scheduling step, not {k}"
        )


def _run_rounds(eng, ex, args, variants: list[tuple], total: int) -> dict[tuple, _Tally]:
    # Rounds take turns over every (K, m) on the same batch: every variant sees the same context
    # lengths (attention cost grows with them) and the same slow drifts of the machine.
    tallies = {v: _Tally() for v in variants}
    last = args.warmup_rounds + args.rounds - 1
    for rnd in range(args.warmup_rounds + args.rounds):
        for v in variants:
            k, m = v
            wall = _step_variant(eng, ex, k, m, rnd == last)
            if rnd < args.warmup_rounds:
                continue
            _check_decode_step(eng, ex, k, total)
            tallies[v].add(wall, ex.last, ex.trace)
    ex.trace = False
    return tallies


def _summarise_variants(args, ks: list[int], tallies: dict[tuple, _Tally], total: int) -> list:
    """One summary row per (K, m), with its speedups over m = 1 and over the first K."""
    runs = []
    for (k, m), t in tallies.items():
        r = summarise(
            t.walls,
            t.stage_sums,
            t.loads,
            t.wire,
            m=m,
            k=k,
            num_attention=args.num_attention_workers,
            num_expert=args.num_expert_workers,
            total=total,
        )
        r["events"] = t.events
        add_speedup(r, "m1", t.walls, k, tallies[(k, 1)].walls, k)
        if len(ks) > 1:
            add_speedup(r, "first_k", t.walls, k, tallies[(ks[0], m)].walls, ks[0])
        runs.append(r)
    return runs


def _run_header(llm, args, ks: list[int]) -> dict:
    from afd.scheduler.cluster.executor import shares_gpus

    return {
        "topology": {
            "attention_workers": args.num_attention_workers,
            "expert_workers": args.num_expert_workers,
        },
        "batch_size_per_attention_worker": args.batch_size,
        "context_len": args.context_len,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup_rounds,
        "num_scheduler_steps": ks,
        "device": device_name(args.device),
        "dtype": args.dtype,
        "comm_backend": resolve_transport_name(
            args.comm_backend, args.device, "-", shares_gpus(llm.engine.config)
        ),
        "dispatch_dtype": args.dispatch_dtype,
        "model": args.model,
    }


def measure(llm, args, ks: list[int], SamplingParams) -> dict:
    eng, ex = llm.engine, llm.engine.executor
    total = args.batch_size * args.num_attention_workers
    _prefill_batch(eng, total, args.context_len, SamplingParams)
    variants = [(k, m) for k in ks for m in range(1, args.max_micro_batches + 1)]
    tallies = _run_rounds(eng, ex, args, variants, total)
    return {**_run_header(llm, args, ks), "runs": _summarise_variants(args, ks, tallies, total)}


# Each side's plan time splits into compute, exposed transfers and waiting for the other side;
# the rest of the host's step is time outside the plan (docs/structures.md, "Pipeline metrics").
SIDES = {
    "attention": ("attention_plan", ("dispatch", "combine_copy", "kv_import"), "combine_wait"),
    "expert": ("expert_plan", ("expert_recv_copy", "expert_send"), "expert_recv_wait"),
}


def side_breakdown(per_step: dict[str, float], step_s: float, side: str, workers: int) -> dict:
    """Seconds per decode step of one side (mean over its workers) and their fractions of the
    step: compute + comm + wait + host == step, bubble = (wait + host) / step."""
    plan, comm_stages, wait_stage = SIDES[side]
    plan_s = per_step.get(plan, 0.0) / workers
    comm_s = sum(per_step.get(s, 0.0) for s in comm_stages) / workers
    wait_s = per_step.get(wait_stage, 0.0) / workers
    compute_s = plan_s - comm_s - wait_s
    host_s = step_s - plan_s
    return {
        "compute_s": compute_s,
        "comm_s": comm_s,
        "wait_s": wait_s,
        "host_s": host_s,
        "busy_fraction": (compute_s + comm_s) / step_s,
        "bubble_fraction": (wait_s + host_s) / step_s,
        "exposed_comm_fraction": comm_s / step_s,
    }


def summarise(
    walls: list[float],
    stage_sums: dict[str, float],
    loads: list,
    wire: dict[str, int] | None = None,
    *,
    m: int,
    k: int,
    num_attention: int,
    num_expert: int,
    total: int,
) -> dict:
    """One variant's times per decode step (a scheduling step runs k of them). walls: seconds
    of each measured scheduling step; stage_sums: stage seconds summed over those steps and over
    the workers of each side; loads: per step, per expert worker, tokens per expert; wire: bytes
    the attention workers put on the data plane ("dispatch") and got back ("combine")."""
    steps = len(walls) * k
    step_s = statistics.mean(walls) / k
    per_step = {name: v / steps for name, v in stage_sums.items()}
    sides = {
        "attention": side_breakdown(per_step, step_s, "attention", num_attention),
        "expert": side_breakdown(per_step, step_s, "expert", num_expert),
    }
    workers = {"attention": num_attention, "expert": num_expert, "prefill": 1}
    stages = {
        name: v / workers["expert" if name.startswith("expert") else "attention"]
        for name, v in per_step.items()
    }
    per_expert = [sum(col) for col in zip(*[x for step in loads for x in step], strict=False)]
    flat = [c / k for step in loads for shard in step for c in shard]
    a, f = sides["attention"]["compute_s"], sides["expert"]["compute_s"]
    return {
        "m": m,
        "num_scheduler_steps": k,
        "step_time_s": step_s,
        "step_time_median_s": statistics.median(walls) / k,
        "scheduling_step_times_s": walls,
        "decode_tokens_per_s": total / step_s,
        "stage_time_per_step_s": stages,
        "attention": sides["attention"],
        "expert": sides["expert"],
        "bubble_fraction": {s: sides[s]["bubble_fraction"] for s in sides},
        "exposed_comm_fraction": {s: sides[s]["exposed_comm_fraction"] for s in sides},
        "attention_expert_balance": a / f if f > 0 else None,
        "expert_load": {
            "mean_tokens_per_expert_step": statistics.mean(flat) if flat else 0,
            "max_tokens_per_expert_step": max(flat) if flat else 0,
            "total_per_expert": per_expert,
        },
        "wire_bytes_per_step": {key: n / steps for key, n in sorted((wire or {}).items())},
    }


def add_speedup(run: dict, name: str, walls: list[float], k: int, base: list[float], base_k: int):
    """run["speedup_vs_<name>"]: decode tokens/s over the baseline's (mean step times), and the
    same ratio within each round (the two steps ran back to back) as median, min and max."""
    mean = (statistics.mean(base) / base_k) / (statistics.mean(walls) / k)
    rounds = [(b / base_k) / (w / k) for w, b in zip(walls, base, strict=True)]
    run[f"speedup_vs_{name}"] = mean
    run[f"speedup_vs_{name}_per_round"] = {
        "median": statistics.median(rounds),
        "min": min(rounds),
        "max": max(rounds),
        "values": rounds,
    }


def device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def print_table(result: dict) -> None:
    head = (
        f"{'K':>2} {'m':>2} {'tok/s':>9} {'speedup':>8} {'step ms':>8} {'attn ms':>8} "
        f"{'expert ms':>9} {'comm A':>6} {'comm F':>6} {'bubble A':>8} {'bubble F':>8} {'A/F':>5} "
        f"{'A->F MB':>8} {'F->A MB':>8}"
    )
    print(head)
    for r in result["runs"]:
        a, f, wb = r["attention"], r["expert"], r["wire_bytes_per_step"]
        print(
            f"{r['num_scheduler_steps']:>2} {r['m']:>2} {r['decode_tokens_per_s']:>9.1f} "
            f"{r['speedup_vs_m1']:>7.2f}x {r['step_time_s'] * 1e3:>8.1f} "
            f"{a['compute_s'] * 1e3:>8.1f} {f['compute_s'] * 1e3:>9.1f} "
            f"{a['exposed_comm_fraction']:>6.3f} {f['exposed_comm_fraction']:>6.3f} "
            f"{a['bubble_fraction']:>8.2f} {f['bubble_fraction']:>8.2f} "
            f"{r['attention_expert_balance'] or 0:>5.2f} "
            f"{wb.get('dispatch', 0) / 1e6:>8.3f} {wb.get('combine', 0) / 1e6:>8.3f}"
        )
    print(
        "per decode step; attn/expert ms: compute; comm: exposed transfers / step; "
        "bubble: (waiting for the other side + time outside the plan) / step"
    )


def _traced(result: dict, events: dict[str, list]) -> list[tuple[str, dict, list]]:
    """(title, run, events) of every run with a traced scheduling step."""
    out = []
    for r in result["runs"]:
        evs = events.get(f"{r['num_scheduler_steps']},{r['m']}") or []
        if evs:
            k = r["num_scheduler_steps"]
            title = f"K={k} m={r['m']}" if len(result["num_scheduler_steps"]) > 1 else f"m={r['m']}"
            out.append((title, r, evs))
    return out


def write_chrome_trace(result: dict, events: dict[str, list], path: Path) -> None:
    trace = []
    for title, _r, evs in _traced(result, events):
        t0 = min(e[2] for e in evs)
        for lane, name, start, end, rank in evs:
            trace.append(
                {
                    "name": name,
                    "ph": "X",
                    "pid": title,
                    "tid": f"{lane} rank {rank}",
                    "ts": (start - t0) / 1e3,
                    "dur": (end - start) / 1e3,
                }
            )
    path.write_text(json.dumps({"traceEvents": trace}))


def write_timeline_png(result: dict, events: dict[str, list], path: Path) -> None:
    from afd.results import pyplot

    plt = pyplot()

    runs = _traced(result, events)
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.4 * len(runs)), squeeze=False)
    colors = {"attention": "tab:blue", "comm": "tab:orange", "wait": "lightgray"}
    colors["expert"] = "tab:green"
    order = {"attention": 0, "comm": 1, "wait": 2, "expert": 3}
    for ax, (title, r, evs) in zip(axes[:, 0], runs, strict=True):
        t0 = min(e[2] for e in evs)
        lanes = sorted({(e[0], e[4]) for e in evs}, key=lambda x: (x[1], order.get(x[0], 9)))
        for y, (lane, rank) in enumerate(lanes):
            mine = [e for e in evs if (e[0], e[4]) == (lane, rank)]
            spans = [((e[2] - t0) / 1e6, (e[3] - e[2]) / 1e6) for e in mine]
            ax.broken_barh(spans, (y - 0.4, 0.8), color=colors.get(lane, "gray"))
        ax.set_yticks(range(len(lanes)), [f"{lane} r{rank}" for lane, rank in lanes])
        k = r["num_scheduler_steps"]
        what = "one decode step" if k == 1 else f"one scheduling step ({k} decode steps)"
        ax.set_title(f"{title}: {what}, {r['decode_tokens_per_s']:.0f} tok/s")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- the planner's check: a colocated baseline and predicted figures beside the measured ------


def add_planner_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        default=None,
        help="an afd profile JSON of this machine: print predicted tok/s beside every row",
    )
    p.add_argument(
        "--no-colocated",
        action="store_true",
        help="skip the colocated baseline (the same batch in the single-process engine)",
    )


def measure_colocated(model: str, args, ks: list[int], longest: int) -> list[dict]:
    """The single-process engine on the same model, batch and contexts, with every core: one
    row per K, steps taken in turns as the disaggregated variants were."""
    from afd.entrypoints.llm import LLM
    from afd.sampling.params import SamplingParams

    total = args.batch_size * args.num_attention_workers
    block_size = 16
    llm = LLM(
        model,
        dtype=args.dtype,
        device=args.device,
        num_scheduler_steps=max(ks),
        max_num_seqs=total,
        block_size=block_size,
        num_kv_blocks=total * -(-longest // block_size) + 8,
        max_num_batched_tokens=max(512, total * args.context_len),
    )
    try:
        eng = llm.engine
        _prefill_batch(eng, total, args.context_len, SamplingParams)
        walls: dict[int, list[float]] = {k: [] for k in ks}
        # as many decode steps per round as the disaggregated variants took: same contexts
        for rnd in range(args.warmup_rounds + args.rounds):
            for k in ks:
                _set_k(eng, k)
                for _ in range(args.max_micro_batches):
                    t0 = time.perf_counter()
                    eng.step()
                    if rnd >= args.warmup_rounds:
                        walls[k].append(time.perf_counter() - t0)
    finally:
        llm.shutdown()
    return [
        {
            "num_scheduler_steps": k,
            "step_time_s": statistics.mean(walls[k]) / k,
            "decode_tokens_per_s": total / (statistics.mean(walls[k]) / k),
        }
        for k in ks
    ]


def measured_context(args, ks: list[int]) -> float:
    """Mean KV length of a sequence over the measured steps (prompt, first token, then every
    decode step of every earlier variant and round)."""
    per_round = sum(ks) * args.max_micro_batches
    return args.context_len + 1 + per_round * (args.warmup_rounds + args.rounds / 2)


def add_predictions(result: dict, args, ks: list[int]) -> None:
    """The step model's tok/s for every measured row (and the colocated rows), from --profile."""
    from afd.scheduler.planner.profiler import MeasuredCosts
    from afd.scheduler.planner.step_model import StepConfig, predict

    costs = MeasuredCosts.load(args.profile)
    context = measured_context(args, ks)
    a, f = args.num_attention_workers, args.num_expert_workers
    rows = [(r, "afd") for r in result["runs"]]
    rows += [(r, "colocated") for r in result.get("colocated", [])]
    for r, kind in rows:
        cfg = StepConfig(
            kind=kind,
            attention_workers=a if kind == "afd" else 1,
            expert_workers=f,
            micro_batches=r.get("m", 1),
            scheduler_steps=r["num_scheduler_steps"],
            batch=args.batch_size * (a if kind == "colocated" else 1),
            context=context,
        )
        pred = predict(costs, cfg)
        r["predicted"] = {
            "decode_tokens_per_s": pred.decode_tokens_per_s,
            "step_time_s": pred.step_time_s,
            "stages_s": pred.stages_s,
            "bubble_fraction": pred.bubble_fraction,
            "context": context,
        }
        r["prediction_error"] = pred.decode_tokens_per_s / r["decode_tokens_per_s"] - 1.0
    result["profile"] = str(args.profile)


def print_predictions(result: dict) -> None:
    rows = [(f"{r['num_scheduler_steps']:>2} {r['m']:>2}", r) for r in result["runs"]]
    rows += [(f"{r['num_scheduler_steps']:>2}  colocated", r) for r in result.get("colocated", [])]
    if not result.get("colocated") and "profile" not in result:
        return
    print(f"{' K  m':>13} {'tok/s':>9} {'predicted':>9} {'error':>7}")
    for label, r in rows:
        pred = r.get("predicted")
        extra = (
            f"{pred['decode_tokens_per_s']:>9.1f} {r['prediction_error']:>+7.0%}" if pred else ""
        )
        print(f"{label:>13} {r['decode_tokens_per_s']:>9.1f} {extra}")
