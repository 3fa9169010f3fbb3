"""Registers the Triton kernels into afd.kernels.ops; imported lazily on first Triton use."""

from __future__ import annotations

from afd.kernels import ops
from afd.kernels.triton_attention import mla_attention, paged_attention
from afd.kernels.triton_fp8 import fp8_linear, quant_fp8
from afd.kernels.triton_moe import fused_moe, fused_moe_fp8
from afd.kernels.triton_norm import rms_norm
from afd.kernels.triton_rope import rotary_embedding

TRITON_IMPLS = {
    "rms_norm": rms_norm,
    "fused_moe": fused_moe,
    "fused_moe_fp8": fused_moe_fp8,
    "fp8_linear": fp8_linear,
    "quant_fp8": quant_fp8,
    "paged_attention": paged_attention,
    "mla_attention": mla_attention,
    "rotary_embedding": rotary_embedding,
}
ops._TRITON_IMPLS.update(TRITON_IMPLS)
