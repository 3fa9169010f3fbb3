"""RMSNorm in Triton, optionally fused with the residual add (one pass over the row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from afd.kernels.triton_utils import cast_to, check_tensor, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    hidden,
    stride_x,
    stride_res,
    stride_y,
    stride_res_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the activation dtype before normalising, as the torch path does.
        s = cast_to(x + r, res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / hidden
    h = cast_to(x * tl.rsqrt(var + eps), res_out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, cast_to(w * h, y_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [..., H]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch_ops.rms_norm: y, or (y, x + residual) when residual is given."""
    check_tensor(x, "rms_norm")
    shape, hidden = x.shape, x.shape[-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, hidden, dtype=torch.result_type(weight, x), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty(rows, hidden, dtype=torch.result_type(x, residual), device=x.device)
    else:
        r2 = x2  # unused, any valid pointer
        # Carries the activation dtype for the pre-scale rounding; nothing is written.
        res_out = x2
    if rows > 0:
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight,
            y,
            res_out,
            hidden,
            x2.stride(0),
            r2.stride(0),
            y.stride(0),
            res_out.stride(0),
            float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK_H=next_pow2(hidden),
            num_warps=min(max(next_pow2(hidden) // 256, 1), 8),
        )
    y = y.view(shape)
    return y if residual is None else (y, res_out.view(shape))
