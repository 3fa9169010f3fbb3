"""`afd` command line: generate, launch, bench, profile, plan."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from afd.comm.dispatch import DISPATCH_DTYPES, transport_names
from afd.config import DTYPES, EngineConfig
from afd.quantization import QUANTIZATION_MODES


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine (names as in vLLM / SGLang)."""
    p.add_argument("--model", default="tiny-qwen3-moe", help="HF model dir or built-in name")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-mb", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument(
        "--num-prefill-workers",
        type=int,
        default=0,
        help="prefill pool size (0: attention workers prefill too)",
    )
    p.add_argument(
        "--num-attention-workers",
        type=int,
        default=0,
        help="0 runs the whole model in this process",
    )
    p.add_argument("--num-expert-workers", type=int, default=0)
    p.add_argument("--num-micro-batches", type=int, default=1)
    p.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=1,
        help="decode steps per scheduling step (workers feed sampled tokens back themselves)",
    )
    p.add_argument("--comm-backend", default="auto", choices=transport_names())
    p.add_argument(
        "--quantization",
        default="auto",
        choices=QUANTIZATION_MODES,
        help="fp8: keep (or make) block-FP8 weights; none: dequantize FP8 checkpoints while "
        "loading; auto: FP8 checkpoints stay FP8 on CUDA, are dequantized on CPU",
    )
    p.add_argument(
        "--dispatch-dtype",
        default="auto",
        choices=DISPATCH_DTYPES,
        help="A->F activations: the compute dtype (auto) or e4m3 + a float32 scale per 128 "
        "channels (fp8); combine stays in the compute dtype",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=None,
        help="GPUs a node's workers share, several workers per GPU when fewer than workers "
        "(default: one GPU per worker)",
    )
    p.add_argument(
        "--max-worker-restarts",
        type=int,
        default=5,
        help="replacements of dead or hung workers allowed per node within --restart-window-s; "
        "past that the service stops (HTTP 503, exit code 1)",
    )
    p.add_argument("--restart-window-s", type=float, default=600.0)
    p.add_argument(
        "--worker-timeout-s",
        type=float,
        default=60.0,
        help="a worker without progress (or heartbeat) this long is killed and replaced",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    for name in (
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "num_micro_batches",
        "num_scheduler_steps",
    ):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.num_attention_workers, args.num_expert_workers, args.num_prefill_workers) < 0:
        raise CLIError("worker counts must be >= 0")
    if args.num_prefill_workers and not args.num_attention_workers:
        raise CLIError("--num-prefill-workers needs attention and expert workers")
    if args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise CLIError("--gpus-per-node must be at least 1")
    if (args.num_attention_workers > 0) != (args.num_expert_workers > 0):
        raise CLIError("--num-attention-workers and --num-expert-workers go together (both > 0)")
    if args.max_worker_restarts < 0:
        raise CLIError("--max-worker-restarts must be >= 0")
    for name in ("restart_window_s", "worker_timeout_s"):
        value = getattr(args, name)
        if not 0 < value < 1e9:  # also NaN and inf
            raise CLIError(f"--{name.replace('_', '-')} must be a positive number of seconds")
    return EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_mb=args.kv_cache_memory_mb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching,
        kernel_backend=args.kernel_backend,
        num_prefill_workers=args.num_prefill_workers,
        num_attention_workers=args.num_attention_workers,
        num_expert_workers=args.num_expert_workers,
        num_micro_batches=args.num_micro_batches,
        num_scheduler_steps=args.num_scheduler_steps,
        comm_backend=args.comm_backend,
        quantization=args.quantization,
        dispatch_dtype=args.dispatch_dtype,
        gpus_per_node=args.gpus_per_node,
        max_worker_restarts=args.max_worker_restarts,
        restart_window_s=args.restart_window_s,
        worker_timeout_s=args.worker_timeout_s,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from afd.entrypoints.llm import LLM
    from afd.sampling.params import SamplingParams

    config = engine_config_from_args(args)
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_tokens=args.max_tokens,
            seed=args.seed,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    llm = LLM(**{k: getattr(config, k) for k in config.__dataclass_fields__ if k != "extra"})
    try:
        if args.chat:
            conversations = [[{"role": "user", "content": p}] for p in args.prompt]
            outs = llm.chat(conversations, params, use_tqdm=False)
        else:
            outs = llm.generate(args.prompt, params, use_tqdm=False)
        for out in outs:
            print(out.outputs[0].text)
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="+")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in _BENCHES.items():
        if importlib.util.find_spec(f"afd.benchmarks.{module}") is None:
            continue
        b = bench_sub.add_parser(name, help=f"{name} benchmark")
        _bench_module(module).add_arguments(b)
        b.set_defaults(func=_bench_module(module).run)

    _add_launch(sub)
    _add_profile(sub)
    _add_plan(sub)
    return parser


_BENCHES = {"kernels": "kernels", "pipeline": "pipeline", "serve": "serve", "chaos": "chaos"}


def _bench_module(name: str):
    return importlib.import_module(f"afd.benchmarks.{name}")


