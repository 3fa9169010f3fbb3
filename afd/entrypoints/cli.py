"""`afd` command line: generate, launch, bench."""

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
            outs = [llm.chat([{"role": "user", "content": p}], params) for p in args.prompt]
        else:
            outs = llm.generate(args.prompt, params)
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
    return parser


_BENCHES = {"kernels": "kernels", "pipeline": "pipeline", "serve": "serve"}


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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "launch":
            from afd.entrypoints.launch import apply_config_file

            launch = parser._subparsers._group_actions[0].choices["launch"]
            apply_config_file(launch, argv[1:])
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"afd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
