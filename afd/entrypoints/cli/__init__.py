"""`afd` command line: generate, launch, bench, profile, plan."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from afd.config import (
    DTYPES,
    WORKER_POOLS,
    ClusterConfig,
    ModelSource,
    resolve_worker_counts,
    worker_count_error,
)
from afd.entrypoints.flags import (
    ArgumentParser,
    CLIError,
    add_engine_args,
    add_flags,
    engine_config_from_args,
    flag_values,
)
from afd.results import add_allow_dirty

# vLLM flags AFD cannot honour, and why: an error naming the flag, never a silent ignore
# (README "`afd serve` and `vllm serve`" lists these beside the ones AFD shares)
VLLM_FLAGS_NOT_HONOURED = {
    "--tensor-parallel-size": "AFD splits a model into attention and expert workers "
    "(--num-attention-workers, --num-expert-workers) instead of tensor parallelism",
    "-tp": "see --tensor-parallel-size",
    "--pipeline-parallel-size": "AFD pipelines micro-batches between attention and expert "
    "workers (--num-micro-batches), not layers between GPUs",
    "-pp": "see --pipeline-parallel-size",
    "--data-parallel-size": "attention workers are AFD's data-parallel replicas "
    "(--num-attention-workers)",
    "-dp": "see --data-parallel-size",
    "--enable-expert-parallel": "expert workers always hold disjoint expert shards "
    "(--num-expert-workers)",
    "--kv-cache-dtype": "the KV cache is kept in the model's dtype",
    "--cpu-offload-gb": "weights are never offloaded",
    "--swap-space": "preempted sequences are recomputed, never swapped",
    "--enable-lora": "LoRA adapters are not supported",
    "--lora-modules": "LoRA adapters are not supported",
    "--load-format": "AFD loads safetensors checkpoints only",
    "--tokenizer-mode": "AFD reads tokenizer.json (Hugging Face tokenizers) only",
    "--enable-auto-tool-choice": "tool calling is not supported",
    "--tool-call-parser": "tool calling is not supported",
    "--reasoning-parser": "reasoning parsers are not supported",
    "--guided-decoding-backend": "structured outputs always use xgrammar",
    "--structured-outputs-config": "structured outputs always use xgrammar",
    "--hf-overrides": "the model's config.json is used as it is",
    "--rope-scaling": "the model's config.json is used as it is",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--ssl-keyfile": "serve TLS through a reverse proxy",
    "--ssl-certfile": "serve TLS through a reverse proxy",
    "--root-path": "serve under a path prefix through a reverse proxy",
    "--allowed-origins": "CORS is not served; use a reverse proxy",
    "--enable-chunked-prefill": "AFD always chunks prefills by --max-num-batched-tokens",
    "--no-enable-chunked-prefill": "AFD always chunks prefills by --max-num-batched-tokens",
    "--enable-log-requests": "requests are logged unless --disable-log-requests",
    "--max-logprobs": "logprobs are bounded at 20 alternatives",
    "--scheduling-policy": "scheduling is first come, first served",
    "--generation-config": "sampling defaults are vLLM's, not the model's generation_config",
}


def _check_unknown(extra: list[str]) -> None:
    """Leftover arguments: a vLLM flag AFD cannot honour says why; anything else is unknown."""
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if flag in VLLM_FLAGS_NOT_HONOURED:
            raise CLIError(f"{flag} cannot be honoured: {VLLM_FLAGS_NOT_HONOURED[flag]}")
    raise CLIError(f"unrecognized arguments: {' '.join(extra)}")


def int_range(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} must be {lo}..{hi}")
        return value

    return parse


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
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        raise CLIError(str(e)) from e
    llm = LLM(**config.flat())
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


def version() -> str:
    from afd.version import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="afd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"afd {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one or more prompts")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="+", help="prompt texts, one completion each")
    gen.add_argument("--max-tokens", type=int, default=32, help="output tokens per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 samples greedily")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k limit")
    gen.add_argument("--ignore-eos", action="store_true", help="generate past EOS tokens")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    # the benchmark modules import torch (~2 s): only `afd bench` (or a whole parser) loads them
    for name, module in _BENCHES.items() if command in (None, "bench") else ():
        if importlib.util.find_spec(f"afd.benchmarks.{module}") is None:
            continue
        b = bench_sub.add_parser(name, help=f"{name} benchmark")
        _bench_module(module).add_arguments(b)
        add_allow_dirty(b)
        b.set_defaults(func=_bench_module(module).run)

    _add_serve(sub)
    _add_profile(sub)
    _add_plan(sub)
    return parser


_BENCHES = {"kernels": "kernels", "pipeline": "pipeline", "serve": "serve", "chaos": "chaos"}
_BENCHES["peer"] = "peer"  # AFD against vLLM's CPU build (afd.benchmarks.peer)
_BENCHES["offline"] = "offline"  # LLM.generate, this checkout against a git revision
_BENCHES["steps"] = "profile_steps"  # where a colocated step's time goes, per component
_BENCHES["fuzz"] = "fuzz"  # schemathesis against a served model (afd.benchmarks.fuzz)
_BENCHES["spec"] = "spec"  # speculative decoding off and on, side by side (issue 21)
SERVE_COMMANDS = ("serve", "launch")  # launch: the name before vLLM's


def _bench_module(name: str):
    return importlib.import_module(f"afd.benchmarks.{name}")


def _add_serve(sub) -> None:
    from afd.entrypoints.launch import add_arguments, run

    p = sub.add_parser(
        "serve",
        aliases=["launch"],
        help="start a local AFD cluster serving the OpenAI API (afd launch: the same)",
        description="Start an AFD cluster serving the OpenAI API: `afd serve MODEL`, as "
        "`vllm serve MODEL`.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine on a model's layers (for afd plan)")
    add_flags(p, ModelSource, only=["model"], overrides=_PROFILE_FLAGS)
    add_flags(p, ClusterConfig, only=["device"], overrides=_PROFILE_FLAGS)
    add_flags(p, ModelSource, only=["dtype"], overrides=_PROFILE_FLAGS)
    add_flags(p, ClusterConfig, only=["comm_backend"], overrides=_PROFILE_FLAGS)
    p.add_argument("--quick", action="store_true", help="fewer points (seconds, for a smoke test)")
    p.add_argument("--output", default=None, help="profile JSON (default: benchmarks/results/...)")
    add_allow_dirty(p)
    p.set_defaults(func=cmd_profile)


# afd profile measures one compute dtype (no auto) of a model, bench names included
_PROFILE_FLAGS = {
    "model": {"help": "model dir, built-in or bench name"},
    "device": {"help": "device to measure"},
    "dtype": {"help": "compute dtype", "flag_default": "float32", "choices": tuple(DTYPES),
              "parse": None},
    "comm_backend": {"help": "transport to measure"},
}  # fmt: skip


def cmd_profile(args: argparse.Namespace) -> int:
    from afd.results import write_result
    from afd.scheduler.planner.profiler import run_profile

    ModelSource(**flag_values(ModelSource, args))  # the checks of every command's flags
    ClusterConfig(**flag_values(ClusterConfig, args))

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


_positive_int = int_range(1, 1 << 20)


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
    from afd.scheduler.planner.hardware import DTYPE_BYTES, PRESETS

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
    p.add_argument(
        "--weight-dtype", default="bf16", choices=list(DTYPE_BYTES), help="weights (GPU presets)"
    )
    p.add_argument(
        "--kv-dtype", default="bf16", choices=list(DTYPE_BYTES), help="KV cache (GPU presets)"
    )
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
    p.add_argument("--input-len", type=_positive_int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=_positive_int, default=256, help="output tokens")
    p.add_argument("--request-rate", type=_positive_float, default=None, help="requests/s")
    p.add_argument("--ttft-ms", type=_positive_float, default=1000.0, help="TTFT SLO")
    p.add_argument("--tpot-ms", type=_positive_float, default=100.0, help="TPOT SLO")
    p.add_argument(
        "--max-workers",
        type=_positive_int,
        default=None,
        help="GPUs, or worker processes on a CPU (default: 8 GPUs / the cores)",
    )
    p.add_argument(
        "--objective",
        default="throughput",
        choices=["throughput", "cost"],
        help="rank by tokens/s, or by cost per token",
    )
    p.add_argument("--ep", action="store_true", help="GPUs: also rank colocated EP deployments")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--output", default=None, help="write the best plan as a cluster YAML")
    p.add_argument("--frontier", default=None, help="write the throughput-vs-TPOT PNG here")
    p.add_argument(
        "--predict",
        action="store_true",
        help="predict the one configuration given by the flags below",
    )
    p.set_defaults(worker_defaults=dict(zip(WORKER_POOLS, (0, 1, 1), strict=True)))
    p.add_argument(
        "--num-attention-workers",
        type=int,
        default=None,
        help="with --predict; 0: the colocated engine, the other pools then default to 0 "
        "(default: 1)",
    )
    p.add_argument(
        "--num-expert-workers",
        type=int,
        default=None,
        help="with --predict (default: 1; 0 with --num-attention-workers 0)",
    )
    p.add_argument(
        "--num-prefill-workers", type=int, default=None, help="with --predict (default: 0)"
    )
    p.add_argument("--num-micro-batches", type=_positive_int, default=1, help="with --predict")
    p.add_argument("--num-scheduler-steps", type=_positive_int, default=1, help="with --predict")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="per attention worker")
    p.add_argument("--context-len", type=_positive_float, default=256.0, help="mean KV length")
    p.add_argument(
        "--published",
        action="store_true",
        help="reproduce the published operating points (docs/planner.md)",
    )
    add_allow_dirty(p)
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    """afd plan: predict one configuration, or search for the best and write its plan."""
    if args.published:
        return _plan_published(args)
    if args.profile is None and args.hardware is None:
        raise CLIError("give --profile PROFILE.json (from afd profile) or --hardware NAME")
    given = {name: getattr(args, name) for name in WORKER_POOLS}
    vars(args).update(resolve_worker_counts(given, args.worker_defaults))
    a, f = args.num_attention_workers, args.num_expert_workers
    error = worker_count_error(args.num_prefill_workers, a, f) if args.predict else None
    if error:
        raise CLIError(error)
    costs = _plan_costs(args, a, f)
    if args.predict:
        _plan_predict(args, costs, a, f)
        return 0
    req = _plan_request(args, costs)
    from afd.scheduler.planner import planner

    cands = planner.search(costs, req)
    if not cands:
        raise CLIError("no configuration fits in memory; use more workers or a smaller batch")
    best = next((c for c in cands if c.meets_slo and c.config.kind != "ep"), None)
    if args.json:
        _print_plan_json(cands, best)
    else:
        _print_plan_table(cands, best)
    _write_plan_outputs(args, cands, best, req)
    return 0


def _plan_costs(args: argparse.Namespace, a: int, f: int):
    """The cost model from --profile or --hardware, sized for the workers asked for."""
    from afd.scheduler.planner import planner

    return planner.load_costs(
        args.profile,
        args.hardware,
        args.model,
        args.weight_dtype,
        args.kv_dtype,
        dict(args.efficiency),
        args.calibrate,
        workers=(a + f) if args.predict else (args.max_workers or 8),
    )


def _plan_predict(args: argparse.Namespace, costs, a: int, f: int) -> None:
    """afd plan --predict: print one configuration's predicted step (text or JSON)."""
    import json

    from afd.scheduler.planner.step_model import StepConfig, predict

    kind = "colocated" if a == 0 else "afd"
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
        return
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


