"""Fused MoE in Triton: align routed (token, slot) pairs to experts in blocks of BLOCK_M, grouped
GEMM for gate/up with SiLU-and-multiply fused, grouped GEMM for down scaled by the router weight,
then a top-k combine. Same semantics as torch_ops.fused_moe (out-of-range ids contribute zero)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from afd.kernels.triton_utils import INTERPRET, cast_to, check_tensor, next_pow2


def moe_align_block_size(
    topk_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the flat (token, slot) indices by expert, each group padded to a multiple of block_m.

    Returns `sorted_ids` [P] int32 (padding holds T * k) and `block_experts` [P / block_m] int32
    (the expert of each block, -1 for unused tail blocks). P is an upper bound known from shapes
    alone, so nothing here waits on the device.
    """
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    device = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts).long()  # invalid ids sort last
    counts = torch.bincount(key, minlength=num_experts + 1)  # [E + 1]
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(key, stable=True)  # [n]
    sorted_key = key[order]
    group_start = counts.cumsum(0) - counts  # [E + 1]
    rank = torch.arange(n, device=device) - group_start[sorted_key]
    max_padded = n + min(n, num_experts) * (block_m - 1)
    max_padded = max(block_m, (max_padded + block_m - 1) // block_m * block_m)
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=device)
    keep = sorted_key < num_experts
    dest = padded_start[sorted_key[keep]] + rank[keep]
    sorted_ids[dest] = order[keep].to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_start, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_ids, block_experts


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    w13_ptr,
    inter_ptr,
    sorted_ids_ptr,
    block_experts_ptr,
    xs_ptr,
    ws_ptr,
    num_slots,
    top_k,
    hidden,
    inter_size,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wk,
    stride_it,
    stride_xst,
    stride_wse,
    stride_wsn,
    group_n,
    group_k,
    up_block_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    # FP8: x and w13 are e4m3; xs [T, Kb] per-token-group scales, ws [E, 2 * Nb, Kb] block
    # scales (gate blocks, then up blocks from up_block_row); one k-step = one scale block.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slot = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = slot < num_slots
    token = slot // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter_size
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh  # [BM, BK]
    w_ptrs = w13_ptr + expert * stride_we
    g_ptrs = w_ptrs + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    u_ptrs = g_ptrs + inter_size * stride_wn  # up rows follow the gate rows in w13
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step = group_k if FP8 else BLOCK_K
    if FP8:
        xs_ptrs = xs_ptr + token * stride_xst  # [BM], plus the k-block
        gs_ptrs = ws_ptr + expert * stride_wse + (offs_n // group_n) * stride_wsn  # [BN]
        us_ptrs = gs_ptrs + up_block_row * stride_wsn
    for kb in range(0, tl.cdiv(hidden, step)):
        k_mask = (offs_k < step) & (offs_k < hidden - kb * step)
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            a_s = tl.load(xs_ptrs + kb, mask=row_mask, other=0.0)[:, None]
            acc_g += tl.dot(a, wg) * a_s * tl.load(gs_ptrs + kb, mask=n_mask, other=0.0)[None, :]
            acc_u += tl.dot(a, wu) * a_s * tl.load(us_ptrs + kb, mask=n_mask, other=0.0)[None, :]
        else:
            if UPCAST:
                a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
            if IEEE:
                acc_g = tl.dot(a, wg, acc_g, input_precision="ieee")
                acc_u = tl.dot(a, wu, acc_u, input_precision="ieee")
            else:
                acc_g = tl.dot(a, wg, acc_g)
                acc_u = tl.dot(a, wu, acc_u)
        a_ptrs += step * stride_xh
        g_ptrs += step * stride_wk
        u_ptrs += step * stride_wk
    dtype = inter_ptr.dtype.element_ty
    # Round like the torch path: the projections come out in the activation dtype.
    g = cast_to(acc_g, dtype).to(tl.float32)
    u = cast_to(acc_u, dtype).to(tl.float32)
    act = cast_to(g * tl.sigmoid(g), dtype).to(tl.float32) * u
    out_ptrs = inter_ptr + slot[:, None] * stride_it + offs_n[None, :]
    tl.store(out_ptrs, cast_to(act, dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    inter_ptr,
    w2_ptr,
    out_ptr,
    weights_ptr,
    sorted_ids_ptr,
    block_experts_ptr,
    is_ptr,
    ws_ptr,
    num_slots,
    hidden,
    inter_size,
    stride_it,
    stride_we,
    stride_wn,
    stride_wk,
    stride_ot,
    stride_ist,
    stride_wse,
    stride_wsn,
    group_n,
    group_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FP8: tl.constexpr,
):
    # FP8: the intermediate and w2 are e4m3; is [T*k, Kb] per-row-group scales, ws [E, Nb, Kb].
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    slot = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + slot[:, None] * stride_it + offs_k[None, :]  # [BM, BK]
    b_ptrs = w2_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    step = group_k if FP8 else BLOCK_K
    if FP8:
        as_ptrs = is_ptr + slot * stride_ist  # [BM], plus the k-block
        bs_ptrs = ws_ptr + expert * stride_wse + (offs_n // group_n) * stride_wsn  # [BN]
    for kb in range(0, tl.cdiv(inter_size, step)):
        k_mask = (offs_k < step) & (offs_k < inter_size - kb * step)
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP8:
            a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        a_ptrs += step
        b_ptrs += step * stride_wk
    dtype = out_ptr.dtype.element_ty
    w = tl.load(weights_ptr + slot, mask=row_mask, other=0.0)  # [BM] router weights
    w = cast_to(w, dtype).to(tl.float32)
    h = cast_to(acc, dtype).to(tl.float32) * w[:, None]
    out_ptrs = out_ptr + slot[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, cast_to(h, dtype), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_combine_kernel(
    partial_ptr,
    ids_ptr,
    out_ptr,
    hidden,
    num_experts,
    stride_pt,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        slot = token * TOP_K + j
        e = tl.load(ids_ptr + slot) + tl.zeros((BLOCK_N,), dtype=tl.int64)  # broadcast
        # Skipped slots were never written: mask them instead of zero-filling the buffer.
        valid = (e >= 0) & (e < num_experts)
        acc += tl.load(partial_ptr + slot * stride_pt + offs_n, mask=n_mask & valid, other=0.0).to(
            tl.float32
        )
    out = cast_to(acc, out_ptr.dtype.element_ty)
    tl.store(out_ptr + token * stride_ot + offs_n, out, mask=n_mask)


def _pick_block_m(num_slots: int, num_experts: int) -> int:
    """Small blocks when experts see few tokens (decode), larger when they see many."""
    per_expert = max(1, num_slots // max(1, num_experts))
    return min(64, max(16, next_pow2(per_expert)))


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], shard-local; out-of-range ids are skipped
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton fused MoE with the contract of torch_ops.fused_moe."""
    return _fused_moe(x, w13, w2, topk_weights, topk_ids, block_m)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] fp8
    w13_scale: torch.Tensor,  # [E, 2 * ceil(I/bn), ceil(H/bk)]
    w2: torch.Tensor,  # [E, H, I] fp8
    w2_scale: torch.Tensor,  # [E, ceil(H/bn), ceil(I/bk)]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k], shard-local; out-of-range ids are skipped
    block: tuple[int, int],
    block_m: int | None = None,
) -> torch.Tensor:
    """Triton fused MoE on block-FP8 experts: torch_ops.fused_moe_fp8's contract."""
    return _fused_moe(x, w13, w2, topk_weights, topk_ids, block_m, (w13_scale, w2_scale, block))


@dataclass(frozen=True)
class _GemmLaunch:
    """What the gate/up and down GEMM launches share: the expert-sorted slots and the tiling."""

    sorted_ids: torch.Tensor
    block_experts: torch.Tensor
    num_slots: int
    hidden: int
    inter_size: int
    block_m: int
    block_k: int
    group_n: int
    group_k: int
    fp8: bool
    upcast: bool
    ieee: bool
    block_n: int = 64

    def grid(self, cols: int) -> tuple[int, int]:
        return (self.block_experts.shape[0], triton.cdiv(cols, self.block_n))

    def meta(self) -> dict:
        gpu_opts = {} if INTERPRET else {"num_warps": 4, "num_stages": 3}
        tiles = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        return dict(**tiles, UPCAST=self.upcast, IEEE=self.ieee, FP8=self.fp8, **gpu_opts)


def _launch_gate_up(g: _GemmLaunch, a, w13, inter, a_scale, w13_scale, top_k, up_block_row) -> None:
    _moe_gate_up_kernel[g.grid(g.inter_size)](
        a,
        w13,
        inter,
        g.sorted_ids,
        g.block_experts,
        a_scale,
        w13_scale,
        g.num_slots,
        top_k,
        g.hidden,
        g.inter_size,
        a.stride(0),
        a.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        inter.stride(0),
        a_scale.stride(0),
        w13_scale.stride(0),
        w13_scale.stride(1),
        g.group_n,
        g.group_k,
        up_block_row,
        **g.meta(),
    )


def _launch_down(g: _GemmLaunch, inter, w2, partial, weights, inter_scale, w2_scale) -> None:
    _moe_down_kernel[g.grid(g.hidden)](
        inter,
        w2,
        partial,
        weights,
        g.sorted_ids,
        g.block_experts,
        inter_scale,
        w2_scale,
        g.num_slots,
        g.hidden,
        g.inter_size,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        partial.stride(0),
        inter_scale.stride(0),
        w2_scale.stride(0),
        w2_scale.stride(1),
        g.group_n,
        g.group_k,
        **g.meta(),
    )


def _launch_combine(partial, ids, out, num_experts: int, top_k: int) -> None:
    num_tokens, hidden = out.shape
    combine_n = min(1024, next_pow2(hidden))
    _moe_combine_kernel[(num_tokens, triton.cdiv(hidden, combine_n))](
        partial,
        ids,
        out,
        hidden,
        num_experts,
        partial.stride(0),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_N=combine_n,
    )


def _fused_moe(x, w13, w2, topk_weights, topk_ids, block_m, fp8=None) -> torch.Tensor:
    check_tensor(x, "fused_moe")
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    out = torch.empty_like(x)
    if num_slots == 0:
        return out.zero_()
    block_m = block_m or _pick_block_m(num_slots, num_experts)
    sorted_ids, block_experts = moe_align_block_size(topk_ids, num_experts, block_m)
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).contiguous()
    # [T*k, I]; rows of skipped slots stay unwritten (FP8 quantizes them all: zeros under the
    # interpreter, which warns about garbage it divides)
    alloc = torch.zeros if fp8 is not None and INTERPRET else torch.empty
    inter = alloc(num_slots, inter_size, dtype=x.dtype, device=x.device)
    partial = torch.empty(num_slots, hidden, dtype=x.dtype, device=x.device)  # [T*k, H]
    block_k = 64
    if fp8 is not None:
        from afd.kernels.triton_fp8 import quant_fp8

        w13_scale, w2_scale, (group_n, group_k) = fp8
        block_k = max(16, next_pow2(group_k))
        a, a_scale = quant_fp8(x, group_k)  # [T, H] fp8, [T, Hb]
        up_block_row = triton.cdiv(inter_size, group_n)
    else:
        w13_scale = w2_scale = a_scale = x  # unused pointers
        group_n = group_k = up_block_row = 1
        a = x
    g = _GemmLaunch(
        sorted_ids,
        block_experts,
        num_slots,
        hidden,
        inter_size,
        block_m,
        block_k,
        group_n,
        group_k,
        fp8=fp8 is not None,
        upcast=INTERPRET,  # the interpreter gets bf16 arithmetic wrong; compute in fp32 there
        ieee=x.dtype == torch.float32 and not INTERPRET,
    )
    _launch_gate_up(g, a, w13, inter, a_scale, w13_scale, top_k, up_block_row)
    if fp8 is not None:
        inter, inter_scale = quant_fp8(inter, group_k)  # [T*k, I] fp8, [T*k, Ib]
    else:
        inter_scale = inter
    _launch_down(g, inter, w2, partial, weights, inter_scale, w2_scale)
    _launch_combine(partial, ids, out, num_experts, top_k)
    return out
