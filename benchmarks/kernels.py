"""`afd bench kernels`: each kernel over a sweep of decode (and, on CPU, prefill) shapes. Every
kernel's output is first checked against the torch reference (fp32 ground truth, bound from the
torch reference's own error in the same dtype); a kernel that fails is reported as failed and
never timed. Then time (backends in alternating rounds), achieved GB/s (attention, norm, rotary)
or TFLOP/s (MoE), and the ratio to the device's copy bandwidth and dense matmul throughput
measured in the same run, with warm-up and repetitions. JSON output under
benchmarks/results/<machine>/."""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# native: kernels/native.py's compiled CPU kernels; cpu: the torch fast paths without them.
BACKENDS = ("torch", "cpu", "native", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KERNELS = (
    "rms_norm",
    "rotary_embedding",
    "paged_attention",
    "mla_attention",
    "fused_moe",
    "fused_moe_fp8",
    "fp8_linear",
)

# GPU sweep: the targets (GQA decode batch 64 x 4096 context; >= 4096 routed tokens)
# plus neighbours, Qwen3-30B-A3B-like and DeepSeek-V3-like shapes, and shapes off the tile sizes.
GPU_SWEEP = {
    "rms_norm": [dict(tokens=t, hidden=h) for t in (64, 4096) for h in (2048, 7168)],
    "rotary_embedding": [
        dict(tokens=4096, q_heads=32, kv_heads=4, head_dim=128, interleaved=False),
        dict(tokens=4096, q_heads=128, kv_heads=1, head_dim=64, interleaved=True),
    ],
    "paged_attention": [
        dict(batch=64, context=4096, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=64, context=4096, q_heads=32, kv_heads=8, head_dim=128, block_size=16),
        dict(batch=64, context=4096, q_heads=32, kv_heads=32, head_dim=128, block_size=16),
        dict(batch=256, context=1024, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=8, context=32768, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=63, context=4095, q_heads=28, kv_heads=4, head_dim=128, block_size=16),
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
        dict(tokens=333, hidden=2880, inter=1000, experts=64, top_k=6, shard=1),
    ],
    # Block-FP8 weights (DeepSeek-V3's checkpoints): fused_moe's shapes, to set against its bf16
    # rates, and DeepSeek-V3's dense layers (the dense MLP's gate 7168 -> 18432, q_b_proj 1536 ->
    # 24576) plus one off the 128 blocks.
    "fused_moe_fp8": [
        dict(tokens=512, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=4096, hidden=7168, inter=2048, experts=256, top_k=8, shard=8),
    ],
    "fp8_linear": [
        dict(tokens=64, in_features=7168, out_features=18432),
        dict(tokens=4096, in_features=7168, out_features=18432),
        dict(tokens=4096, in_features=1536, out_features=24576),
        dict(tokens=333, in_features=2880, out_features=1000),
    ],
}

# CPU sweep (the cpu fast paths against the torch references): the peer models' shapes
# (benchmarks/peer_models.py: hidden 256, head_dim 32-64) at the serving load of issue 20 (16
# streams, contexts 128-192), 64 streams, prefill of 128-token prompts and of ragged 16-400-token
# prompts, plus wider shapes where the one gather of the pages costs more than it saves.
# `query`: new tokens per sequence (default 1: decode; = context: a whole prompt); `ragged`:
# contexts spread evenly from context/25 to context.
_PEER = dict(q_heads=8, kv_heads=2, head_dim=32, block_size=16)
CPU_SWEEP = {
    "rms_norm": [dict(tokens=16, hidden=256), dict(tokens=2048, hidden=256)],
    "paged_attention": [
        dict(batch=16, context=192, **_PEER),
        dict(batch=64, context=192, **_PEER),
        dict(batch=16, context=400, ragged=True, **_PEER),
        dict(batch=16, context=192, q_heads=16, kv_heads=8, head_dim=64, block_size=16),
        dict(batch=4, context=4096, q_heads=32, kv_heads=8, head_dim=128, block_size=16),
        dict(batch=16, context=128, query=128, **_PEER),
        dict(batch=32, context=400, query=400, ragged=True, **_PEER),
    ],
    "mla_attention": [
        dict(batch=16, context=192, q_heads=8, latent=64, rope=16, block_size=16),
        dict(batch=8, context=1024, q_heads=16, latent=512, rope=64, block_size=64),
        dict(batch=8, context=128, query=128, q_heads=8, latent=64, rope=16, block_size=16),
    ],
    "fused_moe": [
        dict(tokens=1, hidden=256, inter=256, experts=16, top_k=4, shard=1),
        dict(tokens=16, hidden=256, inter=256, experts=16, top_k=4, shard=1),
        dict(tokens=64, hidden=256, inter=256, experts=16, top_k=4, shard=1),
        dict(tokens=2048, hidden=256, inter=256, experts=16, top_k=4, shard=1),
        dict(tokens=16, hidden=256, inter=1024, experts=16, top_k=4, shard=1),
        dict(tokens=16, hidden=1024, inter=512, experts=64, top_k=8, shard=2),
    ],
}

# Runs on a CPU in seconds with the torch backend (and with Triton under TRITON_INTERPRET=1).
QUICK_SWEEP = {
    "rms_norm": [dict(tokens=16, hidden=256)],
    "rotary_embedding": [dict(tokens=16, q_heads=8, kv_heads=2, head_dim=64, interleaved=True)],
    "paged_attention": [
        dict(batch=4, context=128, q_heads=8, kv_heads=2, head_dim=64, block_size=16),
    ],
    "mla_attention": [dict(batch=4, context=128, q_heads=8, latent=64, rope=16, block_size=16)],
    "fused_moe": [dict(tokens=32, hidden=128, inter=64, experts=8, top_k=2, shard=1)],
    "fused_moe_fp8": [dict(tokens=32, hidden=256, inter=160, experts=8, top_k=2, shard=1)],
    "fp8_linear": [dict(tokens=16, in_features=300, out_features=200)],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA if present"
    )
    p.add_argument(
        "--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--backends",
        default="auto",
        help=f"comma list of {','.join(BACKENDS)}; auto: triton,torch on CUDA, "
        "native,cpu,torch on CPU",
    )
    p.add_argument("--kernels", default="all", help=f"comma list of {','.join(KERNELS)}")
    p.add_argument("--quick", action="store_true", help="tiny sweep (CPU-friendly, seconds)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case")
    p.add_argument("--iters", type=int, default=None, help="least timed calls per case")
    p.add_argument(
        "--min-time", type=float, default=None, help="least seconds of timed calls per case"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timed rounds per case, the backends' order alternating each round (median kept)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--name", default="kernels", help="result name (NAME.json)")
    p.add_argument(
        "--output",
        default=None,
        help="JSON results path (default: benchmarks/results/<machine>/NAME.json)",
    )


@dataclass
class Case:
    """One kernel call with its inputs bound and its work counted; `impls[backend](*inputs)`."""

    kernel: str
    shape: dict
    inputs: tuple
    impls: dict[str, Callable]
    bytes_moved: float = 0.0
    flops: float = 0.0
    extra: dict = field(default_factory=dict)
    floors: tuple[float, float] | None = None  # (norm-wise, max-wise) error always allowed

    def call(self, backend: str) -> Callable[[], object]:
        impl = self.impls[backend]
        return lambda: impl(*self.inputs)

    def reference(self, fp32: bool) -> object:
        """The torch reference's output, on fp32 copies of the inputs when `fp32`."""
        inputs = self.inputs
        if fp32:
            inputs = tuple(
                t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in inputs
            )
        return self.impls["torch"](*inputs)


def _outputs(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(||out - ref|| / ||ref||, max|out - ref| / max|ref|), both in float64."""
    diff = out.double() - ref.double()
    ref_norm = max(float(ref.double().norm()), 1e-30)
    ref_max = max(float(ref.double().abs().max()), 1e-30) if ref.numel() else 1.0
    err_max = float(diff.abs().max()) / ref_max if ref.numel() else 0.0
    return float(diff.norm()) / ref_norm, err_max


def check_output(
    out: object,
    ref32: object,
    ref_lowp: object,
    dtype: torch.dtype,
    floors: tuple[float, float] | None = None,
) -> dict:
    """Does a kernel's output match the fp32 torch reference as well as the torch reference run
    in the same dtype does? Passes when, for every output tensor, the norm-wise relative error
    is within max(1.5 x torch's, u) and the max-wise within max(3 x torch's, 2u), u being the
    dtype's unit roundoff (at least 1e-5 norm-wise and 1e-4 max-wise, for fp32 reassociation).
    A kernel that accumulates in bf16 where it should in fp32 errs about twice as much as the
    reference on long reductions; the bounds are set to tell the two apart. `floors` raises the
    floors for kernels whose exact result hangs on a rounding the reference cannot reproduce."""
    u = torch.finfo(dtype).eps / 2
    floor_norm, floor_max = max(u, 1e-5), max(2 * u, 1e-4)
    if floors is not None:
        floor_norm, floor_max = max(floor_norm, floors[0]), max(floor_max, floors[1])
    outs, refs, lows = _outputs(out), _outputs(ref32), _outputs(ref_lowp)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs, strict=True)):
        shapes = [tuple(o.shape) for o in outs], [tuple(r.shape) for r in refs]
        return {"passed": False, "reason": f"output shapes {shapes[0]} != reference {shapes[1]}"}
    rows = []
    for o, r, low in zip(outs, refs, lows, strict=True):
        if o.dtype != low.dtype:
            return {"passed": False, "reason": f"output dtype {o.dtype} != reference {low.dtype}"}
        err_norm, err_max = relative_errors(o, r)
        ref_norm, ref_max = relative_errors(low, r)
        bound_norm, bound_max = max(1.5 * ref_norm, floor_norm), max(3 * ref_max, floor_max)
        finite = bool(torch.isfinite(o).all()) or not bool(torch.isfinite(r).all())
        rows.append(
            {
                "passed": finite and err_norm <= bound_norm and err_max <= bound_max,
                "error_norm": err_norm,
                "error_max": err_max,
                "bound_norm": bound_norm,
                "bound_max": bound_max,
                "torch_error_norm": ref_norm,
                "torch_error_max": ref_max,
            }
        )
    worst = max(
        rows, key=lambda x: max(x["error_norm"] / x["bound_norm"], x["error_max"] / x["bound_max"])
    )
    return {**worst, "passed": all(x["passed"] for x in rows)}


class Timer:
    """Median seconds per call: CUDA events around batches of `iters` calls on GPU, one
    perf_counter sample per call on CPU; after `warmup` calls, samples are taken until there are
    at least `min_samples` and they add up to `min_time_s`."""

    def __init__(
        self, device: torch.device, warmup: int, iters: int, min_time_s: float, max_samples=1000
    ):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.min_time_s, self.max_samples = min_time_s, max_samples

    def __call__(self, fn: Callable[[], object]) -> dict:
        for _ in range(self.warmup):
            fn()
        samples: list[float] = []
        cuda = self.device.type == "cuda"
        min_samples = 3 if cuda else self.iters
        per_sample = self.iters if cuda else 1  # calls behind each sample
        if cuda:
            torch.cuda.synchronize(self.device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
        while len(samples) < self.max_samples and (
            len(samples) < min_samples or sum(samples) * per_sample < self.min_time_s
        ):
            if cuda:
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / self.iters)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        calls = len(samples) * per_sample
        return {"seconds": statistics.median(samples), "warmup": self.warmup, "calls": calls}


def device_limits(device: torch.device, dtype: torch.dtype) -> dict:
    """Copy bandwidth (read + write bytes) and dense matmul throughput, measured now, with the
    same warm-up and repetitions whatever the sweep: a cold or once-timed ceiling is too low."""
    cuda = device.type == "cuda"
    timer = Timer(device, warmup=10 if cuda else 3, iters=10, min_time_s=0.5 if cuda else 0.3)
    n_bytes = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy = timer(functools.partial(dst.copy_, src))
    del src, dst  # 4 GiB on a GPU: free before the matmul operands
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = timer(lambda: a @ b)
    return {
        "copy_GBps": 2 * n_bytes / copy["seconds"] / 1e9,
        "copy_bytes": n_bytes,
        "copy_timing": copy,
        "matmul_TFLOPs": 2 * n**3 / mm["seconds"] / 1e12,
        "matmul_n": n,
        "matmul_timing": mm,
    }


def _impls(name: str) -> dict[str, Callable]:
    """The backends that implement kernel `name` (cpu and triton only where they have one)."""
    from afd.kernels import native, torch_ops
    from afd.kernels.cpu_ops import NATIVE_IMPLS, TORCH_IMPLS

    impls = {"torch": getattr(torch_ops, name)}
    if name in TORCH_IMPLS:
        impls["cpu"] = TORCH_IMPLS[name]
    if name in NATIVE_IMPLS and native.available():
        impls["native"] = NATIVE_IMPLS[name]
    if _has_triton():
        from afd.kernels.triton_ops import TRITON_IMPLS

        impls["triton"] = TRITON_IMPLS[name]
    return impls


def _paged_meta(shape: dict, device: torch.device):
    """Metadata of an attention shape: `batch` sequences at `context` tokens (or ragged up to
    it), the last `query` of each new, pages scattered over the cache."""
    from afd.kernels.metadata import AttentionMetadata

    batch, context, block_size = shape["batch"], shape["context"], shape["block_size"]
    if shape.get("ragged"):
        lens = torch.linspace(context / 25, context, batch).round().int().clamp(min=1).tolist()
    else:
        lens = [context] * batch
    query = shape.get("query", 1)
    q_lens = [min(query, n) for n in lens]
    per_seq = [-(-n // block_size) for n in lens]
    pool = torch.randperm(sum(per_seq)).tolist()
    tables = [pool[sum(per_seq[:b]) : sum(per_seq[: b + 1])] for b in range(batch)]
    meta = AttentionMetadata.build(q_lens, lens, tables, block_size, device)
    return meta, len(pool)


def _rms_norm_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    x = torch.randn(shape["tokens"], shape["hidden"], **kw)
    res = torch.randn_like(x)
    w = (1 + 0.1 * torch.randn(shape["hidden"], device=kw["device"])).to(kw["dtype"])
    return Case(kernel, shape, (x, w, 1e-6, res), impls, bytes_moved=4 * x.numel() * elt)


def _rotary_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    t, d = shape["tokens"], shape["head_dim"]
    q = torch.randn(t, shape["q_heads"], d, **kw)
    k = torch.randn(t, shape["kv_heads"], d, **kw)
    angles = torch.rand(t, d // 2, device=kw["device"]) * 100  # positions x frequencies
    cos, sin = angles.cos().to(kw["dtype"]), angles.sin().to(kw["dtype"])
    moved = 2 * (q.numel() + k.numel()) * elt + 2 * cos.numel() * elt
    inputs = (q, k, cos, sin, bool(shape["interleaved"]))
    return Case(kernel, shape, inputs, impls, bytes_moved=moved)


def _paged_attention_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    bs, hq, hkv, d = shape["block_size"], shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    meta, num_blocks = _paged_meta(shape, kw["device"])
    q = torch.randn(meta.slot_mapping.shape[0], hq, d, **kw)
    k_cache = torch.randn(num_blocks, bs, hkv, d, **kw)
    v_cache = torch.randn(num_blocks, bs, hkv, d, **kw)
    if "splits" in shape and "triton" in impls:
        from afd.kernels.triton_attention import paged_decode_attention

        impls["triton"] = lambda q, k, v, meta, scale: paged_decode_attention(
            q, k, v, meta.block_tables, meta.seq_lens, scale, num_splits=shape["splits"]
        )
    kv_bytes = 2 * int(meta.seq_lens.sum()) * hkv * d * elt
    inputs = (q, k_cache, v_cache, meta, d**-0.5)
    return Case(kernel, shape, inputs, impls, bytes_moved=kv_bytes + 2 * q.numel() * elt)


def _mla_attention_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    bs, h, lat, r = shape["block_size"], shape["q_heads"], shape["latent"], shape["rope"]
    meta, num_blocks = _paged_meta(shape, kw["device"])
    t = meta.slot_mapping.shape[0]
    q_latent = torch.randn(t, h, lat, **kw)
    q_rope = torch.randn(t, h, r, **kw)
    kv_cache = torch.randn(num_blocks, bs, lat + r, **kw)
    if "splits" in shape and "triton" in impls:
        from afd.kernels.triton_attention import mla_decode_attention

        impls["triton"] = lambda ql, qr, kv, meta, scale: mla_decode_attention(
            ql, qr, kv, meta.block_tables, meta.seq_lens, scale, num_splits=shape["splits"]
        )
    kv_bytes = int(meta.seq_lens.sum()) * (lat + r) * elt
    inputs = (q_latent, q_rope, kv_cache, meta, (128 + r) ** -0.5)
    moved = kv_bytes + t * h * (2 * lat + r) * elt
    return Case(kernel, shape, inputs, impls, bytes_moved=moved)


def _fp8_linear_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    """Weights quantized in 128 x 128 blocks, as checkpoints hold them."""
    from afd.kernels.torch_ops import quant_fp8_blocks

    t, k, n = shape["tokens"], shape["in_features"], shape["out_features"]
    x = torch.randn(t, k, **kw)
    wq, ws = quant_fp8_blocks(torch.randn(n, k, device=kw["device"]) * k**-0.5, (128, 128))
    moved = n * k + ws.numel() * 4 + t * (k + n) * elt
    inputs = (x, wq, ws, (128, 128))
    return Case(kernel, shape, inputs, impls, bytes_moved=moved, flops=2 * t * k * n)


def _fused_moe_case(kernel: str, shape: dict, kw: dict, elt: int, impls: dict) -> Case:
    device, dtype = kw["device"], kw["dtype"]
    t, hid, inter = shape["tokens"], shape["hidden"], shape["inter"]
    experts, top_k, shard = shape["experts"], shape["top_k"], shape["shard"]
    local = experts // shard
    x = torch.randn(t, hid, **kw)
    w13 = (torch.randn(local, 2 * inter, hid, device=device) * hid**-0.5).to(dtype)
    w2 = (torch.randn(local, hid, inter, device=device) * inter**-0.5).to(dtype)
    scores = torch.rand(t, experts, device=device)
    weights, ids = scores.topk(top_k, dim=-1)
    ids = torch.where(ids < local, ids, -1)  # this shard holds experts [0, local)
    routed = int((ids >= 0).sum())
    active = int(torch.unique(ids[ids >= 0]).numel())
    inputs, weight_elt, floors = (x, w13, w2, weights, ids), elt, None
    if kernel == "fused_moe_fp8":
        from afd.kernels.torch_ops import quant_fp8_experts

        w13q, w13s, w2q, w2s = quant_fp8_experts(w13.float(), w2.float())
        inputs, weight_elt = (x, w13q, w13s, w2q, w2s, weights, ids, (128, 128)), 1
        # The SiLU-and-mul output is quantized to e4m3 again: a last-bit difference in the
        # fp32 sums before it can round an element to the neighbouring e4m3 value (1/16 to
        # 1/8 of it), which no reference reproduces. Measured under the interpreter at fp32:
        # 1.4e-4 norm-wise, 5.4e-4 max-wise over 20 seeds; a wrong scale or index errs by ~1.
        floors = (2**-10, 2**-7)
    return Case(
        kernel,
        shape,
        inputs,
        impls,
        flops=2 * routed * 3 * hid * inter,
        bytes_moved=active * 3 * hid * inter * weight_elt,
        extra={"routed_tokens": routed, "active_experts": active},
        floors=floors,
    )


_CASE_BUILDERS = {
    "rms_norm": _rms_norm_case,
    "rotary_embedding": _rotary_case,
    "paged_attention": _paged_attention_case,
    "mla_attention": _mla_attention_case,
    "fp8_linear": _fp8_linear_case,
    "fused_moe": _fused_moe_case,
    "fused_moe_fp8": _fused_moe_case,
}


def make_case(kernel: str, shape: dict, device: torch.device, dtype: torch.dtype) -> Case:
    """Allocate inputs for one shape and count its bytes or FLOPs. A `splits` key in an
    attention shape forces that many split-K partitions on the Triton side."""
    elt = torch.finfo(dtype).bits // 8
    impls = _impls(kernel)
    build = _CASE_BUILDERS.get(kernel)
    if build is None:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    return build(kernel, shape, dict(device=device, dtype=dtype), elt, impls)


def _has_triton() -> bool:
    from afd.kernels import ops

    return ops.triton_available()


def _resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str]]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    if args.backends == "auto":
        backends = ["triton", "torch"] if device.type == "cuda" else ["native", "cpu", "torch"]
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends):
        choices = ", ".join(BACKENDS)
        raise ValueError(f"--backends: a comma list of {choices}, got {args.backends!r}")
    for be in ("cpu", "native"):
        if be in backends and device.type != "cpu":
            raise ValueError(f"--backends {be} times the CPU fast paths: it needs --device cpu")
    if "triton" in backends:
        from afd.kernels import ops

        if not ops.triton_available():
            raise ValueError(
                "--backends triton needs the 'triton' package: pip install 'afd[triton]'"
            )
        if device.type == "cpu":
            from afd.kernels.triton_utils import INTERPRET

            if not INTERPRET:
                raise ValueError("--backends triton on CPU needs TRITON_INTERPRET=1")
    for name in ("warmup", "iters"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 100_000:
            raise ValueError(f"--{name} must be in [0, 100000]")
    if args.iters is not None and args.iters < 1:
        raise ValueError("--iters must be at least 1")
    if not 1 <= args.rounds <= 100:
        raise ValueError("--rounds must be in [1, 100]")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError("--threads must be in [1, 1024]")
    if args.min_time is not None and not 0 <= args.min_time <= 3600:
        raise ValueError("--min-time must be in [0, 3600] seconds")
    return device, dtype, backends


def _timed_rounds(case: Case, backends: list[str], timer: Timer, rounds: int) -> dict[str, list]:
    """Each backend's timings over `rounds` rounds, the order reversed every other round so that
    neither side always runs second (warmer caches, a neighbour's load at one end)."""
    timings: dict[str, list] = {be: [] for be in backends}
    for r in range(rounds):
        for be in backends if r % 2 == 0 else backends[::-1]:
            timings[be].append(timer(case.call(be)))
    return timings


def measure_case(
    case: Case,
    backends: list[str],
    dtype: torch.dtype,
    timer: Timer,
    limits: dict,
    rounds: int = 1,
):
    """Rows of one case: each backend's output checked, then those that passed timed in
    alternating rounds (the median of the rounds' medians kept). Backends without an
    implementation of the kernel get no row."""
    ref32 = case.reference(fp32=True)
    ref_lowp = case.reference(fp32=False) if dtype != torch.float32 else ref32
    rows, passed = {}, []
    for be in (b for b in backends if b in case.impls):
        row = {"kernel": case.kernel, "backend": be, "shape": case.shape, **case.extra}
        row["label"] = " ".join(f"{k}={v}" for k, v in case.shape.items())
        check = check_output(case.call(be)(), ref32, ref_lowp, dtype, case.floors)
        row["check"] = check
        rows[be] = row
        if check["passed"]:
            passed.append(be)
        else:
            row["error"] = "output does not match the torch reference: not timed"
    times = {}
    for be, timings in _timed_rounds(case, passed, timer, rounds).items():
        row, seconds = rows[be], statistics.median(t["seconds"] for t in timings)
        times[be] = seconds
        calls = sum(t["calls"] for t in timings)
        row.update(time_us=seconds * 1e6, calls=calls, warmup=timings[0]["warmup"])
        if rounds > 1:
            row["round_time_us"] = [t["seconds"] * 1e6 for t in timings]
        row["GBps"] = case.bytes_moved / seconds / 1e9
        ratios = {"fraction_of_copy_bw": row["GBps"] / limits["copy_GBps"]}
        if case.flops:
            row["TFLOPs"] = case.flops / seconds / 1e12
            ratios["fraction_of_matmul"] = row["TFLOPs"] / limits["matmul_TFLOPs"]
        for name, value in ratios.items():
            if value > 1.0:  # faster than the ceiling measured in the same run: a bad reading
                row[name] = None
                row.setdefault("measurement_error", []).append(
                    f"{name} = {value:.2f} is above 1: the ceiling or this timing is wrong"
                )
            else:
                row[name] = value
    rows = list(rows.values())
    if "torch" in times:
        for row in rows:
            if row["backend"] != "torch" and row["backend"] in times:
                row["speedup_vs_torch"] = times["torch"] / times[row["backend"]]
                row["torch_time_us"] = times["torch"] * 1e6
    return rows


def format_row(row: dict) -> str:
    head = f"{row['kernel']:16s} {row['backend']:6s} {row['shape']}"
    check = row["check"]
    if not check["passed"]:
        detail = check.get("reason") or (
            f"error {check['error_norm']:.2e} (bound {check['bound_norm']:.2e}), "
            f"max {check['error_max']:.2e} (bound {check['bound_max']:.2e})"
        )
        return f"{head}  FAILED output check: {detail}; not timed"
    if row.get("TFLOPs") is not None:
        metric, ratio, what = f"{row['TFLOPs']:.3f} TFLOP/s", row["fraction_of_matmul"], "matmul"
    else:
        metric, ratio, what = f"{row['GBps']:.1f} GB/s", row["fraction_of_copy_bw"], "copy"
    share = f"{ratio:.0%} of {what}" if ratio is not None else f"MEASUREMENT ERROR: above {what}"
    speedup = f"  {row['speedup_vs_torch']:.2f}x torch" if "speedup_vs_torch" in row else ""
    return f"{head} {row['time_us']:10.1f} us  {metric} ({share}){speedup}"


def run(args: argparse.Namespace) -> int:
    from afd.results import machine_name, results_dir, write_result

    device, dtype, backends = _resolve(args)
    if args.quick:
        sweep = QUICK_SWEEP
    else:
        sweep = CPU_SWEEP if device.type == "cpu" else GPU_SWEEP
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kernels = list(sweep) if args.kernels == "all" else args.kernels.split(",")
    for k in kernels:
        if k not in sweep:
            raise ValueError(f"--kernels: unknown kernel {k!r}; choose from {', '.join(sweep)}")
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    iters = args.iters if args.iters is not None else (20 if cuda else 5)
    min_time = args.min_time if args.min_time is not None else (0.2 if cuda else 0.1)
    timer = Timer(device, warmup, iters, min_time)
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name(device) if cuda else machine_name("cpu")
    limits = device_limits(device, dtype)
    print(
        f"{device_name}: copy {limits['copy_GBps']:.1f} GB/s, "
        f"matmul {limits['matmul_TFLOPs']:.3f} TFLOP/s ({dtype}), {torch.get_num_threads()} "
        f"thread(s), {args.rounds} round(s)"
    )
    results = []
    for kernel in kernels:
        for shape in sweep[kernel]:
            case = make_case(kernel, shape, device, dtype)
            for row in measure_case(case, backends, dtype, timer, limits, args.rounds):
                results.append(row)
                print(format_row(row))
            del case
    failed = [r for r in results if not r["check"]["passed"]]
    report = {
        "device": device_name,
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "backends": backends,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "timing": "cuda events" if cuda else "perf_counter",
        "warmup": warmup,
        "min_iters": iters,
        "min_time_s": min_time,
        "limits": limits,
        "failed_checks": len(failed),
        "results": results,
    }
    path = args.output or results_dir(device.type) / f"{args.name}.json"
    out = write_result(
        args.name, report, device=device.type, path=path, argv=getattr(args, "command_argv", None)
    )
    print(f"wrote {out}")
    if failed:
        print(f"{len(failed)} kernel output check(s) failed: those kernels were not timed")
        return 1
    return 0
