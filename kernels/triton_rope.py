"""Rotary embedding in Triton for the NeoX (half split) and DeepSeek (interleaved) layouts; the
frequencies (incl. YaRN) arrive as cos/sin, so every scaling type shares the kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from afd.kernels.triton_utils import cast_to, check_tensor, next_pow2


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    num_heads,
    half,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    INTERLEAVED: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    freqs = tl.arange(0, BLOCK_F)
    h_mask, f_mask = heads < num_heads, freqs < half
    mask = h_mask[:, None] & f_mask[None, :]
    cos = tl.load(cos_ptr + token * stride_ct + freqs, mask=f_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_st + freqs, mask=f_mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        first, second = 2 * freqs, 2 * freqs + 1
    else:
        first, second = freqs, freqs + half
    base = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)  # [BH, BF]
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    out = out_ptr + token * stride_ot + heads[:, None] * stride_oh + freqs[None, :]
    tl.store(out, cast_to(o1, out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, cast_to(o2, out_ptr.dtype.element_ty), mask=mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    num_tokens, num_heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(num_tokens, num_heads, dim, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    _rotary_kernel[(num_tokens,)](
        x,
        cos,
        sin,
        out,
        num_heads,
        dim // 2,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        sin.stride(0),
        out.stride(0),
        out.stride(1),
        INTERLEAVED=interleaved,
        BLOCK_H=next_pow2(num_heads),
        BLOCK_F=next_pow2(dim // 2),
    )
    return out


def rotary_embedding(
    q: torch.Tensor,  # [T, Hq, d]
    k: torch.Tensor,  # [T, Hk, d]
    cos: torch.Tensor,  # [T, d/2]
    sin: torch.Tensor,  # [T, d/2]
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_ops.rotary_embedding."""
    check_tensor(q, "rotary_embedding")
    cos = cos.reshape(cos.shape[0], -1)
    sin = sin.reshape(sin.shape[0], -1)
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(q, cos, sin, interleaved), _rotate(k, cos, sin, interleaved)
