"""The GPU correctness gate: every Triton kernel, compiled, in bf16, fp16 and fp32 against its
torch reference on CUDA, over shapes that split K, cross tile boundaries and hold many experts;
then `afd bench kernels` end to end (it checks every output before timing it). Skipped without a
GPU; scripts/gpu_check.sh runs tests/test_gpu*.py with TRITON_INTERPRET=0 before any timing.

The bounds are afd.benchmarks.kernels.check_output's: the kernel's error against the fp32 torch
reference may be at most 1.5x (norm-wise) and 3x (max-wise) that of the torch reference run in
the same dtype, or the dtype's unit roundoff. tests/test_kernels.py shows on CPU that a bf16
accumulator where an fp32 one belongs fails them."""

from __future__ import annotations

import json

import pytest
import torch

from afd.benchmarks import kernels as bench

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GATE = {
    "rms_norm": [dict(tokens=4097, hidden=7168), dict(tokens=3, hidden=5000)],
    "rotary_embedding": [
        dict(tokens=1000, q_heads=32, kv_heads=4, head_dim=128, interleaved=False),
        dict(tokens=999, q_heads=16, kv_heads=1, head_dim=64, interleaved=True),
    ],
    "paged_attention": [
        # 8 x 4 programs on a GPU with >= 16 SMs: the kernel picks split-K by itself
        dict(batch=8, context=8191, q_heads=32, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=3, context=1000, q_heads=8, kv_heads=8, head_dim=128, block_size=16, splits=5),
        dict(batch=64, context=300, q_heads=28, kv_heads=4, head_dim=128, block_size=16),
        dict(batch=2, context=20000, q_heads=8, kv_heads=2, head_dim=256, block_size=32),
    ],
    "mla_attention": [
        dict(batch=4, context=5000, q_heads=128, latent=512, rope=64, block_size=64),
        dict(batch=16, context=777, q_heads=16, latent=512, rope=64, block_size=64, splits=3),
    ],
    "fused_moe": [
        dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=333, hidden=2880, inter=1000, experts=256, top_k=8, shard=4),
        dict(tokens=1, hidden=7168, inter=2048, experts=256, top_k=8, shard=8),
        # a down projection reducing over 4096: at inter <= 2048 a down GEMM whose accumulator
        # is rounded to bf16 every K block stays within the bound (tests/test_kernels.py)
        dict(tokens=64, hidden=1024, inter=4096, experts=8, top_k=2, shard=1),
    ],
    # block-FP8 weights in 128 x 128 blocks; sizes off the blocks included
    "fused_moe_fp8": [
        dict(tokens=4096, hidden=2048, inter=768, experts=128, top_k=8, shard=1),
        dict(tokens=333, hidden=2880, inter=1000, experts=256, top_k=8, shard=4),
        dict(tokens=1, hidden=7168, inter=2048, experts=256, top_k=8, shard=8),
    ],
    "fp8_linear": [
        dict(tokens=4097, in_features=7168, out_features=2100),
        dict(tokens=1, in_features=1536, out_features=24576),
    ],
}
CASES = [(kernel, shape) for kernel, shapes in GATE.items() for shape in shapes]


def _id(case) -> str:
    kernel, shape = case
    return kernel + "-" + "-".join(f"{k}{v}" for k, v in shape.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kernel,shape", CASES, ids=[_id(c) for c in CASES])
def test_triton_kernel_matches_torch_reference(kernel, shape, dtype):
    from afd.kernels.triton_utils import INTERPRET

    assert not INTERPRET, "the gate checks compiled kernels: set TRITON_INTERPRET=0"
    torch.manual_seed(0)
    device = torch.device("cuda")
    case = bench.make_case(kernel, shape, device, dtype)
    ref32 = case.reference(fp32=True)
    ref_lowp = case.reference(fp32=False)
    out = case.call("triton")()
    torch.cuda.synchronize()
    check = bench.check_output(out, ref32, ref_lowp, dtype, case.floors)
    assert check["passed"], check


def test_auto_split_k_is_taken():
    """The first paged shape must really run split-K without being forced."""
    from afd.kernels.triton_attention import _pick_num_splits

    shape = GATE["paged_attention"][0]
    programs = shape["batch"] * shape["kv_heads"]  # one head block per KV head (group of 8)
    assert _pick_num_splits(programs, shape["context"], torch.device("cuda")) > 1


def test_bench_kernels_checks_before_timing(tmp_path):
    """The full GPU sweep in bf16: every kernel passes its output check, then is timed."""
    from afd.entrypoints.cli import main

    out = tmp_path / "kernels.json"
    argv = ["bench", "kernels", "--device", "cuda", "--dtype", "bfloat16"]
    assert (
        main([*argv, "--warmup", "1", "--iters", "2", "--min-time", "0", "--output", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    assert report["failed_checks"] == 0
    triton_rows = [r for r in report["results"] if r["backend"] == "triton"]
    assert {r["kernel"] for r in triton_rows} == set(bench.GPU_SWEEP)
    assert all(r["check"]["passed"] and "time_us" in r for r in triton_rows)
