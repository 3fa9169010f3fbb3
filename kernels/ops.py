"""Kernel entry points the engine calls; the backend (torch or triton) is picked only here."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from afd.kernels import torch_ops

KERNEL_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("AFD_KERNEL_BACKEND", "auto")

# name -> triton implementation, filled by afd.kernels.triton_ops when triton imports
_TRITON_IMPLS: dict[str, Callable] = {}


def set_kernel_backend(name: str) -> None:
    """Force 'torch' or 'triton' kernels, or 'auto' (triton on CUDA, torch on CPU)."""
    global _backend
    if name not in KERNEL_BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r}; choose from {', '.join(KERNEL_BACKENDS)}"
        )
    _backend = name


def get_kernel_backend() -> str:
    return _backend


def _pick(name: str, x: torch.Tensor) -> Callable:
    if _backend == "torch" or (_backend == "auto" and not x.is_cuda):
        return getattr(torch_ops, name)
    if not _TRITON_IMPLS:
        _load_triton()
    impl = _TRITON_IMPLS.get(name)
    if impl is None:
        if _backend == "triton":
            raise RuntimeError(f"kernel {name!r} has no triton implementation")
        return getattr(torch_ops, name)
    return impl


def _load_triton() -> None:
    import importlib.util

    if importlib.util.find_spec("afd.kernels.triton_ops") is None:
        if _backend == "triton":
            raise RuntimeError("Triton kernels are not implemented yet; use --kernel-backend torch")
        return
    try:
        from afd.kernels import triton_ops  # noqa: F401  (registers into _TRITON_IMPLS)
    except ImportError as e:
        if _backend == "triton":
            raise RuntimeError(
                "--kernel-backend triton needs the 'triton' package: pip install 'afd[triton]'"
            ) from e


def rms_norm(x, weight, eps, residual=None):
    return _pick("rms_norm", x)(x, weight, eps, residual)


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    return _pick("fused_moe", x)(x, w13, w2, topk_weights, topk_ids)


def store_kv(k, k_cache, slot_mapping, v=None, v_cache=None):
    return torch_ops.store_kv(k, k_cache, slot_mapping, v, v_cache)


def paged_attention(q, k_cache, v_cache, meta, scale):
    return _pick("paged_attention", q)(q, k_cache, v_cache, meta, scale)


def mla_attention(q_latent, q_rope, kv_cache, meta, scale):
    return _pick("mla_attention", q_latent)(q_latent, q_rope, kv_cache, meta, scale)
