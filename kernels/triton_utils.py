"""Shared helpers for the Triton kernels: interpreter detection and device checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once: Triton decides between compiling and interpreting when @triton.jit runs.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensor(x: torch.Tensor, name: str) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"triton kernel {name!r} got a {x.device.type} tensor: Triton runs on CUDA, or on CPU "
            "only with TRITON_INTERPRET=1 set before afd.kernels.triton_ops is imported"
        )


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (at least 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


_INTERPRET_C = tl.constexpr(INTERPRET)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest-even for bf16 and e4m3 under the interpreter (which
    truncates bf16 and drops the carry of e4m3's rounding: 1.95 became 1.0)."""
    if _INTERPRET_C and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # exactly representable: truncation is exact now
    if _INTERPRET_C and dtype == tl.float8e4nv:
        # Round |x| to the e4m3 grid in float32 first; the cast of a grid value is exact.
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        sign = bits & 0x80000000
        bits = bits & 0x7FFFFFFF
        mag = bits.to(tl.float32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        # below 2^-6 e4m3 is subnormal, a fixed step of 2^-9: adding 2^14 rounds to that step
        subnormal = (mag + 16384.0) - 16384.0
        mag = tl.where(mag < 0.015625, subnormal, normal)
        x = (mag.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return x.to(dtype)
