"""Decoder-only MoE models. Every decoder layer is an attention part and an FFN part with a clean
seam, because in AFD the two halves (and the routed experts) run in different processes."""

from __future__ import annotations

import torch
from torch import nn

from afd.config import ModelConfig
from afd.kernels.metadata import AttentionMetadata
from afd.models.attention import GQAAttention, MLAAttention
from afd.models.layers import DenseMLP, ExpertShard, MoE, RMSNorm, Router

PARTS = ("full", "attention", "experts")


def build_router(config: ModelConfig) -> Router:
    hf = config.hf
    h, e, k = config.hidden_size, config.n_routed_experts, config.num_experts_per_tok
    if config.model_type == "deepseek_v3":
        return Router(
            h,
            e,
            k,
            scoring="sigmoid",
            method="noaux_tc",
            norm_topk_prob=bool(hf.norm_topk_prob),
            n_group=hf.n_group,
            topk_group=hf.topk_group,
            routed_scaling_factor=hf.routed_scaling_factor,
            fp32_logits=True,
            correction_bias=True,
        )
    if config.model_type == "deepseek_v2":
        method = getattr(hf, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"unsupported DeepSeek-V2 topk_method {method!r}")
        return Router(
            h,
            e,
            k,
            scoring="softmax",
            method=method,
            n_group=hf.n_group or 1,
            topk_group=hf.topk_group or 1,
            routed_scaling_factor=hf.routed_scaling_factor,
            fp32_logits=True,
        )
    return Router(h, e, k, norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)))


def build_shared_experts(config: ModelConfig) -> tuple[DenseMLP | None, bool, str]:
    """(shared MLP, has a sigmoid gate, attribute name as in the checkpoint)."""
    hf = config.hf
    if config.is_mla:
        n = getattr(hf, "n_shared_experts", 0) or 0
        mlp = DenseMLP(config.hidden_size, config.moe_intermediate_size * n) if n else None
        return mlp, False, "shared_experts"
    size = getattr(hf, "shared_expert_intermediate_size", 0) or 0
    if config.model_type == "qwen2_moe" and size:
        return DenseMLP(config.hidden_size, size), True, "shared_expert"
    return None, False, "shared_expert"


class DecoderLayer(nn.Module):
    """input_layernorm -> self_attn -> post_attention_layernorm | mlp (dense or MoE)."""

    def __init__(self, config: ModelConfig, idx: int, with_experts: bool):
        super().__init__()
        self.idx = idx
        if config.is_mla:
            self.self_attn = MLAAttention(config)
        elif config.model_type == "qwen2_moe":
            self.self_attn = GQAAttention(config, qkv_bias=bool(config.hf.qkv_bias), qk_norm=False)
        else:
            bias = bool(getattr(config.hf, "attention_bias", False))
            self.self_attn = GQAAttention(config, qkv_bias=bias, qk_norm=True, o_bias=bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(idx)
        if self.is_moe:
            shared, gated, attr = build_shared_experts(config)
            experts = (
                ExpertShard(
                    config.hidden_size, config.moe_intermediate_size, 0, config.n_routed_experts
                )
                if with_experts
                else None
            )
            self.mlp = MoE(build_router(config), experts, shared, gated, config.hidden_size, attr)
        else:
            self.mlp = DenseMLP(config.hidden_size, config.hf.intermediate_size)

    def attention_part(
        self,
        hidden: torch.Tensor,  # [T, H]
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed FFN input [T, H], residual [T, H])."""
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm(hidden, residual)
        x = self.self_attn(x, positions, meta, kv_cache)
        return self.post_attention_layernorm(x, residual)

    def ffn_part(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Backbone(nn.Module):
    """`model.*` in the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, config: ModelConfig, with_experts: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, with_experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MoEForCausalLM(nn.Module):
    """The whole model (part='full') or everything but the routed experts (part='attention')."""

    def __init__(self, config: ModelConfig, part: str = "full"):
        super().__init__()
        self.config = config
        self.part = part
        self.model = Backbone(config, with_experts=(part == "full"))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding; again after `to_empty`, which unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states after the final norm, [T, H] (needs part='full'); with return_hidden
        also the pre-norm last hidden (h + residual), which DeepSeek's MTP drafter takes.
        kv_caches may hold extra trailing layers (the MTP layer's); they are not used here."""
        h, residual = self.embed(input_ids), None
        for layer, kv in zip(self.model.layers, kv_caches[: len(self.model.layers)], strict=True):
            x, residual = layer.attention_part(h, residual, positions, meta, kv)
            h = layer.ffn_part(x)
        out = self.final_norm(h, residual)
        if return_hidden:
            return out, h if residual is None else h + residual
        return out

    def final_norm(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if residual is None:
            return self.model.norm(h)
        return self.model.norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [T, V]


class ExpertShardModel(nn.Module):
    """What an expert worker holds: the routed experts [start, end) of every MoE layer."""

    def __init__(self, config: ModelConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.n_routed_experts:
            raise ValueError(
                f"expert range [{start}, {end}) is outside 0..{config.n_routed_experts}"
            )
        self.config = config
        self.start, self.end = start, end
        self.moe_layers = config.moe_layers
        self.experts = nn.ModuleDict(
            {
                str(i): ExpertShard(config.hidden_size, config.moe_intermediate_size, start, end)
                for i in self.moe_layers
            }
        )

    def forward_layer(
        self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.experts[str(layer)](x, topk_weights, topk_ids)


def build_model(
    config: ModelConfig, part: str = "full", expert_range: tuple[int, int] | None = None
):
    """Model skeleton (uninitialised weights) for a part; load weights with afd.loader."""
    if part not in PARTS:
        raise ValueError(f"unknown model part {part!r}; choose from {', '.join(PARTS)}")
    if part == "experts":
        start, end = expert_range or (0, config.n_routed_experts)
        return ExpertShardModel(config, start, end)
    return MoEForCausalLM(config, part)


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device,
    extra_layers: int = 0,
) -> list:
    """Per layer: (k_cache, v_cache) [N, bs, Hkv, D] for GQA, one [N, bs, L + R] for MLA;
    `extra_layers` more at the end (the MTP drafter's layer), sharing the block tables."""
    shape, n = config.kv_cache_block_shape(block_size)
    caches = []
    for _ in range(config.num_hidden_layers + extra_layers):
        tensors = [torch.zeros(num_blocks, *shape, dtype=dtype, device=device) for _ in range(n)]
        caches.append(tensors[0] if n == 1 else tuple(tensors))
    return caches


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    shape, n = config.kv_cache_block_shape(block_size)
    numel = n * int(torch.tensor(shape).prod())
    return numel * config.num_hidden_layers * torch.empty((), dtype=dtype).element_size()
