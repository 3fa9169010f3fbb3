"""Block-scaled FP8 in Triton: dynamic per-token-group activation quantization and the W8A8 GEMM
that DeepSeek-V3's inference runs (e4m3 weights with one float32 scale per [bn, bk] block, e4m3
activations with one scale per token and bk channels; fp32 accumulation, each k-block's dot
scaled by its two scales). Same results as torch_ops.quant_fp8 / fp8_linear."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from afd.kernels.torch_ops import FP8_DTYPE, FP8_MAX, FP8_MIN_AMAX
from afd.kernels.triton_utils import INTERPRET, cast_to, check_tensor, next_pow2

_MAX = tl.constexpr(FP8_MAX)
_MIN_AMAX = tl.constexpr(FP8_MIN_AMAX)


@triton.jit
def _quant_fp8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    num_rows,
    num_cols,
    group,
    stride_xt,
    stride_qt,
    stride_st,
    BLOCK_T: tl.constexpr,
    GROUP_P2: tl.constexpr,
):
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs = tl.arange(0, GROUP_P2)
    cols = g * group + offs
    mask = (rows[:, None] < num_rows) & ((offs < group) & (cols < num_cols))[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_T]
    scale = tl.maximum(amax, _MIN_AMAX) / _MAX
    q = tl.clamp(x / scale[:, None], -_MAX, _MAX)
    tl.store(
        q_ptr + rows[:, None] * stride_qt + cols[None, :],
        cast_to(q, q_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(s_ptr + rows * stride_st + g, scale, mask=rows < num_rows)


def quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (fp8 [T, K], float32 scales [T, ceil(K/group)]), like torch_ops.quant_fp8."""
    check_tensor(x, "quant_fp8")
    num_rows, num_cols = x.shape
    groups = triton.cdiv(num_cols, group)
    q = torch.empty(num_rows, num_cols, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(num_rows, groups, dtype=torch.float32, device=x.device)
    if num_rows == 0 or num_cols == 0:
        return q, s
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_t = min(16, next_pow2(num_rows))
    _quant_fp8_kernel[(triton.cdiv(num_rows, block_t), groups)](
        x,
        q,
        s,
        num_rows,
        num_cols,
        group,
        x.stride(0),
        q.stride(0),
        s.stride(0),
        BLOCK_T=block_t,
        GROUP_P2=next_pow2(group),
    )
    return q, s


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    group_n,
    group_k,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # c [M, N] = a [M, K] @ b [N, K].T; each k-step covers one scale block (group_k <= BLOCK_K).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BK, BN]
    as_ptrs = as_ptr + offs_m * stride_asm  # [BM], plus the k-block
    bs_ptrs = bs_ptr + (offs_n // group_n) * stride_bsn  # [BN], plus the k-block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, group_k)):
        k_mask = (offs_k < group_k) & (offs_k < K - kb * group_k)
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += group_k
        b_ptrs += group_k
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, cast_to(acc, c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _gemm_tiles(m: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): decode-sized M gets a thin tile."""
    block_m = min(64, max(16, next_pow2(m)))
    return block_m, 4


def fp8_gemm(
    a: torch.Tensor,  # [M, K] fp8
    a_scale: torch.Tensor,  # [M, ceil(K/bk)]
    b: torch.Tensor,  # [N, K] fp8
    b_scale: torch.Tensor,  # [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int],
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-scaled W8A8 GEMM a @ b.T -> [M, N] out_dtype (fp32 accumulation)."""
    check_tensor(a, "fp8_gemm")
    m, k = a.shape
    n = b.shape[0]
    group_n, group_k = block
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if b.stride(-1) != 1 or a.stride(-1) != 1:
        raise ValueError("fp8_gemm needs row-major a and b (last dim contiguous)")
    block_m, num_warps = _gemm_tiles(m)
    block_n = 128 if n >= 128 else max(16, next_pow2(n))
    gpu_opts = {} if INTERPRET else {"num_warps": num_warps, "num_stages": 3}
    _fp8_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        a,
        a_scale,
        b,
        b_scale,
        bias if bias is not None else c,
        c,
        m,
        n,
        k,
        group_n,
        group_k,
        a.stride(0),
        a_scale.stride(0),
        b.stride(0),
        b_scale.stride(0),
        c.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=max(16, next_pow2(group_k)),
        **gpu_opts,
    )
    return c


def fp8_linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K] fp8
    scale: torch.Tensor,  # [ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T with x quantized per token and bk channels: torch_ops.fp8_linear's contract."""
    xq, xs = quant_fp8(x, block[1])
    return fp8_gemm(xq, xs, weight, scale, block, x.dtype, bias)
