"""Attention over the paged KV cache: GQA/MHA (Qwen) and absorbed MLA (DeepSeek)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afd.config import ModelConfig
from afd.kernels import ops
from afd.kernels.metadata import AttentionMetadata
from afd.models.layers import RMSNorm, RotaryEmbedding


class GQAAttention(nn.Module):
    """Grouped-query attention with optional qkv bias (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, config: ModelConfig, qkv_bias: bool, qk_norm: bool, o_bias: bool = False):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            d,
        )
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=o_bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if qk_norm else None
        self.rotary = RotaryEmbedding(config.hf, d, interleaved=False)
        self.scale = d**-0.5
        self._fused: tuple | None = None  # (weight, bias, sizes, parameter pointers)

    def _projs(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        return self.q_proj, self.k_proj, self.v_proj

    def _pointers(self) -> tuple[int, ...]:
        tensors = [t for p in self._projs() for t in (p.weight, p.bias) if t is not None]
        return tuple(t.data_ptr() for t in tensors)

    def fuse_qkv(self) -> None:
        """Concatenate the q, k and v weights (and biases) into one tensor and point the three
        layers' parameters at its rows: one GEMM per layer instead of three, no extra memory.
        Layers that are not plain nn.Linear (FP8) keep three."""
        projs = self._projs()
        if any(type(p) is not nn.Linear or (p.bias is None) != (projs[0].bias is None)
               for p in projs):  # fmt: skip
            return
        sizes = [p.out_features for p in projs]
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projs])
            bias = None if projs[0].bias is None else torch.cat([p.bias for p in projs])
            for i, p in enumerate(projs):
                p.weight = nn.Parameter(weight.split(sizes)[i], requires_grad=False)
                if bias is not None:
                    p.bias = nn.Parameter(bias.split(sizes)[i], requires_grad=False)
        self._fused = (weight, bias, sizes, self._pointers())

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k and v projections of x: one GEMM while the fused weight still backs the three
        parameters (any of them replaced or moved since fuse_qkv: three)."""
        fused = self._fused
        if fused is not None and fused[3] == self._pointers():
            return F.linear(x, fused[0], fused[1]).split(fused[2], dim=-1)
        return tuple(p(x) for p in self._projs())

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self._qkv(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k, meta.derived)
        k_cache, v_cache = kv_cache
        ops.store_kv(k, k_cache, meta.slot_mapping, v, v_cache)
        o = ops.paged_attention(q, k_cache, v_cache, meta, self.scale)  # [T, Hq, D]
        return self.o_proj(o.reshape(t, -1))


class MLAAttention(nn.Module):
    """Multi-head latent attention in the absorbed form: the cache holds the normalised latent and
    the roped key; queries are projected into latent space through kv_b_proj's key half."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hf = config.hf
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.nope, self.rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope + self.rope
        bias = bool(getattr(hf, "attention_bias", False))
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.latent + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.latent, 1e-6)
        self.kv_b_proj = nn.Linear(
            self.latent, self.num_heads * (self.nope + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=bias)
        self.rotary = RotaryEmbedding(hf, self.rope, interleaved=config.rope_interleave)
        self.scale = _mla_softmax_scale(config.rope_scaling, qk_dim)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,  # [N, bs, L + R]
    ) -> torch.Tensor:
        t = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.num_heads, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [T, L]
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])
        ops.store_kv(torch.cat([latent, k_pe[:, 0]], dim=-1), kv_cache, meta.slot_mapping)
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.latent)
        w_uk, w_uv = w_kv.split([self.nope, self.v_dim], dim=1)  # [Hq, nope, L], [Hq, v, L]
        q_latent = torch.einsum("thd,hdl->thl", q_nope, w_uk)  # [T, Hq, L]
        o_latent = ops.mla_attention(q_latent, q_pe, kv_cache, meta, self.scale)  # [T, Hq, L]
        o = torch.einsum("thl,hvl->thv", o_latent, w_uv)  # [T, Hq, v]
        return self.o_proj(o.reshape(t, -1))


def _mla_softmax_scale(rope_scaling: dict | None, qk_dim: int) -> float:
    """qk_dim^-0.5, times YaRN's mscale(mscale_all_dim)^2 as transformers does."""
    import math

    scale = qk_dim**-0.5
    if rope_scaling is not None:
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        factor = rope_scaling.get("factor", 1.0)
        if mscale_all_dim and factor > 1:
            m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scale = scale * m * m
    return scale
