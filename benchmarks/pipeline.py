"""`afd bench pipeline`: decode steps on a disaggregated topology for m = 1..k micro-batches in
one run; per-stage times, bubbles, exposed communication, balance, tokens/s, timeline, trace."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from afd.comm.dispatch import DISPATCH_DTYPES, transport_names

BENCH_MODEL = "bench-balanced-moe"
# Shaped so that on CPU the attention side (projections + paged attention over ~32-64 tokens)
# and the expert side (top-2 of 4 experts) take about the same time per token. Eight layers:
# filling and draining the ping-pong costs about one layer of one side per step.
BENCH_SHAPE = dict(
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    num_hidden_layers=8,
    mlp_only_layers=[],
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=768,
    intermediate_size=512,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=BENCH_MODEL, help=f"model dir, built-in name or {BENCH_MODEL}"
    )
    p.add_argument("--num-attention-workers", type=int, default=1)
    p.add_argument("--num-expert-workers", type=int, default=1)
    p.add_argument("--max-micro-batches", type=int, default=2, help="measure m = 1..this")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--context-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="measured decode steps per m (rounded up to whole scheduling steps)",
    )
    p.add_argument("--warmup", type=int, default=3, help="decode steps per m before measuring")
    p.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=1,
        help="decode steps per scheduling step (the pipeline runs on across them)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--comm-backend", default="auto", choices=transport_names())
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
    p.add_argument("--output-dir", default="results/pipeline", help="JSON, PNG and trace go here")


def bench_model_path():
    from afd.builtin import cache_dir
    from afd.models.tiny import build_tiny_checkpoint

    path = cache_dir() / "models" / f"{BENCH_MODEL}-v5"
    if not (path / "config.json").is_file():
        from afd.builtin import VOCAB_SIZE
        from afd.tokenizer import train_bytelevel_bpe

        train_bytelevel_bpe(path, VOCAB_SIZE)
        build_tiny_checkpoint("qwen3-moe", path, seed=0, vocab_size=VOCAB_SIZE, **BENCH_SHAPE)
    return path


def run(args: argparse.Namespace) -> int:
    from afd.benchmarks.results import write_result

    from afd import LLM, SamplingParams

    for name in (
        "num_attention_workers",
        "num_expert_workers",
        "max_micro_batches",
        "batch_size",
        "context_len",
        "steps",
        "num_scheduler_steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be at least 0")
    model = str(bench_model_path()) if args.model == BENCH_MODEL else args.model
    # room for every sequence until the last measured step: a preempted sequence would make
    # the steps it misses cheaper and its recompute dearer
    k = args.num_scheduler_steps
    # whole scheduling steps of k decode steps each: the contexts grow as much as with k = 1
    args.warmup_plans, args.plans = -(-args.warmup // k), -(-args.steps // k)
    longest = args.context_len + (args.warmup_plans + args.plans) * args.max_micro_batches * k + 2
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
        num_scheduler_steps=k,
        max_num_seqs=args.batch_size * args.num_attention_workers,
        block_size=block_size,
        num_kv_blocks=args.batch_size * -(-longest // block_size) + 8,
        max_num_batched_tokens=max(512, args.batch_size * args.context_len),
    )
    try:
        result = measure(llm, args, SamplingParams)
    finally:
        llm.shutdown()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_result("pipeline", result, device=args.device, path=out / "pipeline.json")
    write_chrome_trace(result, out / "pipeline_trace.json")
    write_timeline_png(result, out / "pipeline_timeline.png")
    print_table(result)
    print(
        f"wrote {out / 'pipeline.json'}, {out / 'pipeline_timeline.png'}, "
        f"{out / 'pipeline_trace.json'}"
    )
    return 0


def measure(llm, args, SamplingParams) -> dict:
    import torch

    eng, ex = llm.engine, llm.engine.executor
    g = torch.Generator().manual_seed(0)
    vocab = eng.model_config.vocab_size
    total = args.batch_size * args.num_attention_workers
    params = SamplingParams(temperature=0, max_tokens=1_000_000, ignore_eos=True)
    for _ in range(total):
        prompt = torch.randint(3, vocab, (args.context_len,), generator=g).tolist()
        eng.add_request(prompt, params, stream=False)
    # Prefill everything so that every measured step is a pure decode step of the whole batch.
    while any(s.num_waiting for s in eng.schedulers) or any(
        seq.num_output_tokens == 0 for s in eng.schedulers for seq in s.running
    ):
        eng.step()
    # Steps take turns over m = 1, 2, ..., k: every m sees the same context lengths (attention
    # cost grows with them) and the same slow drifts of the machine.
    ms = list(range(1, args.max_micro_batches + 1))
    walls = {m: [] for m in ms}
    stage_sums = {m: {} for m in ms}
    events: dict[int, list] = {}
    loads = {m: [] for m in ms}
    wire = {m: {} for m in ms}
    for i in range((args.warmup_plans + args.plans) * len(ms)):
        m = ms[i % len(ms)]
        measured = i >= args.warmup_plans * len(ms)
        ex.num_micro_batches = m
        ex.trace = measured and i >= (args.warmup_plans + args.plans - 1) * len(ms)
        t0 = time.perf_counter()
        eng.step()
        wall = time.perf_counter() - t0
        if not measured:
            continue
        running = sum(len(s.running) for s in eng.schedulers)
        if running != total or ex.last_num_steps != args.num_scheduler_steps:
            raise RuntimeError(
                f"{running} of {total} sequences ran {ex.last_num_steps} decode steps in a "
                f"scheduling step, not {args.num_scheduler_steps}"
            )
        walls[m].append(wall)
        for k, v in ex.last_times.items():
            stage_sums[m][k] = stage_sums[m].get(k, 0.0) + v
        loads[m].append(ex.last_load)
        for key, v in ex.last_wire.items():
            wire[m][key] = wire[m].get(key, 0) + v
        if ex.trace:
            events[m] = ex.last_events
    ex.trace = False
    runs = [
        summarise(m, walls[m], stage_sums[m], events.get(m), loads[m], wire[m], total, args)
        for m in ms
    ]
    base = runs[0]["decode_tokens_per_s"]
    for r in runs:
        r["speedup_vs_m1"] = r["decode_tokens_per_s"] / base
    return {
        "topology": {
            "attention_workers": args.num_attention_workers,
            "expert_workers": args.num_expert_workers,
        },
        "batch_size_per_attention_worker": args.batch_size,
        "context_len": args.context_len,
        "decode_steps": args.plans * args.num_scheduler_steps,
        "num_scheduler_steps": args.num_scheduler_steps,
        "dispatch_dtype": args.dispatch_dtype,
        "dtype": args.dtype,
        "device": device_name(args.device),
        "model": args.model,
        "runs": runs,
    }


def summarise(m, walls, stage_sums, events, loads, wire, total, args) -> dict:
    """Times, loads and data-plane bytes per decode step (a scheduling step runs
    num_scheduler_steps of them)."""
    k = args.num_scheduler_steps
    steps = len(walls) * k
    step_s = statistics.mean(walls) / k
    per_step = {name: v / steps for name, v in stage_sums.items()}
    a, f = args.num_attention_workers, args.num_expert_workers
    attn = per_step.get("attention", 0.0) / a
    combine_wait = per_step.get("combine_wait", 0.0) / a
    expert = per_step.get("expert", 0.0) / f
    expert_idle = per_step.get("expert_recv_wait", 0.0) / f
    per_expert = (
        [sum(col) for col in zip(*[x for step in loads for x in step], strict=False)]
        if loads
        else []
    )
    flat = [c / k for step in loads for shard in step for c in shard]
    return {
        "m": m,
        "step_time_s": step_s,
        "step_time_median_s": statistics.median(walls) / k,
        "scheduling_step_times_s": walls,
        "decode_tokens_per_s": total / step_s,
        "stage_time_per_step_s": {
            "attention": attn,
            "dispatch": per_step.get("dispatch", 0.0) / a,
            "combine_wait": combine_wait,
            "expert": expert,
            "expert_recv_wait": expert_idle,
            "expert_send": per_step.get("expert_send", 0.0) / f,
        },
        "bubble_fraction": {"attention": combine_wait / step_s, "expert": expert_idle / step_s},
        "exposed_comm_ratio": combine_wait / step_s,
        "attention_expert_balance": attn / expert if expert else None,
        "expert_load": {
            "mean_tokens_per_expert_step": statistics.mean(flat) if flat else 0,
            "max_tokens_per_expert_step": max(flat) if flat else 0,
            "total_per_expert": per_expert,
        },
        # bytes every attention worker together put on the wire (A->F) and got back (F->A)
        "wire_bytes_per_step": {key: v / steps for key, v in sorted(wire.items())},
        "events": events or [],
    }


def device_name(device: str) -> str:
    import platform

    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def print_table(result: dict) -> None:
    head = (
        f"{'m':>2} {'tok/s':>9} {'speedup':>8} {'step ms':>8} {'attn ms':>8} {'expert ms':>9} "
        f"{'wait ms':>8} {'bubble A':>8} {'bubble F':>8} {'A/F':>5} {'A->F MB':>8} {'F->A MB':>8}"
    )
    print(head)
    for r in result["runs"]:
        s = r["stage_time_per_step_s"]
        bal = r["attention_expert_balance"] or 0
        wb = r["wire_bytes_per_step"]
        print(
            f"{r['m']:>2} {r['decode_tokens_per_s']:>9.1f} {r['speedup_vs_m1']:>7.2f}x "
            f"{r['step_time_s'] * 1e3:>8.1f} {s['attention'] * 1e3:>8.1f} "
            f"{s['expert'] * 1e3:>9.1f} "
            f"{s['combine_wait'] * 1e3:>8.1f} {r['bubble_fraction']['attention']:>8.2f} "
            f"{r['bubble_fraction']['expert']:>8.2f} {bal:>5.2f} "
            f"{wb.get('dispatch', 0) / 1e6:>8.3f} {wb.get('combine', 0) / 1e6:>8.3f}"
        )


def write_chrome_trace(result: dict, path: Path) -> None:
    trace = []
    for _pid, r in enumerate(result["runs"]):
        if not r["events"]:
            continue
        t0 = min(e[2] for e in r["events"])
        for lane, name, start, end, rank in r["events"]:
            trace.append(
                {
                    "name": name,
                    "ph": "X",
                    "pid": f"m={r['m']}",
                    "tid": f"{lane} rank {rank}",
                    "ts": (start - t0) / 1e3,
                    "dur": (end - start) / 1e3,
                }
            )
    path.write_text(json.dumps({"traceEvents": trace}))


def write_timeline_png(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if r["events"]]
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 2.2 * len(runs)), squeeze=False)
    colors = {"attention": "tab:blue", "comm": "tab:orange", "expert": "tab:green"}
    for ax, r in zip(axes[:, 0], runs, strict=True):
        t0 = min(e[2] for e in r["events"])
        lanes = sorted({(e[0], e[4]) for e in r["events"]}, key=lambda x: (x[0] != "attention", x))
        for y, (lane, rank) in enumerate(lanes):
            spans = [
                ((e[2] - t0) / 1e6, (e[3] - e[2]) / 1e6)
                for e in r["events"]
                if (e[0], e[4]) == (lane, rank)
            ]
            ax.broken_barh(spans, (y - 0.4, 0.8), color=colors.get(lane, "gray"))
        ax.set_yticks(range(len(lanes)), [f"{lane} r{rank}" for lane, rank in lanes])
        k = result["num_scheduler_steps"]
        what = "one decode step" if k == 1 else f"one scheduling step ({k} decode steps)"
        ax.set_title(f"m = {r['m']}: {what}, {r['decode_tokens_per_s']:.0f} tok/s")
        ax.set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
