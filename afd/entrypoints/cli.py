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


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default (unless it says what happens without it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and "default:" not in text
            and action.default not in (None, argparse.SUPPRESS)
            and action.option_strings
            and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`afd: error: ...`, exit code 2) instead of the usage
    block; `--help` still prints everything."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(message)


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
    "--speculative-config": "speculative decoding is not supported",
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


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in (0, 1]")
    return value


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


_int64 = int_range(-(2**63), 2**63 - 1)


def _text(text: str) -> str:
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


# vLLM's dtype names, as it spells them too
DTYPE_ALIASES = {"half": "float16", "float": "float32"}


def _dtype(text: str) -> str:
    value = DTYPE_ALIASES.get(text, text)
    if value != "auto" and value not in DTYPES:
        choices = ", ".join(["auto", *DTYPES, *DTYPE_ALIASES])
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {choices})")
    return value


def add_engine_args(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Flags shared by every command that builds an engine (names as in vLLM / SGLang)."""
    if model_flag:
        p.add_argument(
            "--model",
            default="tiny-qwen3-moe",
            type=_text,
            help="a model directory, a built-in tiny model or a Hugging Face Hub id (org/name)",
        )
    p.add_argument(
        "--revision",
        default=None,
        type=_text,
        help="Hub revision (branch, tag or commit) of an org/name model (default: main)",
    )
    p.add_argument(
        "--download-dir",
        default=None,
        help="Hugging Face cache folder for Hub models (default: $HF_HOME/hub)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        type=_text,
        help="another tokenizer: a directory or Hub id with tokenizer.json (default: the model's)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        type=_text,
        help="a chat template: a Jinja file or the template text (default: the tokenizer's)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM compatibility; AFD never executes a model's own code",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        type=_dtype,
        help="weights and activations: auto (the checkpoint's; float32 for float16 on CPU), "
        "float32, bfloat16, float16 (vLLM's half and float too)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where workers run")
    p.add_argument("--seed", type=_int64, default=None,
                   help="seed of requests that give none: each gets one derived from this and "
                   "its arrival order, so a run repeats (default: unseeded)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--num-kv-blocks",
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="KV-cache blocks per cache (default: from --gpu-memory-utilization or "
        "--kv-cache-memory-mb)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=_fraction,
        default=None,
        help="fraction of memory for weights + KV cache: of each GPU, or on CPU of the RAM "
        "available at start (all workers together); sizes the KV cache (default: "
        "--kv-cache-memory-mb)",
    )
    p.add_argument(
        "--kv-cache-memory-mb",
        type=int,
        default=256,
        help="KV-cache size per cache, unless --num-kv-blocks or --gpu-memory-utilization",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=64, help="sequences in a running batch (per replica)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="tokens per forward: prefill chunks and decodes share it",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length: prompt + output tokens (default: the model's)",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of prompt prefixes seen before",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="same as --no-enable-prefix-caching",
    )
    p.add_argument(
        "--kernel-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="auto: Triton kernels for CUDA tensors, torch references otherwise",
    )
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
        help="attention workers (KV cache, attention, sampling); 0 runs the whole model in "
        "this process",
    )
    p.add_argument(
        "--num-expert-workers",
        type=int,
        default=0,
        help="expert workers, each holding a shard of the routed experts",
    )
    p.add_argument(
        "--num-micro-batches",
        type=int,
        default=1,
        help="micro-batches ping-ponging between attention and expert workers",
    )
    p.add_argument(
        "--num-scheduler-steps",
        type=int,
        default=1,
        help="decode steps per scheduling step (workers feed sampled tokens back themselves)",
    )
    p.add_argument(
        "--comm-backend",
        default="auto",
        choices=transport_names(),
        help="A<->F transport: shm on one CPU node, torch (gloo/NCCL) across nodes, deepep",
    )
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
    p.add_argument(
        "--restart-window-s",
        type=float,
        default=600.0,
        help="the window --max-worker-restarts counts in, seconds",
    )
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
        "kv_cache_memory_mb",
    ):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise CLIError("--max-model-len must be at least 2 (a prompt token and an output token)")
    if args.num_kv_blocks is not None and args.num_kv_blocks < 1:
        raise CLIError("--num-kv-blocks must be at least 1")
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
        gpu_memory_utilization=args.gpu_memory_utilization,
        seed=args.seed,
        revision=args.revision,
        download_dir=args.download_dir,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        enable_prefix_caching=args.enable_prefix_caching,
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


def version() -> str:
    from afd import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
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
    for name, module in _BENCHES.items():
        if importlib.util.find_spec(f"afd.benchmarks.{module}") is None:
            continue
        b = bench_sub.add_parser(name, help=f"{name} benchmark")
        _bench_module(module).add_arguments(b)
        b.set_defaults(func=_bench_module(module).run)

    _add_serve(sub)
    _add_profile(sub)
    _add_plan(sub)
    return parser


_BENCHES = {"kernels": "kernels", "pipeline": "pipeline", "serve": "serve", "chaos": "chaos"}
_BENCHES["peer"] = "peer"  # AFD against vLLM's CPU build (afd.benchmarks.peer)
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
    p.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info: the tokenizer's configuration and chat template, as "
        "vLLM does (lm-eval's tokenizer_backend=remote reads it); off by default (a 404)",
    )
    p.set_defaults(func=run)


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine on a model's layers (for afd plan)")
    p.add_argument("--model", default="tiny-qwen3-moe", help="model dir, built-in or bench name")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to measure")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype")
    p.add_argument(
        "--comm-backend", default="auto", choices=transport_names(), help="transport to measure"
    )
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
    p.add_argument("--num-attention-workers", type=int, default=1, help="0: colocated engine")
    p.add_argument("--num-expert-workers", type=int, default=1, help="with --predict")
    p.add_argument("--num-prefill-workers", type=int, default=0, help="with --predict")
    p.add_argument("--num-micro-batches", type=_positive_int, default=1, help="with --predict")
    p.add_argument("--num-scheduler-steps", type=_positive_int, default=1, help="with --predict")
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
    argv = sys.argv[1:] if argv is None else list(argv)
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
