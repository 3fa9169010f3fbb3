"""Tiny random MoE checkpoints in Hugging Face format, built with transformers' own classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("qwen2-moe", "qwen3-moe", "deepseek-v2", "deepseek-v3")


def _qwen3_moe_kwargs() -> dict[str, Any]:
    """qwen3-moe: the family-specific sizes and routing."""
    return dict(
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


def _qwen2_moe_kwargs() -> dict[str, Any]:
    """qwen2-moe: the family-specific sizes and routing."""
    return dict(
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


def _deepseek_v2_kwargs() -> dict[str, Any]:
    """deepseek-v2: the family-specific sizes and routing."""
    return dict(
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


def _deepseek_v3_kwargs() -> dict[str, Any]:
    """deepseek-v3: the family-specific sizes and routing."""
    return dict(
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
    family_kwargs = {
        "qwen3-moe": (_qwen3_moe_kwargs, Qwen3MoeConfig),
        "qwen2-moe": (_qwen2_moe_kwargs, Qwen2MoeConfig),
        "deepseek-v2": (_deepseek_v2_kwargs, DeepseekV2Config),
        "deepseek-v3": (_deepseek_v3_kwargs, DeepseekV3Config),
    }
    if family not in family_kwargs:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(FAMILIES)}")
    kwargs_of, cls = family_kwargs[family]
    kw = kwargs_of()
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


def build_random_checkpoint(
    config: dict[str, Any],
    out_dir: str | Path,
    seed: int = 0,
    dtype: str = "bfloat16",
    std: float = 0.02,
) -> Path:
    """A checkpoint of any size from a config.json dict, in the hub's per-expert layout, with
    random weights drawn tensor by tensor (no transformers init: at real widths that is the slow
    part). Linear weights ~ N(0, std), norms 1 + N(0, 0.1), e_score_correction_bias U(0, 0.1)."""
    import json

    import torch
    from safetensors.torch import save_file

    from afd.config import ModelConfig
    from afd.models import build_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf_dict(config)
    with torch.device("meta"):
        model = build_model(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if "correction" in n})
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    tensors = _draw_tensors(shapes, torch.Generator().manual_seed(seed), getattr(torch, dtype), std)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2))
    return out


def _draw_tensors(shapes: dict[str, tuple], gen, wdtype, std: float) -> dict:
    """Random tensors for our parameter shapes, stacked experts split per expert and proj."""
    import torch

    tensors: dict[str, torch.Tensor] = {}

    def draw(shape, mean=0.0, scale=std, dt=wdtype):
        return torch.empty(shape, dtype=dt).normal_(mean, scale, generator=gen)

    for name, shape in shapes.items():
        if name.endswith(("w13", "w2")):  # stacked experts -> one tensor per expert and proj
            prefix = name.rsplit(".", 1)[0]
            for e in range(shape[0]):
                if name.endswith("w13"):
                    inter = shape[1] // 2
                    tensors[f"{prefix}.{e}.gate_proj.weight"] = draw((inter, shape[2]))
                    tensors[f"{prefix}.{e}.up_proj.weight"] = draw((inter, shape[2]))
                else:
                    tensors[f"{prefix}.{e}.down_proj.weight"] = draw(shape[1:])
        elif name.endswith("e_score_correction_bias"):
            tensors[name] = torch.rand(shape, generator=gen) * 0.1  # float32, as released
        elif "norm" in name.rsplit(".", 2)[-2]:
            tensors[name] = draw(shape, 1.0, 0.1)
        else:
            tensors[name] = draw(shape)
    return tensors


def add_mtp_weights(model_dir: str | Path, seed: int = 0, std: float = 0.05) -> Path:
    """Add random DeepSeek-V3 MTP weights to a (tiny) checkpoint as DeepSeek lays them out:
    decoder layer index num_hidden_layers with enorm, hnorm, eh_proj, its block, shared_head and
    a copy of embed_tokens, in a second shard of a model.safetensors.index.json;
    num_nextn_predict_layers = 1 in config.json."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    from afd.config import ModelConfig
    from afd.models.mtp import MTPLayer

    out = Path(model_dir)
    cfg = ModelConfig.from_pretrained(out)
    with torch.device("meta"):
        layer = MTPLayer(cfg)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in layer.named_buffers() if "correction" in n})
    drawn = _draw_tensors(shapes, torch.Generator().manual_seed(seed), torch.float32, std)
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    tensors = {prefix + n.removeprefix("block."): t for n, t in drawn.items()}
    main_file = out / "model.safetensors"
    main = load_file(str(main_file))
    tensors[prefix + "embed_tokens.weight"] = main["model.embed_tokens.weight"].clone()
    # two shards and their index, as DeepSeek ships (transformers reads a lone
    # model.safetensors before any index, so the main file is renamed)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    main_file.rename(out / names[0])
    save_file(tensors, str(out / names[1]), metadata={"format": "pt"})
    weight_map = dict.fromkeys(main, names[0]) | dict.fromkeys(tensors, names[1])
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return out
