"""Tiny random MoE checkpoints in Hugging Face format, built with transformers' own classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3")


def tiny_config(family: str, vocab_size: int = 512, **overrides: Any):
    """A small config that exercises the family's features (shared experts, dense layers, ...)."""
    from transformers import DeepseekV2Config, DeepseekV3Config, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )
    if family == "qwen3-moe":
        kw = dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        )
        cls = Qwen3MoeConfig
    elif family == "qwen2-moe":
        kw = dict(
            num_hidden_layers=2,
            num_key_value_heads=2,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            qkv_bias=True,
        )
        cls = Qwen2MoeConfig
    elif family == "deepseek-v2":
        kw = dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 512,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        )
        cls = DeepseekV2Config
    elif family == "deepseek-v3":
        kw = dict(
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_interleave=True,
        )
        cls = DeepseekV3Config
    else:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(FAMILIES)}")
    kw = {**common, **kw, **overrides}
    return cls(**kw)


def build_tiny_checkpoint(
    family: str, out_dir: str | Path, seed: int = 0, vocab_size: int = 512, **overrides: Any
) -> Path:
    """Random weights from `seed`, saved with save_pretrained (safetensors, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, vocab_size, **overrides)
    config.bos_token_id = overrides.get("bos_token_id", config.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for name, buf in model.named_buffers():
            # transformers initialises the noaux_tc bias to zero; random values exercise it
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.rand(buf.shape, generator=gen) * 0.1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out
