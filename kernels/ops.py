"""Kernel entry points the engine calls; the backend (torch, cpu or triton) is picked only here."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from afd.choices import KERNEL_BACKENDS  # noqa: F401  (re-exported; one list)
from afd.kernels import cpu_ops, torch_ops
from afd.kernels.metadata import AttentionMetadata

# "auto": triton for CUDA tensors, the cpu fast paths for CPU tensors. "torch" forces the
# references. "cpu" uses its fast paths on CPU tensors (the references elsewhere and for the
# kernels it lacks, FP8 among them). "triton" on CPU tensors needs TRITON_INTERPRET=1 (how CI
# runs the kernels).
_backend = os.environ.get("AFD_KERNEL_BACKEND", "auto")

# name -> triton implementation, filled by afd.kernels.triton_ops when triton imports
_TRITON_IMPLS: dict[str, Callable] = {}
_triton_import_error: ImportError | None = None


def set_kernel_backend(name: str) -> None:
    """Force 'torch', 'cpu' or 'triton' kernels, or 'auto' (triton on CUDA, cpu on CPU)."""
    global _backend
    if name not in KERNEL_BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r}; choose from {', '.join(KERNEL_BACKENDS)}"
        )
    _backend = name


def get_kernel_backend() -> str:
    """The backend name set by set_kernel_backend (or AFD_KERNEL_BACKEND)."""
    return _backend


def _pick(name: str, x: torch.Tensor) -> Callable:
    """The implementation of `name` for tensor `x` under the current backend."""
    if _backend == "torch":
        return getattr(torch_ops, name)
    if _backend in ("auto", "cpu") and not x.is_cuda:
        return cpu_ops.CPU_IMPLS.get(name) or getattr(torch_ops, name)
    if _backend == "cpu":
        return getattr(torch_ops, name)
    impl = _TRITON_IMPLS.get(name) if triton_available() else None
    if impl is not None:
        return impl
    if _backend == "triton":
        if _triton_import_error is not None:
            raise RuntimeError(
                "--kernel-backend triton needs the 'triton' package: pip install 'afd[triton]'"
            ) from _triton_import_error
        raise RuntimeError(f"kernel {name!r} has no triton implementation")
    return getattr(torch_ops, name)


def triton_available() -> bool:
    """True when the Triton kernels import (tried once; the error is kept for the message)."""
    global _triton_import_error
    if not _TRITON_IMPLS and _triton_import_error is None:
        try:
            from afd.kernels import triton_ops  # noqa: F401  (registers into _TRITON_IMPLS)
        except ImportError as e:
            _triton_import_error = e
    return bool(_TRITON_IMPLS)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with `residual` returns (norm(x + residual), x + residual)."""
    return _pick("rms_norm", x)(x, weight, eps, residual)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] shard-local; ids < 0 or >= E are skipped
) -> torch.Tensor:
    """Routed experts: sum_j w_j * down(silu(gate(x)) * up(x)) over each token's top-k -> [T, H]."""
    return _pick("fused_moe", x)(x, w13, w2, topk_weights, topk_ids)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] float8_e4m3fn
    w13_scale: torch.Tensor,  # [E, 2 * ceil(I/bn), ceil(H/bk)]: gate blocks, then up blocks
    w2: torch.Tensor,  # [E, H, I] float8_e4m3fn
    w2_scale: torch.Tensor,  # [E, ceil(H/bn), ceil(I/bk)]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] shard-local; ids < 0 or >= E are skipped
    block: tuple[int, int],  # (bn, bk) of the weight scales
) -> torch.Tensor:
    """fused_moe with block-FP8 experts; activations quantized per token and bk channels."""
    impl = _pick("fused_moe_fp8", x)
    return impl(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block)


def fp8_linear(
    x: torch.Tensor,  # [T, K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [ceil(N/bn), ceil(K/bk)] float32
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ weight.T (+ bias) -> [T, N] in x's dtype; x quantized per token and bk channels."""
    return _pick("fp8_linear", x)(x, weight, scale, block, bias)


def quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (float8_e4m3fn [T, K], float32 scales [T, ceil(K/group)])."""
    return _pick("quant_fp8", x)(x, group)


def store_kv(
    k: torch.Tensor,
    k_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    v: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
) -> None:
    """Write new keys (and values) into their paged cache slots (an indexed copy on any device)."""
    torch_ops.store_kv(k, k_cache, slot_mapping, v, v_cache)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,  # [N, bs, Hkv, Dv]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal varlen attention over the paged cache -> [T, Hq, Dv]."""
    return _pick("paged_attention", q)(q, k_cache, v_cache, meta, scale)


def mla_attention(
    q_latent: torch.Tensor,  # [T, Hq, L]
    q_rope: torch.Tensor,  # [T, Hq, R]
    kv_cache: torch.Tensor,  # [N, bs, L + R]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA over the paged latent cache -> [T, Hq, L]."""
    return _pick("mla_attention", q_latent)(q_latent, q_rope, kv_cache, meta, scale)


def rotary_embedding(
    q: torch.Tensor,  # [T, Hq, d]
    k: torch.Tensor,  # [T, Hk, d]
    cos: torch.Tensor,  # [T, d/2], attention scaling folded in
    sin: torch.Tensor,  # [T, d/2]
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k (NeoX halves, or DeepSeek's interleaved pairs de-interleaved)."""
    return _pick("rotary_embedding", q)(q, k, cos, sin, interleaved)
