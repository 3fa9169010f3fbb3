"""Block-scaled FP8 (e4m3 + float32 block scales): the Triton kernels against their torch references
under TRITON_INTERPRET=1, shapes that are not multiples of the 128-wide blocks included.

Tolerances: activation quantization is bit-exact (same bytes, same scales). The FP8 GEMM and FP8
fused MoE read the same quantized inputs as the references, so only fp32 summation order differs:
fp32 atol = rtol = 1e-4, bf16 3e-2 (as the other kernels). Against unquantized math the error is
e4m3's: 3 mantissa bits, each rounding off by at most 2^-4 relative (bounds below).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from afd.kernels import ops, torch_ops  # noqa: E402
from afd.kernels.triton_fp8 import fp8_gemm, fp8_linear, quant_fp8  # noqa: E402
from afd.kernels.triton_moe import fused_moe_fp8  # noqa: E402

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = [torch.float32, torch.bfloat16]
BLOCK = (128, 128)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def test_torch_block_quantization_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g)
    w[:128, :128] *= 1000  # one block far louder than the rest keeps its own scale
    q, s = torch_ops.quant_fp8_blocks(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3) and s.dtype == torch.float32
    # every block's largest magnitude lands on e4m3's largest value
    assert q.float().abs().amax() == torch_ops.FP8_MAX
    back = torch_ops.dequant_fp8(q, s, BLOCK)
    assert ((back - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-9).all()
    zero_q, zero_s = torch_ops.quant_fp8_blocks(torch.zeros(3, 5), BLOCK)  # no 0/0
    assert zero_q.float().abs().sum() == 0 and torch.isfinite(zero_s).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 300), (1, 128), (19, 64), (0, 256)])
def test_quant_fp8_is_bit_exact(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g) * 2)
    x = x.to(dtype)
    if shape[0] > 2:
        x[2] = 0  # an all-zero row
    q, s = quant_fp8(x, 128)
    q_ref, s_ref = torch_ops.quant_fp8(x, 128)
    assert q.shape == x.shape and s.shape == (shape[0], -(-shape[1] // 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(7, 200, 300), (1, 256, 128), (33, 72, 520)])
def test_fp8_gemm_matches_reference(dtype, m, n, k):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) * k**-0.5
    wq, ws = torch_ops.quant_fp8_blocks(w, BLOCK)
    bias = torch.randn(n, generator=g).to(dtype)
    xq, xs = torch_ops.quant_fp8(x, 128)
    out = fp8_gemm(xq, xs, wq, ws, BLOCK, dtype)
    ref = torch_ops.dequant_fp8(xq, xs, (1, 128)) @ torch_ops.dequant_fp8(wq, ws, BLOCK).t()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), **TOL[dtype])
    lin = fp8_linear(x, wq, ws, BLOCK, bias)
    lin_ref = torch_ops.fp8_linear(x, wq, ws, BLOCK, bias)
    torch.testing.assert_close(lin.float(), lin_ref.float(), **TOL[dtype])
    # two e4m3 roundings (activations, weights) against the unquantized product
    assert _rel_err(lin_ref, x.float() @ w.t() + bias.float()) < 0.06


def test_fp8_gemm_other_block_shapes():
    """Non-square weight blocks (64 x 32): scales are read per block on both axes."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 100, generator=g)
    w = torch.randn(70, 100, generator=g)
    wq, ws = torch_ops.quant_fp8_blocks(w, (64, 32))
    out = fp8_linear(x, wq, ws, (64, 32))
    torch.testing.assert_close(out, torch_ops.fp8_linear(x, wq, ws, (64, 32)), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,inter", [(13, 300, 200), (1, 256, 128), (40, 96, 72)])
def test_fused_moe_fp8_matches_reference(dtype, num_tokens, hidden, inter):
    g = torch.Generator().manual_seed(num_tokens)
    num_experts, top_k = 6, 3
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    w13q, w13s, w2q, w2s = torch_ops.quant_fp8_experts(w13, w2)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices
    ids[0, 1] = -1  # what a shard sees for experts elsewhere
    if num_tokens > 3:
        ids[3, 0] = num_experts
    weights = torch.rand(num_tokens, top_k, generator=g)
    out = fused_moe_fp8(x, w13q, w13s, w2q, w2s, weights, ids, BLOCK)
    ref = torch_ops.fused_moe_fp8(x, w13q, w13s, w2q, w2s, weights, ids, BLOCK)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    # four e4m3 roundings (input, w13, SiLU-and-mul output, w2) against unquantized experts
    assert _rel_err(ref, torch_ops.fused_moe(x.float(), w13, w2, weights, ids)) < 0.1


def test_fused_moe_fp8_no_valid_ids_and_empty():
    experts = torch_ops.quant_fp8_experts(torch.randn(2, 64, 48), torch.randn(2, 48, 32))
    w13q, w13s, w2q, w2s = experts
    x = torch.randn(3, 48)
    ids = torch.tensor([[-1, 2], [5, -3], [2, 2]])
    args = (w13q, w13s, w2q, w2s)
    assert torch.equal(fused_moe_fp8(x, *args, torch.ones(3, 2), ids, BLOCK), torch.zeros(3, 48))
    ref = torch_ops.fused_moe_fp8(x, *args, torch.ones(3, 2), ids, BLOCK)
    assert torch.equal(ref, torch.zeros(3, 48))
    assert fused_moe_fp8(x[:0], *args, torch.ones(0, 2), ids[:0], BLOCK).shape == (0, 48)


def test_ops_select_the_fp8_kernels():
    from afd.kernels import triton_ops

    x = torch.randn(2, 16)
    before = ops.get_kernel_backend()
    try:
        ops.set_kernel_backend("torch")
        assert ops._pick("fp8_linear", x) is torch_ops.fp8_linear
        assert ops._pick("fused_moe_fp8", x) is torch_ops.fused_moe_fp8
        ops.set_kernel_backend("triton")
        for name in ("fp8_linear", "fused_moe_fp8", "quant_fp8"):
            assert ops._pick(name, x) is triton_ops.TRITON_IMPLS[name]
    finally:
        ops.set_kernel_backend(before)
