"""Model definitions (Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3) split at the attention/FFN seam."""

from __future__ import annotations

from afd.models.model import (
    ExpertShardModel,
    MoEForCausalLM,
    allocate_kv_cache,
    build_model,
    kv_cache_bytes_per_block,
)

__all__ = [
    "ExpertShardModel",
    "MoEForCausalLM",
    "allocate_kv_cache",
    "build_model",
    "kv_cache_bytes_per_block",
]
