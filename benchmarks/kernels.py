"""`afd bench kernels`: each kernel over a sweep of decode shapes; time, achieved GB/s (attention,
norm) or TFLOP/s (MoE), and the ratio to the device's copy bandwidth and dense matmul throughput
measured in the same run. JSON output."""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GPU sweep: the targets (GQA decode batch 64 x 4096 context; >= 4096 routed tokens)
# plus neighbours. Qwen3-30B-A3B-like and DeepSeek-V3-like shapes.
GPU_SWEEP = {
    "rms_norm": [dict(tokens=t, hidden=h) for t in (64, 4096) for h in (2048, 7168)],
    "paged_attention": [
        dict(batch=64, context=4096, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=64, context=4096, q_heads=32, kv_heads=8, head_dim=128, block_size=16),
        dict(batch=64, context=4096, q_heads=32, kv_heads=32, head_dim=128, block_size=16),
        dict(batch=256, context=1024, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=8, context=32768, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
    ],
    "mla_attention": [
        dict(batch=64, context=4096, q_heads=16, latent=512, rope=64, block_size=64),
        dict(batch=64, context=4096, q_heads=128, latent=512, rope=64, block_size=64),
        dict(batch=8, context=32768, q_heads=16, latent=512, rope=64, block_size=64),
    ],
    "fused_moe": [
        dict(tokens=64, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=512, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        # One of 8 expert workers for DeepSeek-V3: 32 local experts of 256, ids elsewhere skipped.
        dict(tokens=4096, hidden=7168, inter=2048, experts=256, top_k=8, shard=8),
    ],
    # Block-FP8 weights (DeepSeek-V3's checkpoints): the same MoE shapes as fused_moe, and dense
    # layers of DeepSeek-V3 (q_b_proj 1536 -> 24576, the dense MLP's gate 7168 -> 18432).
    "fused_moe_fp8": [
        dict(tokens=512, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=4096, hidden=7168, inter=2048, experts=256, top_k=8, shard=8),
    ],
    "fp8_linear": [
        dict(tokens=64, in_features=7168, out_features=18432),
        dict(tokens=4096, in_features=7168, out_features=18432),
        dict(tokens=4096, in_features=1536, out_features=24576),
    ],
}

# Runs on a CPU in seconds with the torch backend.
QUICK_SWEEP = {
    "rms_norm": [dict(tokens=16, hidden=256)],
    "paged_attention": [
        dict(batch=4, context=128, q_heads=8, kv_heads=2, head_dim=64, block_size=16),
    ],
    "mla_attention": [dict(batch=4, context=128, q_heads=8, latent=64, rope=16, block_size=16)],
    "fused_moe": [dict(tokens=32, hidden=128, inter=64, experts=8, top_k=2, shard=1)],
    "fused_moe_fp8": [dict(tokens=32, hidden=256, inter=128, experts=8, top_k=2, shard=1)],
    "fp8_linear": [dict(tokens=16, in_features=256, out_features=384)],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--backends",
        default="auto",
        help="comma list of torch,triton; auto: triton,torch on CUDA, torch on CPU",
    )
    p.add_argument("--kernels", default="all", help=f"comma list of {','.join(GPU_SWEEP)}")
    p.add_argument("--quick", action="store_true", help="tiny sweep (CPU-friendly, seconds)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case")
    p.add_argument("--iters", type=int, default=None, help="timed calls per case")
    p.add_argument("--output", default="results/kernels.json", help="JSON results path")


@dataclass
class Case:
    """One kernel call with its inputs bound and its work counted."""

    kernel: str
    shape: dict
    call: Callable[[str], Callable[[], object]]  # backend -> zero-arg callable
    bytes_moved: float = 0.0
    flops: float = 0.0
    extra: dict = field(default_factory=dict)


class Timer:
    """Mean time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, iters: int):
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            samples = []
            for _ in range(3):
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / self.iters)
            return statistics.median(samples)
        samples = []
        for _ in range(self.iters):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


def device_limits(device: torch.device, dtype: torch.dtype, timer: Timer, quick: bool) -> dict:
    """Copy bandwidth (read + write bytes) and dense matmul throughput, measured now."""
    n_bytes = (32 << 20) if quick or device.type == "cpu" else (2 << 30)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy_s = timer(lambda: dst.copy_(src))
    n = 256 if quick or device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = timer(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / copy_s / 1e9,
        "copy_bytes": n_bytes,
        "matmul_TFLOPs": 2 * n**3 / mm_s / 1e12,
        "matmul_n": n,
    }


def _impl(name: str, backend: str) -> Callable:
    if backend == "torch":
        from afd.kernels import torch_ops

        return getattr(torch_ops, name)
    from afd.kernels.triton_ops import TRITON_IMPLS

    return TRITON_IMPLS[name]


def _paged_meta(batch: int, context: int, block_size: int, device: torch.device):
    """Decode metadata: every sequence at `context` tokens, pages scattered over the cache."""
    from afd.models.metadata import AttentionMetadata

    per_seq = (context + block_size - 1) // block_size
    num_blocks = batch * per_seq
    tables = torch.randperm(num_blocks).view(batch, per_seq).tolist()
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, block_size, device)
    return meta, num_blocks


def make_case(kernel: str, shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    """Allocate inputs for one shape and count its bytes or FLOPs."""
    elt = torch.finfo(dtype).bits // 8
    kw = dict(device=device, dtype=dtype)
    if kernel == "rms_norm":
        x = torch.randn(shape["tokens"], shape["hidden"], **kw)
        res = torch.randn_like(x)
        w = torch.ones(shape["hidden"], **kw)
        call = lambda be: lambda: _impl("rms_norm", be)(x, w, 1e-6, res)
        return Case(kernel, shape, call, bytes_moved=4 * x.numel() * elt)
    if kernel == "paged_attention":
        b, ctx, bs = shape["batch"], shape["context"], shape["block_size"]
        hq, hkv, d = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
        meta, num_blocks = _paged_meta(b, ctx, bs, device)
        q = torch.randn(b, hq, d, **kw)
        k_cache = torch.randn(num_blocks, bs, hkv, d, **kw)
        v_cache = torch.randn(num_blocks, bs, hkv, d, **kw)
        call = lambda be: lambda: _impl("paged_attention", be)(q, k_cache, v_cache, meta, d**-0.5)
        kv_bytes = 2 * b * ctx * hkv * d * elt
        return Case(kernel, shape, call, bytes_moved=kv_bytes + 2 * q.numel() * elt)
    if kernel == "mla_attention":
        b, ctx, bs = shape["batch"], shape["context"], shape["block_size"]
        h, lat, r = shape["q_heads"], shape["latent"], shape["rope"]
        meta, num_blocks = _paged_meta(b, ctx, bs, device)
        q_latent = torch.randn(b, h, lat, **kw)
        q_rope = torch.randn(b, h, r, **kw)
        kv_cache = torch.randn(num_blocks, bs, lat + r, **kw)
        scale = (128 + r) ** -0.5
        call = lambda be: (
            lambda: _impl("mla_attention", be)(q_latent, q_rope, kv_cache, meta, scale)
        )
        kv_bytes = b * ctx * (lat + r) * elt
        return Case(kernel, shape, call, bytes_moved=kv_bytes + b * h * (2 * lat + r) * elt)
    if kernel == "fp8_linear":
        from afd.kernels.torch_ops import quant_fp8_blocks

        t, k, n = shape["tokens"], shape["in_features"], shape["out_features"]
        x = torch.randn(t, k, **kw)
        wq, ws = quant_fp8_blocks(torch.randn(n, k, device=device) * k**-0.5, (128, 128))
        call = lambda be: lambda: _impl("fp8_linear", be)(x, wq, ws, (128, 128))
        return Case(kernel, shape, call, flops=2 * t * k * n, bytes_moved=n * k + 2 * t * k * elt)
    if kernel in ("fused_moe", "fused_moe_fp8"):
        t, hid, inter = shape["tokens"], shape["hidden"], shape["inter"]
        experts, top_k, shard = shape["experts"], shape["top_k"], shape["shard"]
        local = experts // shard
        x = torch.randn(t, hid, **kw)
        w13 = torch.randn(local, 2 * inter, hid, **kw) * hid**-0.5
        w2 = torch.randn(local, hid, inter, **kw) * inter**-0.5
        scores = torch.rand(t, experts, device=device)
        weights, ids = scores.topk(top_k, dim=-1)
        ids = torch.where(ids < local, ids, -1)  # this shard holds experts [0, local)
        routed = int((ids >= 0).sum())
        active = int(torch.unique(ids[ids >= 0]).numel())
        if kernel == "fused_moe":
            call = lambda be: lambda: _impl("fused_moe", be)(x, w13, w2, weights, ids)
            weight_elt = elt
        else:
            from afd.kernels.torch_ops import quant_fp8_experts

            fp8 = quant_fp8_experts(w13.float(), w2.float())
            block = (128, 128)
            call = lambda be: lambda: _impl("fused_moe_fp8", be)(x, *fp8, weights, ids, block)
            weight_elt = 1
        return Case(
            kernel,
            shape,
            call,
            flops=2 * routed * 3 * hid * inter,
            bytes_moved=active * 3 * hid * inter * weight_elt,
            extra={"routed_tokens": routed, "active_experts": active},
        )
    raise ValueError(f"unknown kernel {kernel!r}")


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str]]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    if args.backends == "auto":
        backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("torch", "triton"):
            raise SystemExit(f"unknown backend {b!r}; choose torch and/or triton")
    if "triton" in backends and device.type == "cpu":
        from afd.kernels.triton_utils import INTERPRET

        if not INTERPRET:
            raise SystemExit("--backends triton on CPU needs TRITON_INTERPRET=1")
    return device, dtype, backends


def run(args: argparse.Namespace) -> int:
    device, dtype, backends = _resolve(args)
    sweep = QUICK_SWEEP if args.quick or device.type == "cpu" else GPU_SWEEP
    kernels = list(sweep) if args.kernels == "all" else args.kernels.split(",")
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 5)
    iters = args.iters if args.iters is not None else (3 if device.type == "cpu" else 20)
    timer = Timer(device, warmup, iters)
    torch.manual_seed(0)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu {platform.processor() or platform.machine()}".strip()
    limits = device_limits(device, dtype, timer, args.quick)
    print(
        f"{device_name}: copy {limits['copy_GBps']:.1f} GB/s, "
        f"matmul {limits['matmul_TFLOPs']:.3f} TFLOP/s ({dtype})"
    )
    results = []
    for kernel in kernels:
        for shape in sweep[kernel]:
            case = make_case(kernel, shape, device, dtype)
            times = {}
            for be in backends:
                seconds = timer(case.call(be))
                times[be] = seconds
                row = {
                    "kernel": kernel,
                    "backend": be,
                    "shape": shape,
                    **case.extra,
                    "time_us": seconds * 1e6,
                    "GBps": case.bytes_moved / seconds / 1e9,
                    "fraction_of_copy_bw": case.bytes_moved / seconds / 1e9 / limits["copy_GBps"],
                }
                if case.flops:
                    tflops = case.flops / seconds / 1e12
                    row["TFLOPs"] = tflops
                    row["fraction_of_matmul"] = tflops / limits["matmul_TFLOPs"]
                results.append(row)
                metric = (
                    f"{row['TFLOPs']:.3f} TFLOP/s ({row['fraction_of_matmul']:.0%} of matmul)"
                    if case.flops
                    else f"{row['GBps']:.1f} GB/s ({row['fraction_of_copy_bw']:.0%} of copy)"
                )
                print(f"{kernel:16s} {be:6s} {shape} {seconds * 1e6:10.1f} us  {metric}")
            if "torch" in times:  # torch ran last: fill the ratio into the earlier rows
                for row in results[-len(backends) :]:
                    if row["backend"] != "torch":
                        row["speedup_vs_torch"] = times["torch"] / times[row["backend"]]
            del case
    report = {
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "backends": backends,
        "timing": "cuda events" if device.type == "cuda" else "perf_counter",
        "limits": limits,
        "results": results,
    }
    from afd.benchmarks.results import write_result

    out = write_result("kernels", report, device=device.type, path=Path(args.output))
    print(f"wrote {out}")
    return 0