def _add_launch(sub) -> None:
    try:
        from afd.entrypoints.launch import add_arguments, run
    except ImportError:
        return
    p = sub.add_parser("launch", help="start a local AFD cluster serving the OpenAI API")
    add_arguments(p)
    p.set_defaults(func=run)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine on a model's layers (for afd plan)")
    p.add_argument("--model", default="tiny-qwen3-moe", help="model dir, built-in or bench name")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--comm-backend", default="auto", choices=transport_names())
    p.add_argument("--quick", action="store_true", help="fewer points (seconds, for a smoke test)")
    p.add_argument("--output", default=None, help="profile JSON (default: benchmarks/results/...)")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from afd.benchmarks.results import write_result
    from afd.scheduler.profiler import run_profile

    profile = run_profile(args.model, args.device, args.comm_backend, args.dtype, args.quick)
    name = "profile-" + "".join(c if c.isalnum() else "-" for c in str(args.model))[-60:]
    out = write_result(name, profile, device=args.device, path=args.output)
    fits = profile["fits"]
    print(
        f"afd profile: {profile['model']} on {profile['cores']} cores, "
        f"{profile['profile_seconds']:.0f} s; transport {profile['comm_backend']}; "
        f"interference attention x{profile['interference']['attention']:.2f}, "
        f"expert x{profile['interference']['expert']:.2f}"
    )
    for key, f in fits.items():
        terms = " + ".join(f"{c:.3g}*{n}" for c, n in zip(f["coef"], f["features"], strict=True))
        print(f"  {key:18s} {terms}  (max error {f['max_rel_error']:.0%})")
    print(f"wrote {out}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1 or value > 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1..{1 << 20}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _efficiency(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--efficiency takes NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--efficiency {name}: {value!r} is not a number"
        ) from None
    return name, number