def _plan_request(args: argparse.Namespace, costs):
    """The search's request: SLOs, worker cap, price and the kinds to compare."""
    from afd.scheduler.planner import planner

    max_workers = args.max_workers or (costs.cores if costs.device == "cpu" else 8)
    price = args.price_per_hour
    if price is None:
        price = costs.hw.price_per_hour if args.hardware else 1.0
    kinds = ("colocated", "afd", "ep") if args.ep else ("colocated", "afd")
    return planner.PlanRequest(
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


def _print_plan_json(cands: list, best) -> None:
    """The best configuration and every candidate as JSON (infinities as null)."""
    import json
    import math

    def clean(row):
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}

    print(
        json.dumps(
            {
                "best": clean(best.row()) if best else None,
                "candidates": [clean(c.row()) for c in cands],
            },
            indent=2,
        )
    )


def _print_plan_table(cands: list, best) -> None:
    """The candidates' table and one line naming the winner."""
    from afd.scheduler.planner import planner

    print(planner.format_table(cands))
    if best is None:
        print("afd plan: no configuration meets the SLOs; the table ranks the closest")
        return
    c = best.config
    if c.kind == "colocated":
        print("afd plan: the colocated engine (no disaggregation) wins here")
    else:
        print(
            f"afd plan: {c.label()} with m={c.micro_batches}, K={c.scheduler_steps}, "
            f"batch {c.batch} per attention worker, {c.prefill_workers} prefill "
            f"worker(s)"
        )


def _write_plan_outputs(args: argparse.Namespace, cands: list, best, req) -> None:
    """--output (the winner's cluster YAML) and --frontier (the PNG), when asked for."""
    from pathlib import Path

    from afd.scheduler.planner import planner

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


def _plan_published(args) -> int:
    import json

    from afd.results import write_result
    from afd.scheduler.planner.published import reproduce

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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    try:
        if argv and argv[0] in SERVE_COMMANDS:
            from afd.entrypoints.launch import apply_config_file

            serve = parser._subparsers._group_actions[0].choices[argv[0]]
            apply_config_file(serve, argv[1:])
        args, extra = parser.parse_known_args(argv)
        if extra:
            _check_unknown(extra)
        args.command_argv = list(argv)  # what benchmarks record as the command they ran
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"afd: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
