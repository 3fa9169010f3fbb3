"""DeepSeek-V3 multi-token prediction (MTP) module: the drafter layer published after the last
decoder layer (index num_hidden_layers), used recursively to propose K draft tokens."""

from __future__ import annotations

import torch
from torch import nn

from afd.config import ModelConfig
from afd.kernels.metadata import AttentionMetadata
from afd.models.layers import RMSNorm
from afd.models.model import DecoderLayer


def num_mtp_layers(config: ModelConfig) -> int:
    """MTP layers a checkpoint's config declares (DeepSeek-V3: num_nextn_predict_layers)."""
    return int(getattr(config.hf, "num_nextn_predict_layers", 0) or 0)


def require_mtp(config: ModelConfig) -> None:
    """A clear error when MTP drafting is asked of a checkpoint that has no MTP layer."""
    if config.model_type != "deepseek_v3" or num_mtp_layers(config) < 1:
        raise ValueError(
            f"speculative method 'mtp' needs a DeepSeek-V3 checkpoint whose config has "
            f"num_nextn_predict_layers >= 1; this one ({config.model_type}) has none"
        )


class SharedHead(nn.Module):
    """`shared_head.*`: the MTP layer's own final norm and output projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(nn.Module):
    """h' = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), then a decoder block with its own
    attention (its own KV layer), then shared_head norm + head. Parameter names are those of
    `model.layers.{num_hidden_layers}.*` in the checkpoint."""

    def __init__(self, config: ModelConfig, with_experts: bool = True):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps)
        self.hnorm = RMSNorm(h, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderLayer(config, config.num_hidden_layers, with_experts)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        embeds: torch.Tensor,  # [T, H] Emb(t_{i+1}) (the main model's embedding)
        hidden: torch.Tensor,  # [T, H] pre-norm hidden of position i (main model or MTP)
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-norm output hidden [T, H] for the next recursion, logits [T, V] float32)."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        y, residual = self.block.attention_part(x, None, positions, meta, kv_cache)
        out = self.block.ffn_part(y) + residual
        return out, self.shared_head.head(self.shared_head.norm(out)).float()


def propose(
    mtp: MTPLayer,
    embed,
    hidden: torch.Tensor,  # [H] pre-norm last hidden of the target at position p
    next_token: int,  # t_{p+1}, the token the target produced at position p
    position: int,  # p: the pair (h_p, t_{p+1}) sits at the target's position p
    metas: list[AttentionMetadata],
    kv_cache,
) -> tuple[list[int], torch.Tensor]:
    """(len(metas) greedy draft tokens, their logits [K, V]) for one sequence whose MTP KV holds
    positions < `position`; step k runs one query at position + k with metas[k], and K > 1 feeds
    the layer its own output hidden and draft."""
    drafts: list[int] = []
    rows = []
    token, h = next_token, hidden[None]
    for k, meta in enumerate(metas):
        pos = torch.tensor([position + k])
        h, logits = mtp(embed(torch.tensor([token])), h, pos, meta, kv_cache)
        token = int(logits[0].argmax())
        drafts.append(token)
        rows.append(logits[0])
    return drafts, torch.stack(rows)