def _add_plan(sub) -> None:
    from afd.scheduler.hardware import DTYPE_BYTES, PRESETS

    p = sub.add_parser(
        "plan", help="predict every topology and pick P, A, F, m, K and batch under SLOs"
    )
    p.add_argument(
        "--model",
        default="tiny-qwen3-moe",
        help="model dir, built-in, bench or published name (deepseek-v3, step3)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", default=None, help="an afd profile JSON of this machine")
    src.add_argument(
        "--hardware",
        default=None,
        type=str.upper,
        choices=list(PRESETS),
        help="a GPU preset instead of a profile",
    )
    p.add_argument("--weight-dtype", default="bf16", choices=list(DTYPE_BYTES))
    p.add_argument("--kv-dtype", default="bf16", choices=list(DTYPE_BYTES))
    p.add_argument(
        "--efficiency",
        action="append",
        type=_efficiency,
        default=[],
        help="override a preset efficiency, NAME=VALUE (docs/planner.md)",
    )
    p.add_argument("--calibrate", default=None, help="afd bench kernels JSON from that GPU")
    p.add_argument(
        "--price-per-hour",
        type=_positive_float,
        default=None,
        help="per GPU (preset: its list price) or per CPU core (1.0)",
    )
    p.add_argument("--input-len", type=_positive_int, default=256)
    p.add_argument("--output-len", type=_positive_int, default=256)
    p.add_argument("--request-rate", type=_positive_float, default=None, help="requests/s")
    p.add_argument("--ttft-ms", type=_positive_float, default=1000.0)
    p.add_argument("--tpot-ms", type=_positive_float, default=100.0)
    p.add_argument(
        "--max-workers",
        type=_positive_int,
        default=None,
        help="GPUs, or worker processes on a CPU (default: 8 GPUs / the cores)",
    )
    p.add_argument("--objective", default="throughput", choices=["throughput", "cost"])
    p.add_argument("--ep", action="store_true", help="GPUs: also rank colocated EP deployments")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--output", default=None, help="write the best plan as a cluster YAML")
    p.add_argument("--frontier", default=None, help="write the throughput-vs-TPOT PNG here")
    p.add_argument(
        "--predict",
        action="store_true",
        help="predict the one configuration given by the flags below",
    )
    p.add_argument("--num-attention-workers", type=int, default=1, help="0: colocated engine")
    p.add_argument("--num-expert-workers", type=int, default=1)
    p.add_argument("--num-prefill-workers", type=int, default=0)
    p.add_argument("--num-micro-batches", type=_positive_int, default=1)
    p.add_argument("--num-scheduler-steps", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="per attention worker")
    p.add_argument("--context-len", type=_positive_float, default=256.0, help="mean KV length")
    p.add_argument(
        "--published",
        action="store_true",
        help="reproduce the published operating points (docs/planner.md)",
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    import math
    from pathlib import Path

    from afd.scheduler import planner

    if args.published:
        return _plan_published(args)
    if args.profile is None and args.hardware is None:
        raise CLIError("give --profile PROFILE.json (from afd profile) or --hardware NAME")
    a, f = args.num_attention_workers, args.num_expert_workers
    costs = planner.load_costs(
        args.profile,
        args.hardware,
        args.model,
        args.weight_dtype,
        args.kv_dtype,
        dict(args.efficiency),
        args.calibrate,
        workers=(a + f) if args.predict else (args.max_workers or 8),
    )
    if args.predict:
        from afd.scheduler.step_model import StepConfig, predict

        if a < 0 or f < 0 or args.num_prefill_workers < 0:
            raise CLIError("worker counts must be >= 0")
        kind = "colocated" if a == 0 else "afd"
        if kind == "afd" and f < 1:
            raise CLIError("--num-attention-workers and --num-expert-workers go together")
        cfg = StepConfig(
            kind=kind,
            attention_workers=max(1, a),
            expert_workers=f,
            micro_batches=args.num_micro_batches,
            scheduler_steps=args.num_scheduler_steps,
            batch=args.batch_size,
            context=args.context_len,
            prefill_workers=args.num_prefill_workers,
        )
        pred = predict(costs, cfg)
        if args.json:
            print(json.dumps(pred.to_dict(), indent=2))
        else:
            print(
                f"{cfg.label()} m={cfg.micro_batches} K={cfg.scheduler_steps} batch="
                f"{cfg.batch} context={cfg.context:g}: step {pred.step_time_s * 1e3:.2f} ms, "
                f"{pred.decode_tokens_per_s:.0f} tok/s, TPOT {pred.tpot_ms:.2f} ms; "
                f"bottleneck {pred.bottleneck}"
            )
            stages = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in pred.stages_s.items())
            bubbles = ", ".join(f"{k} {v:.2f}" for k, v in pred.bubble_fraction.items())
            print(f"  stages (ms per step, one worker): {stages}")
            print(
                f"  bubbles: {bubbles}; exposed comm {pred.exposed_comm_s * 1e3:.2f} ms"
                + (f"; {'; '.join(pred.notes)}" if pred.notes else "")
            )
        return 0
    max_workers = args.max_workers or (costs.cores if costs.device == "cpu" else 8)
    price = args.price_per_hour
    if price is None:
        price = costs.hw.price_per_hour if args.hardware else 1.0
    kinds = ("colocated", "afd", "ep") if args.ep else ("colocated", "afd")
    req = planner.PlanRequest(
        input_len=args.input_len,
        output_len=args.output_len,
        ttft_ms=args.ttft_ms,
        tpot_ms=args.tpot_ms,
        max_workers=max_workers,
        request_rate=args.request_rate,
        objective=args.objective,
        price_per_hour=price,
        kinds=kinds,
    )
    cands = planner.search(costs, req)
    if not cands:
        raise CLIError("no configuration fits in memory; use more workers or a smaller batch")
    best = next((c for c in cands if c.meets_slo and c.config.kind != "ep"), None)
    if args.json:

        def clean(row):
            return {
                k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()
            }

        print(
            json.dumps(
                {
                    "best": clean(best.row()) if best else None,
                    "candidates": [clean(c.row()) for c in cands],
                },
                indent=2,
            )
        )
    else:
        print(planner.format_table(cands))
        if best is None:
            print("afd plan: no configuration meets the SLOs; the table ranks the closest")
        else:
            c = best.config
            if c.kind == "colocated":
                print("afd plan: the colocated engine (no disaggregation) wins here")
            else:
                print(
                    f"afd plan: {c.label()} with m={c.micro_batches}, K={c.scheduler_steps}, "
                    f"batch {c.batch} per attention worker, {c.prefill_workers} prefill "
                    f"worker(s)"
                )
    if args.output:
        if best is None:
            raise CLIError("no configuration meets the SLOs: no plan YAML written")
        device = "cpu" if args.profile else "cuda"
        extra = {} if args.hardware is None else {"dtype": "bfloat16"}
        text = planner.cluster_yaml(best, args.model, req, device, extra)
        planner.write_outputs(Path(args.output), text)
        print(f"wrote {args.output}")
    if args.frontier:
        planner.frontier_png(cands, best, req, args.frontier)
        print(f"wrote {args.frontier}")
    return 0


def _plan_published(args) -> int:
    import json

    from afd.benchmarks.results import write_result
    from afd.scheduler.published import reproduce

    rows = reproduce()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            f"{'operating point':48s} {'GPUs':>4} {'published':>9} {'predicted':>9} "
            f"{'residual':>8} {'step ms':>13}"
        )
        for r in rows:
            print(
                f"{r['name']:48s} {r['gpus']:>4} {r['published_tokens_per_s_per_gpu']:>9.0f} "
                f"{r['predicted_tokens_per_s_per_gpu']:>9.0f} {r['residual']:>+8.0%} "
                f"{r['published_step_ms']:>5.1f} / {r['predicted_step_ms']:>5.1f}"
            )
    if args.output:
        out = write_result("planner-published", {"points": rows}, path=args.output)
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "launch":
            from afd.entrypoints.launch import apply_config_file

            launch = parser._subparsers._group_actions[0].choices["launch"]
            apply_config_file(launch, argv[1:])
        args = parser.parse_args(argv)
        args.command_argv = list(argv)  # what benchmarks record as the command they ran
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"afd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
